"""One training run of the study (protocol v2): a task, a recipe, an N:M ratio, an lr, a seed, and
optionally a fixed switch point.

Every run trains the way models are trained: AdamW with torch's and the paper's defaults (betas
(0.9, 0.999), eps 1e-8), decoupled weight decay 0.01, the lr warmed up linearly over the first 5%
of the steps and then decayed along a cosine to 10% of its peak (a ``LambdaLR`` on the optimizer's
param groups, as any torch scheduler). With beta2 = 0.999 AutoSwitch's window is 1000 steps, so
the tasks run 3000 steps: the window fits between T_min (10%) and T_max (50%).

Recipes: ``dense`` (AdamW), ``asp`` (apex ASP: one magnitude N:M prune, then training with the mask
fixed; from scratch it trains dense for 60% of the steps first, when fine-tuning it prunes the
pretrained model at once), ``srste`` and ``step`` (the optimizer's own recipes; ``step`` uses the
default AutoSwitch). ``switch_at`` (recipe ``step`` only) fixes the switch at that percentage of
the steps instead: the switch-point sweep.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from step_kernels import STEP, AutoSwitch, sparse_param_groups
from step_kernels.reference import nm_mask, parse_sparsity
from step_kernels.targets import find_targets

from .._common import git_commit
from .tasks import TASKS, Task

RECIPES = ("dense", "asp", "srste", "step")
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
ASP_DENSE_FRACTION = 0.6  # from scratch; fine-tuning prunes the pretrained model at step 0
SWITCH_POINTS = (10, 20, 30, 40, 50)  # percent of the run: the switch-point sweep
EVAL_EVERY = 100


@dataclass(frozen=True)
class RunConfig:
    """What one run trains; ``run_id`` names its result file."""

    task: str
    recipe: str
    sparsity: Optional[str]  # None for dense
    lr: float  # the peak of the schedule
    seed: int
    switch_at: Optional[int] = None  # percent of the steps; None: AutoSwitch

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if (self.recipe == "dense") != (self.sparsity is None):
            raise ValueError("sparsity must be None exactly when recipe is 'dense'")
        if self.switch_at is not None and (self.switch_at not in SWITCH_POINTS or self.recipe != "step"):
            raise ValueError(f"switch_at must be one of {SWITCH_POINTS} with recipe 'step', got {self.switch_at!r}")

    @property
    def run_id(self) -> str:
        sparsity = self.sparsity.replace(":", "of") if self.sparsity else "dense"
        suffix = f"-switch{self.switch_at}" if self.switch_at is not None else ""
        return f"{self.task}-{self.recipe}-{sparsity}-lr{self.lr:g}-s{self.seed}{suffix}"


def lr_factor(step: int, steps: int) -> float:
    """The schedule's multiplier of the peak lr at optimizer step ``step`` (counted from 0):
    linear warm-up over ``WARMUP_FRACTION`` of the steps, then cosine decay to ``FINAL_LR_FRACTION``."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(config: RunConfig, model: torch.nn.Module, task: Task, steps: int) -> STEP:
    """The run's optimizer; a fine-tuning task's continues the pretraining AdamW state."""
    recipe = "dense" if config.recipe in ("dense", "asp") else config.recipe
    start = task.start_step(config.seed)
    if config.switch_at is not None:
        switch = start + int(config.switch_at / 100 * steps)
    else:  # AutoSwitch's default bounds, 10% and 50% of this run's own steps
        switch = AutoSwitch(min_step=start + int(0.1 * steps), max_step=start + int(0.5 * steps))
    kwargs = dict(lr=config.lr, betas=BETAS, eps=EPS, recipe=recipe, switch=switch)
    sparsity = config.sparsity or "2:4"
    adamw_state = task.adamw_state(config.seed)
    if adamw_state is not None:
        return STEP.from_adamw(model, adamw_state, sparsity=sparsity, exclude=task.exclude,
                               weight_decay=WEIGHT_DECAY, **kwargs)
    groups = sparse_param_groups(model, sparsity, exclude=task.exclude, weight_decay=WEIGHT_DECAY)
    return STEP(groups, **kwargs)


def batch_generator(seed: int) -> torch.Generator:
    """The generator of a run's training batches: every recipe of a seed sees the same batches."""
    return torch.Generator().manual_seed(1_000_003 * seed + 17)


