"""The C++ fused step (backend "cpu", csrc/fused_step_cpu.cpp) against step_kernels.reference.

Exactness: masks, m, v, flips and everything of a frozen-preconditioner step are bit-identical to
the reference. With a live v (phase 1, "dense", "srste") the weight may differ: torch computes
``v.sqrt()`` on CPU through MKL's vector math, which is not correctly rounded (1 ulp), while the
kernel uses the IEEE square root. The Adam update term then differs by about 2 ulp of itself, so
w may differ by 1 ulp of w plus 2^-22 of the update (which can exceed w where v is tiny), and the
model parameter by 1 ulp of its dtype. The AutoSwitch sums are float64 sums of the same fp32 terms in another
order (rtol 1e-12) and do not depend on the thread count: each chunk of 2048 elements keeps its own partial sum and
the partials are added in chunk order.
"""

import functools
import math

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import FLAGS, ROW_SCALARS, Conv1D, clone, compare, make_tensors, run
from helpers import NM_WIDE as NM
from helpers import scalars as _scalars
from step_kernels import ops

pytestmark = pytest.mark.skipif(
    ops.backend_status("cpu", torch.device("cpu")) is not None,
    reason=f"backend 'cpu' unavailable: {ops.backend_status('cpu', torch.device('cpu'))}",
)

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
scalars = functools.partial(_scalars, **ROW_SCALARS)


def check_against_reference(shapes, *, flags, n=0, m=0, dims=None, g_dtype=torch.float32, out_dtype=None,
                            p_dtype=torch.float32, s=None, seed=0, **kwargs):
    frozen = FLAGS[flags][1]
    theirs = make_tensors(shapes, frozen=frozen, g_dtype=g_dtype, out_dtype=out_dtype, p_dtype=p_dtype, seed=seed)
    ours = clone(theirs)
    s = s or scalars()
    w_before = [ts[0].clone() for ts in theirs]
    tot_ref = run("reference", theirs, flags=flags, n=n, m=m, dims=dims, s=s, **kwargs)
    tot_ours = run("cpu", ours, flags=flags, n=n, m=m, dims=dims, s=s, **kwargs)
    compare(ours, theirs, tot_ours, tot_ref, flags=flags, w_before=w_before, decay_factor=s.decay_factor, n=n,
            m=m, dims=dims)
    return ours, tot_ours


# ---------------------------------------------------------------------------------------------
# equality with the reference
# ---------------------------------------------------------------------------------------------


