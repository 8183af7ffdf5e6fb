"""2:4 packing for NVIDIA sparse tensor cores (docs/design.md section 9).

``pack24(dense)`` returns ``(values, meta)`` in the CUTLASS layout of
``torch.sparse.SparseSemiStructuredTensorCUTLASS``, byte-identical to torch's reference
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``;
``unpack24(values, meta)`` is the inverse. Both run on CPU (C++, AVX2 when available) and on CUDA
(when the extension was built with CUDA sources). The ops are ``torch.ops.step_kernels.pack24`` /
``unpack24``, with fake kernels so they trace under ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from . import _extension
from .ops import BackendUnavailableError

__all__ = ["pack24", "unpack24", "SUPPORTED_DTYPES", "meta_dtype"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The metadata dtype of ``dtype``: int32 for int8 values, int16 for fp16/bf16."""
    return torch.int32 if dtype == torch.int8 else torch.int16


def _columns_per_meta(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.int8 else 16


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


# The checks of csrc/pack24_torch.h, with the same messages, for the fake (meta) kernels: a traced or
# meta-device call fails where an eager one would, and never returns an unchecked empty tensor.
_ROW_MULTIPLE = {torch.float16: 32, torch.bfloat16: 32, torch.int8: 16}
_COL_MULTIPLE = {torch.float16: 64, torch.bfloat16: 64, torch.int8: 128}


def _shape(t: Tensor) -> str:
    """A shape as the C++ checks print it: ``[rows, cols]``."""
    return "[" + ", ".join(str(size) for size in t.shape) + "]"


def _check_matrix(op: str, arg: str, t: Tensor, layout: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {arg} must be float16, bfloat16 or int8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {arg} must be a 2-D matrix {layout}, got a {t.dim()}-D tensor of shape {_shape(t)}")


def _check_tile(op: str, what: str, rows: int, cols: int, dtype: torch.dtype) -> None:
    row_multiple, col_multiple = _ROW_MULTIPLE[dtype], _COL_MULTIPLE[dtype]
    if not (rows > 0 and rows % row_multiple == 0 and cols > 0 and cols % col_multiple == 0):
        raise ValueError(
            f"{op}: a {dtype} matrix needs rows a positive multiple of {row_multiple} and columns a positive "
            f"multiple of {col_multiple} (the minimum tile of the 2:4 sparse GEMM); {what}; nothing is padded"
        )


def _pack24_fake(dense: Tensor, prune: bool = False) -> Tuple[Tensor, Tensor]:
    _check_matrix("pack24", "dense", dense, "[rows, cols]")
    rows, cols = dense.shape
    _check_tile("pack24", f"got dense of shape {_shape(dense)}", rows, cols, dense.dtype)
    return (
        dense.new_empty((rows, cols // 2)),
        dense.new_empty((rows, cols // _columns_per_meta(dense.dtype)), dtype=meta_dtype(dense.dtype)),
    )


def _unpack24_fake(values: Tensor, meta: Tensor) -> Tensor:
    _check_matrix("unpack24", "values", values, "[rows, cols/2]")
    if meta.dtype != meta_dtype(values.dtype):
        raise TypeError(f"unpack24: meta must be {meta_dtype(values.dtype)} for {values.dtype} values, got {meta.dtype}")
    if meta.device != values.device:
        raise ValueError(f"unpack24: meta is on {meta.device} but values are on {values.device}")
    rows, cols = values.shape[0], 2 * values.shape[1]
    _check_tile("unpack24", f"values of shape {_shape(values)} give a dense shape [{rows}, {cols}]", rows, cols,
                values.dtype)
    meta_cols = cols // _columns_per_meta(values.dtype)
    if meta.dim() != 2 or tuple(meta.shape) != (rows, meta_cols):
        raise ValueError(
            f"unpack24: values of shape {_shape(values)} need meta of shape [{rows}, {meta_cols}], "
            f"got meta of shape {_shape(meta)}"
        )
    return values.new_empty((rows, cols))


@functools.lru_cache(maxsize=None)
def register_fake_kernels() -> None:
    """Register the fake (meta) kernels of pack24/unpack24; called when ``step_kernels._C`` loads."""
    if hasattr(torch.ops.step_kernels, "pack24"):
        torch.library.register_fake("step_kernels::pack24", _pack24_fake)
        torch.library.register_fake("step_kernels::unpack24", _unpack24_fake)
