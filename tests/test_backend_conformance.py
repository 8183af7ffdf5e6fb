"""What every fused-step backend must do, run on each of them, like torch's ``OptimizerInfo`` matrix.

``BACKENDS`` lists the backends under test, each with its tolerance: the C++ backend once per
instruction-set variant this CPU supports ("cpu-avx512", "cpu-avx2", "cpu-baseline": the
``backend`` fixture forces the variant through STEP_KERNELS_CPU_ISA; the variant list is
helpers.CPU_ISAS, one line per variant) and the Triton backend ("triton", on CPU tensors under
TRITON_INTERPRET=1 and on CUDA when present). Every test runs the same inputs on every backend and
checks them against the reference or an independent peer (torch.optim.AdamW, torch's casts); the
grids that came from the C++ file take CPU tensors (``cpu_backend``), the others run on CUDA too
(``bdevice``):

- the rules: NaN, signed zeros, ties, RNE stores, grad_scale and found_inf, deterministic sums;
- one step against the reference over every flag combination and dtype, every N:M of the C++
  backend's list (helpers.NM_WIDE, a superset of the Triton list), both orientations, awkward sizes
  (1, 4, 15, 257 and 4097 groups, tails, a block-sized tensor, misaligned views), empty tensors
  and lists: the grids the two backend files had, united;
- bad input: every error condition both backends check, each raising its own message naming the
  tensor, and nothing written;
- the STEP optimizer over 50 steps against the same optimizer on the reference backend.

One exception, visible in the report: under the interpreter Triton skips the strided layouts of
4097 groups (minutes each; 257 groups take the same code path).

The backend files keep what is backend-specific: tests/test_fused_step_cpu.py (the instruction-set
override, bit-identical results at 1 and 2 threads per variant, the launch count, backend="auto"
on CPU), tests/test_fused_step_triton.py (the interpreter, launch counts, runtime scalars, the
input limits of one launch).
"""

import dataclasses
import functools
import os
from typing import Callable, Optional

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import (
    CPU_ISAS,
    FLAGS,
    NM_SMALL,
    NM_WIDE,
    RECIPES,
    ROW_SCALARS,
    Conv1D,
    assert_ulps,
    clone,
    compare,
    compare_ulps,
    force_isa,
    make_case,
    make_tensors,
    rows,
    run,
    supported_isas,
    tiny_gpt,
)
from helpers import scalars as _scalars
from step_kernels import ops
from step_kernels import reference as ref
from step_kernels.optimizer import parse_sparsity

CPU_REASON = ops.backend_status("cpu", torch.device("cpu"))
SUPPORTED_ISAS = supported_isas()


def _triton_missing():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


