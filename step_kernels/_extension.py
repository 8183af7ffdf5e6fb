"""Lazy access to the compiled extension ``step_kernels._C``, and the host side of its ops.

Importing this module never loads the extension; the first call that needs it does (and registers
the ops' fake kernels, :mod:`step_kernels._fakes`), and a missing build raises
:class:`~step_kernels.errors.BackendUnavailableError` saying how to build it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _fakes
from .errors import BackendUnavailableError
from .reference import StepScalars

_BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .`) from the source "
    "checkout; it needs a C++17 compiler with OpenMP and the installed torch"
)


@functools.lru_cache(maxsize=None)
def _load():
    """Import ``step_kernels._C`` (which registers its ops); return ``(module, error)``."""
    try:
        from . import _C  # noqa: F401  (torch is imported first: _C links against libtorch)
    except ImportError as exc:
        return None, exc
    _fakes.register()
    return _C, None


def missing_reason() -> Optional[str]:
    """None when the extension loads; else why not and how to build it."""
    module, error = _load()
    if module is None:
        return f"the compiled extension step_kernels._C is not available ({error}); {_BUILD_HINT}"
    return None


def has_op(name: str) -> bool:
    """Whether the extension registers ``torch.ops.step_kernels.<name>``."""
    if missing_reason() is not None:
        return False
    return hasattr(torch.ops.step_kernels, name)


def require(name: str):
    """The op ``torch.ops.step_kernels.<name>``, or a clear error when it is not built."""
    reason = missing_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)
    if not hasattr(torch.ops.step_kernels, name):
        raise BackendUnavailableError(
            f"step_kernels._C has no op {name!r}: the build is older than the sources; {_BUILD_HINT}"
        )
    return getattr(torch.ops.step_kernels, name)


def cpu_fused_step(
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
    """The C++ fused step (backend "cpu"): the contract of :func:`step_kernels.reference.fused_step`.

    Every argument reaches ``torch.ops.step_kernels.fused_step`` by keyword, the fields of
    ``scalars`` included, so a scalar that the op's schema does not name raises instead of
    being dropped. Returns ``(totals, 1)``: one call of the op steps every tensor.
    """
    op = require("fused_step")
    if len(weights) == 0:  # the dispatcher needs a tensor to route the call
        return torch.zeros(3, dtype=torch.float64), 1
    # One meta tensor would route the whole call to the fake kernel: no step, uninitialised totals.
    for name, tensors in (("weights", weights), ("grads", grads), ("exp_avgs", exp_avgs),
                          ("second_moments", second_moments), ("model_params", model_params),
                          ("grad_scale", [grad_scale]), ("found_inf", [found_inf])):
        for i, t in enumerate(tensors):
            if isinstance(t, Tensor) and t.device.type == "meta":
                where = name if name in ("grad_scale", "found_inf") else f"{name}[{i}]"
                raise ValueError(f"fused_step: {where} is on meta; the 'cpu' backend takes CPU tensors")
    totals = op(
        list(weights), list(grads), list(exp_avgs), list(second_moments), list(model_params),
        masked=masked, frozen_v=frozen_v, n=n, m=m, group_dims=list(group_dims or []),
        grad_scale=grad_scale, found_inf=found_inf, compute_stats=compute_stats,
        **dataclasses.asdict(scalars),
    )
    return totals, 1
