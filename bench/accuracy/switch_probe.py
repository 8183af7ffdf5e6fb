"""What happens at STEP's switch: one dense run forked into four continuations (a diagnostic, not
part of the study's protocol; it tunes nothing).

The study's TinyGPT runs at 1:8 show STEP's validation loss jumping at the switch far above where
SR-STE is, and recovering slowly. The switch does two things at once: the N:M mask starts to act
(phase 1 is dense) and v is frozen. This probe separates them. It trains one dense run (AdamW with
the study's defaults and schedule) to step ``at``, then continues the same model, the same AdamW
state (through :meth:`step_kernels.STEP.from_adamw`) and the same batches four ways for ``after``
steps:

- ``dense``: no mask (the reference),
- ``asp``: magnitude N:M prune at the fork, then the mask fixed (live v),
- ``srste``: SR-STE with live v (masks from the fork on),
- ``step``: STEP's phase 2: SR-STE with v frozen at the fork.

``srste`` and ``step`` differ only in v, so the gap between them is what the frozen
preconditioner does once the mask acts. Each branch also records its gradient energy (per step,
the targets' summed g^2 over their summed bias-corrected v at the fork: about 1 while training
goes on as before the fork; Adam's step on a weight scales with g / sqrt(v_hat), so an energy of
E makes the frozen preconditioner's steps about sqrt(E) times the fork's) and, with live v, how
far the summed v_hat has grown by the end.

    python -m bench.accuracy.switch_probe --sparsity 1:8 --seed 0     # one fork, ~4 min at 1 thread
    python -m bench.accuracy.study report                            # the table in REPORT.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from typing import Dict, List, Optional

import torch

from step_kernels import STEP
from step_kernels.reference import parse_sparsity
from step_kernels.targets import find_targets

from .._common import git_commit
from .run import BETAS, EPS, WEIGHT_DECAY, asp_prune, batch_generator, lr_factor, train_step
from .tasks import TASKS

BRANCHES = ("dense", "asp", "srste", "step")
EVAL_AFTER = (10, 25, 50, 100, 200, 300)  # steps after the fork at which every branch is evaluated
# Not under results/: the study reads every results/*/*.json as one of its runs.
PROBE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes")


def probe_path(task: str, sparsity: str, seed: int, at: int, results_dir: str = PROBE_DIR) -> str:
    """Where the probe of (task, sparsity, seed, fork step) is stored."""
    return os.path.join(results_dir, f"{task}-{sparsity.replace(':', 'of')}-s{seed}-at{at}.json")


def _continue(branch: str, task, model: torch.nn.Module, adamw_state: Dict, v_hat_fork: float, sparsity: str,
              lr: float, at: int, steps: int, after: int, generator_state: torch.Tensor, progress=None) -> Dict:
    """Train ``model`` (a copy, changed in place) ``after`` steps from the fork as ``branch``;
    ``v_hat_fork`` is the fork's bias-corrected v summed over the targets, the scale of the
    gradient energy and v growth it records."""
    recipe = {"dense": "dense", "asp": "dense", "srste": "srste", "step": "step"}[branch]
    extra = {"switch": at} if recipe == "step" else {}
    opt = STEP.from_adamw(model, adamw_state, sparsity=sparsity, exclude=task.exclude, weight_decay=WEIGHT_DECAY,
                          lr=lr, betas=BETAS, eps=EPS, recipe=recipe, **extra)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(at + s, steps))
    masks = asp_prune(model, task, sparsity) if branch == "asp" else None
    gen = torch.Generator()
    gen.set_state(generator_state)
    targets = [t.param for t in find_targets(model, exclude=task.exclude)]
    grad_energy: List[float] = []  # per step: sum of g^2 over the targets / the fork's sum of v_hat
    curve: List[Dict] = []
    if branch == "asp":
        curve.append({"after": 0, **task.evaluate(model)})  # pruned, not yet trained
    flips: List[float] = []
    for k in range(1, after + 1):
        loss = train_step(task, model, opt, schedule, gen, masks)
        grad_energy.append(sum(float(p.grad.double().square().sum()) for p in targets) / v_hat_fork)
        flip_rate = opt.stats()["flip_rate"] if recipe != "dense" else None
        if flip_rate is not None:  # None at a mask's first step (nothing to flip from)
            flips.append(flip_rate)
        if k in EVAL_AFTER or k == after:
            curve.append({"after": k, "train_loss": loss.item(), **task.evaluate(model)})
            if progress:
                progress(f"    {branch:<6} +{k:<4} {task.metric} {curve[-1][task.metric]:.4f}")
    return {"curve": curve, "flip_rate_mean": sum(flips) / len(flips) if flips else None,
            "flip_rate_first10": sum(flips[:10]) / len(flips[:10]) if flips else None,
            "grad_energy_first10": sum(grad_energy[:10]) / len(grad_energy[:10]),
            "grad_energy_mean": sum(grad_energy) / len(grad_energy),
            "v_hat_growth": _v_hat_sum(opt, targets) / v_hat_fork if "exp_avg_sq" in opt.state[targets[0]] else None,
            "switch_step": opt.switch_step, "phase": opt.phase}


def _v_hat_sum(opt: torch.optim.Optimizer, params: List[torch.Tensor]) -> float:
    """The bias-corrected second moment ``v / (1 - beta2^t)`` of ``opt`` summed over ``params``."""
    total = 0.0
    for param in params:
        state = opt.state[param]
        total += float(state["exp_avg_sq"].double().sum()) / (1 - BETAS[1] ** float(state["step"]))
    return total


def probe(task_name: str, sparsity: str, seed: int, lr: float, at: int, after: int, progress=None) -> Dict:
    """Train dense to step ``at``, then each of ``BRANCHES`` for ``after`` steps; the result dict."""
    task = TASKS[task_name]()
    if task.adamw_state(seed) is not None:
        raise ValueError(f"task {task_name!r} starts from a pretrained AdamW state; the probe forks from-scratch tasks")
    if not 1 <= at < task.steps or not 1 <= after <= task.steps - at:
        raise ValueError(f"need 1 <= at < {task.steps} and 1 <= after <= steps - at, got at={at}, after={after}")
    parse_sparsity(sparsity)
    begin = time.perf_counter()
    model = task.build(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, task.steps))
    gen = batch_generator(seed)  # the study's batch order
    for _ in range(at):
        train_step(task, model, opt, schedule, gen)
    fork = task.evaluate(model)
    if progress:
        progress(f"    fork at step {at}: {task.metric} {fork[task.metric]:.4f}")
    adamw_state = opt.state_dict()
    v_hat_fork = _v_hat_sum(opt, [t.param for t in find_targets(model, exclude=task.exclude)])
    branches = {}
    for branch in BRANCHES:
        branches[branch] = _continue(branch, task, copy.deepcopy(model), adamw_state, v_hat_fork, sparsity, lr, at,
                                     task.steps, after, gen.get_state(), progress)
    return {
        "task": task_name, "sparsity": sparsity, "seed": seed, "lr": lr, "at": at, "after": after,
        "steps": task.steps, "metric": task.metric, "fork": fork, "v_hat_fork": v_hat_fork, "branches": branches,
        "wall_s": time.perf_counter() - begin, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "commit": git_commit() or "unknown",
    }


def load_probes(results_dir: str = PROBE_DIR) -> List[Dict]:
    """Every stored probe, sorted by task, sparsity, seed and fork step."""
    if not os.path.isdir(results_dir):
        return []
    probes = []
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                probes.append(json.load(f))
    return sorted(probes, key=lambda p: (p["task"], p["sparsity"], p["seed"], p["at"]))


def probe_table(probes: List[Dict]) -> List[str]:
    """Markdown: one table per metric (task), a row per probe and branch, the metric at each
    evaluation after the fork."""
    lines: List[str] = []
    for metric in sorted({p["metric"] for p in probes}):
        lines += ([""] if lines else []) + _metric_table([p for p in probes if p["metric"] == metric])
    return lines


def _metric_table(probes: List[Dict]) -> List[str]:
    afters = sorted({c["after"] for p in probes for b in p["branches"].values() for c in b["curve"]})
    metric = probes[0]["metric"]
    lines = [f"| task | N:M | seed | fork: step, {metric} | branch | " + " | ".join(f"+{a}" for a in afters)
             + " | flip rate, first 10 / all | gradient energy, first 10 / all | v_hat growth |",
             "|---|---|---|---|---|" + "---|" * len(afters) + "---|---|---|"]
    for p in probes:
        for name in BRANCHES:
            b = p["branches"][name]
            at = {c["after"]: c[p["metric"]] for c in b["curve"]}
            cells = [f"{at[a]:.4f}" if a in at else "" for a in afters]
            flips = ("-" if b["flip_rate_mean"] is None
                     else f"{b['flip_rate_first10']:.2e} / {b['flip_rate_mean']:.2e}")
            growth = "-" if b["v_hat_growth"] is None else f"{b['v_hat_growth']:.2f}"
            lines.append(f"| {p['task']} | {p['sparsity']} | {p['seed']} | {p['at']}, {p['fork'][p['metric']]:.4f} "
                         f"| {name} | " + " | ".join(cells) + f" | {flips} | {b['grad_energy_first10']:.2f} / "
                         f"{b['grad_energy_mean']:.2f} | {growth} |")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="lm", choices=[t for t in TASKS if t != "ft"])
    parser.add_argument("--sparsity", default="1:8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=4e-3, help="peak lr (default: the lm task's tuned lr)")
    parser.add_argument("--at", type=int, default=1000, help="fork step (AutoSwitch chose 1005-1074 on lm)")
    parser.add_argument("--after", type=int, default=max(EVAL_AFTER))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default=PROBE_DIR)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = probe(args.task, args.sparsity, args.seed, args.lr, args.at, args.after, progress=print)
    path = probe_path(args.task, args.sparsity, args.seed, args.at, args.results)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print("\n".join(probe_table([result])))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
