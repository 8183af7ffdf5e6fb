"""The Triton fused step (triton_kernels/fused_step.py) against the reference, on CPU under
TRITON_INTERPRET=1 and on CUDA when present.

Masks are compared bit for bit. Values may differ from the reference by its own rounding: torch's
CPU sqrt is not always correctly rounded (the kernel's is), so master weights and moments are
allowed ``ULPS`` units in the last place of the value or of the step's update; model parameters must equal the
RNE cast of the kernel's own masked master exactly.
"""

import functools
import os

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import NM_SMALL as NM
from helpers import assert_ulps as _assert_ulps
from helpers import compare_ulps, make_case, rows, tiny_gpt
from helpers import scalars as _scalars
from step_kernels import ops
from step_kernels import reference as ref

pytest.importorskip("triton")

# torch's CPU sqrt may be one ulp off; through the division and the add that is up to ~3 ulps of
# the update. Four ulps of max(|w|, |update|) is the reference's own rounding, not the kernel's.
ULPS = 4


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def tdevice(device):
    """The test device, skipping CPU when Triton's interpreter is off (a CUDA machine)."""
    if device.type == "cpu" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


assert_ulps = functools.partial(_assert_ulps, ulps=ULPS)
scalars = functools.partial(_scalars, step=3, lr=1e-2, weight_decay=0.1, srste_decay=0.05)


def run_both(tensors, scalars, **kwargs):
    """Run the reference and the Triton backend on copies; returns both results."""
    results = {}
    for backend in ("reference", "triton"):
        copies = [[x.clone() if x is not None else None for x in t] for t in tensors]
        w, g, m1, second, out = (list(col) for col in zip(*copies))
        totals, launches = ops.fused_step(backend, w, g, m1, second, out, scalars=scalars, **kwargs)
        results[backend] = dict(w=w, m=m1, second=second, out=out, totals=totals.cpu(), launches=launches)
    return results["reference"], results["triton"]


def check_against_reference(r, t, *, masked, frozen, n, m, dims, out_dtype, before):
    """helpers.compare_ulps: ULPS of the reference, the same masks and flips, model params the RNE
    cast of the kernel's own masked w."""
    assert all((x is None) == (out_dtype is None) for x in t["out"])
    compare_ulps(rows(t), rows(r), t["totals"], r["totals"], flags=(masked, frozen, False),
                 w_before=[row[0] for row in before], ulps=ULPS, n=n, m=m, dims=dims)


def contiguous_shapes(m):
    # rows x groups: 1 group, 15 groups, 257 groups (several blocks, a tail), a block-sized tensor
    return [(1, m), (3, 5 * m), (1, 257 * m), (2, 1024 // 2)]


def strided_shapes(m):
    # [in, out] Conv1D layout; cols 1, 15 (not a multiple of 16), 257, 48 with 1-3 row groups
    return [(m, 1), (m, 15), (2 * m, 257 // 2 * 2 + 1), (3 * m, 48)]


# (masked, frozen, grad dtype, model dtype, precond dtype)
RECIPES = {
    "step2-fp32": (True, True, torch.float32, torch.float32, torch.float32),
    "step2-bf16": (True, True, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "step2-fp16": (True, True, torch.float16, torch.float16, torch.float32),
    "srste-fp32": (True, False, torch.float32, torch.float32, torch.float32),
    "srste-bf16": (True, False, torch.bfloat16, torch.bfloat16, torch.float32),
}


@pytest.mark.parametrize("n,m", NM)
def test_masked_contiguous_every_nm(n, m, tdevice):
    masked, frozen, gd, od, pd = RECIPES["step2-bf16"]
    shapes = contiguous_shapes(m)
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=tdevice,
                        seed=n * 100 + m)
    dims = [1] * len(shapes)
    r, t = run_both(tensors, scalars(), masked=True, frozen_v=frozen, n=n, m=m, group_dims=dims)
    check_against_reference(r, t, before=tensors, masked=True, frozen=frozen, n=n, m=m, dims=dims, out_dtype=od)
    assert t["launches"] == 2  # one step launch for all tensors + the partial-sum launch


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 16), (16, 32)])
@pytest.mark.parametrize("recipe", ["step2-fp32", "srste-bf16"])
def test_masked_strided_conv1d(recipe, n, m, tdevice):
    masked, frozen, gd, od, pd = RECIPES[recipe]
    shapes = strided_shapes(m)
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=tdevice,
                        seed=7 * m + n)
    dims = [0] * len(shapes)
    r, t = run_both(tensors, scalars(), masked=True, frozen_v=frozen, n=n, m=m, group_dims=dims)
    check_against_reference(r, t, before=tensors, masked=True, frozen=frozen, n=n, m=m, dims=dims, out_dtype=od)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_masked_recipes_and_dtypes_mixed_orientation(recipe, tdevice):
    masked, frozen, gd, od, pd = RECIPES[recipe]
    n, m = 2, 4
    shapes = contiguous_shapes(m)[:3] + strided_shapes(m)[:2]
    dims = [1, 1, 1, 0, 0]
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=tdevice,
                        seed=3)
    r, t = run_both(tensors, scalars(), masked=True, frozen_v=frozen, n=n, m=m, group_dims=dims)
    check_against_reference(r, t, before=tensors, masked=True, frozen=frozen, n=n, m=m, dims=dims, out_dtype=od)
    assert t["launches"] == 3  # one step launch per orientation + the partial sums


