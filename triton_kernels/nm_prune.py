"""Standalone N:M prune: ``nm_prune(w, n, m, dim) -> (masked w, mask)`` (docs/design.md section 3)."""

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._nm import check_device, check_nm, nm_keep, strided_launch_shape, strided_tile

BLOCK = 1024  # elements per program (a [M, BLOCK // M] tile when the groups are strided)
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _nm_prune_kernel(w_ptr, out_ptr, mask_ptr, numel, cols, N: tl.constexpr, M: tl.constexpr,
                     BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    # Fuses the load, the top-N of every group of M (NaN as +inf, ties to the lower index), the
    # masked write (pruned entries +0.0, kept ones bit-unchanged) and the bool mask write.
    # Bytes per element: read s, write s + 1 (s = 4 for fp32, 2 for bf16/fp16).
    # BLOCK 1024 on 4 warps = 8 contiguous elements per thread: 16-byte loads for 16-bit inputs
    # (numel/cols divisible by 16 are specialised by the JIT). The selection keeps O(M)
    # temporaries per group, so contiguous groups use that block for every M; strided groups of
    # M >= 16 use 256 elements on one warp (_nm.strided_launch_shape).
    b = tl.program_id(0).to(tl.int64)
    if STRIDED:
        base, offs, valid = strided_tile(b, cols, BLOCK, M)
    else:
        base = b * BLOCK
        offs = tl.arange(0, BLOCK)
        valid = offs < numel - base
    x = tl.load(w_ptr + base + offs, mask=valid, other=0.0)
    keep = nm_keep(x.to(tl.float32), STRIDED, N, M)
    tl.store(out_ptr + base + offs, tl.where(keep, x, tl.zeros_like(x)), mask=valid)
    tl.store(mask_ptr + base + offs, keep, mask=valid)


def nm_prune(w: torch.Tensor, n: int, m: int, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(masked w, mask)``: keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``dim``.

    ``w`` is a contiguous fp32/bf16/fp16 tensor on CUDA (or on CPU under ``TRITON_INTERPRET=1``);
    ``w.shape[dim]`` must be divisible by ``m``. Pruned entries are +0.0, kept entries keep their
    bits; the mask is bool. Equal to ``step_kernels.reference.nm_prune`` bit for bit.
    """
    check_nm(n, m)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a tensor, got {type(w).__name__}")
    check_device(w, "w", os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    if w.dtype not in _DTYPES:
        raise ValueError(f"w has unsupported dtype {w.dtype}; expected one of {_DTYPES}")
    if w.dim() == 0:
        raise ValueError("w: N:M groups need at least one dimension, got a scalar")
    if not isinstance(dim, int) or not -w.dim() <= dim < w.dim():
        raise ValueError(f"dim {dim!r} is out of range for w of shape {tuple(w.shape)}")
    d = dim % w.dim()
    if w.shape[d] % m != 0:
        raise ValueError(f"w: size {w.shape[d]} of dim {d} (shape {tuple(w.shape)}) is not divisible by M={m}")
    if not w.is_contiguous():
        raise ValueError(f"w is not contiguous (strides {w.stride()}); call .contiguous() first")
    out = torch.empty_like(w)
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    if w.numel() == 0:
        return out, mask
    strided = d != w.dim() - 1
    cols = w[(0,) * (d + 1)].numel() if strided else w.shape[d]
    if strided:
        block, warps = strided_launch_shape(m)
        grid = (w.numel() // cols // m * triton.cdiv(cols, block // m),)
    else:
        block, warps = BLOCK, NUM_WARPS
        grid = (triton.cdiv(w.numel(), BLOCK),)
    _nm_prune_kernel[grid](w, out, mask, w.numel(), cols, N=n, M=m, BLOCK=block, STRIDED=strided,
                           num_warps=warps)
    return out, mask
