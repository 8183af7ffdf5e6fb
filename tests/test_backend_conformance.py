"""What every fused-step backend must do, run on each of them: the C++ backend ("cpu") and the
Triton backend ("triton", on CPU tensors under TRITON_INTERPRET=1 and on CUDA when present), each
against the reference or an independent peer within its own tolerance (``BACKENDS``).

The backend files keep what is backend-specific: tests/test_fused_step_cpu.py (instruction sets,
thread counts, the C++ error messages), tests/test_fused_step_triton.py (the interpreter, launch
counts, the kernel's signature and error messages). Not merged yet: their reference-comparison
grids over N:M, shapes and dtypes (different inputs and case lists per backend) and the 50-step
optimizer runs.
"""

import functools
import os

import pytest
import torch

from helpers import FLAGS, ROW_SCALARS, assert_ulps, clone, compare, compare_ulps, make_case, make_tensors, rows, run
from helpers import scalars as _scalars
from step_kernels import ops
from step_kernels import reference as ref

CPU_REASON = ops.backend_status("cpu", torch.device("cpu"))


def _triton_missing():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


TRITON_REASON = _triton_missing()

# Each backend with the tolerances its results are held to. "ulps": against torch.optim.AdamW and
# the RNE casts (4 ulps of the value or the update: torch's CPU sqrt is not always correctly
# rounded). "compare": one step on rows [w, g, m, second, out] against the reference; "cpu" is
# bit-exact but for the live-v weight (helpers.compare, tests/test_fused_step_cpu.py explains it),
# "triton" within 4 ulps (helpers.compare_ulps, tests/test_fused_step_triton.py explains it).
BACKENDS = {
    "cpu": dict(ulps=4, compare=lambda *a, decay_factor, **k: compare(*a, decay_factor=decay_factor, **k)),
    "triton": dict(ulps=4, compare=lambda *a, decay_factor, **k: compare_ulps(*a, ulps=4, **k)),
}
scalars = functools.partial(_scalars, **ROW_SCALARS)
BACKEND_PARAMS = [
    pytest.param("cpu", marks=pytest.mark.skipif(CPU_REASON is not None, reason=f"backend 'cpu': {CPU_REASON}")),
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None, reason=f"{TRITON_REASON}")),
]


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    return request.param


@pytest.fixture
def bdevice(backend, device):
    """The device ``backend`` runs on here: "cpu" takes CPU tensors only; "triton" takes CPU
    tensors under the interpreter and CUDA tensors."""
    if backend == "cpu" and device.type != "cpu":
        pytest.skip("backend 'cpu' takes CPU tensors")
    if backend == "triton" and device.type == "cpu" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


@pytest.fixture
def cpu_tensors_backend(backend):
    """``backend`` for a check on CPU tensors ("triton" needs the interpreter for them)."""
    if backend == "triton" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return backend


def run_both(backend, tensors, scalars, **kwargs):
    """Run the reference and ``backend`` on copies of per-tensor rows [w, g, m, second, out]."""
    results = {}
    for name in ("reference", backend):
        copies = [[x.clone() if x is not None else None for x in t] for t in tensors]
        w, g, m1, second, out = (list(col) for col in zip(*copies))
        totals, launches = ops.fused_step(name, w, g, m1, second, out, scalars=scalars, **kwargs)
        results[name] = dict(w=w, m=m1, second=second, out=out, totals=totals.cpu(), launches=launches)
    return results["reference"], results[backend]


def test_adamw_matches_torch_adamw(backend, bdevice):
    """An independent peer: torch.optim.AdamW over three steps with changing lr."""
    ulps = BACKENDS[backend]["ulps"]
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(bdevice) for s in [(33,), (8, 40)]]
    peer = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(peer, lr=1e-2, weight_decay=0.1, foreach=False)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for step, lr in enumerate([1e-2, 5e-3, 2e-2], start=1):
        grads = [torch.randn(p.shape, generator=gen).to(bdevice) for p in params]
        for q, g in zip(peer, grads):
            q.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        s = ref.step_scalars(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step)
        ops.fused_step(backend, params, grads, exp_avgs, exp_avg_sqs, [None, None], masked=False, frozen_v=False,
                       scalars=s)
    for p, q in zip(params, peer):
        assert_ulps(p, q.detach(), "w vs torch.optim.AdamW", ulps=ulps)
    for mine, q in zip(exp_avg_sqs, peer):
        assert_ulps(mine, opt.state[q]["exp_avg_sq"], "v vs torch.optim.AdamW", ulps=ulps)


