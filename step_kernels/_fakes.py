"""The fake (meta) kernels of every op of ``step_kernels._C``, for ``torch.compile`` and meta tensors.

:func:`register` registers them all; :mod:`step_kernels._extension` calls it once, right after
``step_kernels._C`` has defined the ops. A fake kernel checks the arguments that decide its
outputs' shapes, with the messages of the C++ checks, so a traced or meta-device call fails where
an eager one would and never returns an unchecked empty tensor; then it returns empty tensors of
the outputs' shapes, dtypes and device.

The pack24 shape rules live here (and :mod:`step_kernels.packing` re-exports the public ones), so
this module needs nothing above :mod:`step_kernels.reference`.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .reference import check_nm_args

__all__ = ["SUPPORTED_DTYPES", "meta_dtype", "register"]

# ---------------------------------------------------------------------------------------------
# pack24 / unpack24 (csrc/pack24_torch.h)
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_ROW_MULTIPLE = {torch.float16: 32, torch.bfloat16: 32, torch.int8: 16}
_COL_MULTIPLE = {torch.float16: 64, torch.bfloat16: 64, torch.int8: 128}


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The metadata dtype of ``dtype``: int32 for int8 values, int16 for fp16/bf16."""
    return torch.int32 if dtype == torch.int8 else torch.int16


def _columns_per_meta(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.int8 else 16


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
        raise TypeError(f"unpack24: meta must be {meta_dtype(values.dtype)} for {values.dtype} values, "
                        f"got {meta.dtype}")
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


# ---------------------------------------------------------------------------------------------
# nm_prune (csrc/nm_prune_cpu.cpp)
# ---------------------------------------------------------------------------------------------

NM_PRUNE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8)


def _nm_prune_fake(w: Tensor, n: int, m: int, dim: int = -1) -> Tuple[Tensor, Tensor]:
    check_nm_args(w, n, m, dim, "w")
    if w.dtype not in NM_PRUNE_CPU_DTYPES:
        raise TypeError(f"w: the cpu nm_prune takes float32, float16, bfloat16, float64 or int8, got {w.dtype}")
    return w.new_empty(w.shape), w.new_empty(w.shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# fused_step (csrc/fused_step_cpu.cpp)
# ---------------------------------------------------------------------------------------------


def _fused_step_fake(
    weights: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
    second_moments: Sequence[Tensor], model_params: Sequence[Optional[Tensor]], *, masked: bool,
    frozen_v: bool, n: int, m: int, group_dims: List[int], decay_factor: float, beta1: float,
    one_minus_beta1: float, beta2: float, one_minus_beta2: float, step_size: float, bc2_sqrt: float,
    eps: float, srste_decay: float, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
    compute_stats: bool,
) -> Tensor:
    count = len(weights)
    lengths = [len(grads), len(exp_avgs), len(second_moments), len(model_params)]
    if any(length != count for length in lengths):
        raise ValueError("fused_step: weights, grads, exp_avgs, second_moments and model_params must have the "
                         f"same length, got {count}, {', '.join(map(str, lengths))}")
    if frozen_v and not masked:
        raise ValueError("fused_step: frozen_v=True requires masked=True")
    if masked:
        if not (2 <= m <= 32 and m & (m - 1) == 0):
            raise ValueError(f"fused_step: M must be a power of two from 2 to 32, got {m}")
        if not 1 <= n < m:
            raise ValueError(f"fused_step: N must satisfy 1 <= N < M, got N={n} M={m}")
        if len(group_dims) != count:
            raise ValueError(f"fused_step: group_dims has {len(group_dims)} entries for {count} tensors")
    return weights[0].new_empty((3,), dtype=torch.float64)


# The fake kernel of each op, by op name.
FAKES = {
    "pack24": _pack24_fake,
    "unpack24": _unpack24_fake,
    "nm_prune": _nm_prune_fake,
    "fused_step": _fused_step_fake,
}


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register the fake kernel of every op in :data:`FAKES` that ``step_kernels._C`` defines.

    Called by :mod:`step_kernels._extension` once the extension has loaded (an op that an older
    build lacks is skipped: calling it raises the missing-op error of ``_extension.require``).
    """
    for name, fake in FAKES.items():
        if hasattr(torch.ops.step_kernels, name):
            torch.library.register_fake(f"step_kernels::{name}", fake)
