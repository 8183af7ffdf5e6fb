"""One entry point per op; each picks a backend: ``"triton"``, ``"cpu"`` or ``"reference"``.

Importing this module never needs a GPU, Triton or the built extension: the Triton kernels are
imported on first use and the extension is loaded on first use (:mod:`step_kernels._extension`).
Asking for a backend that is not available raises :class:`BackendUnavailableError` with the reason
and how to get it; an explicitly requested backend never falls back silently.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _extension, reference
from ._fakes import NM_PRUNE_CPU_DTYPES
from .errors import BackendUnavailableError
from .reference import StepScalars

BACKENDS = ("triton", "cpu", "reference")

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FUSED_STEP",
    "backend_status",
    "resolve_backend",
    "fused_step",
    "nm_prune",
]


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status(device: torch.device) -> Optional[str]:
    """None when the Triton backend can run on ``device``, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed: `pip install 'triton>=3.6'` (Linux, x86-64 or aarch64)"
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a broken install
        return f"step_kernels.triton_kernels failed to import: {exc}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreter_on():
        return None
    return (
        f"the Triton backend runs on CUDA tensors (got {device.type}); for CPU tensors set "
        "TRITON_INTERPRET=1 before importing triton (slow: for tests), or use backend='cpu'"
    )


def _cpu_status(device: torch.device) -> Optional[str]:
    """None when the C++ backend can run on ``device``, else the reason it cannot."""
    if device.type != "cpu":
        return f"the 'cpu' backend runs on CPU tensors (got {device.type}); use backend='triton'"
    reason = _extension.missing_reason()
    if reason is not None:
        return reason
    if not _extension.has_op("fused_step"):
        return (
            "the compiled extension step_kernels._C has no fused_step op; rebuild it with "
            "`pip install --no-build-isolation -e .` from a checkout that has csrc/fused_step_cpu.cpp"
        )
    return None


def backend_status(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device``; otherwise the reason, with how to fix it."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_status(device)
    if backend == "cpu":
        return _cpu_status(device)
    raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use on ``device``: ``"auto"`` picks the fastest available one.

    ``"auto"`` is ``"triton"`` on CUDA when Triton is installed, ``"cpu"`` on CPU when the
    extension is built, else ``"reference"``. Any other name is checked and returned as is, or
    raises :class:`BackendUnavailableError` saying why it cannot run.
    """
    device = torch.device(device)
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        return preferred if backend_status(preferred, device) is None else "reference"
    reason = backend_status(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
    return backend


def _triton_fused_step(*args, **kwargs) -> Tuple[Tensor, int]:
    """The Triton fused step (backend "triton"), imported on its first call: Triton is optional."""
    from .triton_kernels.fused_step import fused_step as triton_fused_step

    return triton_fused_step(*args, **kwargs)


# The fused step of each backend. Every one has the signature and the return of
# :func:`step_kernels.reference.fused_step`: the lists, then keywords only (``scalars`` a
# StepScalars), returning ``(totals, launches)``.
FUSED_STEP: Dict[str, Callable[..., Tuple[Tensor, int]]] = {
    "triton": _triton_fused_step,
    "cpu": _extension.cpu_fused_step,
    "reference": reference.fused_step,
}


def fused_step(
    backend: str,
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
    """The optimizer step of :func:`step_kernels.reference.fused_step` on ``backend``
    (:data:`FUSED_STEP`).

    Returns ``(totals, launches)``: float64 ``[sum |dv|, sum v, flips]`` on the tensors' device,
    and the number of kernel launches the backend made (the reference counts one per tensor).
    """
    impl = FUSED_STEP.get(backend)
    if impl is None:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return impl(
        weights, grads, exp_avgs, second_moments, model_params, masked=masked, frozen_v=frozen_v, n=n, m=m,
        group_dims=list(group_dims) if group_dims is not None else None, scalars=scalars,
        grad_scale=grad_scale, found_inf=found_inf, compute_stats=compute_stats,
    )


# The dtypes each compiled backend of nm_prune takes; the reference takes any.
NM_PRUNE_DTYPES = {
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cpu": NM_PRUNE_CPU_DTYPES,
}


def _nm_prune_backend(backend: str, w: Tensor) -> str:
    """The backend that prunes ``w``: ``"auto"`` takes the fastest one that runs here, takes
    ``w``'s dtype and, when ``w`` needs a gradient, tracks it (only the reference does); an
    explicit one must run here and take the dtype, or raises (it never falls back)."""
    if backend == "auto" and w.requires_grad and torch.is_grad_enabled():
        return "reference"
    resolved = resolve_backend(backend, w.device)
    if resolved == "reference" or w.dtype in NM_PRUNE_DTYPES[resolved]:
        return resolved
    if backend == "auto":
        return "reference"
    raise TypeError(
        f"w: backend {backend!r} prunes {', '.join(str(d) for d in NM_PRUNE_DTYPES[resolved])} tensors, got "
        f"{w.dtype}; backend='reference' takes any dtype"
    )


def nm_prune(w: Tensor, n: int, m: int, dim: int = -1, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(masked w, mask)``: keep the ``n`` largest ``|w|`` of every ``m`` along ``dim``.

    Every backend gives the bits of :func:`step_kernels.reference.nm_prune` (docs/design.md section 3)
    for any layout of ``w``, and checks the arguments the same way first
    (:func:`~step_kernels.reference.check_nm_args`: a ``ValueError`` naming ``n``, ``m``, ``dim``
    or ``w``). ``"cpu"`` is the C++ kernel (float32, bfloat16, float16, float64, int8), ``"triton"``
    the Triton one (float32, bfloat16, float16); another dtype is a ``TypeError`` there, and
    ``"auto"`` then uses the reference, as it does for a ``w`` that requires grad (with grad
    enabled): the results of ``"cpu"`` and ``"triton"`` do not track gradients.
    """
    dim = reference.check_nm_args(w, n, m, dim, "w")
    backend = _nm_prune_backend(backend, w)
    if backend == "triton":
        from .triton_kernels.nm_prune import nm_prune as triton_nm_prune

        return triton_nm_prune(w.detach().contiguous(), n, m, dim)
    if backend == "cpu":
        out, mask = _extension.require("nm_prune")(w.detach(), n, m, dim)
        return out, mask
    return reference.nm_prune(w, n, m, dim)