def test_nan_and_signed_zero_rules(backend, bdevice):
    """NaN weights count as +inf and stay kept; pruned entries are written +0.0; -0.0 kept stays -0.0."""
    w = torch.tensor([[float("nan"), 1.0, 2.0, 0.5, -0.0, 0.0, 0.0, 0.0]], device=bdevice)
    g = torch.zeros_like(w)
    tensors = [[w, g, torch.zeros_like(w), torch.ones_like(w), torch.empty_like(w, dtype=torch.bfloat16)]]
    s = ref.step_scalars(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, srste_decay=0.0)
    r, t = run_both(backend, tensors, s, masked=True, frozen_v=True, n=2, m=4, group_dims=[1])
    out = t["out"][0].float().cpu()
    assert torch.isnan(out[0, 0]) and out[0, 2] == 2.0 and out[0, 1] == 0 and out[0, 3] == 0
    assert not torch.signbit(out[0, 1]) and not torch.signbit(out[0, 3])
    assert torch.signbit(out[0, 4]) and out[0, 4] == 0  # kept by the tie rule: -0.0 is the lowest index of 4 ties
    assert torch.equal(torch.signbit(out[0, 5:]), torch.zeros(3, dtype=torch.bool))
    assert t["totals"][2].item() == r["totals"][2].item() == 0


