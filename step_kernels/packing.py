"""2:4 packing for NVIDIA sparse tensor cores (docs/design.md section 9).

``pack24(dense)`` returns ``(values, meta)`` in the CUTLASS layout of
``torch.sparse.SparseSemiStructuredTensorCUTLASS``, byte-identical to torch's reference
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``;
``unpack24(values, meta)`` is the inverse. Both run on CPU (C++, AVX2 when available) and on CUDA
(when the extension was built with CUDA sources). The ops are ``torch.ops.step_kernels.pack24`` /
``unpack24``, with fake kernels (:mod:`step_kernels._fakes`) so they trace under ``torch.compile``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _extension
from ._fakes import SUPPORTED_DTYPES, meta_dtype
from .errors import BackendUnavailableError

__all__ = ["pack24", "unpack24", "SUPPORTED_DTYPES", "meta_dtype"]


def _op(name: str, t: Tensor):
    """``torch.ops.step_kernels.<name>``, checked to have a kernel for ``t``'s device."""
    if torch.compiler.is_compiling():  # traced: the op was loaded when the caller ran eagerly
        return getattr(torch.ops.step_kernels, name)
    op = _extension.require(name)
    device = t.device.type
    if device not in ("cpu", "meta") and not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"step_kernels::{name}", device.upper()
    ):
        raise BackendUnavailableError(
            f"{name}: step_kernels._C has no {device} kernel: it was built without CUDA sources (the "
            "build prints why: torch without CUDA, or nvcc's major version differs from "
            "torch.version.cuda); rebuild with `pip install --no-build-isolation -e .` where both agree"
        )
    return op


def pack24(dense: Tensor, prune: bool = False) -> Tuple[Tensor, Tensor]:
    """Pack a 2:4 sparse matrix into ``(values, meta)`` for sparse tensor cores.

    ``dense`` is a 2-D float16, bfloat16 or int8 matrix ``[rows, cols]`` whose groups of 4
    consecutive columns hold at most 2 nonzeros (a ``ValueError`` names the first row and columns
    that do not). Rows must be a positive multiple of 32 (int8: 16) and columns of 64 (int8: 128),
    the minimum tile of the sparse GEMM; nothing is padded.

    ``prune=True`` first keeps the 2 largest ``|w|`` of every group (ties: lower index; NaN counts
    as +inf; int8 magnitudes widened), exactly ``pack24(nm_prune(dense, 2, 4)[0])``, in one pass.

    Returns ``values [rows, cols/2]`` (dense's dtype) and ``meta``: int16 ``[rows, cols/16]``, or
    int32 ``[rows, cols/32]`` for int8, in CUTLASS's reordered layout.
    """
    values, meta = _op("pack24", dense)(dense, prune)
    return values, meta


def unpack24(values: Tensor, meta: Tensor) -> Tensor:
    """The dense matrix ``[rows, 2 * values.shape[1]]`` that :func:`pack24` packed into
    ``(values, meta)``; a ``ValueError`` names the first group whose metadata is not a 2:4 pattern."""
    return _op("unpack24", values)(values, meta)