TRITON_REASON = _triton_missing()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend under test: ``op`` is its name in ``ops.fused_step``, ``isa`` the C++ variant
    forced for it (None for Triton), ``ulps`` its tolerance against torch.optim.AdamW and the RNE
    casts and ``compare`` its tolerance for one step on rows [w, g, m, second, out] against the
    reference (the signature of helpers.compare)."""

    name: str
    op: str
    isa: Optional[str]
    ulps: int
    compare: Callable


def _compare_ulps(*args, decay_factor, **kwargs):
    compare_ulps(*args, ulps=4, **kwargs)


# The tolerances. "cpu": bit-exact but for the live-v weight (helpers.compare; the reference's
# v.sqrt() through MKL is 1 ulp off at times, the kernel's IEEE sqrt is not). "triton": 4 ulps of
# the value or of the step's update (helpers.compare_ulps; the kernel's division and sqrt are
# correctly rounded, the reference's sqrt is not), masks, flips and the RNE casts exact. Against
# torch.optim.AdamW both are held to 4 ulps (the peer's sqrt is torch's too).
BACKENDS = [Backend(f"cpu-{isa}", "cpu", isa, 4, compare) for isa in CPU_ISAS] + [
    Backend("triton", "triton", None, 4, _compare_ulps)]


def _skip_reason(backend):
    if backend.op == "cpu":
        if CPU_REASON is not None:
            return f"backend 'cpu': {CPU_REASON}"
        if backend.isa not in SUPPORTED_ISAS:
            return f"this CPU or build does not run {backend.isa}"
        return None
    return TRITON_REASON


BACKEND_PARAMS = [pytest.param(b, id=b.name, marks=pytest.mark.skipif(_skip_reason(b) is not None,
                                                                      reason=str(_skip_reason(b))))
                  for b in BACKENDS]
scalars = functools.partial(_scalars, **ROW_SCALARS)  # the C++ file's scalars
tscalars = functools.partial(_scalars, step=3, lr=1e-2, weight_decay=0.1, srste_decay=0.05)  # the Triton file's


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch):
    """The backend under test; a C++ variant is forced for the whole test (the optimizer's calls
    included)."""
    b = request.param
    if b.isa is not None:
        force_isa(monkeypatch, b.isa)
    return b


@pytest.fixture
def bdevice(backend, device):
    """The device ``backend`` runs on here: "cpu" takes CPU tensors only; "triton" takes CPU
    tensors under the interpreter and CUDA tensors."""
    if backend.op == "cpu" and device.type != "cpu":
        pytest.skip("backend 'cpu' takes CPU tensors")
    if backend.op == "triton" and device.type == "cpu" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return device


@pytest.fixture
def cpu_backend(backend):
    """``backend`` for a check on CPU tensors ("triton" needs the interpreter for them)."""
    if backend.op == "triton" and not interpreter_on():
        pytest.skip("CPU tensors need TRITON_INTERPRET=1")
    return backend


def run_both(backend, tensors, scalars, **kwargs):
    """Run the reference and ``backend`` on copies of per-tensor rows [w, g, m, second, out]."""
    results = {}
    for name in ("reference", backend.op):
        copies = [[x.clone() if x is not None else None for x in t] for t in tensors]
        w, g, m1, second, out = (list(col) for col in zip(*copies))
        totals, launches = ops.fused_step(name, w, g, m1, second, out, scalars=scalars, **kwargs)
        results[name] = dict(w=w, m=m1, second=second, out=out, totals=totals.cpu(), launches=launches)
    return results["reference"], results[backend.op]


def check_rows(backend, shapes, *, flags, n=0, m=0, dims=None, g_dtype=torch.float32, out_dtype=None,
               p_dtype=torch.float32, s=None, seed=0, **kwargs):
    """One step of ``backend`` and of the reference on helpers.make_tensors rows, compared with the
    backend's tolerance; returns the backend's rows and totals."""
    frozen = FLAGS[flags][1]
    theirs = make_tensors(shapes, frozen=frozen, g_dtype=g_dtype, out_dtype=out_dtype, p_dtype=p_dtype, seed=seed)
    ours = clone(theirs)
    s = s or scalars()
    w_before = [ts[0].clone() for ts in theirs]
    tot_ref = run("reference", theirs, flags=flags, n=n, m=m, dims=dims, s=s, **kwargs)
    tot_ours = run(backend.op, ours, flags=flags, n=n, m=m, dims=dims, s=s, **kwargs)
    backend.compare(ours, theirs, tot_ours, tot_ref, flags=flags, w_before=w_before, decay_factor=s.decay_factor,
                    n=n, m=m, dims=dims)
    return ours, tot_ours


def check_case(backend, tensors, *, masked, frozen, n, m, dims, out_dtype, **kwargs):
    """One step of ``backend`` and of the reference on helpers.make_case rows (the Triton file's
    inputs), compared with the backend's tolerance; returns the backend's results."""
    s = tscalars()
    r, t = run_both(backend, tensors, s, masked=masked, frozen_v=frozen, n=n, m=m, group_dims=dims, **kwargs)
    assert all((x is None) == (out_dtype is None) for x in t["out"])
    flags = (masked, frozen, kwargs.get("compute_stats", False))
    backend.compare(rows(t), rows(r), t["totals"], r["totals"], flags=flags, w_before=[row[0] for row in tensors],
                    decay_factor=s.decay_factor, n=n, m=m, dims=dims)
    return t


# ---------------------------------------------------------------------------------------------
# the rules: an independent peer, NaN and signed zeros, ties, RNE stores
# ---------------------------------------------------------------------------------------------


def test_adamw_matches_torch_adamw(backend, bdevice):
    """An independent peer: torch.optim.AdamW over three steps with changing lr."""
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
        ops.fused_step(backend.op, params, grads, exp_avgs, exp_avg_sqs, [None, None], masked=False,
                       frozen_v=False, scalars=s)
    for p, q in zip(params, peer):
        assert_ulps(p, q.detach(), "w vs torch.optim.AdamW", ulps=backend.ulps)
    for mine, q in zip(exp_avg_sqs, peer):
        assert_ulps(mine, opt.state[q]["exp_avg_sq"], "v vs torch.optim.AdamW", ulps=backend.ulps)


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
        ops.fused_step(backend.op, [w], [torch.zeros_like(w)], [torch.zeros_like(w)], [torch.zeros_like(w)], [out],
                       masked=False, frozen_v=False, scalars=s)
        expected = values.to(dtype)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan], expected[~nan]), dtype


@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_nan_inf_zero_and_ties_follow_the_rules(flags, cpu_backend):
    backend = cpu_backend
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
    tot_ours = run(backend.op, ours, flags=flags, n=2, m=4, dims=[1], s=scalars(weight_decay=0.0))
    backend.compare(ours, theirs, tot_ours, tot_ref, flags=flags, w_before=w_before, decay_factor=1.0, n=2, m=4,
                    dims=[1])
    out, w_new = ours[0][4], ours[0][0]
    keep = ref.nm_mask(w_new, 2, 4, 1)
    assert keep.view(-1, 4).sum(1).eq(2).all(), "exactly N kept in every group"
    assert keep_before[0, :4].tolist() == [True, False, True, False]
    assert keep[1, :4].tolist() == [True, True, False, False]
    assert keep[3, :4].tolist() == [True, True, False, False]
    assert torch.isnan(out[0, 0]) and torch.isnan(out[3, :2]).all(), "a kept NaN stays visible"
    pruned = out.float()[~keep]
    assert pruned.eq(0).all() and not torch.signbit(pruned).any(), "pruned entries are +0.0"


# ---------------------------------------------------------------------------------------------
# grad_scale and found_inf
# ---------------------------------------------------------------------------------------------


def test_grad_scale_divides_and_found_inf_skips(cpu_backend):
    backend = cpu_backend
    theirs = make_tensors([(6, 64)], frozen=True, g_dtype=torch.float16, out_dtype=torch.bfloat16)
    ours = clone(theirs)
    w_before = [theirs[0][0].clone()]
    scale = torch.tensor(1024.0)
    tot_ref = run("reference", theirs, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale)
    tot_ours = run(backend.op, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale)
    backend.compare(ours, theirs, tot_ours, tot_ref, flags="phase2", w_before=w_before, decay_factor=None, n=2, m=4,
                    dims=[1])
    before = clone(ours)
    for found in (torch.tensor(1.0), torch.tensor([float("inf")])):
        tot = run(backend.op, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale, found_inf=found)
        assert tot.tolist() == [0.0, 0.0, 0.0]
        for a, b in zip(ours[0], before[0]):
            assert torch.equal(a, b), "found_inf must leave every tensor untouched"
    run(backend.op, ours, flags="phase2", n=2, m=4, dims=[1], grad_scale=scale, found_inf=torch.tensor(0.0))
    assert not torch.equal(ours[0][0], before[0][0]), "found_inf == 0 steps"


def test_grad_scale_and_found_inf_on_device(backend, bdevice):
    """Grads scaled by 1024 in bf16, a [1] found_inf (the Triton file's case)."""
    s = tscalars()
    shapes = [(4, 16), (2, 8)]
    tensors = make_case(shapes, frozen=True, grad_dtype=torch.bfloat16, out_dtype=torch.bfloat16,
                        precond_dtype=torch.float32, device=bdevice, seed=9)
    for t in tensors:
        t[1] = (t[1].float() * 1024).to(torch.bfloat16)
    scale = torch.tensor([1024.0], device=bdevice)
    kwargs = dict(masked=True, frozen_v=True, n=1, m=4, group_dims=[1, 1], grad_scale=scale)
    r, t = run_both(backend, tensors, s, found_inf=torch.zeros(1, device=bdevice), **kwargs)
    backend.compare(rows(t), rows(r), t["totals"], r["totals"], flags="phase2", w_before=[row[0] for row in tensors],
                    decay_factor=s.decay_factor, n=1, m=4, dims=[1, 1])
    before = [[x.clone() for x in row] for row in tensors]
    w, g, m1, second, out = (list(col) for col in zip(*tensors))
    totals, _ = ops.fused_step(backend.op, w, g, m1, second, out, scalars=s,
                               found_inf=torch.ones(1, device=bdevice), **kwargs)
    assert totals.abs().sum().item() == 0
    for row, old in zip(tensors, before):
        for x, y in zip(row, old):
            assert torch.equal(x, y), "found_inf must make the step a no-op"


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_deterministic_partial_sums(backend, bdevice):
    """Two runs of the same step give bit-identical AutoSwitch sums."""
    shapes = [(1, 3000), (7, 257), (1,)]
    tensors = make_case(shapes, frozen=False, grad_dtype=torch.float32, out_dtype=None,
                        precond_dtype=torch.float32, device=bdevice, seed=21, ties=False)
    runs = [run_both(backend, tensors, tscalars(), masked=False, frozen_v=False, compute_stats=True)[1]["totals"]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------------
# one step against the reference: flags and dtypes
# ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# a bf16 second moment exists only as the frozen preconditioner
@pytest.mark.parametrize("flags,p_dtype", [(f, torch.float32) for f in FLAGS] + [("phase2", torch.bfloat16)])
@pytest.mark.parametrize("g_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("out_dtype", [None] + FLOAT_DTYPES)
def test_flags_and_dtypes_match_reference(flags, p_dtype, g_dtype, out_dtype, cpu_backend):
    masked = FLAGS[flags][0]
    # one multi-tensor call: Linear (groups along dim 1), Conv1D (dim 0), a single group; dense
    # calls also take vectors and a scalar
    shapes = [(3, 4 * 257), (4 * 15, 7), (1, 4)] + ([] if masked else [(257,), ()])
    ours, totals = check_rows(cpu_backend, shapes, flags=flags, n=2, m=4, dims=[1, 0, -1], g_dtype=g_dtype,
                              out_dtype=out_dtype, p_dtype=p_dtype)
    if masked:
        assert totals[2].item() > 0, "the case should flip some masks"


def contiguous_shapes(m):
    # rows x groups: 1 group, 15 groups, 257 groups (several blocks, a tail), a block-sized tensor
    return [(1, m), (3, 5 * m), (1, 257 * m), (2, 1024 // 2)]


def strided_shapes(m):
    # [in, out] Conv1D layout; cols 1, 15 (not a multiple of 16), 257, 48 with 1-3 row groups
    return [(m, 1), (m, 15), (2 * m, 257 // 2 * 2 + 1), (3 * m, 48)]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_masked_recipes_and_dtypes_mixed_orientation(recipe, backend, bdevice):
    masked, frozen, gd, od, pd = RECIPES[recipe]
    shapes = contiguous_shapes(4)[:3] + strided_shapes(4)[:2]
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=bdevice,
                        seed=3)
    check_case(backend, tensors, masked=True, frozen=frozen, n=2, m=4, dims=[1, 1, 1, 0, 0], out_dtype=od)


@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("stats", [False, True])
def test_adamw_matches_reference(grad_dtype, out_dtype, stats, backend, bdevice):
    shapes = [(1,), (15,), (257,), (1024 + 17,), (4, 1024), (3, 5, 7)]  # tails, non-multiples of 16 and of the block
    tensors = make_case(shapes, frozen=False, grad_dtype=grad_dtype, out_dtype=out_dtype,
                        precond_dtype=torch.float32, device=bdevice, seed=11, ties=False)
    t = check_case(backend, tensors, masked=False, frozen=False, n=0, m=0, dims=None, out_dtype=out_dtype,
                   compute_stats=stats)
    if not stats:
        assert t["totals"].abs().sum().item() == 0, "A and S are 0 unless compute_stats"


# ---------------------------------------------------------------------------------------------
# one step against the reference: every N:M, both orientations, awkward sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", NM_WIDE)
@pytest.mark.parametrize("flags", ["srste", "phase2"])
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_every_nm_matches_reference(n, m, flags, orientation, cpu_backend):
    shapes = [(5, m * 37)] if orientation == "linear" else [(m * 37, 5)]
    check_rows(cpu_backend, shapes, flags=flags, n=n, m=m, dims=[1 if orientation == "linear" else 0],
               out_dtype=torch.bfloat16)


@pytest.mark.parametrize("n,m", NM_SMALL)
def test_masked_contiguous_every_nm(n, m, backend, bdevice):
    masked, frozen, gd, od, pd = RECIPES["step2-bf16"]
    shapes = contiguous_shapes(m)
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=bdevice,
                        seed=n * 100 + m)
    check_case(backend, tensors, masked=True, frozen=frozen, n=n, m=m, dims=[1] * len(shapes), out_dtype=od)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 16), (16, 32)])
@pytest.mark.parametrize("recipe", ["step2-fp32", "srste-bf16"])
def test_masked_strided_conv1d(recipe, n, m, backend, bdevice):
    masked, frozen, gd, od, pd = RECIPES[recipe]
    shapes = strided_shapes(m)
    tensors = make_case(shapes, frozen=frozen, grad_dtype=gd, out_dtype=od, precond_dtype=pd, device=bdevice,
                        seed=7 * m + n)
    check_case(backend, tensors, masked=True, frozen=frozen, n=n, m=m, dims=[0] * len(shapes), out_dtype=od)


@pytest.mark.parametrize("groups", [1, 15, 257, 4097])
@pytest.mark.parametrize("m", [4, 32])
@pytest.mark.parametrize("layout", ["linear", "conv1d", "conv1d-wide"])
def test_awkward_sizes_match_reference(groups, m, layout, cpu_backend):
    # linear: one row of `groups` groups; conv1d: `groups` groups down 3 columns; conv1d-wide: one
    # group-row across `groups` columns (the strided tiles cut through the columns)
    if cpu_backend.op == "triton" and groups == 4097 and layout != "linear":
        pytest.skip("4097 strided tiles take minutes under the interpreter; 257 groups take the same path")
    shape, dim = {"linear": ((1, m * groups), 1), "conv1d": ((m * groups, 3), 0),
                  "conv1d-wide": ((m, groups), 0)}[layout]
    check_rows(cpu_backend, [shape], flags="phase2", n=m // 4, m=m, dims=[dim], out_dtype=torch.float16,
               p_dtype=torch.bfloat16)
    if layout == "linear":
        check_rows(cpu_backend, [shape], flags="phase1", out_dtype=torch.bfloat16)


@pytest.mark.parametrize("groups", [1, 4, 15, 257, 4097])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_contiguous_n4_matches_reference(groups, n, flags, cpu_backend):
    # contiguous N:4 groups: the C++ kernel selects 16 weights at a time (on AVX-512 with bit-mask
    # ranks) and the rest of a tile group by group (1 and 15 groups: a partial block; 4097: both)
    check_rows(cpu_backend, [(1, 4 * groups), (3, 4 * groups)], flags=flags, n=n, m=4, dims=[1, 1],
               out_dtype=torch.float32)


@pytest.mark.parametrize("flags", ["phase1", "srste", "phase2"])
def test_three_of_eight_fp16_matches_reference(flags, cpu_backend):
    """N = 3 of M = 8 in both orientations, fp16 grads and model parameters, 129 groups a row."""
    check_rows(cpu_backend, [(8, 8 * 129), (8 * 9, 5)], flags=flags, n=3, m=8, dims=[1, 0], g_dtype=torch.float16,
               out_dtype=torch.float16)


def test_misaligned_views_match_reference(backend, bdevice):
    """Contiguous views that start 4 bytes into their storage (Triton cannot use its 16-byte hints)."""
    tensors = make_case([(3, 40), (257,)], frozen=False, grad_dtype=torch.float32, out_dtype=None,
                        precond_dtype=torch.float32, device=bdevice, seed=13, ties=False)
    for row in tensors:
        for k in range(4):
            shifted = torch.empty(row[k].numel() + 1, dtype=row[k].dtype, device=bdevice)[1:].view(row[k].shape)
            shifted.copy_(row[k])
            row[k] = shifted
    assert tensors[0][0].data_ptr() % 16 != 0
    check_case(backend, tensors, masked=False, frozen=False, n=0, m=0, dims=None, out_dtype=None, compute_stats=True)


def test_empty_lists_and_empty_tensors(cpu_backend):
    totals, _ = ops.fused_step(cpu_backend.op, [], [], [], [], [], masked=False, frozen_v=False, scalars=scalars())
    assert totals.tolist() == [0.0, 0.0, 0.0]
    check_rows(cpu_backend, [(0, 8), (4, 8)], flags="phase2", n=2, m=4, dims=[1, 1], out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the tensor, and nothing written
# ---------------------------------------------------------------------------------------------


def _bad_case(kind):
    """(rows, flags, n, m, dims, found_inf) of a call that ``kind`` breaks (tensor 1 of 2 unless
    the kind says otherwise): the C++ file's cases on phase-2 rows, the Triton file's on dense
    rows without model parameters."""
    ts = make_tensors([(4, 8), (4, 8)], frozen=True, g_dtype=torch.float32, out_dtype=torch.float32)
    dense = make_tensors([(4, 8), (4, 8)], frozen=False, g_dtype=torch.float32, out_dtype=None)
    flags, n, m, dims, found_inf = "phase2", 2, 4, [1, 1], None
    if kind == "grad shape":
        ts[1][1] = torch.zeros(4, 4)
    elif kind == "first m shape":
        ts, flags = dense, "dense"
        ts[0][2] = torch.zeros(4, 4)
    elif kind == "weight dtype":
        ts[1][0] = ts[1][0].double()
    elif kind == "grad dtype":
        ts[1][1] = ts[1][1].double()
    elif kind == "first grad dtype":
        ts, flags = dense, "dense"
        ts[0][1] = ts[0][1].double()
    elif kind == "weight on meta":
        ts, flags = dense, "dense"
        ts[1][0] = torch.randn(4, 8, device="meta")
    elif kind == "strided m":
        ts[1][2] = torch.zeros(8, 4).t()
    elif kind == "live v in bf16":
        flags = "srste"
        ts[1][3] = ts[1][3].bfloat16()
    elif kind == "dense v in bf16":
        ts, flags = dense, "dense"
        ts[1][3] = ts[1][3].bfloat16()
    elif kind == "indivisible group dim 0":
        dims = [1, 0]
        ts[1] = make_tensors([(6, 8)], frozen=True, g_dtype=torch.float32, out_dtype=torch.float32)[0]
    elif kind == "indivisible group dim 1":
        ts, flags = make_tensors([(4, 6), (4, 6)], frozen=False, g_dtype=torch.float32, out_dtype=None), "srste"
    elif kind == "model param is master":
        ts[1][4] = ts[1][0]
    elif kind == "bad N:M":
        n, m = 4, 4
    elif kind == "M not a power of two":
        n, m = 1, 6
    elif kind == "M not a power of two, srste":
        ts, flags, n, m = make_tensors([(4, 6), (4, 6)], frozen=False, g_dtype=torch.float32, out_dtype=None), \
            "srste", 2, 6
    elif kind == "frozen without mask":
        flags = (False, True, False)
    elif kind == "frozen without mask, dense rows":
        ts, flags = dense, (False, True, False)
    elif kind == "found_inf shape":
        ts, flags, found_inf = dense, "dense", torch.zeros(2)
    elif kind == "group_dims length":
        ts, dims = ts[:1], [1, 1]
    return ts, flags, n, m, dims, found_inf


# kind: {ops backend: (error type, message)}. The C++ backend raises TypeError for a dtype (as
# torch's TORCH_CHECK_TYPE), Triton ValueError for everything; each message names the tensor.
BAD_INPUT = {
    "grad shape": {"cpu": (ValueError, r"grads\[1\] has shape \[4, 4\] but weights\[1\] has shape \[4, 8\]"),
                   "triton": (ValueError, r"grads\[1\] has shape \(4, 4\) but weights\[1\] has \(4, 8\)")},
    "first m shape": {"cpu": (ValueError, r"exp_avgs\[0\] has shape \[4, 4\] but weights\[0\] has shape \[4, 8\]"),
                      "triton": (ValueError, r"exp_avgs\[0\] has shape \(4, 4\) but weights\[0\] has \(4, 8\)")},
    "weight dtype": {"cpu": (TypeError, r"weights\[1\] must be float32"),
                     "triton": (ValueError, r"weights\[1\] has unsupported dtype torch.float64")},
    "grad dtype": {"cpu": (TypeError, r"grads\[1\] has dtype Double"),
                   "triton": (ValueError, r"grads\[1\] has unsupported dtype torch.float64")},
    "first grad dtype": {"cpu": (TypeError, r"grads\[0\] has dtype Double"),
                         "triton": (ValueError, r"grads\[0\] has unsupported dtype torch.float64")},
    "weight on meta": {"cpu": (ValueError, r"weights\[1\] is on meta; the 'cpu' backend takes CPU tensors"),
                       "triton": (ValueError, r"weights\[1\] is on meta but weights\[0\] is on cpu")},
    "strided m": {"cpu": (ValueError, r"exp_avgs\[1\] .* must be contiguous"),
                  "triton": (ValueError, r"exp_avgs\[1\] is not contiguous")},
    "live v in bf16": {"cpu": (TypeError, r"second_moments\[1\] has dtype BFloat16; v must be float32"),
                       "triton": (ValueError, r"second_moments\[1\] has unsupported dtype torch.bfloat16")},
    "dense v in bf16": {"cpu": (TypeError, r"second_moments\[1\] has dtype BFloat16; v must be float32"),
                        "triton": (ValueError, r"second_moments\[1\] has unsupported dtype torch.bfloat16")},
    "indivisible group dim 0": {
        "cpu": (ValueError, r"weights\[1\]: size 6 of dim 0 \(shape \[6, 8\]\) is not divisible by M=4"),
        "triton": (ValueError, r"weights\[1\]: size 6 of dim 0 \(shape \(6, 8\)\) is not divisible by M=4")},
    "indivisible group dim 1": {
        "cpu": (ValueError, r"weights\[0\]: size 6 of dim 1 \(shape \[4, 6\]\) is not divisible by M=4"),
        "triton": (ValueError, r"weights\[0\]: size 6 of dim 1 \(shape \(4, 6\)\) is not divisible by M=4")},
    "model param is master": {"cpu": (ValueError, r"model_params\[1\] is weights\[1\]"),
                              "triton": (ValueError, r"model_params\[1\] is weights\[1\]")},
    "bad N:M": {"cpu": (ValueError, r"N must satisfy 1 <= N < M, got N=4 M=4"),
                "triton": (ValueError, r"N must satisfy 1 <= N < M=4, got 4")},
    "M not a power of two": {"cpu": (ValueError, "M must be a power of two"),
                             "triton": (ValueError, "M must be a power of two")},
    "M not a power of two, srste": {"cpu": (ValueError, "M must be a power of two"),
                                    "triton": (ValueError, "M must be a power of two")},
    "frozen without mask": {"cpu": (ValueError, "frozen_v=True requires masked=True"),
                            "triton": (ValueError, "frozen_v=True requires masked=True")},
    "frozen without mask, dense rows": {"cpu": (ValueError, "frozen_v=True requires masked=True"),
                                        "triton": (ValueError, "frozen_v=True requires masked=True")},
    "found_inf shape": {"cpu": (ValueError, r"found_inf must have one element, got shape \[2\]"),
                        "triton": (ValueError, "found_inf must be a one-element float32 tensor")},
    "group_dims length": {"cpu": (ValueError, "group_dims has 2 entries for 1 tensors"),
                          "triton": (ValueError, "group_dims must give one dim per tensor")},
}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_names_the_tensor_and_changes_nothing(kind, cpu_backend):
    err, match = BAD_INPUT[kind][cpu_backend.op]
    ts, flags, n, m, dims, found_inf = _bad_case(kind)
    before = clone(ts)
    with pytest.raises(err, match=match):
        run(cpu_backend.op, ts, flags=flags, n=n, m=m, dims=dims, found_inf=found_inf)
    for a, b in zip(ts, before):
        for x, y in zip(a, b):
            if x is not None and x.device.type != "meta":  # a meta tensor holds no values
                assert torch.equal(x, y), "a failed call must leave its inputs untouched"


def test_list_lengths_are_checked(cpu_backend):
    w, g, m1, p, out = make_tensors([(4, 8)], frozen=True, g_dtype=torch.float32, out_dtype=None)[0]
    match = {"cpu": "must have the same length", "triton": "grads has 2 tensors, weights has 1"}[cpu_backend.op]
    with pytest.raises(ValueError, match=match):
        ops.fused_step(cpu_backend.op, [w], [g, g], [m1], [p], [out], masked=False, frozen_v=False, scalars=scalars())


# ---------------------------------------------------------------------------------------------
# the STEP optimizer over 50 steps against the same optimizer on the reference backend
# ---------------------------------------------------------------------------------------------


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 128), nn.LayerNorm(128), Conv1D(64, 128, bias=None), nn.Linear(64, 16)).to(dtype)


# scenario: (model, recipe, dtype, precond dtype, switch, grads). "mlp": Linear and Conv1D targets
# (plus dense biases and a LayerNorm), fixed random grads (not backprop: a forward through weights
# that differ by an ulp would make the two runs see different grads, chaotic for a bf16 model),
# the switch at step 20 or SR-STE throughout. "gpt": TinyGPT, teacher-forced (both copies get the
# reference model's backprop grads), AutoSwitch deciding.
FIFTY_STEPS = {
    "mlp-step-fp32": ("mlp", "step", torch.float32, torch.float32, 20),
    "mlp-step-bf16": ("mlp", "step", torch.bfloat16, torch.bfloat16, 20),
    "mlp-srste-fp32": ("mlp", "srste", torch.float32, torch.float32, None),
    "gpt-step-fp32": ("gpt", "step", torch.float32, torch.float32, "auto"),
    "gpt-step-bf16": ("gpt", "step", torch.bfloat16, torch.float32, "auto"),
}


def _fifty_steps(backend, scenario, device, steps=50):
    arch, recipe, dtype, precond_dtype, switch = FIFTY_STEPS[scenario]
    runs = []
    for name in ("reference", backend.op):
        if arch == "mlp":
            model = mlp(dtype).to(device)
            groups = sk.sparse_param_groups(model, exclude=[])
            opt = sk.STEP(groups, lr=3e-3, weight_decay=0.01, recipe=recipe, backend=name, switch=switch,
                          precond_dtype=precond_dtype)
            dims = sorted(g["nm_dim"] for g in opt.param_groups if g.get("sparsity"))
            assert dims == [0, 1], "both orientations are targets"
        else:
            model = tiny_gpt(dtype, device)
            opt = sk.STEP(sk.sparse_param_groups(model), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95),
                          recipe=recipe, backend=name, precond_dtype=precond_dtype,
                          switch=sk.AutoSwitch(max_step=steps // 2, threshold=1e-6, rule="absolute"))
        assert opt.backend == name
        runs.append((model, opt))
    (m_ref, o_ref), (m_b, o_b) = runs
    history = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 + step)
        if arch == "mlp":
            for p, q in zip(m_ref.parameters(), m_b.parameters()):
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(device=device, dtype=dtype)
                q.grad = p.grad.clone()
        else:
            o_ref.zero_grad()
            idx = torch.randint(0, 64, (4, 17), generator=gen).to(device)
            m_ref.loss(idx[:, :-1], idx[:, 1:]).backward()
            for p, q in zip(m_ref.parameters(), m_b.parameters()):
                q.grad = p.grad.clone()
        o_ref.step()
        o_b.step()
        history.append((o_ref.phase, o_b.phase, o_ref.stats()["flip_rate"], o_b.stats()["flip_rate"]))
    return (m_ref, o_ref), (m_b, o_b), history


@pytest.mark.parametrize("scenario", list(FIFTY_STEPS))
def test_fifty_optimizer_steps_match_reference_backend(scenario, backend, bdevice):
    """The same switch, phases, masks and flips at every step; weights and state within the
    reference's rounding accumulated over 50 steps (relative 1e-5 of each tensor's scale); model
    parameters exactly the RNE cast of the masked master; fewer launches than the reference."""
    recipe = FIFTY_STEPS[scenario][1]
    (m_ref, o_ref), (m_b, o_b), history = _fifty_steps(backend, scenario, bdevice)
    if recipe == "step":
        assert o_ref.switch_step == o_b.switch_step is not None and o_b.switch_step < 50
    else:
        assert o_ref.switch_step is None and o_b.switch_step is None
    for step, (ref_phase, b_phase, ref_flips, b_flips) in enumerate(history):
        assert ref_phase == b_phase and ref_flips == b_flips, f"step {step}"
    assert o_ref.stats()["z_history"] == pytest.approx(o_b.stats()["z_history"], rel=1e-5)
    assert o_b.stats()["kernel_launches"] < o_ref.stats()["kernel_launches"]
    for (name, p), q in zip(m_ref.named_parameters(), m_b.parameters()):
        s_ref, s_b = o_ref.state[p], o_b.state[q]
        assert set(s_ref) == set(s_b), name
        assert s_b["step"] == s_ref["step"], name  # the parameter's own step count (an int)
        for key in set(s_ref) - {"step"}:
            scale = s_ref[key].float().abs().max().item()
            torch.testing.assert_close(s_b[key].float(), s_ref[key].float(), rtol=1e-5, atol=1e-5 * scale,
                                       msg=f"{name}:{key}")
        assert torch.equal(p == 0, q == 0), f"{name}: masks differ"
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        master = s_b.get("master", q)
        group = next(g for g in o_b.param_groups if any(x is q for x in g["params"]))
        if group.get("sparsity") is not None:
            n, m = parse_sparsity(group["sparsity"])
            keep = ref.nm_mask(master, n, m, group["nm_dim"])
            assert torch.equal(keep, ref.nm_mask(s_ref.get("master", p), n, m, group["nm_dim"])), name
            assert torch.equal(q.detach(), torch.where(keep, master, torch.zeros((), device=q.device)).to(q.dtype)), \
                name
        else:
            assert torch.equal(q.detach(), master.to(q.dtype)), name
