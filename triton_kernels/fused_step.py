"""The fused optimizer step of STEP (docs/design.md sections 5 and 8): one pass per element, many tensors per launch.

One kernel family, two compile-time flags:

- ``MASKED=False, FROZEN_V=False``: AdamW (STEP phase 1, recipe "dense", non-target params),
  optionally (``STATS``) summing the AutoSwitch statistics ``sum |v_t - v_{t-1}|`` and ``sum v_t``;
- ``MASKED=True, FROZEN_V=False``: recipe "srste" (live ``v``);
- ``MASKED=True, FROZEN_V=True``: STEP phase 2 (frozen preconditioner ``p``, read only).

A launch covers every tensor of one dtype combination: a device table holds each tensor's
pointers and sizes, a second table lists the blocks (tensor, block index), one program per block.
Per-block partial sums (statistics, mask flips) are added by a second one-program kernel in a fixed
order, so results are deterministic run to run.
"""

import os
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._nm import check_device, check_nm, nm_keep, store_rounded, strided_launch_shape, strided_tile

BLOCK = 1024  # elements per program (a [M, BLOCK // M] tile for strided groups)
NUM_WARPS = 4
REDUCE_BLOCK = 1024
# The runtime scalar arguments of _fused_step_kernel, in order: the fields of the launcher's
# ``scalars`` (a step_kernels.reference.StepScalars) that the kernel reads. Every field but beta1
# (the update uses torch's lerp weight one_minus_beta1); a test keeps this in step with StepScalars.
KERNEL_SCALARS = ("decay_factor", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps",
                  "srste_decay")
_TABLE_COLS = 8  # w, g, m, second, out, numel, cols, unused
_GRAD_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PRECOND_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
_OUT_KINDS = {torch.float32: (1, tl.float32), torch.bfloat16: (2, tl.uint16), torch.float16: (3, tl.uint16)}
_CACHE_SIZE = 64


