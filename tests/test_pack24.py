"""pack24 / unpack24 against torch's own CUTLASS conversion (the oracle) and the reference pruner."""

import pytest
import torch

import step_kernels
from step_kernels import _extension, pack24, reference, unpack24

conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
torch_pack = conv.sparse_semi_structured_from_dense_cutlass
torch_unpack = conv.sparse_semi_structured_to_dense_cutlass

pytestmark = pytest.mark.skipif(
    _extension.missing_reason() is not None, reason=str(_extension.missing_reason())
)

DTYPES = [torch.float16, torch.bfloat16, torch.int8]
# (rows, cols): the smallest allowed, non-square, tall, wide; per dtype family.
SHAPES = {
    torch.float16: [(32, 64), (96, 192), (160, 64), (32, 448)],
    torch.int8: [(16, 128), (48, 256), (80, 128), (16, 640)],
}
SHAPES[torch.bfloat16] = SHAPES[torch.float16]


@pytest.fixture(params=["simd", "scalar"])
def cpu_path(request, monkeypatch):
    """Run CPU packing through the AVX2 rows and through the portable group loop."""
    monkeypatch.setenv("STEP_KERNELS_PACK24_SIMD", "1" if request.param == "simd" else "0")
    return request.param


def bits(t):
    """The raw bits, so -0.0 and NaN payloads are compared exactly."""
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


def assert_bits_equal(a, b):
    """Equal bit patterns (so +0.0 differs from -0.0); any NaN equals any NaN, because torch's
    CPU ops (the oracle's where/gather/scatter) may rewrite NaN payloads."""
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = a.cpu(), b.cpu()
    if a.dtype != torch.int8 and a.dtype.is_floating_point:
        nan = torch.isnan(b)
        assert torch.equal(torch.isnan(a), nan)
        a, b = a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    assert torch.equal(bits(a), bits(b))


def nonzero_values(shape, dtype, gen):
    if dtype == torch.int8:
        v = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int16)
        return torch.where(v == 0, torch.ones_like(v), v).to(torch.int8)
    v = torch.randn(shape, generator=gen) * 3
    return torch.where(v == 0, torch.ones_like(v), v).to(dtype)


def random_24(rows, cols, dtype, gen):
    """A 2:4 matrix whose groups hold 0, 1 or 2 nonzeros at random places; float zeros are +0 or -0."""
    groups = rows * cols // 4
    count = torch.randint(0, 3, (groups, 1), generator=gen)
    rank = torch.rand(groups, 4, generator=gen).argsort(dim=1).argsort(dim=1)
    keep = rank < count
    values = nonzero_values((groups, 4), dtype, gen)
    zeros = torch.zeros((groups, 4), dtype=dtype)
    if dtype != torch.int8:
        zeros = torch.where(torch.rand(groups, 4, generator=gen) < 0.5, -zeros, zeros)
    return torch.where(keep, values, zeros).reshape(rows, cols)


