"""Pure-PyTorch specification of every STEP op.

This module is the documentation of the math (docs/design.md sections 3 and 5) and the oracle every
backend is tested against. It is written for clarity, runs on any device, and never needs Triton
or the compiled extension.

Scalar forms (per element, fp32 master ``w``, fp32 moments ``m`` and ``v``, grad ``g`` already
cast to fp32 and divided by ``grad_scale``). The host scalars are computed in Python double
precision by :func:`step_scalars` and rounded to fp32 where they meet a tensor, as torch does:

    decay_factor = 1 - lr * weight_decay
    step_size    = lr / (1 - beta1**t)
    bc2_sqrt     = sqrt(1 - beta2**t)

    AdamW (phase 1, recipe "dense", non-target parameters), identical to torch.optim.AdamW:
        w = w * decay_factor
        m = m + (1 - beta1) * (g - m)                  # torch's lerp_(g, 1 - beta1)
        v = v * beta2 + ((1 - beta2) * g) * g          # torch's mul_(beta2).addcmul_(g, g, 1 - beta2)
        w = w - step_size * (m / (sqrt(v) / bc2_sqrt + eps))

    Masked step (recipe "srste" with live v, or STEP phase 2 with the frozen preconditioner p):
        keep_old = nm_mask(w)                          # the mask the last forward used
        g = g + where(keep_old, 0, srste_decay * w)    # SR-STE decay on pruned entries only
        w = w * decay_factor
        m = m + (1 - beta1) * (g - m)
        live v:  v = v * beta2 + ((1 - beta2) * g) * g ;  w = w - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
        frozen:  w = w - step_size * (m * p)
        keep_new = nm_mask(w)
        model_param = where(keep_new, w, +0.0) cast to the model dtype (round to nearest even)
        flips += count(keep_new != keep_old)

    Preconditioner at the switch (end of step t):
        p = 1 / (sqrt(v) / bc2_sqrt + precond_eps)     # stored in precond_dtype
        p = unfed_preconditioner(...) where v == 0     # a coordinate no gradient ever reached

The SR-STE term uses ``where`` rather than ``(1 - keep) * w`` so a kept NaN weight does not turn
the gradient of its group into NaN (``0 * NaN`` is NaN); for finite weights the two are equal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "StepScalars",
    "step_scalars",
    "parse_sparsity",
    "check_nm_args",
    "nm_mask",
    "nm_prune",
    "srste_grad",
    "adamw_step",
    "masked_step",
    "preconditioner",
    "unfed_preconditioner",
    "AUTOSWITCH_RULES",
    "autoswitch_window",
    "autoswitch_z",
    "autoswitch_bounds",
    "autoswitch_decide",
    "fused_step",
]

_SPARSITY_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
SUPPORTED_M = (2, 4, 8, 16, 32)


def parse_sparsity(sparsity: str, name: str = "sparsity") -> Tuple[int, int]:
    """Parse an ``"N:M"`` string into ``(n, m)``.

    ``M`` must be a power of two from 2 to 32 and ``1 <= N < M``. Anything else raises a
    ``ValueError`` that names ``name`` (the parameter or argument at fault).
    """
    if not isinstance(sparsity, str):
        raise ValueError(f"{name}: sparsity must be a string 'N:M', got {sparsity!r}")
    match = _SPARSITY_RE.match(sparsity)
    if match is None:
        raise ValueError(f"{name}: sparsity must look like 'N:M' (e.g. '2:4'), got {sparsity!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if m not in SUPPORTED_M:
        raise ValueError(f"{name}: M must be a power of two from 2 to 32, got {sparsity!r}")
    if not 1 <= n < m:
        raise ValueError(f"{name}: N must satisfy 1 <= N < M, got {sparsity!r}")
    return n, m


@dataclass(frozen=True)
class StepScalars:
    """Host-side scalars of one optimizer step, in Python double precision."""

    decay_factor: float  # 1 - lr * weight_decay
    beta1: float
    one_minus_beta1: float  # the lerp weight
    beta2: float
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1**t)
    bc2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    srste_decay: float


def step_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    srste_decay: float = 0.0,
) -> StepScalars:
    """The scalars of step ``step`` (counted from 1), computed exactly as torch.optim.AdamW does."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return StepScalars(
        decay_factor=1 - lr * weight_decay,
        beta1=beta1,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        step_size=lr / bias_correction1,
        bc2_sqrt=bias_correction2**0.5,
        eps=eps,
        srste_decay=srste_decay,
    )