@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("stats", [False, True])
def test_adamw_matches_reference(grad_dtype, out_dtype, stats, tdevice):
    shapes = [(1,), (15,), (257,), (1024 + 17,), (4, 1024), (3, 5, 7)]  # tails, non-multiples of 16 and of the block
    tensors = make_case(shapes, frozen=False, grad_dtype=grad_dtype, out_dtype=out_dtype,
                        precond_dtype=torch.float32, device=tdevice, seed=11, ties=False)
    r, t = run_both(tensors, scalars(), masked=False, frozen_v=False, compute_stats=stats)
    check_against_reference(r, t, before=tensors, masked=False, frozen=False, n=0, m=0, dims=None, out_dtype=out_dtype)
    assert t["launches"] == (2 if stats else 1)
    if not stats:
        assert t["totals"].abs().sum().item() == 0


def test_misaligned_views_take_the_unaligned_variant(tdevice):
    """Contiguous views that start 4 bytes into their storage cannot use the 16-byte hints."""
    tensors = make_case([(3, 40), (257,)], frozen=False, grad_dtype=torch.float32, out_dtype=None,
                        precond_dtype=torch.float32, device=tdevice, seed=13, ties=False)
    for row in tensors:
        for k in range(4):
            shifted = torch.empty(row[k].numel() + 1, dtype=row[k].dtype, device=tdevice)[1:].view(row[k].shape)
            shifted.copy_(row[k])
            row[k] = shifted
    assert tensors[0][0].data_ptr() % 16 != 0
    r, t = run_both(tensors, scalars(), masked=False, frozen_v=False, compute_stats=True)
    check_against_reference(r, t, before=tensors, masked=False, frozen=False, n=0, m=0, dims=None, out_dtype=None)


def test_scalars_are_runtime_arguments():
    """lr, step and the other hyper-parameters must not be constexpr: changing them never recompiles."""
    import inspect

    from step_kernels.triton_kernels.fused_step import _fused_step_kernel

    params = inspect.signature(_fused_step_kernel.fn).parameters
    for name in ("decay_factor", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "bc2_sqrt", "eps",
                 "srste_decay"):
        assert params[name].annotation is inspect.Parameter.empty, name


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the tensor, nothing written
# ---------------------------------------------------------------------------------------------


def _lists(device, n=2, shape=(4, 8)):
    w = [torch.randn(shape, device=device) for _ in range(n)]
    return w, [torch.randn(shape, device=device) for _ in range(n)], \
        [torch.zeros(shape, device=device) for _ in range(n)], \
        [torch.zeros(shape, device=device) for _ in range(n)], [None] * n


@pytest.mark.parametrize("break_it,match", [
    (lambda L: L[1].__setitem__(1, torch.randn(8, 4).t()), r"grads\[1\] is not contiguous"),
    (lambda L: L[2].__setitem__(0, torch.zeros(4, 4)), r"exp_avgs\[0\] has shape"),
    (lambda L: L[1].__setitem__(0, torch.randn(4, 8, dtype=torch.float64)), r"grads\[0\] has unsupported dtype"),
    (lambda L: L[1].__setitem__(1, torch.randn(4, 8, dtype=torch.bfloat16)), r"grads\[1\] has dtype .* grads\[0\]"),
    (lambda L: L[0].__setitem__(1, torch.randn(4, 8, device="meta")), r"weights\[1\] is on meta"),
    (lambda L: L[3].__setitem__(1, torch.zeros(4, 8, dtype=torch.bfloat16)), r"second_moments\[1\] has unsupported"),
    (lambda L: L[4].__setitem__(1, torch.zeros(4, 8)), r"model_params\[1\] is a tensor but model_params\[0\] is None"),
])
def test_bad_input_names_the_tensor_and_writes_nothing(break_it, match):
    lists = list(_lists("cpu"))
    break_it(lists)
    before = [[x.clone() if x is not None and x.device.type != "meta" else x for x in col] for col in lists]
    s = scalars()
    with pytest.raises(ValueError, match=match):
        ops.fused_step("triton", *lists, masked=False, frozen_v=False, scalars=s)
    for col, old in zip(lists, before):
        for x, y in zip(col, old):
            if x is not None and x.device.type != "meta":
                assert torch.equal(x, y)