def random_dense(rows, cols, dtype, gen):
    """Any matrix, with the cases the pruning rule names: ties, +-0, NaN, +-inf, int8 -128."""
    x = nonzero_values((rows, cols), dtype, gen)
    pick = torch.randint(0, 8, (rows, cols), generator=gen)
    if dtype == torch.int8:
        specials = torch.tensor([0, -128, 127, 1, -1], dtype=torch.int8)
    else:
        specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0], dtype=dtype)
    special = specials[torch.randint(0, len(specials), (rows, cols), generator=gen)]
    return torch.where(pick < 3, special, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_torch_reference(dtype, device, cpu_path):
    gen = torch.Generator().manual_seed(1)
    for rows, cols in SHAPES[dtype]:
        for _ in range(3):
            x = random_24(rows, cols, dtype, gen)
            ref_values, ref_meta = torch_pack(x)
            values, meta = pack24(x.to(device))
            assert meta.dtype == (torch.int32 if dtype == torch.int8 else torch.int16)
            assert_bits_equal(values, ref_values)
            assert_bits_equal(meta, ref_meta)
            back = unpack24(values, meta)
            assert_bits_equal(back, torch_unpack(ref_values, ref_meta))
            assert torch.equal(back.cpu(), x)  # equal values (-0.0 fillers come back as +0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_equals_reference_mask_then_pack(dtype, device, cpu_path):
    gen = torch.Generator().manual_seed(2)
    for rows, cols in SHAPES[dtype]:
        x = random_dense(rows, cols, dtype, gen)
        pruned, keep = reference.nm_prune(x, 2, 4)
        assert (keep.reshape(-1, 4).sum(-1) == 2).all()
        ref_values, ref_meta = torch_pack(pruned)
        values, meta = pack24(x.to(device), prune=True)
        assert_bits_equal(values, ref_values)
        assert_bits_equal(meta, ref_meta)
        back = unpack24(values, meta)
        assert_bits_equal(back, torch_unpack(ref_values, ref_meta))
        torch.testing.assert_close(back.cpu(), pruned, rtol=0, atol=0, equal_nan=True)  # +-0 equal


def test_prune_int8_magnitudes_are_widened():
    x = torch.tensor([[-128, 127, 3, -4] * 32] * 16, dtype=torch.int8)
    values, _ = pack24(x, prune=True)
    assert torch.equal(values[:, :2], torch.tensor([[-128, 127]] * 16, dtype=torch.int8))


def test_known_answers():
    """docs/design.md section 9: uniform patterns and the non-uniform fp16 32x64 case."""
    for pattern, word in [([0, 0, 1, 1], -4370), ([1, 1, 0, 0], 17476), ([1, 0, 0, 1], -13108), ([0, 1, 1, 0], -26215)]:
        x = torch.tensor(pattern, dtype=torch.float16).repeat(32, 16)
        _, meta = pack24(x)
        assert (meta == word).all()
    choices = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]])
    r = torch.arange(32).view(32, 1)
    g = torch.arange(16).view(1, 16)
    mask = choices[(r + g) % 6].reshape(32, 64)
    values = (torch.arange(32 * 64) % 251 + 1).view(32, 64)
    packed, meta = pack24((mask * values).to(torch.float16))
    as_u16 = meta.view(torch.int16).to(torch.int32) & 0xFFFF
    assert as_u16[0].tolist() == [0x9C84, 0xED9C, 0x84ED, 0x9C84]
    assert as_u16[1].tolist() == [0x84ED, 0x9C84, 0xED9C, 0x84ED]
    assert packed[0, :8].tolist() == [1, 2, 5, 7, 9, 12, 14, 15]


@pytest.mark.parametrize("dtype", DTYPES)
def test_wraps_into_torch_cutlass_tensor(dtype):
    gen = torch.Generator().manual_seed(3)
    rows, cols = SHAPES[dtype][1]
    x = random_24(rows, cols, dtype, gen)
    values, meta = pack24(x)
    sparse = torch.sparse.SparseSemiStructuredTensorCUTLASS(
        x.shape, packed=values, meta=meta, packed_t=None, meta_t=None, compressed_swizzled_bitmask=None
    )
    assert torch.equal(sparse.to_dense(), x)
    assert torch.equal(sparse.values(), values) and torch.equal(sparse.indices(), meta)


def test_noncontiguous_input_is_packed_by_value():
    gen = torch.Generator().manual_seed(4)
    x = random_24(96, 64, torch.bfloat16, gen).t().contiguous().t()  # strides (1, 96)
    assert not x.is_contiguous()
    values, meta = pack24(x)
    ref_values, ref_meta = torch_pack(x.contiguous())
    assert_bits_equal(values, ref_values)
    assert_bits_equal(meta, ref_meta)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool])
def test_wrong_dtype(dtype):
    with pytest.raises(TypeError, match="float16, bfloat16 or int8"):
        pack24(torch.zeros(32, 64, dtype=dtype))


@pytest.mark.parametrize("shape", [(64,), (2, 32, 64), ()])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match="2-D"):
        pack24(torch.zeros(shape, dtype=torch.float16))