def check_nm_args(w: Tensor, n: int, m: int, dim: int = -1, name: str = "w") -> int:
    """Check the arguments of an N:M selection; return ``dim`` in ``[0, w.dim())``.

    The one validation of every backend of ``nm_prune`` (and of :func:`nm_mask`): ``m`` a power of
    two from 2 to 32, ``1 <= n < m`` (both ints), ``dim`` an int in range, ``w.shape[dim]``
    divisible by ``m`` (docs/design.md section 3). A ``ValueError`` names the argument at fault (``w``
    as ``name``); a ``w`` that is not a tensor is a ``TypeError``.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: must be a tensor, got {type(w).__name__}")
    if isinstance(m, bool) or not isinstance(m, int) or m not in SUPPORTED_M:
        raise ValueError(f"m: M must be a power of two from 2 to 32, got {m!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"n: N must satisfy 1 <= N < M={m}, got {n!r}")
    if w.dim() == 0:
        raise ValueError(f"{name}: N:M groups need at least one dimension, got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -w.dim() <= dim < w.dim():
        raise ValueError(f"dim: {dim!r} is out of range for {name} of shape {tuple(w.shape)}")
    dim %= w.dim()
    if w.shape[dim] % m != 0:
        raise ValueError(
            f"{name}: size {w.shape[dim]} of dim {dim} (shape {tuple(w.shape)}) is not divisible by M={m}"
        )
    return dim


def nm_mask(w: Tensor, n: int, m: int, dim: int = -1, name: str = "weight") -> Tensor:
    """Boolean mask keeping the ``n`` largest ``|w|`` in each group of ``m`` consecutive entries.

    Groups run along ``dim``. Rules (docs/design.md section 3): NaN magnitudes count as +inf, ties go
    to the lower index, and exactly ``n`` entries are kept in every group.

    The rank of entry ``i`` in its group is the number of entries that beat it: ``j`` beats ``i``
    when ``|w_j| > |w_i|``, or when they are equal and ``j < i``. Entry ``i`` is kept when its
    rank is below ``n``. This O(M^2) form is exact and order-independent, which is what makes the
    kernels' masks bit-identical to this one. Arguments are checked by :func:`check_nm_args`.
    """
    dim = check_nm_args(w, n, m, dim, name)
    moved = w.movedim(dim, -1)
    key = moved.abs() if moved.is_floating_point() else moved.double().abs()  # int8: |-128| overflows
    key = torch.where(torch.isnan(key), torch.full_like(key, math.inf), key)
    groups = key.reshape(*key.shape[:-1], key.shape[-1] // m, m)
    kj = groups.unsqueeze(-2)  # [..., 1, M]: the challengers j
    ki = groups.unsqueeze(-1)  # [..., M, 1]: the entry i being ranked
    idx = torch.arange(m, device=w.device)
    lower = idx.view(1, m) < idx.view(m, 1)  # [i, j]: j < i
    beats = (kj > ki) | ((kj == ki) & lower)
    rank = beats.sum(dim=-1)
    keep = (rank < n).reshape(moved.shape)
    return keep.movedim(-1, dim)


def nm_prune(w: Tensor, n: int, m: int, dim: int = -1) -> Tuple[Tensor, Tensor]:
    """Return ``(masked w, mask)``: pruned entries written as +0.0, kept entries unchanged."""
    keep = nm_mask(w, n, m, dim, name="w")
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)), keep


def srste_grad(grad: Tensor, w: Tensor, keep: Tensor, srste_decay: float) -> Tensor:
    """SR-STE gradient: ``grad + srste_decay * w`` on pruned entries, ``grad`` on kept ones."""
    return grad + torch.where(keep, torch.zeros((), dtype=w.dtype, device=w.device), srste_decay * w)


def _prepare_grad(grad: Tensor, grad_scale: Optional[Tensor]) -> Tensor:
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=torch.float32)
    return g


def adamw_step(
    w: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: StepScalars,
    grad_scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One AdamW step in place on the fp32 master ``w`` and fp32 moments.

    Returns ``(sum |v_t - v_{t-1}|, sum v_t)`` as float64 scalars (the AutoSwitch statistics).
    """
    g = _prepare_grad(grad, grad_scale)
    v_old = exp_avg_sq.clone()
    w.mul_(s.decay_factor)
    exp_avg.lerp_(g, s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / s.bc2_sqrt).add_(s.eps)
    w.addcdiv_(exp_avg, denom, value=-s.step_size)
    abs_dv = (exp_avg_sq - v_old).abs().sum(dtype=torch.float64)
    return abs_dv, exp_avg_sq.sum(dtype=torch.float64)