def asp_prune(model: torch.nn.Module, task: Task, sparsity: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """ASP's one magnitude prune: zero the targets outside their N:M mask; returns (param, mask) pairs."""
    n, m = parse_sparsity(sparsity)
    masks = [(t.param, nm_mask(t.param.detach(), n, m, t.group_dim)) for t in find_targets(model, exclude=task.exclude)]
    with torch.no_grad():
        for param, mask in masks:
            param.mul_(mask)
    return masks


def train_step(task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer, schedule, generator: torch.Generator,
               masks: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
    """One optimizer and schedule step on the next batch; ``masks`` (ASP's) are reapplied after it.
    Returns the batch's loss."""
    opt.zero_grad(set_to_none=True)
    loss = task.loss(model, generator)
    loss.backward()
    opt.step()
    schedule.step()
    if masks is not None:
        with torch.no_grad():
            for param, mask in masks:
                param.mul_(mask)
    return loss


def _pattern_ok(model: torch.nn.Module, task: Task, sparsity: str) -> bool:
    n, m = parse_sparsity(sparsity)
    for target in find_targets(model, exclude=task.exclude):
        w = target.param.detach()
        if ((w != 0).movedim(target.group_dim, -1).reshape(-1, m).sum(-1) > n).any():
            return False
    return True


def train(config: RunConfig, steps: Optional[int] = None, progress=None) -> Dict:
    """Train one run and return its result (curve, final metrics, switch step, flip rates, time)."""
    commit = git_commit() or "unknown"
    task = TASKS[config.task]()
    steps = steps or task.steps
    model = task.build(config.seed)
    opt = _optimizer(config, model, task, steps)
    start_step = opt.step_count
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    asp_masks = None
    prune_at = (int(task.asp_dense_fraction * steps) if config.recipe == "asp" else None)
    gen = batch_generator(config.seed)
    curve, flips = [], []
    begin = time.perf_counter()
    for step in range(1, steps + 1):
        if config.recipe == "asp" and asp_masks is None and step > prune_at:
            asp_masks = asp_prune(model, task, config.sparsity)
        loss = train_step(task, model, opt, schedule, gen, asp_masks)
        flip_rate = opt.stats()["flip_rate"] if config.recipe in ("srste", "step") else None
        if flip_rate is not None:
            flips.append((step, flip_rate))
        if step % EVAL_EVERY == 0 or step == steps:
            metrics = task.evaluate(model)
            curve.append({"step": step, "train_loss": loss.item(), **metrics})
            if progress:
                elapsed = time.perf_counter() - begin
                left = elapsed / step * (steps - step)
                progress(f"    {config.run_id} step {step}/{steps} {task.metric} {metrics[task.metric]:.4f}  "
                         f"{step / elapsed:.1f} steps/s, ETA {int(left // 60)}:{int(left % 60):02d}")
    wall = time.perf_counter() - begin
    final_stats = opt.stats()
    switch = opt.switch if config.recipe == "step" and isinstance(opt.switch, AutoSwitch) else None
    return {
        "config": asdict(config), "run_id": config.run_id, "protocol": 2, "steps": steps,
        "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
        "schedule": {"warmup_fraction": WARMUP_FRACTION, "final_lr_fraction": FINAL_LR_FRACTION},
        "metric": task.metric, "final": curve[-1], "curve": curve,
        "flip_rate": flips[::10] + ([flips[-1]] if flips and (len(flips) - 1) % 10 else []),
        "start_step": start_step,
        "switch_step": None if opt.switch_step is None else opt.switch_step - start_step,
        "precond_floor_count": final_stats["precond_floor_count"] if config.recipe == "step" else None,
        "z_history": final_stats["z_history"] if config.recipe == "step" else None,
        "autoswitch": None if switch is None else {"rule": switch.rule, "threshold": switch.threshold},
        "pattern_ok": _pattern_ok(model, task, config.sparsity) if config.sparsity else None,
        "wall_s": wall, "threads": torch.get_num_threads(), "backend": opt.backend,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "corpus_bytes": getattr(task, "corpus_bytes", None), "commit": commit,
    }


def result_path(results_dir: str, config: RunConfig) -> str:
    """Where the result of ``config`` is stored: ``<results_dir>/<task>/<run_id>.json``."""
    return os.path.join(results_dir, config.task, f"{config.run_id}.json")


def claim_path(results_dir: str, config: RunConfig) -> str:
    """The lock file of ``config``'s run, ``<result>.claim``: a worker holds an exclusive
    ``flock`` on it while it trains the run. The kernel drops the lock when the worker ends, however
    it ends, so a killed worker leaves no claim behind."""
    return result_path(results_dir, config) + ".claim"


@contextlib.contextmanager
def _locked(path: str, create: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` for the ``with`` block when no other open of it holds
    one; yields whether this process got it (False too when ``path`` is missing and not
    ``create``)."""
    import fcntl  # POSIX only, imported here so that the study's other code imports anywhere

    if create:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)  # flock needs no write access
        except FileNotFoundError:
            fd = None
    if fd is None:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)  # releases the lock


def is_claimed(results_dir: str, config: RunConfig) -> bool:
    """Whether a worker is training ``config`` now (its claim is locked)."""
    path = claim_path(results_dir, config)
    with _locked(path, create=False) as got:  # got is False for a missing claim too
        return not got and os.path.exists(path)


def run_if_missing(config: RunConfig, results_dir: str, progress=None) -> Optional[Dict]:
    """Train ``config`` unless its result file exists or another worker has claimed it; write
    the result atomically. Workers sharing ``results_dir`` on one machine never train the same run
    twice: each holds the run's claim (:func:`claim_path`) while it trains it, and checks for the
    result again once it holds it."""
    path = result_path(results_dir, config)
    if os.path.exists(path):
        return None
    with _locked(claim_path(results_dir, config)) as got:
        if not got or os.path.exists(path):
            return None
        result = train(config, progress=progress)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # a crash must not leave an empty result that every reader trips on
        os.replace(tmp, path)
        # Done: the result exists before the claim goes, so a worker that locks the claim after
        # this sees the result. A failed run's claim stays, unlocked.
        with contextlib.suppress(FileNotFoundError):
            os.remove(claim_path(results_dir, config))
        return result