@pytest.mark.parametrize(
    "dtype,shape,needs",
    [
        (torch.float16, (31, 64), "multiple of 32"),
        (torch.float16, (32, 32), "multiple of 64"),
        (torch.bfloat16, (1, 64), "multiple of 32"),
        (torch.bfloat16, (257, 64), "multiple of 32"),
        (torch.bfloat16, (32, 4097), "multiple of 64"),
        (torch.float16, (0, 64), "positive multiple"),
        (torch.int8, (16, 64), "multiple of 128"),
        (torch.int8, (15, 128), "multiple of 16"),
    ],
)
def test_bad_shape_names_the_multiples(dtype, shape, needs):
    with pytest.raises(ValueError, match=needs):
        pack24(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_24_input_names_row_and_columns(dtype, device, cpu_path):
    x = torch.zeros(48 if dtype == torch.int8 else 64, 128 if dtype == torch.int8 else 64, dtype=dtype)
    x[37, 9:12] = 1  # columns 9, 10, 11 of group 8:12: 3 nonzeros
    x[40, 0:4] = 1  # a later row, also bad: the first one is reported
    before = x.clone()
    with pytest.raises(ValueError, match=r"dense\[37, 8:12\] has more than 2 nonzeros.*prune=True"):
        pack24(x.to(device))
    assert torch.equal(x, before)
    values, meta = pack24(x.to(device), prune=True)  # what the message suggests works
    assert torch.equal(unpack24(values, meta).cpu(), reference.nm_prune(x, 2, 4)[0])


def test_unpack_mismatched_values_and_meta():
    x = random_24(64, 128, torch.float16, torch.Generator().manual_seed(5))
    values, meta = pack24(x)
    with pytest.raises(ValueError, match=r"need meta of shape \[64, 8\]"):
        unpack24(values, meta[:, :4])
    with pytest.raises(ValueError, match="need meta of shape"):
        unpack24(values[:32], meta)
    with pytest.raises(ValueError, match=r"need meta of shape \[64, 8\], got meta of shape \[512\]"):
        unpack24(values, meta.reshape(-1))
    with pytest.raises(TypeError, match="meta must be torch.int16 for torch.float16 values, got torch.int32"):
        unpack24(values, meta.to(torch.int32))
    with pytest.raises(TypeError, match="meta must be torch.int32 for torch.int8 values, got torch.int16"):
        unpack24(values.view(torch.int8)[:, :64].contiguous(), meta)
    with pytest.raises(TypeError, match="float16, bfloat16 or int8"):
        unpack24(values.float(), meta)
    with pytest.raises(ValueError, match="multiple of 64"):
        unpack24(values[:, :16], meta[:, :2])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="meta is on cpu but values are on cuda"):
            unpack24(values.cuda(), meta)


def test_unpack_rejects_corrupt_meta():
    x = random_24(32, 64, torch.bfloat16, torch.Generator().manual_seed(6))
    values, meta = pack24(x)
    corrupt = meta.clone()
    corrupt.view(-1)[0] = 0  # nibble 0 = positions (0, 0): not a 2:4 pattern
    with pytest.raises(ValueError, match=r"dense\[0, 0:4\].*not one of the six 2:4 patterns"):
        unpack24(values, corrupt)


# --- torch.library integration -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x = random_24(*SHAPES[dtype][0], dtype, torch.Generator().manual_seed(7))
    torch.library.opcheck(torch.ops.step_kernels.pack24.default, (x,), {"prune": False})
    torch.library.opcheck(torch.ops.step_kernels.pack24.default, (x,), {"prune": True})
    values, meta = pack24(x)
    torch.library.opcheck(torch.ops.step_kernels.unpack24.default, (values, meta))


def test_compiles_with_fake_kernels():
    x = random_dense(64, 128, torch.bfloat16, torch.Generator().manual_seed(8))

    def roundtrip(w):
        values, meta = pack24(w, prune=True)
        return unpack24(values * 2, meta)

    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    assert_bits_equal(compiled(x), roundtrip(x))


def test_top_level_exports():
    assert step_kernels.pack24 is pack24 and step_kernels.unpack24 is unpack24


def test_cuda_sources_include_no_torch_header():
    """pack24.cu (and the csrc headers it pulls in) must build with nvcc alone (docs/design.md section 2)."""
    import pathlib
    import re

    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    seen, todo = set(), [p.name for p in csrc.glob("*.cu")]
    assert "pack24.cu" in todo
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for include in re.findall(r'^#include [<"]([^>"]+)[>"]', (csrc / name).read_text(), re.M):
            assert not re.match(r"(torch|ATen|c10|caffe2|pybind11|Python)", include), f"{name} includes {include}"
            if (csrc / include).exists():
                todo.append(include)
    assert "pack24.h" in seen and "nm_select.h" in seen