def masked_step(
    w: Tensor, grad: Tensor, exp_avg: Tensor, second: Tensor, s: StepScalars, *,
    n: int, m: int, dim: int, frozen_v: bool, grad_scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One masked step in place: recipe "srste" (live ``v`` in ``second``) or STEP phase 2
    (frozen preconditioner ``p`` in ``second``, read only).

    Returns ``(keep_new, flips)``: the new mask and the number of entries whose mask changed.
    """
    g = _prepare_grad(grad, grad_scale)
    keep_old = nm_mask(w, n, m, dim)
    g = srste_grad(g, w, keep_old, s.srste_decay)
    w.mul_(s.decay_factor)
    exp_avg.lerp_(g, s.one_minus_beta1)
    if frozen_v:
        w.sub_(s.step_size * (exp_avg * second.float()))
    else:
        second.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
        denom = (second.sqrt() / s.bc2_sqrt).add_(s.eps)
        w.addcdiv_(exp_avg, denom, value=-s.step_size)
    keep_new = nm_mask(w, n, m, dim)
    flips = (keep_new != keep_old).sum(dtype=torch.float64)
    return keep_new, flips


def preconditioner(
    exp_avg_sq: Tensor, *, beta2: float, step: int, precond_eps: float,
    dtype: torch.dtype = torch.float32, unfed: Optional[float] = None,
) -> Tensor:
    """The frozen preconditioner after ``step`` steps of ``v``: ``1 / (sqrt(v_hat) + precond_eps)``.

    ``unfed``, when given, replaces it where ``v`` is exactly 0 (no gradient ever reached the
    coordinate), which would otherwise get ``1 / precond_eps`` (docs/design.md section 7; the optimizer
    passes :func:`unfed_preconditioner`).
    """
    bc2_sqrt = (1 - beta2**step) ** 0.5
    p = 1.0 / ((exp_avg_sq.sqrt() / bc2_sqrt).add_(precond_eps))
    if unfed is not None:
        p = torch.where(exp_avg_sq == 0, torch.tensor(unfed, dtype=p.dtype, device=p.device), p)
    return p.to(dtype)


def unfed_preconditioner(fed: float, v_sum: float, *, beta2: float, step: int, precond_eps: float) -> float:
    """The preconditioner of a coordinate whose ``v`` is 0 inside a tensor with ``fed`` nonzero
    coordinates summing to ``v_sum``: that of the tensor's root-mean-square fed coordinate,
    ``1 / (sqrt(v_sum / fed / (1 - beta2**step)) + precond_eps)``.

    A coordinate that never saw a gradient then moves, once it gets one of typical size, by a
    typical step of its tensor; ``1 / precond_eps`` would make that step ~1e6 times too large.
    The RMS is at least the mean of ``sqrt(v_hat)``, so this is never larger than a typical
    coordinate's preconditioner. Needs ``fed >= 1``.
    """
    bc2 = 1 - beta2**step
    return 1.0 / (math.sqrt(v_sum / fed / bc2) + precond_eps)


# ---------------------------------------------------------------------------------------------
# AutoSwitch (docs/design.md section 6)
# ---------------------------------------------------------------------------------------------


def autoswitch_window(beta2: float) -> int:
    """Window length ``W = max(1, round(1 / (1 - beta2)))``: 1000 for beta2 = 0.999."""
    return max(1, round(1.0 / (1.0 - beta2)))


AUTOSWITCH_RULES = ("relative", "absolute")


def autoswitch_z(abs_dv_sum: float, v_sum: float, numel: int, rule: str = "relative",
                 beta2: float = 0.999) -> float:
    """The statistic of one phase-1 step, from ``A = sum |v_t - v_{t-1}|``, ``S = sum v_t`` and
    ``n`` (the target coordinates).

    - ``"relative"`` (the default rule): ``Z = A / ((1 - beta2) * S)``, the mean change of v in
      one step relative to v, in units of the EMA rate ``1 - beta2``. Multiplying the loss by c
      multiplies A and S by c**2, so Z does not depend on the gradient scale. Since
      ``v_t - v_{t-1} = (1 - beta2) * (g**2 - v_{t-1})``, a v that tracks ``E[g**2]`` gives
      ``Z <= 2`` whatever the gradient distribution (the mean absolute deviation of a
      non-negative variable is at most twice its mean); a v still filling up from zero, or
      chasing a moving gradient scale, gives more. ``inf`` when ``S == 0``.
    - ``"absolute"`` (the public reimplementation's rule, paper-faithful as far as it is known):
      ``Z = A / n``, which scales with the square of the gradient.
    """
    if rule == "relative":
        return math.inf if v_sum == 0 else abs_dv_sum / ((1.0 - beta2) * v_sum)
    if rule == "absolute":
        return abs_dv_sum / numel
    raise ValueError(f"rule must be one of {AUTOSWITCH_RULES}, got {rule!r}")


def autoswitch_bounds(
    min_step: Optional[int], max_step: Optional[int], total_steps: Optional[int]
) -> Tuple[int, Optional[int]]:
    """``(T_min, T_max)``: explicit bounds win; else 10% and 50% of ``total_steps``; else (0, None)."""
    t_min = min_step if min_step is not None else (int(0.1 * total_steps) if total_steps else 0)
    t_max = max_step if max_step is not None else (int(0.5 * total_steps) if total_steps else None)
    return t_min, t_max


def autoswitch_decide(
    z_history: Sequence[float], step: int, *, beta2: float, threshold: float, t_min: int,
    t_max: Optional[int],
) -> bool:
    """Whether to switch at the end of step ``step``, given the Z history up to and including it.

    Switch if the window is full, ``step >= T_min`` and the window mean is ``<= threshold``;
    or if ``T_max`` is set and ``step >= T_max``. A partly filled window never decides, and
    neither does a window holding a NaN or inf sample (its mean is not ``<= threshold``). A NaN
    gradient stepped without a GradScaler leaves NaN in v for good, so every later sample is NaN
    and only ``T_max`` switches.
    """
    if t_max is not None and step >= t_max:
        return True
    window = autoswitch_window(beta2)
    if len(z_history) < window or step < t_min:
        return False
    recent = z_history[-window:]
    return sum(recent) / window <= threshold


# ---------------------------------------------------------------------------------------------
# The multi-tensor op every backend implements
# ---------------------------------------------------------------------------------------------


def fused_step(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    second_moments: Sequence[Tensor],
    model_params: Sequence[Optional[Tensor]],
    *,
    masked: bool,
    frozen_v: bool,
    n: int = 0,
    m: int = 0,
    group_dims: Optional[Sequence[int]] = None,
    scalars: StepScalars,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    compute_stats: bool = False,
) -> Tuple[Tensor, int]:
    """One optimizer step over many tensors that share flags, N:M and hyper-parameters.

    This is the contract of the kernel family (flags ``masked`` and ``frozen_v``), the same
    signature and return on every backend (:data:`step_kernels.ops.FUSED_STEP`):

    - ``weights``: fp32 masters, updated in place.
    - ``grads``: same shapes, fp32/bf16/fp16; divided by ``grad_scale`` when given.
    - ``exp_avgs``: fp32 first moments, updated in place.
    - ``second_moments``: live ``v`` (fp32, updated) when not ``frozen_v``; the frozen
      preconditioner ``p`` (fp32 or bf16, read only) when ``frozen_v``.
    - ``model_params``: per tensor, the model parameter that receives the new weight (masked when
      ``masked``) in its own dtype, or None when the master *is* the model parameter.
    - ``group_dims``: per tensor, the dim the N:M groups run along (required when ``masked``).
    - ``scalars``: the host scalars of the step (:func:`step_scalars`).
    - ``found_inf``: a nonzero value makes the whole call a no-op.
    - ``compute_stats``: also sum the AutoSwitch statistics (unmasked calls).

    Returns ``(totals, launches)``: a float64 tensor ``[sum |v_t - v_{t-1}|, sum v_t, mask flips]``
    on the weights' device (the first two are 0 unless ``compute_stats``; flips are 0 unless
    ``masked``), and the number of kernel launches the backend made (here one per tensor).
    """
    device = weights[0].device if len(weights) else torch.device("cpu")
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    if frozen_v and not masked:
        raise ValueError("frozen_v=True requires masked=True")
    if found_inf is not None and bool(found_inf.item() != 0):
        return totals, len(weights)
    for i, w in enumerate(weights):
        g, m1, second, out = grads[i], exp_avgs[i], second_moments[i], model_params[i]
        if masked:
            keep, flips = masked_step(
                w, g, m1, second, scalars, n=n, m=m, dim=group_dims[i], frozen_v=frozen_v,
                grad_scale=grad_scale,
            )
            totals[2] += flips
            if out is not None:
                out.copy_(torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)))
        else:
            abs_dv, v_sum = adamw_step(w, g, m1, second, scalars, grad_scale=grad_scale)
            if compute_stats:
                totals[0] += abs_dv
                totals[1] += v_sum
            if out is not None:
                out.copy_(w)
    return totals, len(weights)

