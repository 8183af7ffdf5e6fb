"""Device helpers shared by the N:M kernels: top-N selection and round-to-nearest-even stores.

Everything here is ``@triton.jit`` code inlined into the kernels of ``fused_step.py`` and
``nm_prune.py``, plus the host-side checks both launchers share. The selection and the
downcasts use integer operations only, so Triton's interpreter and a GPU give the same bits.
"""

import triton
import triton.language as tl

SUPPORTED_M = (2, 4, 8, 16, 32)


def strided_launch_shape(m: int):
    """(elements per program, warps) for groups of ``m`` rows of a strided ``[M, BLOCK // M]`` tile.

    The top-N reductions run across the tile's rows. At 1024 elements on 4 warps, M >= 16 spreads
    a group over warps (~255 registers at 16:32); 256 elements on one warp keeps it in-warp (~128).
    Both give 8 contiguous elements per thread, so 16-bit streams still load 16 bytes at a time.
    """
    return (256, 1) if m >= 16 else (1024, 4)


def check_nm(n: int, m: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n < m`` and ``m`` is a power of two from 2 to 32."""
    if m not in SUPPORTED_M:
        raise ValueError(f"m: M must be a power of two from 2 to 32, got {m!r}")
    if not (isinstance(n, int) and 1 <= n < m):
        raise ValueError(f"n: N must satisfy 1 <= N < M={m}, got {n!r}")


def check_device(t, name: str, interpreter: bool) -> None:
    """Raise ``ValueError`` unless ``t`` can be read by a Triton kernel (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter:
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors (CPU tensors only under "
        "TRITON_INTERPRET=1, set before triton is imported); use the 'cpu' or 'reference' backend"
    )


@triton.jit
def magnitude_key(x):
    """int32 key that orders ``|x|`` of fp32 ``x`` exactly; NaN maps to the key of +inf."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.minimum(bits, 0x7F800000)


@triton.jit
def topn_keep(key, AXIS: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """Keep the ``N`` largest keys of each group of ``M`` along ``AXIS`` of a 2-D ``key`` (>= 0).

    Ties go to the lower index. Picks the min(N, M - N) winners (or losers) one reduction at a
    time: O(M * min(N, M - N)) work per group, with no [G, M, M] temporary, so no block size
    spills at M = 32. Returns an int1 tensor of ``key``'s shape.
    """
    if AXIS == 1:
        idx = tl.arange(0, M)[None, :]
    else:
        idx = tl.arange(0, M)[:, None]
    picked = tl.zeros(key.shape, tl.int32)
    k = key
    if N <= M - N:
        for _ in tl.static_range(N):
            best = tl.expand_dims(tl.max(k, axis=AXIS), AXIS)
            first = tl.expand_dims(tl.min(tl.where(k == best, idx, M), axis=AXIS), AXIS)
            chosen = idx == first
            picked = picked | chosen.to(tl.int32)
            k = tl.where(chosen, -1, k)
        keep = picked != 0
    else:
        for _ in tl.static_range(M - N):
            worst = tl.expand_dims(tl.min(k, axis=AXIS), AXIS)
            last = tl.expand_dims(tl.max(tl.where(k == worst, idx, -1), axis=AXIS), AXIS)
            chosen = idx == last
            picked = picked | chosen.to(tl.int32)
            k = tl.where(chosen, 0x7FFFFFFF, k)
        keep = picked == 0
    return keep


@triton.jit
def nm_keep(x, STRIDED: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """The N:M mask of fp32 ``x``: a ``[M, BC]`` tile grouped along axis 0 when ``STRIDED``,
    else a 1-D block whose consecutive runs of ``M`` are the groups."""
    key = magnitude_key(x)
    if STRIDED:
        keep = topn_keep(key, 0, N, M)
    else:
        keep = tl.reshape(topn_keep(tl.reshape(key, [key.shape[0] // M, M]), 1, N, M), [key.shape[0]])
    return keep


@triton.jit
def bf16_bits_rne(x):
    """bf16 bits of fp32 ``x``, rounded to nearest even (NaN stays a quiet NaN of the same sign)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
    return r.to(tl.uint16)


@triton.jit
def fp16_bits_rne(x):
    """fp16 bits of fp32 ``x``, rounded to nearest even (overflow to inf, subnormals, NaN 0x7E00)."""
    u = x.to(tl.uint32, bitcast=True)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # normal halves: rebias the exponent by (15 - 127) << 23 (mod 2^32) and round the low 13 bits
    normal = (a + 0xC8000FFF + ((a >> 13) & 1)) >> 13
    # subnormal halves: an fp32 add of 0.5 rounds |x| to a multiple of 2^-24 (0x3F000000 is 0.5)
    sub = (a.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
    special = tl.where(a > 0x7F800000, 0x7E00, 0x7C00)
    h = tl.where(a >= 0x47800000, special, tl.where(a < 0x38800000, sub, normal))
    return (h | sign).to(tl.uint16)


@triton.jit
def store_rounded(ptr, x, mask, OUT_KIND: tl.constexpr):
    """Store fp32 ``x`` as fp32 (``OUT_KIND`` 1), bf16 (2) or fp16 (3) bits; ``ptr`` matches."""
    if OUT_KIND == 1:
        tl.store(ptr, x, mask=mask)
    elif OUT_KIND == 2:
        tl.store(ptr, bf16_bits_rne(x), mask=mask)
    else:
        tl.store(ptr, fp16_bits_rne(x), mask=mask)


@triton.jit
def strided_tile(b, cols, BLOCK: tl.constexpr, M: tl.constexpr):
    """Block ``b`` of a tensor viewed as ``[rows, cols]`` whose N:M groups are ``M`` consecutive rows.

    Returns ``(base, offsets, valid)``: the int64 element offset of the tile, the int32 ``[M, BC]``
    offsets inside it (``BC = BLOCK // M`` columns, contiguous in memory) and the mask of columns
    that exist. ``cols`` is int32; pass it as ``(cols // 16) * 16`` when it is a multiple of 16 so the
    compiler can see that each row starts 16-byte aligned.
    """
    BC: tl.constexpr = BLOCK // M
    n_col_blocks = (cols + BC - 1) // BC
    row_group = b // n_col_blocks
    col_block = b - row_group * n_col_blocks
    i = tl.arange(0, M)[:, None]
    j = tl.arange(0, BC)[None, :]
    base = row_group * M * cols + col_block * BC
    valid = (j < cols - col_block * BC) & (i < M)
    return base, i * cols + j, valid
