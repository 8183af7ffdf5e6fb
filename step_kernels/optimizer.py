"""The STEP optimizer (docs/design.md section 4): one class, three recipes.

- ``"step"``: dense AdamW until the switch, then N:M mask learning with the frozen preconditioner.
- ``"srste"``: masked from step 1 with Adam's live second moment (the baseline STEP beats).
- ``"dense"``: plain AdamW; ``sparsity`` keys are ignored.

The model parameter always holds what the forward pass uses: ``w`` while dense, ``mask(w) * w``
in the model dtype once masked, so autograd yields the straight-through gradient with no hooks.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops, reference
from .reference import parse_sparsity
from .targets import sparse_param_groups

__all__ = ["STEP", "AutoSwitch"]

RECIPES = ("step", "srste", "dense")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECOND_DTYPES = (torch.float32, torch.bfloat16)
FP32 = (torch.float32,)
# Keys kept identical in every param group: the optimizer's global state. They live in the param
# groups so torch.distributed.checkpoint saves and restores them.
GLOBAL_KEYS = ("recipe", "step", "phase", "switch_step", "z_history", "precond_floor_count")
# The hyper-parameter and N:M keys every param group carries (the constructor's defaults).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "srste_decay", "sparsity", "nm_dim")


class StateKey(NamedTuple):
    """What :meth:`STEP.load_state_dict` accepts for one per-parameter state key.

    ``required(frozen, needs_master)`` says whether the key must be present (True), may be
    present (None) or must be absent (False) for a parameter that is (or not) a target past the
    switch of recipe "step" (``frozen``) and that needs (or not) an fp32 master (bf16/fp16 model,
    or a masked target). ``kind`` is what the key holds: a tensor of the parameter's shape in that
    dtype, ``"precond"`` for a tensor in the optimizer's ``precond_dtype``, or ``int`` for a
    python int >= 0.
    """

    required: Callable[[bool, bool], Optional[bool]]
    kind: Union[torch.dtype, str, type]


# Per-parameter state (docs/design.md section 4): one line per key, so a new key is one line here.
STATE_KEYS: Dict[str, StateKey] = {
    "exp_avg": StateKey(lambda frozen, needs_master: True, torch.float32),
    "exp_avg_sq": StateKey(lambda frozen, needs_master: not frozen, torch.float32),
    "precond": StateKey(lambda frozen, needs_master: frozen, "precond"),
    "master": StateKey(lambda frozen, needs_master: True if needs_master else None, torch.float32),
    "step": StateKey(lambda frozen, needs_master: True, int),  # the parameter's own count, as AdamW's
}


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    if type(t) is Tensor or type(t) is torch.nn.Parameter:  # the common case, without a getattr miss
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed)."""
    return callable(getattr(t, "to_local", None))


def _loaded_copy(value: Tensor, p: Tensor) -> Tensor:
    """A loaded state tensor, copied to ``p``'s device in a contiguous layout (dtype kept)."""
    copied = value.to(device=p.device, copy=True)
    return copied if _local(copied).is_contiguous() else copied.contiguous()


def _fp32_master(p: Tensor) -> Tensor:
    """A contiguous fp32 copy of ``p`` (whatever ``p``'s strides: the kernels take contiguous state)."""
    return p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _contiguous_work(t: Tensor, writebacks: List[Tuple[Tensor, Tensor]]) -> Tensor:
    """``t`` itself when contiguous; else a contiguous copy, recorded in ``writebacks`` as
    ``(t, copy)`` so the step writes it back after its kernels (docs/design.md section 4)."""
    if t.is_contiguous():
        return t
    work = t.contiguous()
    writebacks.append((t, work))
    return work


class AutoSwitch:
    """When to leave the precondition phase (docs/design.md section 6).

    Each phase-1 step records a statistic ``Z_t`` of how much Adam's second moment v moved in
    that step, summed over every target coordinate (``A_t = sum |v_t - v_{t-1}|``,
    ``S_t = sum v_t``, ``n`` coordinates):

    - ``rule="relative"`` (default): ``Z_t = A_t / ((1 - beta2) * S_t)``. It does not depend on the
      gradient scale (a loss multiplied by any constant switches at the same step), and a v that
      has settled on ``E[g**2]`` keeps it at or below 2 whatever the gradient distribution, so the
      default threshold 2.0 means "v moves no more than a settled EMA does" and needs no tuning
      per task. v filling up from zero (the first ~``1 / (1 - beta2)`` steps) or chasing a drifting
      gradient scale keeps it above.
    - ``rule="absolute"``: ``Z_t = A_t / n`` with threshold 1e-8: the public reimplementation's
      rule (the paper's Algorithm 2 as far as it is known). Where it switches depends on the
      gradient scale (loss scale, model width, lr): on one task it fires at ``T_min``, on another
      never.

    The switch happens at the end of step t when the window of the last
    ``round(1 / (1 - beta2))`` values is full, ``t >= min_step`` and its mean is ``<= threshold``;
    or when ``t >= max_step``. ``min_step``/``max_step`` default to 10% and 50% of the
    optimizer's ``total_steps``. The history of Z is ``opt.stats()["z_history"]``. A NaN gradient
    stepped without a GradScaler makes v NaN for good: every later Z is NaN, no window decides,
    only ``max_step`` switches, and the optimizer warns once (``RuntimeWarning``).
    """

    DEFAULT_THRESHOLDS = {"relative": 2.0, "absolute": 1e-8}

    def __init__(self, min_step: Optional[int] = None, max_step: Optional[int] = None,
                 threshold: Optional[float] = None, rule: str = "relative"):
        for name, value in (("min_step", min_step), ("max_step", max_step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"AutoSwitch: {name} must be None or an int >= 0, got {value!r}")
        if min_step is not None and max_step is not None and max_step < min_step:
            raise ValueError(f"AutoSwitch: max_step ({max_step}) must be >= min_step ({min_step})")
        if rule not in reference.AUTOSWITCH_RULES:
            raise ValueError(f"AutoSwitch: rule must be one of {reference.AUTOSWITCH_RULES}, got {rule!r}")
        if threshold is None:
            threshold = self.DEFAULT_THRESHOLDS[rule]
        if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold >= 0
                and math.isfinite(threshold)):
            raise ValueError(f"AutoSwitch: threshold must be a finite number >= 0, got {threshold!r}")
        self.min_step = min_step
        self.max_step = max_step
        self.threshold = float(threshold)
        self.rule = rule

    def __repr__(self) -> str:
        return (f"AutoSwitch(min_step={self.min_step}, max_step={self.max_step}, "
                f"threshold={self.threshold}, rule={self.rule!r})")