@triton.jit
def _table_ptr(row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _step_tile(w_ptr, g_ptr, m_ptr, s_ptr, o_ptr, offs, valid, ok, scale,
               decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, srste_decay,
               OUT_KIND: tl.constexpr, MASKED: tl.constexpr, FROZEN_V: tl.constexpr, STATS: tl.constexpr,
               STRIDED: tl.constexpr, N: tl.constexpr, M: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One tile of the step (1-D block or [M, BC] strided tile); returns (sum |dv|, sum v, flips)."""
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.full(g.shape, scale, tl.float32))
    m1 = tl.load(m_ptr + offs, mask=valid, other=0.0)
    second = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    store = tl.where(ok, valid, False)
    if MASKED:
        keep_old = nm_keep(w, STRIDED, N, M)
        g = g + tl.where(keep_old, 0.0, srste_decay * w)
    w = w * decay_factor
    m1 = tl.fma(tl.full(m1.shape, one_minus_beta1, tl.float32), g - m1, m1)
    abs_dv = tl.full([], 0.0, tl.float32)
    v_sum = tl.full([], 0.0, tl.float32)
    if FROZEN_V:
        w = w - step_size * (m1 * second)
    else:
        v = tl.fma(one_minus_beta2 * g, g, second * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), tl.full(v.shape, bc2_sqrt, tl.float32)) + eps
        w = w + tl.div_rn((-step_size) * m1, denom)
        tl.store(s_ptr + offs, v, mask=store)
        if STATS:
            abs_dv = tl.sum(tl.where(store, tl.abs(v - second), 0.0))
            v_sum = tl.sum(tl.where(store, v, 0.0))
    flips = tl.full([], 0.0, tl.float32)
    out = w
    if MASKED:
        keep_new = nm_keep(w, STRIDED, N, M)
        flips = tl.sum((store & (keep_new != keep_old)).to(tl.float32))
        out = tl.where(keep_new, w, 0.0)
    tl.store(w_ptr + offs, w, mask=store)
    tl.store(m_ptr + offs, m1, mask=store)
    if OUT_KIND != 0:
        store_rounded(o_ptr + offs, out, store, OUT_KIND)
    return abs_dv, v_sum, flips


@triton.jit
def _fused_step_kernel(
    tensors, blocks, partials, grad_scale_ptr, found_inf_ptr,
    decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps, srste_decay,
    G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, OUT_KIND: tl.constexpr, O_DTYPE: tl.constexpr,
    MASKED: tl.constexpr, FROZEN_V: tl.constexpr, STATS: tl.constexpr, STRIDED: tl.constexpr,
    N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
):
    # Fuses, per element: unscale g, [old N:M mask + SR-STE term], decoupled decay, m update,
    # [v update + statistics | frozen p], the update, [new mask + flips], masked model write.
    # Bytes per element (read + written): AdamW fp32 28 (+4 out); phase 2 fp32 model 16 + 12 = 28,
    # bf16 model (bf16 g, p, param) 12 + 10 = 22; srste adds v (+4 +4).
    # BLOCK 1024 on 4 warps = 8 contiguous elements per thread: one 16-byte load per bf16/fp16
    # stream and two per fp32 stream (needs 16-byte aligned pointers and a block bound that is a
    # multiple of 16, hence the two branches below). The N:M selection keeps O(M) temporaries per
    # group (see _nm.topn_keep), so contiguous groups use that block for every M without spills;
    # strided groups with M >= 16 use 256 elements on one warp (launch_shape).
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid).to(tl.int64)
    b = tl.load(blocks + 2 * pid + 1).to(tl.int64)
    row = tensors + 8 * t
    w_ptr = _table_ptr(row, 0, tl.float32, ALIGNED)
    g_ptr = _table_ptr(row, 1, G_DTYPE, ALIGNED)
    m_ptr = _table_ptr(row, 2, tl.float32, ALIGNED)
    s_ptr = _table_ptr(row, 3, S_DTYPE, ALIGNED)
    if OUT_KIND != 0:
        o_ptr = _table_ptr(row, 4, O_DTYPE, ALIGNED)
    else:
        o_ptr = w_ptr
    if HAS_INF:
        ok = tl.load(found_inf_ptr) == 0
    else:
        ok = tl.full([], 1, tl.int1)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
    else:
        scale = tl.full([], 1.0, tl.float32)
    if STRIDED:
        cols = tl.load(row + 6).to(tl.int32)
        if cols % 16 == 0:
            base, offs, valid = strided_tile(b, (cols // 16) * 16, BLOCK, M)
            abs_dv, v_sum, flips = _step_tile(
                w_ptr + base, g_ptr + base, m_ptr + base, s_ptr + base, o_ptr + base, offs, valid, ok,
                scale, decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                srste_decay, OUT_KIND, MASKED, FROZEN_V, STATS, STRIDED, N, M, HAS_SCALE)
        else:
            base, offs, valid = strided_tile(b, cols, BLOCK, M)
            abs_dv, v_sum, flips = _step_tile(
                w_ptr + base, g_ptr + base, m_ptr + base, s_ptr + base, o_ptr + base, offs, valid, ok,
                scale, decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                srste_decay, OUT_KIND, MASKED, FROZEN_V, STATS, STRIDED, N, M, HAS_SCALE)
    else:
        start = b * BLOCK
        limit = tl.minimum(tl.load(row + 5) - start, BLOCK).to(tl.int32)
        offs = tl.arange(0, BLOCK)
        if limit % 16 == 0:
            abs_dv, v_sum, flips = _step_tile(
                w_ptr + start, g_ptr + start, m_ptr + start, s_ptr + start, o_ptr + start, offs,
                offs < (limit // 16) * 16, ok, scale, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bc2_sqrt, eps, srste_decay, OUT_KIND, MASKED, FROZEN_V, STATS, STRIDED, N, M,
                HAS_SCALE)
        else:
            abs_dv, v_sum, flips = _step_tile(
                w_ptr + start, g_ptr + start, m_ptr + start, s_ptr + start, o_ptr + start, offs,
                offs < limit, ok, scale, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
                step_size, bc2_sqrt, eps, srste_decay, OUT_KIND, MASKED, FROZEN_V, STATS, STRIDED, N, M,
                HAS_SCALE)
    if MASKED or STATS:
        tl.store(partials + 3 * pid, abs_dv.to(tl.float64))
        tl.store(partials + 3 * pid + 1, v_sum.to(tl.float64))
        tl.store(partials + 3 * pid + 2, flips.to(tl.float64))


@triton.jit
def _sum_partials_kernel(partials, totals, num_blocks, RBLOCK: tl.constexpr):
    # Fuses the three column sums of the [num_blocks, 3] fp64 partials into totals[3], always in
    # the same order (a strided fp64 accumulator, then one tree reduction): deterministic.
    # Reads 24 B per block of the step kernel, writes 24 B. One program of 4 warps; RBLOCK 1024
    # keeps 8 fp64 accumulators per thread per column.
    offs = tl.arange(0, RBLOCK)
    acc0 = tl.zeros([RBLOCK], tl.float64)
    acc1 = tl.zeros([RBLOCK], tl.float64)
    acc2 = tl.zeros([RBLOCK], tl.float64)
    for start in range(0, num_blocks, RBLOCK):
        idx = start + offs
        mask = idx < num_blocks
        acc0 += tl.load(partials + 3 * idx, mask=mask, other=0.0)
        acc1 += tl.load(partials + 3 * idx + 1, mask=mask, other=0.0)
        acc2 += tl.load(partials + 3 * idx + 2, mask=mask, other=0.0)
    tl.store(totals, tl.sum(acc0))
    tl.store(totals + 1, tl.sum(acc1))
    tl.store(totals + 2, tl.sum(acc2))


_TENSOR_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_BLOCK_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = build()
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def launch_shape(strided: bool, m: int) -> Tuple[int, int]:
    """(elements per program, warps) of the step kernel for this group layout."""
    return strided_launch_shape(m) if strided else (BLOCK, NUM_WARPS)


def _block_table(sizes: Sequence[Tuple[int, int]], strided: bool, m: int, block: int,
                 device: torch.device) -> torch.Tensor:
    """int32 [blocks, 2] of (tensor index, block index) for tensors of (numel, cols)."""

    def build():
        counts = []
        for numel, cols in sizes:
            if strided:
                counts.append((numel // cols // m) * triton.cdiv(cols, block // m) if numel else 0)
            else:
                counts.append(triton.cdiv(numel, block))
        counts_t = torch.tensor(counts, dtype=torch.int64)
        tensor_idx = torch.repeat_interleave(torch.arange(len(sizes)), counts_t)
        first = torch.cumsum(counts_t, 0) - counts_t
        block_idx = torch.arange(int(counts_t.sum())) - torch.repeat_interleave(first, counts_t)
        return torch.stack([tensor_idx, block_idx], dim=1).to(torch.int32).to(device)

    return _cached(_BLOCK_TABLES, (device, strided, m, block, tuple(sizes)), build)


def _tensor_table(rows: List[Tuple[int, ...]], device: torch.device) -> torch.Tensor:
    return _cached(_TENSOR_TABLES, (device, tuple(rows)),
                   lambda: torch.tensor(rows, dtype=torch.int64).reshape(-1, _TABLE_COLS).to(device))


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_scalar_tensor(t: Optional[torch.Tensor], name: str, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a one-element float32 tensor, got "
                         f"{type(t).__name__ if not isinstance(t, torch.Tensor) else (t.dtype, tuple(t.shape))}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but weights[0] is on {device}")


def _groups_layout(w: torch.Tensor, dim: int, m: int, name: str) -> Tuple[bool, int]:
    """(strided, cols) of the N:M groups of ``w`` along ``dim``; raises naming ``name``."""
    if w.dim() == 0:
        raise ValueError(f"{name}: N:M groups need at least one dimension, got a scalar")
    if not isinstance(dim, int) or not -w.dim() <= dim < w.dim():
        raise ValueError(f"{name}: group dim {dim!r} is out of range for shape {tuple(w.shape)}")
    d = dim % w.dim()
    if w.shape[d] % m != 0:
        raise ValueError(f"{name}: size {w.shape[d]} of dim {d} (shape {tuple(w.shape)}) is not divisible by M={m}")
    if d == w.dim() - 1:
        return False, w.shape[d]
    if d == 0:
        return True, w.numel() // w.shape[0] if w.shape[0] else 0
    raise ValueError(f"{name}: N:M groups must run along the first or the last dim, got dim {d} of "
                     f"shape {tuple(w.shape)}")


def _check_lists(weights, grads, exp_avgs, second_moments, model_params, masked, frozen_v, n, m, group_dims):
    """Validate everything before any launch, so a failed call leaves every input untouched."""
    count = len(weights)
    for name, seq in (("grads", grads), ("exp_avgs", exp_avgs), ("second_moments", second_moments),
                      ("model_params", model_params)):
        if len(seq) != count:
            raise ValueError(f"{name} has {len(seq)} tensors, weights has {count}")
    if frozen_v and not masked:
        raise ValueError("frozen_v=True requires masked=True")
    if masked:
        check_nm(n, m)
        if group_dims is None or len(group_dims) != count:
            raise ValueError(f"group_dims must give one dim per tensor when masked=True, got {group_dims!r}")
    device = weights[0].device
    interpreter = _interpreter_on()
    if interpreter and device.type != "cpu":
        raise ValueError(f"weights[0] is on {device} but TRITON_INTERPRET=1 runs kernels on the host, and the "
                         "pointer table holds device addresses: unset TRITON_INTERPRET or use CPU tensors")
    has_out = model_params[0] is not None
    out_dtype = model_params[0].dtype if has_out else None
    second_dtypes = _PRECOND_DTYPES if frozen_v else {torch.float32: tl.float32}
    layouts = []
    for i, w in enumerate(weights):
        named = [("weights", w), ("grads", grads[i]), ("exp_avgs", exp_avgs[i]),
                 ("second_moments", second_moments[i]), ("model_params", model_params[i])]
        for list_name, t in named:
            name = f"{list_name}[{i}]"
            if t is None:
                if list_name == "model_params" and not has_out:
                    continue
                raise ValueError(f"{name} is None but model_params[0] is not: one launch writes all or none")
            if list_name == "model_params" and not has_out:
                raise ValueError(f"{name} is a tensor but model_params[0] is None: one launch writes all or none")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but weights[0] is on {device}")
            check_device(t, name, interpreter)
            if t.shape != w.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but weights[{i}] has {tuple(w.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous (strides {t.stride()}); call .contiguous() first")
        out = model_params[i]
        if out is not None and (out is w or (w.numel() > 0 and out.data_ptr() == w.data_ptr())):
            raise ValueError(f"model_params[{i}] is weights[{i}]; pass None when the master is the model parameter")
        for list_name, t, allowed, first in (
            ("weights", w, {torch.float32: None}, torch.float32),
            ("exp_avgs", exp_avgs[i], {torch.float32: None}, torch.float32),
            ("grads", grads[i], _GRAD_DTYPES, grads[0].dtype),
            ("second_moments", second_moments[i], second_dtypes, second_moments[0].dtype),
            ("model_params", model_params[i], _OUT_KINDS, out_dtype),
        ):
            if t is None:
                continue
            if t.dtype not in allowed:
                raise ValueError(f"{list_name}[{i}] has unsupported dtype {t.dtype}; expected one of "
                                 f"{sorted(map(str, allowed))}")
            if t.dtype != first:
                raise ValueError(f"{list_name}[{i}] has dtype {t.dtype} but {list_name}[0] has {first}: one "
                                 "launch covers one dtype combination")
        layouts.append(_groups_layout(w, group_dims[i], m, f"weights[{i}]") if masked else (False, w.numel()))
    return layouts


def fused_step(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    model_params: Sequence[Optional[torch.Tensor]],
    *,
    masked: bool,
    frozen_v: bool,
    n: int = 0,
    m: int = 0,
    group_dims: Optional[Sequence[int]] = None,
    scalars,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    compute_stats: bool = False,
) -> Tuple[torch.Tensor, int]:
    """One optimizer step over many tensors, in place: the contract of ``reference.fused_step``.

    All tensors are contiguous, on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``), and
    share one dtype combination: fp32 ``weights`` and ``exp_avgs``; ``grads`` fp32/bf16/fp16;
    ``second_moments`` fp32 ``v`` (or, with ``frozen_v``, the fp32/bf16 preconditioner); and
    ``model_params`` all None or all fp32/bf16/fp16. ``grad_scale`` and ``found_inf`` are
    one-element fp32 device tensors, read on the device (``found_inf != 0`` stores nothing).
    ``scalars`` is a ``step_kernels.reference.StepScalars`` (this package imports nothing from
    ``step_kernels``: any object with its fields will do); the fields in ``KERNEL_SCALARS`` are
    runtime kernel arguments, so changing lr or the step never recompiles.

    Returns ``(totals, launches)``: float64 ``[sum |v_t - v_{t-1}|, sum v_t, flips]`` on the
    device and the number of Triton kernel launches made (one per group orientation, plus one
    that sums the per-block partials when statistics or flips are asked for). Bad input raises
    ``ValueError`` naming the tensor before anything is written.
    """
    if len(weights) == 0:
        return torch.zeros(3, dtype=torch.float64), 0
    layouts = _check_lists(weights, grads, exp_avgs, second_moments, model_params, masked, frozen_v, n, m,
                           group_dims)
    device = weights[0].device
    _check_scalar_tensor(grad_scale, "grad_scale", device)
    _check_scalar_tensor(found_inf, "found_inf", device)
    has_out = model_params[0] is not None
    out_kind, o_dtype = _OUT_KINDS[model_params[0].dtype] if has_out else (0, tl.float32)
    stats = bool(compute_stats) and not masked
    need_partials = masked or stats
    by_layout = {}
    for i, (strided, cols) in enumerate(layouts):
        if weights[i].numel():
            by_layout.setdefault(strided, []).append((i, cols))
    launches_plan = []
    total_blocks = 0
    for strided, items in sorted(by_layout.items()):
        rows = []
        for i, cols in items:
            out = model_params[i]
            ptrs = [weights[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                    second_moments[i].data_ptr(), out.data_ptr() if out is not None else 0]
            rows.append((*ptrs, weights[i].numel(), cols, 0))
        aligned = all(p % 16 == 0 for row in rows for p in row[:5])
        block, warps = launch_shape(strided, m)
        blocks = _block_table([(row[5], row[6]) for row in rows], strided, m, block, device)
        launches_plan.append((strided, block, warps, _tensor_table(rows, device), blocks, aligned, total_blocks))
        total_blocks += blocks.shape[0]
    partials = torch.empty((max(total_blocks, 1), 3), dtype=torch.float64, device=device)
    dummy = partials
    launches = 0
    for strided, block, warps, table, blocks, aligned, first_block in launches_plan:
        if blocks.shape[0] == 0:
            continue
        _fused_step_kernel[(blocks.shape[0],)](
            table, blocks, partials[first_block:], grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            *(float(getattr(scalars, name)) for name in KERNEL_SCALARS),
            G_DTYPE=_GRAD_DTYPES[grads[0].dtype],
            S_DTYPE=_PRECOND_DTYPES[second_moments[0].dtype],
            OUT_KIND=out_kind, O_DTYPE=o_dtype,
            MASKED=bool(masked), FROZEN_V=bool(frozen_v), STATS=stats, STRIDED=strided,
            N=int(n) if masked else 0, M=int(m) if masked else 1, BLOCK=block,
            HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None, ALIGNED=aligned,
            num_warps=warps, enable_fp_fusion=False,
        )
        launches += 1
    if not need_partials or total_blocks == 0:
        return torch.zeros(3, dtype=torch.float64, device=device), launches
    totals = torch.empty(3, dtype=torch.float64, device=device)
    _sum_partials_kernel[(1,)](partials, totals, total_blocks, RBLOCK=REDUCE_BLOCK, num_warps=4)
    return totals, launches + 1