def test_bad_groups_and_scalars():
    w, g, m1, v, out = _lists("cpu", shape=(4, 6))
    with pytest.raises(ValueError, match=r"weights\[0\]: size 6 of dim 1 .* not divisible by M=4"):
        ops.fused_step("triton", w, g, m1, v, out, masked=True, frozen_v=False, n=2, m=4, group_dims=[1, 1],
                       scalars=scalars())
    with pytest.raises(ValueError, match="M must be a power of two"):
        ops.fused_step("triton", w, g, m1, v, out, masked=True, frozen_v=False, n=2, m=6, group_dims=[1, 1],
                       scalars=scalars())
    with pytest.raises(ValueError, match="found_inf must be a one-element float32 tensor"):
        ops.fused_step("triton", w, g, m1, v, out, masked=False, frozen_v=False, scalars=scalars(),
                       found_inf=torch.zeros(2))
    with pytest.raises(ValueError, match="frozen_v=True requires masked=True"):
        ops.fused_step("triton", w, g, m1, v, out, masked=False, frozen_v=True, scalars=scalars())


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    from step_kernels.triton_kernels.fused_step import fused_step

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w, g, m1, v, out = _lists("cpu")
    with pytest.raises(ValueError, match=r"weights\[0\] is on cpu: the Triton kernels need CUDA tensors"):
        fused_step(w, g, m1, v, out, masked=False, frozen_v=False, scalars=scalars())
    with pytest.raises(sk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        sk.STEP([torch.nn.Parameter(torch.randn(4, 4))], backend="triton")


# ---------------------------------------------------------------------------------------------
# through the optimizer
# ---------------------------------------------------------------------------------------------


def test_launches_do_not_grow_with_parameters(tdevice):
    def launches(layers):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)]).to(tdevice)
        opt = sk.STEP(sk.sparse_param_groups(model, "2:4", exclude=[]), switch=1, backend="triton")
        counts = []
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            counts.append(opt.stats()["kernel_launches"])
        return counts, len(list(model.parameters()))

    small, n_small = launches(6)
    large, n_large = launches(60)
    assert (n_small, n_large) == (12, 120)
    # step 1 (switch=1, no statistics): one launch for all; then masked (step + partial sums) + biases
    assert small == large == [1, 3]


def _teacher_forced_run(dtype, recipe, steps, device):
    """Two copies of a model, one per backend, fed the same grads (the reference model's) each step."""
    runs = []
    for backend in ("reference", "triton"):
        model = tiny_gpt(dtype, device)
        opt = sk.STEP(sk.sparse_param_groups(model), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95), recipe=recipe,
                      switch=sk.AutoSwitch(max_step=steps // 2, threshold=1e-6, rule="absolute"), backend=backend)
        runs.append((model, opt))
    (m_ref, o_ref), (m_tri, o_tri) = runs
    assert o_tri.backend == "triton"
    history = []
    for step in range(steps):
        o_ref.zero_grad()
        gen = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(0, 64, (4, 17), generator=gen).to(device)
        m_ref.loss(idx[:, :-1], idx[:, 1:]).backward()
        for p, q in zip(m_ref.parameters(), m_tri.parameters()):
            q.grad = p.grad.clone()
        o_ref.step()
        o_tri.step()
        history.append((o_ref.phase, o_tri.phase, o_ref.stats()["flip_rate"], o_tri.stats()["flip_rate"]))
    return (m_ref, o_ref), (m_tri, o_tri), history


@pytest.mark.parametrize("dtype,recipe", [(torch.float32, "step"), (torch.bfloat16, "step")])
def test_optimizer_50_steps_through_the_switch_equals_reference(dtype, recipe, tdevice):
    (m_ref, o_ref), (m_tri, o_tri), history = _teacher_forced_run(dtype, recipe, 50, tdevice)
    assert o_ref.switch_step == o_tri.switch_step is not None and o_tri.switch_step < 50
    for ref_phase, tri_phase, ref_flips, tri_flips in history:
        assert ref_phase == tri_phase and ref_flips == tri_flips
    assert o_ref.stats()["z_history"] == pytest.approx(o_tri.stats()["z_history"], rel=1e-5)
    for (name, p), q in zip(m_ref.named_parameters(), m_tri.parameters()):
        s_ref, s_tri = o_ref.state[p], o_tri.state[q]
        assert set(s_ref) == set(s_tri), name
        assert s_tri["step"] == s_ref["step"], name  # the parameter's own step count (an int)
        for key in set(s_ref) - {"step"}:
            # 50 steps of one-ulp differences (torch's CPU sqrt): relative 1e-5 of the tensor's scale
            scale = s_ref[key].float().abs().max().item()
            torch.testing.assert_close(s_tri[key].float(), s_ref[key].float(), rtol=1e-5, atol=1e-5 * scale,
                                       msg=f"{name}:{key}")
        master = s_tri.get("master", q)
        group = next(g for g in o_tri.param_groups if any(x is q for x in g["params"]))
        if group.get("sparsity") is not None:
            keep = ref.nm_mask(master, 2, 4, group["nm_dim"])
            assert torch.equal(keep, ref.nm_mask(s_ref.get("master", p), 2, 4, group["nm_dim"])), name
            assert torch.equal(q.detach(), torch.where(keep, master, torch.zeros(())).to(dtype)), name
        else:
            assert torch.equal(q.detach(), master.to(dtype)), name