class _Hyper(NamedTuple):
    """A group's hyper-parameters at this step, named as :func:`reference.step_scalars` takes them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    srste_decay: float


class _BucketKey(NamedTuple):
    """What the tensors of one backend call share: flags, N:M, hyper-parameters, step count, dtypes."""

    masked: bool
    frozen: bool  # frozen_v: the second moment is the frozen preconditioner
    stats: bool  # compute_stats: sum the AutoSwitch statistics
    n: int
    m: int
    hyper: _Hyper
    own_step: int  # the parameters' own step count, this step included (their bias corrections)
    grad_dtype: torch.dtype
    out_dtype: Optional[torch.dtype]  # the model parameter's, or None when the master is the parameter
    second_dtype: torch.dtype


class _Bucket:
    """Tensors that one backend call steps together (same :class:`_BucketKey`)."""

    __slots__ = ("weights", "grads", "exp_avgs", "seconds", "outs", "group_dims", "numel")

    def __init__(self):
        self.weights: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.exp_avgs: List[Tensor] = []
        self.seconds: List[Tensor] = []
        self.outs: List[Optional[Tensor]] = []
        self.group_dims: List[int] = []
        self.numel = 0


class STEP(torch.optim.Optimizer):
    """AdamW that learns N:M sparsity masks: STEP, SR-STE and dense recipes in one optimizer.

    Args:
        params: parameters or param groups; groups may carry ``sparsity`` (``"N:M"`` or None) and
            ``nm_dim`` (the dim the groups of M run along: 1 for ``nn.Linear``, 0 for
            ``Conv1D``). :func:`step_kernels.sparse_param_groups` builds them from a model.
        lr, betas, eps: as ``torch.optim.AdamW``, with its defaults.
        weight_decay: decoupled decay as in ``torch.optim.AdamW``, on every parameter of a group.
            The default is 0.0, not AdamW's 0.01 (docs/design.md section 4): pass 0.01 for AdamW's.
        recipe: ``"step"``, ``"srste"`` or ``"dense"``.
        srste_decay: the SR-STE decay on pruned weights (0 gives plain STE).
        switch: None (a fresh :class:`AutoSwitch`), an :class:`AutoSwitch`, or an int k >= 1
            (phase 2 starts at step k + 1). Only for ``recipe="step"``.
        total_steps: sets AutoSwitch's default bounds to 10% and 50% of it.
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``; an explicit backend never
            falls back silently. ``opt.backend`` is the one in use.
        precond_eps: floor of the frozen preconditioner ``1 / (sqrt(v_hat) + precond_eps)``.
        precond_dtype: ``torch.float32`` or ``torch.bfloat16``.

    Public state: ``opt.phase`` (``"dense"`` | ``"sparse"``), ``opt.switch_step``, ``opt.backend``,
    ``opt.stats()``.

    Steps and counts, as ``torch.optim.AdamW``: a parameter without a grad is skipped and its own
    step count (``state["step"]``, which drives its bias corrections) does not advance; a step
    in which no parameter has a grad changes nothing and counts nowhere (not in the global step,
    the switch or AutoSwitch). Non-contiguous parameters (transposed views, channels_last) work:
    their state is contiguous and the step writes the result back. A step validates every
    hyper-parameter, grad and state tensor it needs before its first kernel runs: bad input
    raises ``ValueError`` naming the group or parameter and changes nothing.

    Targets without a settled v (docs/design.md section 7): at the switch, a target whose v is zero
    everywhere (no grad, or only zero grads, in phase 1: a branch used later, a layer unfrozen
    later) is not frozen; it keeps its v, restarts its own step count, takes masked steps with
    live v (the SR-STE update) and is frozen at the end of the step at which it has taken
    ``switch_step`` steps of its own, the same number of Adam steps the other targets had before
    their freeze. A sparse group added after the switch starts the same way. Inside a frozen
    tensor, a coordinate whose v is exactly 0 gets the preconditioner of the tensor's
    root-mean-square v (:func:`step_kernels.reference.unfed_preconditioner`), not
    ``1 / precond_eps``.

    The defaults of ``srste_decay``, ``precond_eps``, ``precond_dtype`` and the bias-corrected
    frozen v were kept after the ablations of ``bench/accuracy`` (docs/optimizer.md, bench/accuracy/REPORT_v1.md):
    plain STE was worse; raw v, ``precond_eps`` 1e-8 and a bf16 preconditioner were within seed
    noise. AutoSwitch's default rule is scale-free (see :class:`AutoSwitch`); check
    ``opt.switch_step`` and ``opt.stats()["z_history"]``, or pass ``switch=k`` to fix the step.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        recipe: str = "step",
        srste_decay: float = 2e-4,
        switch: Union[None, int, AutoSwitch] = None,
        total_steps: Optional[int] = None,
        backend: str = "auto",
        precond_eps: float = 1e-6,
        precond_dtype: torch.dtype = torch.float32,
    ):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if backend not in ("auto",) + ops.BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + ops.BACKENDS}, got {backend!r}")
        if not (isinstance(precond_eps, (int, float)) and precond_eps > 0 and math.isfinite(precond_eps)):
            raise ValueError(f"precond_eps must be a finite number > 0, got {precond_eps!r}")
        if precond_dtype not in PRECOND_DTYPES:
            raise ValueError(f"precond_dtype must be one of {PRECOND_DTYPES}, got {precond_dtype!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be None or an int >= 1, got {total_steps!r}")
        if switch is None:
            switch = AutoSwitch()
        elif isinstance(switch, bool) or not isinstance(switch, (int, AutoSwitch)):
            raise ValueError(f"switch must be None, an AutoSwitch or an int >= 1, got {switch!r}")
        elif isinstance(switch, int) and switch < 1:
            raise ValueError(f"switch must be an int >= 1 (phase 2 starts at step switch + 1), got {switch}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        srste_decay=srste_decay, sparsity=None, nm_dim=None)
        self._check_hyper(defaults, "")
        self.recipe = recipe
        self.switch = switch
        self.total_steps = total_steps
        self.precond_eps = float(precond_eps)
        self.precond_dtype = precond_dtype
        self._requested_backend = backend
        self.backend: Optional[str] = None
        self._last_flips: Optional[Tensor] = None
        self._last_masked_numel = 0
        self._last_launches = 0
        # Every group is validated before any state is created or any target masked: a bad group
        # leaves the model untouched (add_param_group creates state at once after construction).
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p, group)

    # -----------------------------------------------------------------------------------------
    # configuration and state creation
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _check_hyper(group: Dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
            lr = lr.item()
        if not (isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"{where}lr must be a finite number >= 0, got {group['lr']!r}")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
        for key in ("eps", "weight_decay", "srste_decay"):
            value = group[key]
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{where}{key} must be a finite number >= 0, got {value!r}")

    def _param_name(self, group: Dict[str, Any], group_index: int, index: int) -> str:
        names = group.get("param_names")
        if names is not None and index < len(names):
            return names[index]
        return f"param_groups[{group_index}]['params'][{index}]"

    def _is_target(self, group: Dict[str, Any]) -> bool:
        return self.recipe != "dense" and group.get("sparsity") is not None

    def _validate_group(self, group: Dict[str, Any], gi: int) -> None:
        where = f"param_groups[{gi}]: "
        self._check_hyper(group, where)
        sparsity = group.get("sparsity")
        names = group.get("param_names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"{where}param_names has {len(names)} entries for {len(group['params'])} params")
        if sparsity is not None:
            n, m = parse_sparsity(sparsity, f"{where}sparsity")
        seen = set()
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, gi, i)
            if id(p) in seen:
                raise ValueError(f"{name}: appears twice in the group (it would be stepped twice per step)")
            seen.add(id(p))
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(f"{name}: dtype {p.dtype} is not supported; use one of {PARAM_DTYPES}")
            if sparsity is None or self.recipe == "dense":
                continue
            if p.dim() != 2:
                raise ValueError(f"{name}: N:M targets must be 2-D weights, got shape {tuple(p.shape)}")
            dim = group.get("nm_dim")
            dim = 1 if dim is None else dim
            if dim not in (0, 1, -1, -2):
                raise ValueError(f"{name}: nm_dim must be 0 or 1 for a 2-D weight, got {group.get('nm_dim')!r}")
            size = _local(p).shape[dim]
            if size % m != 0:
                raise ValueError(f"{name}: input size {size} (dim {dim % 2} of shape {tuple(_local(p).shape)}) "
                                 f"is not divisible by M={m} of sparsity {sparsity!r}")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (validated, state created eagerly; targets masked now for "srste")."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            self._validate_group(group, gi)
            devices = {_local(p).device for g in self.param_groups for p in g["params"]}
            if len(devices) > 1:
                raise ValueError(f"param_groups[{gi}]: all parameters must be on one device, "
                                 f"got {sorted(map(str, devices))}")
            if self.backend is None and group["params"]:
                self.backend = ops.resolve_backend(self._requested_backend, next(iter(devices)))
        except Exception:
            self.param_groups.pop()
            raise
        source = self.param_groups[0]
        for key in GLOBAL_KEYS:
            if gi == 0:
                group[key] = {"recipe": self.recipe, "step": 0, "phase": "dense", "switch_step": None,
                              "z_history": [], "precond_floor_count": 0}[key]
            else:
                group[key] = source[key]  # z_history: one list, shared by every group
        if group["sparsity"] is not None:
            group["nm_dim"] = 1 if group.get("nm_dim") is None else group["nm_dim"] % 2
        if getattr(self, "_building", False):
            return
        with torch.no_grad():
            for p in group["params"]:
                self._init_state(p, group)

    def _masked_now(self, group: Dict[str, Any]) -> bool:
        if not self._is_target(group):
            return False
        return self.recipe == "srste" or group["phase"] == "sparse"

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> None:
        state = self.state[p]
        if state:
            return
        # The parameter's own step count, as torch.optim.AdamW's: it drives its bias corrections and
        # counts only the steps in which it had a grad (a Python int: no device, no tensor op per step).
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        # A group added after the switch starts with live v too: it is frozen once it has had
        # switch_step steps of its own (docs/design.md section 7), never with the p of v = 0.
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        masked = self._masked_now(group)
        if p.dtype != torch.float32 or masked:
            state["master"] = _fp32_master(p)
        if masked:
            self._write_masked(p, state["master"], group)

    def _write_masked(self, p: Tensor, master: Tensor, group: Dict[str, Any]) -> None:
        """Write the N:M-masked ``master`` into the model parameter ``p`` (in ``p``'s dtype).

        The selection is the optimizer's backend's prune (:func:`step_kernels.ops.nm_prune`),
        bit-identical on every backend and, on "cpu" and "triton", without the reference's
        O(M^2) temporaries per element: this runs on every target at once at the switch.
        """
        n, m = parse_sparsity(group["sparsity"])
        pruned, _ = ops.nm_prune(_local(master), n, m, group["nm_dim"], backend=self.backend)
        _local(p).copy_(pruned)

    # -----------------------------------------------------------------------------------------
    # public state
    # -----------------------------------------------------------------------------------------

    @property
    def _globals(self) -> Dict[str, Any]:
        return self.param_groups[0]

    @property
    def phase(self) -> str:
        """``"dense"`` before the switch (and always for recipe "dense"), ``"sparse"`` after it.

        Recipe ``"srste"`` is masked from the start, so its phase is ``"sparse"``.
        """
        if self.recipe == "srste":
            return "sparse"
        return self._globals["phase"]

    @property
    def switch_step(self) -> Optional[int]:
        """The step k at whose end the switch happened (phase 2 starts at k + 1), or None."""
        return self._globals["switch_step"]

    @property
    def step_count(self) -> int:
        """The global step counter t (steps taken; skipped steps do not count)."""
        return self._globals["step"]

    def _set_global(self, key: str, value: Any) -> None:
        for group in self.param_groups:
            group[key] = value

    def _targets(self):
        for gi, group in enumerate(self.param_groups):
            if self._is_target(group):
                for i, p in enumerate(group["params"]):
                    yield self._param_name(group, gi, i), p, group

    def stats(self) -> Dict[str, Any]:
        """What the optimizer did: ``flip_rate`` of the last step (fraction of target coordinates
        whose mask changed; None before any masked step), ``z_history`` (AutoSwitch's Z per
        phase-1 step), ``sparsity`` (fraction of zeros over all targets' model parameters, now),
        ``precond_floor_count`` (coordinates of the targets frozen at the switch whose
        sqrt(v_hat) was below ``precond_eps``), ``kernel_launches`` (in the last step), plus ``phase``, ``step``,
        ``switch_step`` and ``backend``."""
        flip_rate = None
        if self._last_flips is not None and float(self._last_masked_numel):
            flip_rate = float(self._last_flips.item()) / float(self._last_masked_numel)
        zeros = total = 0
        with torch.no_grad():
            for _, p, _ in self._targets():
                local = _local(p)
                zeros += int((local == 0).sum().item())
                total += local.numel()
        return {
            "flip_rate": flip_rate,
            "z_history": list(self._globals["z_history"]),
            "sparsity": zeros / total if total else 0.0,
            "precond_floor_count": self._globals["precond_floor_count"],
            "kernel_launches": self._last_launches,
            "phase": self.phase,
            "step": self.step_count,
            "switch_step": self.switch_step,
            "backend": self.backend,
        }

    # -----------------------------------------------------------------------------------------
    # the step
    # -----------------------------------------------------------------------------------------

    def _check_param(self, where: Tuple[Dict[str, Any], int, int], p: Tensor, grad: Tensor, state: Dict[str, Any],
                     masked: bool, frozen: bool) -> int:
        """Everything the step needs of one parameter, its grad and its state; raises
        ``ValueError`` naming the parameter (``where`` is its group, group index and index; the
        step has not changed anything yet). Returns the parameter's own step count."""
        try:
            return self._check_param_unnamed(p, grad, state, masked, frozen)
        except ValueError as exc:
            raise ValueError(f"{self._param_name(*where)}: {exc}") from None

    @staticmethod
    def _check_param_unnamed(p: Tensor, grad: Tensor, state: Dict[str, Any], masked: bool, frozen: bool) -> int:
        """:meth:`_check_param` without the name (formatted only when something is wrong)."""
        shape, device = p.shape, _local(p).device
        if p.dtype not in PARAM_DTYPES:
            raise ValueError(f"dtype {p.dtype} is not supported; use one of {PARAM_DTYPES}")
        if grad.is_sparse:
            raise ValueError("sparse gradients are not supported")
        if grad.shape != shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} != param shape {tuple(shape)}")
        if grad.dtype not in PARAM_DTYPES:
            raise ValueError(f"grad dtype {grad.dtype} is not supported; use one of {PARAM_DTYPES}")
        if grad.device != p.device:
            raise ValueError(f"grad is on {grad.device} but the param is on {p.device}")
        count = state.get("step")
        if type(count) is not int or count < 0:
            raise ValueError(f"state 'step' must be an int >= 0 (the parameter's own step count), "
                             f"got {count!r}")
        second = ("precond", PRECOND_DTYPES) if frozen else ("exp_avg_sq", FP32)
        needed = (("exp_avg", FP32), second, ("master", FP32)) if masked or p.dtype != torch.float32 else \
            (("exp_avg", FP32), second)
        for key, dtypes in needed:
            value = state.get(key)
            if not isinstance(value, Tensor):
                raise ValueError(f"state has no {key!r} tensor; this step needs "
                                 f"{sorted(k for k, _ in needed)}")
            if value.dtype not in dtypes:
                raise ValueError(f"state {key!r} has dtype {value.dtype}, expected one of {dtypes}")
            if value.shape != shape:
                raise ValueError(f"state {key!r} has shape {tuple(value.shape)}, param has {tuple(shape)}")
            if _local(value).device != device:
                raise ValueError(f"state {key!r} is on {_local(value).device}, the param on {device} "
                                 "(move the optimizer state with the model)")
        return count

    def _collect(self, autoswitch: bool):
        """Validate everything this step needs, then group its work into backend calls.

        Raises before anything changes: hyper-parameters of every group (as schedulers left
        them), every grad, every state tensor, the backend for the parameters' device. Returns
        ``(buckets, stepped, writebacks)``: the backend calls, the states of the parameters that
        take this step, and ``(tensor, contiguous copy)`` pairs to write back after the kernels.
        ``autoswitch``: whether this step feeds AutoSwitch (its targets sum the statistics).
        """
        buckets: Dict[_BucketKey, _Bucket] = defaultdict(_Bucket)
        stepped: List[Dict[str, Any]] = []
        writebacks: List[Tuple[Tensor, Tensor]] = []
        devices: Dict[torch.device, str] = {}
        for gi, group in enumerate(self.param_groups):
            where = f"param_groups[{gi}]: "
            self._check_hyper(group, where)
            target = self._is_target(group)
            masked = self._masked_now(group)
            stats = target and not masked and autoswitch
            n, m = parse_sparsity(group["sparsity"], f"{where}sparsity") if masked else (0, 0)
            beta1, beta2 = group["betas"]
            lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
            hyper = _Hyper(float(lr), float(beta1), float(beta2), float(group["eps"]),
                           float(group["weight_decay"]), float(group["srste_decay"]))
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                # A target of recipe "step" is frozen once it holds a preconditioner; until then
                # (no settled v at the switch, or added after it) it steps with live v.
                frozen = masked and self.recipe == "step" and "precond" in state
                own_step = self._check_param((group, gi, i), p, grad, state, masked, frozen) + 1
                devices.setdefault(_local(p).device, (group, gi, i))
                master = state.get("master")
                second = state["precond"] if frozen else state["exp_avg_sq"]
                out = p if master is not None else None
                key = _BucketKey(masked, frozen, stats, n, m, hyper, own_step, grad.dtype,
                                 p.dtype if out is not None else None, second.dtype)
                b = buckets[key]
                b.weights.append(_contiguous_work(_local(master if master is not None else p), writebacks))
                local_grad = _local(grad)
                b.grads.append(local_grad if local_grad.is_contiguous() else local_grad.contiguous())
                b.exp_avgs.append(_contiguous_work(_local(state["exp_avg"]), writebacks))
                local_second = _local(second)
                b.seconds.append(local_second.contiguous() if frozen else _contiguous_work(local_second, writebacks))
                b.outs.append(_contiguous_work(_local(out), writebacks) if out is not None else None)
                b.group_dims.append(group["nm_dim"] if masked else -1)
                b.numel += _local(p).numel()
                stepped.append(state)
        for device, where in devices.items():
            reason = ops.backend_status(self.backend, device)
            if reason is not None:
                raise ValueError(f"{self._param_name(*where)}: the optimizer's backend {self.backend!r} cannot "
                                 f"step it: {reason}")
        return buckets, stepped, writebacks

    def _reduce_stats(self, totals: Tensor) -> Tensor:
        """Sum a float64 vector of per-rank statistics over the ranks that hold different parts
        of the parameters (identity on one process; :class:`step_kernels.distributed.DistributedSTEP`
        sums over the shard group). Called at the same point of every step on every rank."""
        return totals

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Take one optimizer step (skipped, and counted nowhere, when ``found_inf`` is set)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item() != 0):
            self._last_launches = 0
            return loss
        # Whether this step feeds AutoSwitch: decided once, from the global state before the step.
        phase = self._globals["phase"]
        autoswitch = self.recipe == "step" and phase == "dense" and isinstance(self.switch, AutoSwitch)
        buckets, stepped, writebacks = self._collect(autoswitch)
        if not stepped:  # no parameter has a grad: a no-op that counts nowhere (docs/design.md section 4)
            self._last_launches = 0
            return loss
        t = self._globals["step"] + 1
        device = next(b.weights[0].device for b in buckets.values())
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        stats_numel = masked_numel = launches = 0
        for key, b in buckets.items():
            scalars = reference.step_scalars(**key.hyper._asdict(), step=key.own_step)
            part, n_launches = ops.fused_step(
                self.backend, b.weights, b.grads, b.exp_avgs, b.seconds, b.outs,
                masked=key.masked, frozen_v=key.frozen, n=key.n, m=key.m,
                group_dims=b.group_dims if key.masked else None,
                scalars=scalars, grad_scale=grad_scale, compute_stats=key.stats,
            )
            totals += part.to(device)
            launches += n_launches
            if key.stats:
                stats_numel += b.numel
            if key.masked:
                masked_numel += b.numel
        for tensor, work in writebacks:
            tensor.copy_(work)
        for state in stepped:
            state["step"] += 1
        # [sum |dv|, sum v, flips, numel of the statistics, numel masked], summed over ranks when the
        # statistics are used; the condition depends only on global state, so every rank agrees.
        totals = torch.cat([totals, totals.new_tensor([stats_numel, masked_numel])])
        if autoswitch or self.recipe == "srste" or phase == "sparse":
            totals = self._reduce_stats(totals)
        self._set_global("step", t)
        self._last_launches = launches
        self._last_flips = totals[2]
        self._last_masked_numel = totals[4]
        if self.recipe == "step" and phase == "dense":
            if autoswitch:
                self._autoswitch(t, totals, int(totals[3].item()))
            elif t >= self.switch:
                self._do_switch(t)
        elif self.recipe == "step":
            self._freeze_ready()
        return loss

    def _autoswitch(self, t: int, totals: Tensor, numel: int) -> None:
        abs_dv, v_sum = totals[0].item(), totals[1].item()
        history = self._globals["z_history"]
        beta2 = next((g["betas"][1] for g in self.param_groups if self._is_target(g)), self.defaults["betas"][1])
        if numel:
            z = reference.autoswitch_z(abs_dv, v_sum, numel, self.switch.rule, beta2)
            if math.isnan(z) and not any(math.isnan(x) for x in history):
                warnings.warn(f"AutoSwitch: a NaN gradient reached the targets at step {t} (no GradScaler "
                              "skipped it); their v is NaN from now on, so AutoSwitch cannot decide and only "
                              "max_step switches", RuntimeWarning, stacklevel=3)
            history.append(z)
        t_min, t_max = reference.autoswitch_bounds(self.switch.min_step, self.switch.max_step, self.total_steps)
        if reference.autoswitch_decide(history, t, beta2=beta2, threshold=self.switch.threshold,
                                       t_min=t_min, t_max=t_max):
            self._do_switch(t)

    def _reduce_per_tensor(self, rows: Tensor) -> Tensor:
        """Sum per-tensor statistics (float64 ``[tensors, k]``) over the ranks that hold parts of
        the same tensors: :meth:`_reduce_stats` applied to them (identity on one process).
        Called on every rank with the same tensors."""
        return self._reduce_stats(rows.flatten()).view_as(rows)

    def _freeze(self, targets: List[Tuple[str, Tensor, Dict[str, Any]]]) -> int:
        """Freeze the live v of ``targets`` into preconditioners (docs/design.md section 7).

        A target whose v is zero everywhere (no gradient, or only zeros, ever reached it) has
        nothing to freeze: it keeps v and restarts its own step count (its m and v are a fresh
        Adam's). In the others, coordinates with v == 0 get :func:`reference.unfed_preconditioner`
        of their tensor. Returns this rank's number of coordinates of the frozen targets whose
        ``sqrt(v_hat)`` is below ``precond_eps``.
        """
        if not targets:
            return 0
        rows = [torch.stack([torch.count_nonzero(_local(v)).to(torch.float64), _local(v).sum(dtype=torch.float64)])
                for v in (self.state[p]["exp_avg_sq"] for _, p, _ in targets)]
        totals = self._reduce_per_tensor(torch.stack(rows)).tolist()
        floor = 0
        for (_, p, group), (fed, v_sum) in zip(targets, totals):
            state = self.state[p]
            if fed == 0:
                state["step"] = 0
                continue
            v = state["exp_avg_sq"]
            beta2 = group["betas"][1]
            count = max(state["step"], 1)  # >= 1 whenever v is nonzero; guards a hand-made state
            unfed = reference.unfed_preconditioner(fed, v_sum, beta2=beta2, step=count, precond_eps=self.precond_eps)
            floor += int(((_local(v).sqrt() / (1 - beta2**count) ** 0.5) < self.precond_eps).sum().item())
            state["precond"] = reference.preconditioner(v, beta2=beta2, step=count, precond_eps=self.precond_eps,
                                                        dtype=self.precond_dtype, unfed=unfed)
            del state["exp_avg_sq"]
        return floor

    def _do_switch(self, t: int) -> None:
        """End of step t: freeze v into the preconditioner, keep masters, mask the model."""
        targets = list(self._targets())
        device = _local(targets[0][1]).device if targets else torch.device("cpu")
        floor = self._freeze(targets)
        for _, p, group in targets:
            state = self.state[p]
            if "master" not in state:
                state["master"] = _fp32_master(p)
            self._write_masked(p, state["master"], group)
        floor = int(self._reduce_stats(torch.tensor([floor], dtype=torch.float64, device=device)).item())
        self._set_global("phase", "sparse")
        self._set_global("switch_step", t)
        self._set_global("precond_floor_count", floor)

    def _freeze_ready(self) -> None:
        """After a phase-2 step: freeze every target still on live v that has now taken
        ``switch_step`` steps of its own (docs/design.md section 7)."""
        ready = []
        for gi, group in enumerate(self.param_groups):
            if not self._is_target(group):
                continue
            for i, p in enumerate(group["params"]):
                state = self.state[p]
                if "exp_avg_sq" in state and state["step"] >= self.switch_step:
                    ready.append((self._param_name(group, gi, i), p, group))
        self._freeze(ready)

    # -----------------------------------------------------------------------------------------
    # checkpoints
    # -----------------------------------------------------------------------------------------

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`; resumes bit-identically. All or nothing.

        After torch's load-state-dict pre-hooks (which may rewrite it), the whole state dict is
        checked before anything changes: the param groups (count, sizes, recipe, N:M,
        hyper-parameters, and the global state they hold: step, phase, switch step) and every
        parameter's state (exactly the keys its phase needs, dtypes, shapes, DTensor or not;
        see ``STATE_KEYS``). Anything wrong raises ``ValueError`` naming the group, the
        parameter and the key, and leaves optimizer and model exactly as they were.

        State tensors keep their dtypes (fp32; ``precond`` in ``precond_dtype``), where torch's
        default would cast them to the parameter dtype; they are copied to the parameter's device
        in a contiguous layout. Model parameters are rewritten from the masters so the two never
        disagree.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping from STEP.state_dict(), got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            if hooked is not None:
                state_dict = hooked
        self._check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        state: Dict[Tensor, Dict[str, Any]] = defaultdict(dict)
        with torch.no_grad():
            for p, pid in zip(params, saved_ids):
                state[p] = {key: _loaded_copy(value, p) if isinstance(value, Tensor) else value
                            for key, value in state_dict["state"].get(pid, {}).items()}
        groups = []
        for mine, saved in zip(self.param_groups, saved_groups):
            group = copy.deepcopy({key: value for key, value in saved.items() if key != "params"})
            group["params"] = mine["params"]
            if "param_names" in mine and "param_names" not in group:
                group["param_names"] = mine["param_names"]
            groups.append(group)
        history = list(groups[0]["z_history"])
        for group in groups:  # one AutoSwitch history, shared by every group as on a live optimizer
            group["z_history"] = history
        self.state, self.param_groups = state, groups
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    master = self.state[p].get("master")
                    if master is None:
                        continue
                    if self._masked_now(group):
                        self._write_masked(p, master, group)
                    else:
                        _local(p).copy_(_local(master))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` is a complete, consistent state of this
        optimizer (see :meth:`load_state_dict`); changes nothing."""
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"state dict has no {missing[0]!r} (it must come from STEP.state_dict())")
        saved_groups, states = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved_groups):
            raise ValueError("state dict: 'param_groups' must be a list of dicts")
        if not isinstance(states, Mapping) or not all(isinstance(s, Mapping) for s in states.values()):
            raise ValueError("state dict: 'state' must map param ids to dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"param_groups[{gi}]: "
            absent = [key for key in ("params",) + GROUP_KEYS + GLOBAL_KEYS if key not in saved]
            if absent:
                raise ValueError(f"{where}state dict has no {absent[0]!r}")
            if saved["recipe"] != self.recipe:
                raise ValueError(f"{where}state dict is from recipe {saved['recipe']!r}, this optimizer runs "
                                 f"{self.recipe!r}")
            for key in ("sparsity", "nm_dim"):
                if saved[key] != mine.get(key):
                    raise ValueError(f"{where}state dict has {key}={saved[key]!r}, this optimizer has "
                                     f"{key}={mine.get(key)!r}")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"{where}state dict has {len(saved['params'])} params, this optimizer has "
                                 f"{len(mine['params'])}")
            self._check_hyper(saved, where)
            # z_history is AutoSwitch's, read from group 0 only; the other global keys are set in
            # every group at once and must agree.
            for key in GLOBAL_KEYS:
                if key != "z_history" and saved[key] != saved_groups[0][key]:
                    raise ValueError(f"{where}state dict has {key}={saved[key]!r}, param_groups[0] has "
                                     f"{saved_groups[0][key]!r} (a global value, the same in every group)")
        self._check_saved_globals(saved_groups[0])
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        listed = set(saved_ids)
        if len(listed) != len(saved_ids):
            raise ValueError("state dict lists a param id in more than one place of its param groups")
        stray = [pid for pid in states if pid not in listed]
        if stray:
            raise ValueError(f"state dict has state for param id {stray[0]!r}, which no param group lists")
        phase = saved_groups[0]["phase"]
        position = 0
        for gi, group in enumerate(self.param_groups):
            target = self._is_target(group)
            masked = target and (self.recipe == "srste" or phase == "sparse")
            frozen = target and self.recipe == "step" and phase == "sparse"
            for i, p in enumerate(group["params"]):
                entry = states.get(saved_ids[position], {})
                position += 1
                name = self._param_name(group, gi, i)
                unknown = [key for key in entry if key not in STATE_KEYS]
                if unknown:
                    raise ValueError(f"{name}: state dict has unknown state {unknown[0]!r} (STEP keeps "
                                     f"{', '.join(STATE_KEYS)})")
                # A target without a settled v at the switch keeps exp_avg_sq instead of precond.
                frozen_here = frozen and ("exp_avg_sq" not in entry or "precond" in entry)
                for key, spec in STATE_KEYS.items():
                    required = spec.required(frozen_here, p.dtype != torch.float32 or masked)
                    kind = "a target" if target else "a parameter that is not a target"
                    if key not in entry:
                        if required:
                            raise ValueError(f"{name}: state dict has no {key!r}, which {kind} in phase "
                                             f"{phase!r} of recipe {self.recipe!r} needs")
                        continue
                    if required is False:
                        raise ValueError(f"{name}: state dict has {key!r}, which {kind} in phase {phase!r} "
                                         f"of recipe {self.recipe!r} does not hold")
                    self._check_state_value(name, key, entry[key], spec.kind, p)

    def _check_saved_globals(self, saved: Mapping) -> None:
        """The global state of a saved param group: step, phase, switch step, floor count."""
        step, phase, switch_step = saved["step"], saved["phase"], saved["switch_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state dict: step must be an int >= 0, got {step!r}")
        phases = ("dense", "sparse") if self.recipe == "step" else ("dense",)
        if phase not in phases:
            raise ValueError(f"state dict: phase must be one of {phases} for recipe {self.recipe!r}, got {phase!r}")
        if phase == "dense" and switch_step is not None:
            raise ValueError(f"state dict: switch_step is {switch_step!r} but the phase is 'dense'")
        if phase == "sparse" and (isinstance(switch_step, bool) or not isinstance(switch_step, int)
                                  or not 1 <= switch_step <= step):
            raise ValueError(f"state dict: switch_step must be an int in [1, step={step}] in phase 'sparse', "
                             f"got {switch_step!r}")
        count = saved["precond_floor_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state dict: precond_floor_count must be an int >= 0, got {count!r}")
        if not isinstance(saved["z_history"], (list, tuple)):
            raise ValueError(f"state dict: z_history must be a list, got {type(saved['z_history']).__name__}")

    def _check_state_value(self, name: str, key: str, value: Any, kind: Union[torch.dtype, str, type],
                           p: Tensor) -> None:
        """One saved state value against its ``STATE_KEYS`` kind and its parameter."""
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: state {key!r} must be an int >= 0, got {value!r}")
            return
        if not isinstance(value, Tensor):
            raise ValueError(f"{name}: state {key!r} must be a tensor, got {type(value).__name__}")
        dtype = self.precond_dtype if kind == "precond" else kind
        if value.dtype != dtype:
            config = " (this optimizer's precond_dtype)" if kind == "precond" else ""
            raise ValueError(f"{name}: state {key!r} has dtype {value.dtype}, expected {dtype}{config}")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{name}: state {key!r} has shape {tuple(value.shape)}, param has {tuple(p.shape)}")
        if _is_dtensor(value) != _is_dtensor(p):
            kinds = ("a DTensor", "a plain tensor")
            raise ValueError(f"{name}: state {key!r} is {kinds[not _is_dtensor(value)]}, the param is "
                             f"{kinds[not _is_dtensor(p)]}")
        if value.device.type == "meta" and p.device.type != "meta":
            raise ValueError(f"{name}: state {key!r} is on the meta device (it holds no values)")

    def __repr__(self) -> str:
        """torch's optimizer repr (each group's settings), with AutoSwitch's Z history summarised.

        The history grows by one value per step until the switch; printed whole it would bury the
        settings. It shows as its length and last value; ``stats()["z_history"]`` has every value.
        """
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            for key in sorted(group):
                if key == "params":
                    continue
                value = group[key]
                if key == "z_history" and value:
                    value = f"[{len(value)} values, last {value[-1]:.4g}]"
                lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n)"

    def __getstate__(self) -> Dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` keep: every attribute but torch's hook registries.

        torch's own ``__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, which
        would lose the recipe, the switch, the backend and the rest. Hooks are dropped, as torch
        drops them: a copy starts without hooks. A deep copy of ``(model, optimizer)`` taken
        together continues bit-identically to the original.
        """
        return {key: value for key, value in self.__dict__.items()
                if not (key.startswith("_optimizer_") and key.endswith("_hooks"))}

    # -----------------------------------------------------------------------------------------
    # starting from a dense AdamW run
    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_adamw(cls, model: torch.nn.Module, adamw_state_dict: Dict[str, Any], *,
                   sparsity: str = "2:4", include=None, exclude=None, weight_decay: Optional[float] = None,
                   overrides: Optional[Dict[str, str]] = None, **kwargs) -> "STEP":
        """A STEP optimizer for ``model`` that continues a dense ``torch.optim.AdamW`` run.

        ``adamw_state_dict`` is ``AdamW.state_dict()`` of an optimizer built over
        ``model.parameters()`` (in that order). Its ``exp_avg``, ``exp_avg_sq`` and step count
        become STEP's ``m``, ``v`` and ``t``; the phase-1 clock and AutoSwitch start from there.
        AutoSwitch's bounds and ``switch=k`` count that global step ``t0``: ``switch=t0`` switches as
        the optimizer is built (v frozen as AdamW left it, the model masked, phase 2 from the first
        step), and a ``k`` below ``t0`` raises ``ValueError``. The defaults derived from
        ``total_steps`` (10% and 50% of it) lie before the AdamW run's step count for any
        fine-tuning shorter than the pretraining, so pass explicit bounds, e.g.
        ``switch=AutoSwitch(min_step=t0 + n // 10, max_step=t0 + n // 2)`` for ``n`` fine-tuning
        steps after ``t0`` AdamW steps (``bench/accuracy``'s fine-tuning task does).
        Other keyword arguments go to :class:`STEP`; ``lr``, ``betas`` and ``eps`` default to the
        AdamW run's. ``weight_decay`` does not: it is STEP's default, 0.0, unless given (docs/design.md
        section 4). The AdamW state is checked before anything is built: a state that does not
        fit the model (parameter count, shapes, dtypes, missing moments, step counts that differ
        between parameters, amsgrad or maximize) raises ``ValueError`` naming the parameter, and
        the model is left as it was.
        """
        named = list(model.named_parameters())
        step = cls._check_adamw_state(adamw_state_dict, named, kwargs)
        switch = kwargs.get("switch")
        if isinstance(switch, int) and not isinstance(switch, bool) and 1 <= switch < step:
            raise ValueError(f"switch={switch} lies before the AdamW run's step count {step}: phase 2 starts at "
                             f"step switch + 1, so pass switch >= {step} ({step}: phase 2 from the first step)")
        for key in ("lr", "betas", "eps"):
            kwargs.setdefault(key, adamw_state_dict["param_groups"][0][key])
        groups = sparse_param_groups(model, sparsity, include=include, exclude=exclude,
                                     weight_decay=weight_decay, overrides=overrides)
        opt = cls(groups, **kwargs)
        saved_ids = [i for g in adamw_state_dict["param_groups"] for i in g["params"]]
        with torch.no_grad():
            for (_, p), pid in zip(named, saved_ids):
                entry = adamw_state_dict["state"].get(pid)
                if not entry:
                    continue
                state = opt.state[p]
                state["exp_avg"].copy_(entry["exp_avg"])
                if "exp_avg_sq" in state:
                    state["exp_avg_sq"].copy_(entry["exp_avg_sq"])
                state["step"] = step  # as AdamW's own count: every parameter with state has the same
        opt._set_global("step", step)
        if opt.recipe == "step" and isinstance(opt.switch, int) and opt.switch == step:  # switch >= 1
            with torch.no_grad():
                opt._do_switch(step)  # the end of step `switch` is now: phase 2 from the next step
        return opt

    @staticmethod
    def _check_adamw_state(adamw_state_dict: Any, named: List[Tuple[str, Tensor]], kwargs: Dict[str, Any]) -> int:
        """Raise ``ValueError`` unless ``adamw_state_dict`` is an AdamW state of the parameters
        ``named`` that STEP can continue; return its step count (0 when it holds no state)."""
        if not isinstance(adamw_state_dict, Mapping) or not all(
                isinstance(adamw_state_dict.get(key), kind) for key, kind in (("state", Mapping),
                                                                              ("param_groups", (list, tuple)))):
            raise ValueError("adamw_state_dict must be AdamW.state_dict(): a dict with 'state' and 'param_groups'")
        saved_groups = adamw_state_dict["param_groups"]
        saved_ids = [i for g in saved_groups for i in g["params"]]
        if len(saved_ids) != len(named):
            raise ValueError(f"adamw_state_dict covers {len(saved_ids)} params, the model has {len(named)} "
                             "(it must come from AdamW(model.parameters()))")
        for key in ("lr", "betas", "eps"):
            if key not in kwargs and key not in saved_groups[0]:
                raise ValueError(f"adamw_state_dict: param_groups[0] has no {key!r}; pass {key}=")
        for gi, group in enumerate(saved_groups):
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"adamw_state_dict: param_groups[{gi}] has {flag}=True, which STEP cannot "
                                     "continue")
        steps: Dict[int, str] = {}
        for (name, p), pid in zip(named, saved_ids):
            entry = adamw_state_dict["state"].get(pid)
            if not entry:
                continue
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key not in entry:
                    raise ValueError(f"{name}: AdamW state has no {key!r}")
            for key in ("exp_avg", "exp_avg_sq"):
                value = entry[key]
                if not isinstance(value, Tensor) or value.dtype not in PARAM_DTYPES:
                    raise ValueError(f"{name}: AdamW {key} must be a tensor of dtype {PARAM_DTYPES}, got "
                                     f"{getattr(value, 'dtype', type(value).__name__)}")
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: AdamW {key} has shape {tuple(value.shape)}, "
                                     f"param has {tuple(p.shape)}")
            step = entry["step"]
            if isinstance(step, Tensor) and step.numel() == 1:
                step = step.item()
            if (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0
                    or step != int(step)):
                raise ValueError(f"{name}: AdamW step must be a whole number >= 0, got {entry['step']!r}")
            steps.setdefault(int(step), name)
        if len(steps) > 1:
            detail = ", ".join(f"{name} has {count}" for count, name in sorted(steps.items()))
            raise ValueError(f"adamw_state_dict has different step counts per parameter: {detail}")
        return next(iter(steps), 0)
