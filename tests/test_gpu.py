"""GPU-only checks at LLM sizes, run by ``make gpu-check`` (skipped without a CUDA device).

- pack24 / unpack24 on CUDA against both CPU paths (AVX2 rows and the portable group loop) and
  against torch's CUTLASS conversion run on the same CUDA tensors, byte for byte, on Llama-sized
  weights (the device-parametrised tests of ``test_pack24.py`` cover the small awkward shapes);
- the 2:4 sparse linear through ``step_kernels.export.to_sparse_semi_structured`` against the dense
  GEMM of the same pruned weight on FFN shapes.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from step_kernels import _extension, pack24, reference, unpack24

conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
from test_pack24 import assert_bits_equal, random_24, random_dense  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_extension.missing_reason() is not None, reason=str(_extension.missing_reason())),
]

DTYPES = [torch.float16, torch.bfloat16, torch.int8]
# Llama-3-8B attention and FFN weights [out, in]: 16.8M and 58.7M elements.
LLM_SHAPES = [(4096, 4096), (14336, 4096)]


def cpu_pack(x, prune, simd, monkeypatch):
    """pack24 of the CPU copy of ``x`` through the AVX2 rows (``simd``) or the portable loop."""
    monkeypatch.setenv("STEP_KERNELS_PACK24_SIMD", "1" if simd else "0")
    return pack24(x.cpu(), prune=prune)


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack24_cuda_equals_cpu_and_torch_on_llm_shapes(dtype, prune, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    for rows, cols in LLM_SHAPES:
        x = (random_dense if prune else random_24)(rows, cols, dtype, gen)
        x_cuda = x.cuda()
        values, meta = pack24(x_cuda, prune=prune)
        assert values.is_cuda and meta.is_cuda
        source = reference.nm_prune(x_cuda, 2, 4)[0] if prune else x_cuda
        torch_values, torch_meta = conv.sparse_semi_structured_from_dense_cutlass(source)
        assert_bits_equal(values, torch_values)
        assert_bits_equal(meta, torch_meta)
        for simd in (True, False):
            cpu_values, cpu_meta = cpu_pack(x, prune, simd, monkeypatch)
            assert_bits_equal(values, cpu_values)
            assert_bits_equal(meta, cpu_meta)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpack24_cuda_equals_cpu_and_torch_on_llm_shapes(dtype):
    gen = torch.Generator().manual_seed(12)
    for rows, cols in LLM_SHAPES:
        x = random_24(rows, cols, dtype, gen)
        values, meta = pack24(x)
        dense = unpack24(values.cuda(), meta.cuda())
        assert dense.is_cuda
        assert_bits_equal(dense, unpack24(values, meta))
        assert_bits_equal(dense, conv.sparse_semi_structured_to_dense_cutlass(values.cuda(), meta.cuda()))
        assert torch.equal(dense.cpu(), x)  # -0.0 fillers come back as +0.0, equal in value


# (tokens, in_features, out_features): Llama-3-8B FFN up/gate and down projections.
FFN_SHAPES = [(512, 4096, 14336), (512, 14336, 4096)]


@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparse_linear_matches_dense_on_ffn_shapes(dtype, shape):
    """Both GEMMs accumulate in fp32 and round once: each is within 2 ulps of the output's scale of
    the fp32 product, and the sparse one within 4 of the dense one."""
    from step_kernels.export import to_sparse_semi_structured

    tokens, d_in, d_out = shape
    gen = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(tokens, d_in, device="cuda", generator=gen).to(dtype)
    weight = reference.nm_prune((torch.randn(d_out, d_in, device="cuda", generator=gen) * 0.02).to(dtype), 2, 4)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hopper routes through cuSPARSELt and says so
        sparse = to_sparse_semi_structured(weight)
    assert isinstance(sparse, torch.sparse.SparseSemiStructuredTensor)
    exact = F.linear(x.float(), weight.float())
    dense, out = F.linear(x, weight), F.linear(x, sparse)
    assert out.dtype == dtype and out.shape == (tokens, d_out)
    ulp = exact.abs().max().item() * torch.finfo(dtype).eps
    assert (dense.float() - exact).abs().max().item() <= 2 * ulp
    assert (out.float() - exact).abs().max().item() <= 2 * ulp
    assert (out.float() - dense.float()).abs().max().item() <= 4 * ulp
