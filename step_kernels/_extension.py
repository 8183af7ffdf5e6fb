"""Lazy access to the compiled extension ``step_kernels._C``, and the host side of its ops.

Importing this module never loads the extension; the first call that needs it does (and registers
the ops' fake kernels, :mod:`step_kernels._fakes`), and a missing build raises
:class:`~step_kernels.errors.BackendUnavailableError` saying how to build it.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _fakes
from .errors import BackendUnavailableError

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


def cpu_fused_step(weights, grads, exp_avgs, second_moments, model_params, **kwargs):
    """The C++ fused step (backend "cpu"); same contract as ``reference.fused_step``."""
    op = require("fused_step")
    if len(weights) == 0:  # the dispatcher needs a tensor to route the call
        return torch.zeros(3, dtype=torch.float64)
    return op(
        list(weights), list(grads), list(exp_avgs), list(second_moments), list(model_params),
        kwargs["masked"], kwargs["frozen_v"], kwargs["n"], kwargs["m"],
        kwargs["group_dims"] or [], kwargs["decay_factor"], kwargs["beta1"],
        kwargs["one_minus_beta1"], kwargs["beta2"], kwargs["one_minus_beta2"],
        kwargs["step_size"], kwargs["bc2_sqrt"], kwargs["eps"], kwargs["srste_decay"],
        kwargs["grad_scale"], kwargs["found_inf"], kwargs["compute_stats"],
    )
