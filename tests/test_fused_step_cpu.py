"""What is specific to the C++ fused step (backend "cpu", csrc/fused_step_cpu.cpp): the
instruction-set override, bit-identical results at 1 and 2 threads on every variant, one launch per
call, the inputs only it accepts, and backend="auto" on CPU. Its results against the reference, on
every instruction-set variant, are tests/test_backend_conformance.py's.

Exactness: masks, m, v, flips and everything of a frozen-preconditioner step are bit-identical to
the reference. With a live v (phase 1, "dense", "srste") the weight may differ: torch computes
``v.sqrt()`` on CPU through MKL's vector math, which is not correctly rounded (1 ulp), while the
kernel uses the IEEE square root. The Adam update term then differs by about 2 ulp of itself, so
w may differ by 1 ulp of w plus 2^-22 of the update (which can exceed w where v is tiny), and the
model parameter by 1 ulp of its dtype (helpers.compare). The AutoSwitch sums are float64 sums of the
same fp32 terms in another order (rtol 1e-12) and do not depend on the thread count: each chunk of
2048 elements keeps its own partial sum and the partials are added in chunk order.
"""

import functools
import math

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import (
    CPU_ISAS,
    FLAGS,
    NM_WIDE,
    ROW_SCALARS,
    clone,
    compare,
    force_isa,
    isa_params,
    make_tensors,
    run,
    supported_isas,
)
from helpers import scalars as _scalars
from step_kernels import ops

pytestmark = pytest.mark.skipif(
    ops.backend_status("cpu", torch.device("cpu")) is not None,
    reason=f"backend 'cpu' unavailable: {ops.backend_status('cpu', torch.device('cpu'))}",
)

scalars = functools.partial(_scalars, **ROW_SCALARS)


# ---------------------------------------------------------------------------------------------
# instruction sets and threads
# ---------------------------------------------------------------------------------------------


def test_instruction_set_override_is_honoured_and_checked(monkeypatch):
    """Every variant this CPU runs can be forced (and is then the one that runs); "baseline" runs
    everywhere; an unknown name is a ValueError that lists the variants."""
    isas = supported_isas()
    assert "baseline" in isas
    assert set(isas) <= set(CPU_ISAS)
    for isa in isas:
        force_isa(monkeypatch, isa)
    monkeypatch.setenv("STEP_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="STEP_KERNELS_CPU_ISA must be one of .*baseline, got 'sse9'"):
        torch.ops.step_kernels.fused_step_cpu_isa()


@pytest.mark.parametrize("flags", ["phase1", "srste", "phase2"])
@pytest.mark.parametrize("isa", isa_params())
def test_one_and_two_threads_give_identical_results(isa, flags, monkeypatch):
    force_isa(monkeypatch, isa)
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


# Every variant of the selection: 16, 8 or 4 lanes per register (AVX-512, AVX2, the portable
# build), groups within a register or across several (M > lanes), whole registers and the scalar
# tail (1 to 37 groups per row), both orientations.
SELECTION_NM = NM_WIDE + [(8, 16), (15, 16), (8, 32)]


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("n,m", SELECTION_NM)
@pytest.mark.parametrize("flags", ["srste", "phase2"])
def test_selection_of_every_instruction_set_with_ties_nan_inf(isa, n, m, flags, monkeypatch):
    force_isa(monkeypatch, isa)
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
# launches
# ---------------------------------------------------------------------------------------------


def test_one_launch_per_call_even_for_empty_lists():
    totals, launches = ops.fused_step("cpu", [], [], [], [], [], masked=False, frozen_v=False, scalars=scalars())
    assert totals.tolist() == [0.0, 0.0, 0.0] and launches == 1
    ts = make_tensors([(4, 8), (4, 3)], frozen=True, g_dtype=torch.float32, out_dtype=torch.bfloat16)
    w, g, m1, p, out = (list(col) for col in zip(*ts))
    _, launches = ops.fused_step("cpu", w, g, m1, p, out, masked=True, frozen_v=True, n=2, m=4, group_dims=[1, 0],
                                 scalars=scalars())
    assert launches == 1


# ---------------------------------------------------------------------------------------------
# the optimizer on backend "cpu" (what backend="auto" picks on CPU)
# ---------------------------------------------------------------------------------------------


def test_auto_picks_cpu_backend():
    assert sk.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert sk.STEP(nn.Linear(8, 4).parameters(), recipe="dense").backend == "cpu"
