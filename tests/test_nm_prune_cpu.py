"""The C++ N:M prune (csrc/nm_prune_cpu.cpp, ``nm_prune(backend="cpu")``) against the reference, bit for bit."""

import pytest
import torch

from helpers import same_bits, shapes_for, with_specials
from step_kernels import _extension, ops
from step_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    _extension.missing_reason() is not None, reason=str(_extension.missing_reason())
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]


def assert_matches_reference(w, n, m, dim):
    out, mask = ops.nm_prune(w, n, m, dim, backend="cpu")
    ref_out, ref_mask = ref.nm_prune(w, n, m, dim)
    assert mask.dtype == torch.bool and torch.equal(mask, ref_mask), (tuple(w.shape), dim, n, m)
    assert out.shape == w.shape and same_bits(out, ref_out), (tuple(w.shape), dim, n, m)
    kept = mask.movedim(dim, -1).reshape(-1, m).sum(-1)
    assert (kept == n).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ref.SUPPORTED_M)
def test_every_nm_matches_reference_bit_for_bit(m, dtype):
    for n in range(1, m):
        for i, (shape, dim) in enumerate(shapes_for(m)):
            w = with_specials(torch.empty(shape, dtype=dtype), seed=i + 31 * m + n)
            assert_matches_reference(w, n, m, dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dims_0_1_and_minus_1_of_awkward_sizes(dtype):
    w = with_specials(torch.empty(24, 40, dtype=dtype), seed=3)  # 24 = 3 groups of 8; 40 = 5 groups of 8
    for dim in (0, 1, -1, -2):
        assert_matches_reference(w, 3, 8, dim)
    cube = with_specials(torch.empty(4, 12, 7, dtype=dtype), seed=4)
    for dim in (0, 1):
        assert_matches_reference(cube, 1, 4, dim)


def test_any_layout_is_pruned_by_value():
    base = with_specials(torch.empty(32, 48), seed=5)
    transposed = base.t()  # [48, 32], strides (1, 48)
    channels_last = with_specials(torch.empty(2, 8, 3, 4), seed=6).to(memory_format=torch.channels_last)
    for w, dim in ((transposed, 1), (transposed, 0), (base[:, ::2], 1), (channels_last, 1), (channels_last, 3)):
        before = w.clone()
        assert_matches_reference(w, 2, 4, dim)
        assert same_bits(w, before)  # the input is read, never written


def test_pruned_entries_are_positive_zero_and_kept_bits_survive():
    w = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [float("nan"), 0.0, -0.0, 1.0]])
    out, mask = ops.nm_prune(w, 2, 4, backend="cpu")
    assert mask.tolist() == [[False, False, True, True], [True, False, False, True]]
    assert not torch.signbit(out[0, :2]).any() and out[0, 2:].tolist() == [-3.0, -4.0]
    assert torch.isnan(out[1, 0]) and not torch.signbit(out[1, 1:3]).any()


def test_int8_minus_128_is_the_largest_magnitude():
    w = torch.tensor([[3, 127, -128, -4]], dtype=torch.int8)
    out, mask = ops.nm_prune(w, 1, 4, backend="cpu")
    assert mask.tolist() == [[False, False, True, False]] and out.tolist() == [[0, 0, -128, 0]]


def test_empty_tensors():
    for shape, dim in (((0, 8), 1), ((8, 0), 0), ((3, 0, 4), 2)):
        out, mask = ops.nm_prune(torch.empty(shape), 2, 4, dim, backend="cpu")
        assert out.shape == mask.shape == shape and mask.dtype == torch.bool


def test_result_does_not_depend_on_the_thread_count():
    w = with_specials(torch.empty(512, 1024), seed=7)  # many parallel chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.nm_prune(w, 2, 8, 0, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    out, mask = ops.nm_prune(w, 2, 8, 0, backend="cpu")
    assert torch.equal(mask, one[1]) and same_bits(out, one[0])
    assert_matches_reference(w, 2, 8, 0)


def test_cpu_runs_the_compiled_kernel_never_the_reference(monkeypatch):
    """An explicit backend never falls back silently (ops.py)."""
    def no_reference(*args, **kwargs):
        raise AssertionError("backend='cpu' ran the Python reference")

    monkeypatch.setattr(ref, "nm_prune", no_reference)
    monkeypatch.setattr(ref, "nm_mask", no_reference)
    out, mask = ops.nm_prune(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), 2, 4, backend="cpu")
    assert mask.tolist() == [[False, True, True, False]] and out.tolist() == [[0.0, -3.0, 2.0, 0.0]]


def test_auto_uses_the_kernel_and_the_reference_where_the_kernel_cannot(monkeypatch):
    calls = []
    real = ref.nm_prune
    monkeypatch.setattr(ref, "nm_prune", lambda *a: calls.append(a[0].dtype) or real(*a))
    w = with_specials(torch.empty(8, 16), seed=8)
    ops.nm_prune(w, 2, 4)
    assert calls == []  # fp32 on CPU: the C++ kernel
    ints = torch.arange(-16, 16, dtype=torch.int32).reshape(4, 8)
    out, mask = ops.nm_prune(ints, 2, 4)
    assert calls == [torch.int32] and torch.equal(out, real(ints, 2, 4)[0])
    trained = w.clone().requires_grad_()
    out, _ = ops.nm_prune(trained, 2, 4)
    out.sum().backward()  # the reference tracks the gradient: 1 where kept
    assert calls[-1] == torch.float32 and torch.equal(trained.grad, real(w, 2, 4)[1].float())


def test_explicit_cpu_rejects_a_dtype_it_cannot_prune():
    w = torch.arange(32, dtype=torch.int32).reshape(4, 8)
    with pytest.raises(TypeError, match=r"w: backend 'cpu' prunes .*torch\.int8 tensors, got torch\.int32"):
        ops.nm_prune(w, 2, 4, backend="cpu")
    assert torch.equal(w, torch.arange(32, dtype=torch.int32).reshape(4, 8))