def test_round_to_nearest_even_model_params(backend, bdevice):
    """Halfway cases, overflow, subnormals and NaN of the fp32 -> bf16/fp16 store, against torch's casts."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F800001, 0x7F7FFFFF, 0x477FF000, 0x477FEFFF, 0x33000000,
                         0x33000001, 0x387FC000, 0x00000001, 0x80000000, 0xFF800000, 0x7FC00001, 0xC7800000],
                        dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    base = torch.randn(64 - x.numel())
    values = torch.cat([x, base]).reshape(1, 64).to(bdevice)
    for dtype in (torch.bfloat16, torch.float16):
        w = values.clone()
        out = torch.empty_like(w, dtype=dtype)
        s = ref.step_scalars(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        ops.fused_step(backend, [w], [torch.zeros_like(w)], [torch.zeros_like(w)], [torch.zeros_like(w)], [out],
                       masked=False, frozen_v=False, scalars=s)
        expected = values.to(dtype)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan], expected[~nan]), dtype


# ---------------------------------------------------------------------------------------------
# one step on CPU tensors against the reference, within the backend's "compare" tolerance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_nan_inf_zero_and_ties_follow_the_rules(flags, cpu_tensors_backend):
    backend = cpu_tensors_backend
    frozen = FLAGS[flags][1]
    theirs = make_tensors([(4, 16)], frozen=frozen, g_dtype=torch.float32, out_dtype=torch.bfloat16)
    w = theirs[0][0]
    w[0, :4] = torch.tensor([float("nan"), 1.0, float("inf"), -2.0])   # NaN counts as +inf
    w[1, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0])                       # all tie: lower index wins
    w[2, :4] = torch.tensor([3.0, -3.0, 3.0, 1.0])                        # ties on magnitude
    w[3, :8] = torch.tensor([float("nan")] * 3 + [1.0] * 5)               # more NaNs than N
    theirs[0][1][1, :4] = 0.0  # grads of the zero group stay zero, so its ties survive the step
    theirs[0][2][1, :4] = 0.0
    ours = clone(theirs)
    keep_before = ref.nm_mask(w, 2, 4, 1)
    w_before = [w.clone()]
    tot_ref = run("reference", theirs, flags=flags, n=2, m=4, dims=[1], s=scalars(weight_decay=0.0))
    tot_ours = run(backend, ours, flags=flags, n=2, m=4, dims=[1], s=scalars(weight_decay=0.0))
    BACKENDS[backend]["compare"](ours, theirs, tot_ours, tot_ref, flags=flags, w_before=w_before,
                                 decay_factor=1.0, n=2, m=4, dims=[1])
    out, w_new = ours[0][4], ours[0][0]
    keep = ref.nm_mask(w_new, 2, 4, 1)
    assert keep.view(-1, 4).sum(1).eq(2).all(), "exactly N kept in every group"
    assert keep_before[0, :4].tolist() == [True, False, True, False]
    assert keep[1, :4].tolist() == [True, True, False, False]
    assert keep[3, :4].tolist() == [True, True, False, False]
    assert torch.isnan(out[0, 0]) and torch.isnan(out[3, :2]).all(), "a kept NaN stays visible"
    pruned = out.float()[~keep]
    assert pruned.eq(0).all() and not torch.signbit(pruned).any(), "pruned entries are +0.0"


def test_grad_scale_divides_and_found_inf_skips(cpu_tensors_backend):
    backend = cpu_tensors_backend
    theirs = make_tensors([(6, 64)], frozen=True, g_dtype=torch.float16, out_dtype=torch.bfloat16)
    ours = clone(theirs)
    w_before = [theirs[0][0].clone()]
    scale = torch.tensor(1024.0)
    tot_ref = run("reference", theirs, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale)
    tot_ours = run(backend, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale)
    BACKENDS[backend]["compare"](ours, theirs, tot_ours, tot_ref, flags="phase2", w_before=w_before,
                                 decay_factor=None, n=2, m=4, dims=[1])
    before = clone(ours)
    for found in (torch.tensor(1.0), torch.tensor([float("inf")])):
        tot = run(backend, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale, found_inf=found)
        assert tot.tolist() == [0.0, 0.0, 0.0]
        for a, b in zip(ours[0], before[0]):
            assert torch.equal(a, b), "found_inf must leave every tensor untouched"
    run(backend, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale, found_inf=torch.tensor(0.0))
    assert not torch.equal(ours[0][0], before[0][0]), "found_inf == 0 steps"


def test_grad_scale_and_found_inf_on_device(backend, bdevice):
    """The Triton file's case (grads scaled by 1024 in bf16, a [1] found_inf) on every backend."""
    s = _scalars(step=3, lr=1e-2, weight_decay=0.1, srste_decay=0.05)  # the Triton file's scalars
    shapes = [(4, 16), (2, 8)]
    tensors = make_case(shapes, frozen=True, grad_dtype=torch.bfloat16, out_dtype=torch.bfloat16,
                        precond_dtype=torch.float32, device=bdevice, seed=9)
    for t in tensors:
        t[1] = (t[1].float() * 1024).to(torch.bfloat16)
    scale = torch.tensor([1024.0], device=bdevice)
    kwargs = dict(masked=True, frozen_v=True, n=1, m=4, group_dims=[1, 1], grad_scale=scale)
    r, t = run_both(backend, tensors, s, found_inf=torch.zeros(1, device=bdevice), **kwargs)
    BACKENDS[backend]["compare"](rows(t), rows(r), t["totals"], r["totals"], flags="phase2",
                                 w_before=[row[0] for row in tensors], decay_factor=s.decay_factor, n=1, m=4,
                                 dims=[1, 1])
    before = [[x.clone() for x in row] for row in tensors]
    w, g, m1, second, out = (list(col) for col in zip(*tensors))
    totals, _ = ops.fused_step(backend, w, g, m1, second, out, scalars=s,
                               found_inf=torch.ones(1, device=bdevice), **kwargs)
    assert totals.abs().sum().item() == 0
    for row, old in zip(tensors, before):
        for x, y in zip(row, old):
            assert torch.equal(x, y), "found_inf must make the step a no-op"


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_deterministic_partial_sums(backend, bdevice):
    """Two runs of the same step give bit-identical AutoSwitch sums (the Triton file's scalars)."""
    s = _scalars(step=3, lr=1e-2, weight_decay=0.1, srste_decay=0.05)
    shapes = [(1, 3000), (7, 257), (1,)]
    tensors = make_case(shapes, frozen=False, grad_dtype=torch.float32, out_dtype=None,
                        precond_dtype=torch.float32, device=bdevice, seed=21, ties=False)
    runs = [run_both(backend, tensors, s, masked=False, frozen_v=False, compute_stats=True)[1]["totals"]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