# a bf16 second moment exists only as the frozen preconditioner
@pytest.mark.parametrize("flags,p_dtype", [(f, torch.float32) for f in FLAGS] + [("phase2", torch.bfloat16)])
@pytest.mark.parametrize("g_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("out_dtype", [None] + FLOAT_DTYPES)
def test_flags_and_dtypes_match_reference(flags, p_dtype, g_dtype, out_dtype):
    masked = FLAGS[flags][0]
    # one multi-tensor call: Linear (groups along dim 1), Conv1D (dim 0), a single group; dense
    # calls also take vectors and a scalar
    shapes = [(3, 4 * 257), (4 * 15, 7), (1, 4)] + ([] if masked else [(257,), ()])
    ours, totals = check_against_reference(shapes, flags=flags, n=2, m=4, dims=[1, 0, -1], g_dtype=g_dtype,
                                           out_dtype=out_dtype, p_dtype=p_dtype)
    if masked:
        assert totals[2].item() > 0, "the case should flip some masks"


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("flags", ["srste", "phase2"])
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_every_nm_matches_reference(n, m, flags, orientation):
    shapes = [(5, m * 37)] if orientation == "linear" else [(m * 37, 5)]
    check_against_reference(shapes, flags=flags, n=n, m=m, dims=[1 if orientation == "linear" else 0],
                            out_dtype=torch.bfloat16)


@pytest.mark.parametrize("groups", [1, 15, 257, 4097])
@pytest.mark.parametrize("m", [4, 32])
@pytest.mark.parametrize("layout", ["linear", "conv1d", "conv1d-wide"])
def test_awkward_sizes_match_reference(groups, m, layout):
    # linear: one row of `groups` groups; conv1d: `groups` groups down 3 columns; conv1d-wide: one
    # group-row across `groups` columns (the strided tiles cut through the columns)
    shape, dim = {"linear": ((1, m * groups), 1), "conv1d": ((m * groups, 3), 0),
                  "conv1d-wide": ((m, groups), 0)}[layout]
    check_against_reference([shape], flags="phase2", n=m // 4, m=m, dims=[dim], out_dtype=torch.float16,
                            p_dtype=torch.bfloat16)
    if layout == "linear":
        check_against_reference([shape], flags="phase1", out_dtype=torch.bfloat16)


@pytest.mark.parametrize("groups", [1, 4, 15, 257, 4097])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_contiguous_n4_matches_reference(groups, n, flags):
    # contiguous N:4 groups are selected 16 weights at a time (on AVX-512 with bit-mask ranks) and
    # the rest of a tile group by group (1 and 15 groups: a partial block; 4097: both)
    check_against_reference([(1, 4 * groups), (3, 4 * groups)], flags=flags, n=n, m=4, dims=[1, 1],
                            out_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# determinism: threads and instruction sets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", ["phase1", "srste", "phase2"])
def test_one_and_two_threads_give_identical_results(flags):
    frozen = FLAGS[flags][1]
    base = make_tensors([(64, 2048), (4 * 300, 24)], frozen=frozen, g_dtype=torch.bfloat16,
                        out_dtype=torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ts = clone(base)
            totals = run("cpu", ts, flags=flags, n=2, m=4, dims=[1, 0])
            results.append((ts, totals))
    finally:
        torch.set_num_threads(before)
    (a, ta), (b, tb) = results
    assert torch.equal(ta, tb), "sums and flips must not depend on the thread count"
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


def supported_isas():
    names = []
    for isa in ("avx512", "avx2", "baseline"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STEP_KERNELS_CPU_ISA", isa)
            try:
                torch.ops.step_kernels.fused_step_cpu_isa()
            except RuntimeError:
                continue
        names.append(isa)
    return names


@pytest.mark.parametrize("flags", ["phase1", "srste", "phase2"])
def test_every_instruction_set_matches_reference(flags, monkeypatch):
    isas = supported_isas()
    assert "baseline" in isas
    for isa in isas:
        monkeypatch.setenv("STEP_KERNELS_CPU_ISA", isa)
        assert torch.ops.step_kernels.fused_step_cpu_isa() == isa
        check_against_reference([(8, 8 * 129), (8 * 9, 5)], flags=flags, n=3, m=8, dims=[1, 0],
                                g_dtype=torch.float16, out_dtype=torch.float16)
    monkeypatch.setenv("STEP_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="STEP_KERNELS_CPU_ISA"):
        torch.ops.step_kernels.fused_step_cpu_isa()


# Every variant of the selection: 16, 8 or 4 lanes per register (AVX-512, AVX2, the portable
# build), groups within a register or across several (M > lanes), whole registers and the scalar
# tail (1 to 37 groups per row), both orientations.
ISA_NM = [(isa, n, m) for isa in ("avx512", "avx2", "baseline") for n, m in NM + [(8, 16), (15, 16), (8, 32)]]


@pytest.mark.parametrize("isa,n,m", ISA_NM)
@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_selection_of_every_instruction_set_with_ties_nan_inf(isa, n, m, flags, monkeypatch):
    if isa not in supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    monkeypatch.setenv("STEP_KERNELS_CPU_ISA", isa)
    # weights from 12 values: most groups hold ties (equal magnitudes, +0/-0, NaN with inf); grads
    # from 3 values, zero m and a constant preconditioner keep many equal weights equal after the
    # update, so the new selection sees ties too, while the others move and flip masks
    values = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-45, 3e38])
    gen = torch.Generator().manual_seed(m * 100 + n)
    shapes = [(3, m), (3, m * 3), (2, m * 7), (1, m * 37), (m * 5, 3)]
    tensors = []
    for shape in shapes:
        w = values[torch.randint(len(values), shape, generator=gen)]
        second = torch.ones(shape) if flags == "phase2" else torch.zeros(shape)
        g = torch.tensor([0.0, 2.0, -2.0])[torch.randint(3, shape, generator=gen)]
        tensors.append([w, g, torch.zeros(shape), second, torch.full(shape, 7.0, dtype=torch.bfloat16)])
    theirs, ours = tensors, clone(tensors)
    s = scalars()
    w_before = [ts[0].clone() for ts in theirs]
    dims = [1, 1, 1, 1, 0]
    tot_ref = run("reference", theirs, flags=flags, n=n, m=m, dims=dims, s=s)
    tot_ours = run("cpu", ours, flags=flags, n=n, m=m, dims=dims, s=s)
    compare(ours, theirs, tot_ours, tot_ref, flags=flags, w_before=w_before, decay_factor=s.decay_factor, n=n, m=m,
            dims=dims)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the tensor, and nothing written
# ---------------------------------------------------------------------------------------------


def _bad(kind):
    """(tensors, flags, n, m, dims, error type, message pattern) with tensor 1 of 2 broken."""
    ts = make_tensors([(4, 8), (4, 8)], frozen=True, g_dtype=torch.float32, out_dtype=torch.float32)
    flags, n, m, dims = "phase2", 2, 4, [1, 1]
    err, match = ValueError, None
    if kind == "grad shape":
        ts[1][1] = torch.zeros(4, 4)
        match = r"grads\[1\] has shape \[4, 4\] but weights\[1\] has shape \[4, 8\]"
    elif kind == "weight dtype":
        ts[1][0] = ts[1][0].double()
        err, match = TypeError, r"weights\[1\] must be float32"
    elif kind == "grad dtype":
        ts[1][1] = ts[1][1].double()
        err, match = TypeError, r"grads\[1\] has dtype Double"
    elif kind == "strided m":
        ts[1][2] = torch.zeros(8, 4).t()
        match = r"exp_avgs\[1\] .* must be contiguous"
    elif kind == "live v in bf16":
        flags = "srste"
        ts[1][3] = ts[1][3].bfloat16()
        err, match = TypeError, r"second_moments\[1\] has dtype BFloat16; v must be float32"
    elif kind == "indivisible group dim":
        dims = [1, 0]
        ts[1] = make_tensors([(6, 8)], frozen=True, g_dtype=torch.float32, out_dtype=torch.float32)[0]
        match = r"weights\[1\]: size 6 of dim 0 \(shape \[6, 8\]\) is not divisible by M=4"
    elif kind == "model param is master":
        ts[1][4] = ts[1][0]
        match = r"model_params\[1\] is weights\[1\]"
    elif kind == "bad N:M":
        n, m = 4, 4
        match = "N must satisfy 1 <= N < M"
    elif kind == "M not a power of two":
        n, m = 1, 6
        match = "M must be a power of two"
    elif kind == "frozen without mask":
        flags = (False, True, False)
        match = "frozen_v=True requires masked=True"
    return ts, flags, n, m, dims, err, match


@pytest.mark.parametrize("kind", ["grad shape", "weight dtype", "grad dtype", "strided m", "live v in bf16",
                                  "indivisible group dim", "model param is master", "bad N:M",
                                  "M not a power of two", "frozen without mask"])
def test_bad_input_names_the_tensor_and_changes_nothing(kind):
    ts, flags, n, m, dims, err, match = _bad(kind)
    before = clone(ts)
    with pytest.raises(err, match=match):
        run("cpu", ts, flags=flags, n=n, m=m, dims=dims)
    for a, b in zip(ts, before):
        for x, y in zip(a, b):
            assert x is None or torch.equal(x, y), "a failed call must leave its inputs untouched"


def test_group_dims_and_list_lengths_are_checked():
    ts = make_tensors([(4, 8)], frozen=True, g_dtype=torch.float32, out_dtype=None)
    with pytest.raises(ValueError, match="group_dims has 2 entries for 1 tensors"):
        run("cpu", ts, flags="phase2", n=2, m=4, dims=[1, 1])
    w, g, m1, p, out = ts[0]
    with pytest.raises(ValueError, match="must have the same length"):
        ops.fused_step("cpu", [w], [g, g], [m1], [p], [out], masked=False, frozen_v=False, scalars=scalars())


def test_empty_lists_and_empty_tensors():
    totals, launches = ops.fused_step("cpu", [], [], [], [], [], masked=False, frozen_v=False, scalars=scalars())
    assert totals.tolist() == [0.0, 0.0, 0.0] and launches == 1
    check_against_reference([(0, 8), (4, 8)], flags="phase2", n=2, m=4, dims=[1, 1], out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# the optimizer on backend "cpu" (what backend="auto" picks on CPU)
# ---------------------------------------------------------------------------------------------


def test_auto_picks_cpu_backend():
    assert sk.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert sk.STEP(nn.Linear(8, 4).parameters(), recipe="dense").backend == "cpu"


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 128), nn.LayerNorm(128), Conv1D(64, 128, bias=None), nn.Linear(64, 16)).to(dtype)


@pytest.mark.parametrize("recipe,dtype,precond_dtype", [
    ("step", torch.float32, torch.float32),
    ("step", torch.bfloat16, torch.bfloat16),
    ("srste", torch.float32, torch.float32),
])
def test_fifty_optimizer_steps_match_reference_backend(recipe, dtype, precond_dtype):
    """50 steps of an MLP with Linear and Conv1D targets (plus dense biases and a LayerNorm),
    through the switch at step 20 (or SR-STE throughout): same switch, same masks and flips,
    weights and state within the live-v rounding accumulated over the steps. The grads are
    fixed random tensors, not backprop: a forward through weights that differ by an ulp would
    make the two runs see different grads (chaotic for a bf16 model or a key bias)."""
    runs = []
    for backend in ("reference", "cpu"):
        model = mlp(dtype)
        opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), lr=3e-3, weight_decay=0.01, recipe=recipe,
                      backend=backend, switch=20 if recipe == "step" else None, precond_dtype=precond_dtype)
        assert opt.backend == backend
        dims = sorted(g["nm_dim"] for g in opt.param_groups if g.get("sparsity"))
        assert dims == [0, 1], "both orientations are targets"
        flips = []
        for step in range(50):
            gen = torch.Generator().manual_seed(1000 + step)
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
            opt.step()
            flips.append(opt.stats()["flip_rate"])
        runs.append((model, opt, flips))
    (model_r, opt_r, flips_r), (model_c, opt_c, flips_c) = runs
    assert opt_c.phase == opt_r.phase and opt_c.switch_step == opt_r.switch_step
    assert opt_c.stats()["kernel_launches"] < opt_r.stats()["kernel_launches"]
    assert flips_c == flips_r
    for (name, pr), pc in zip(model_r.named_parameters(), model_c.parameters()):
        assert torch.equal(pr == 0, pc == 0), f"{name}: masks differ"
        torch.testing.assert_close(pc, pr, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        for key, value in opt_r.state[pr].items():
            torch.testing.assert_close(opt_c.state[pc][key], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name} state {key}: {m}")
