"""The Triton N:M prune (triton_kernels/nm_prune.py) against the reference, bit for bit."""

import os

import pytest
import torch

from helpers import NM_SMALL as NM
from helpers import same_bits, shapes_for, with_specials
from step_kernels import ops
from step_kernels import reference as ref

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def tdevice(device):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
def test_matches_reference_bit_for_bit(n, m, dtype, tdevice):
    for i, (shape, dim) in enumerate(shapes_for(m)):
        w = with_specials(torch.empty(shape, dtype=dtype), seed=i + 31 * m + n).to(tdevice)
        out, mask = ops.nm_prune(w, n, m, dim, backend="triton")
        ref_out, ref_mask = ref.nm_prune(w, n, m, dim)
        assert mask.dtype == torch.bool and torch.equal(mask, ref_mask), (shape, dim)
        assert out.dtype == dtype and same_bits(out, ref_out), (shape, dim)
        kept = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
        assert (kept == n).all()


def test_pruned_entries_are_positive_zero(tdevice):
    w = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], device=tdevice)
    out, mask = ops.nm_prune(w, 2, 4, backend="triton")
    assert mask.tolist() == [[False, False, True, True]]
    assert not torch.signbit(out[0, :2]).any() and out[0, 2:].tolist() == [-3.0, -4.0]


def test_empty_tensor(tdevice):
    out, mask = ops.nm_prune(torch.empty(0, 8, device=tdevice), 2, 4, backend="triton")
    assert out.shape == mask.shape == (0, 8)


def test_bad_input():
    from step_kernels.triton_kernels.nm_prune import nm_prune

    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="not divisible by M=4"):
        nm_prune(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="M must be a power of two"):
        nm_prune(w, 2, 3)
    with pytest.raises(ValueError, match="N must satisfy"):
        nm_prune(w, 4, 4)
    with pytest.raises(ValueError, match="w is not contiguous"):
        nm_prune(torch.randn(8, 4).t(), 2, 4)
    with pytest.raises(ValueError, match="w has unsupported dtype torch.float64"):
        nm_prune(w.double(), 2, 4)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        nm_prune(w, 2, 4, dim=2)


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    from step_kernels.triton_kernels.nm_prune import nm_prune

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="w is on cpu: the Triton kernels need CUDA tensors"):
        nm_prune(torch.randn(4, 8), 2, 4)
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.nm_prune(torch.randn(4, 8), 2, 4, backend="triton")
