"""What several test files share: a Conv1D stand-in, the small TinyGPT, the N:M lists, the step
scalars and the tolerance checks of the fused-step backends against the reference, the N:M prune
inputs and bit comparisons, snapshots of a model and an optimizer (all or nothing), and
run_to_completion for subprocess launches.

Tests import it as ``from helpers import ...`` (pytest puts tests/ on sys.path); tests/multiproc/common.py
adds tests/ to sys.path itself.
"""

import copy
import math
import os
import signal
import subprocess

import pytest
import torch
from torch import nn

from step_kernels import ops
from step_kernels import reference as ref
from step_kernels.models import TinyGPT

# N:M patterns. NM_SMALL: the Triton kernels' list (and test_nm_prune_triton's); NM_REFERENCE adds
# 31:32; NM_WIDE: every M up to 32 with several N each (the C++ backend's list).
NM_SMALL = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 16), (16, 32)]
NM_REFERENCE = NM_SMALL + [(31, 32)]
NM_WIDE = [(1, 2), (1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8), (7, 8), (1, 16), (5, 16), (1, 32), (2, 32),
           (16, 32), (31, 32)]


class Conv1D(nn.Module):
    """transformers' Conv1D layout: weight [in, out], y = x @ W + b (N:M groups run along dim 0).

    The stand-ins this replaces differed in their initialization; each test keeps its numbers by
    asking for the one it used: ``scale`` multiplies ``randn(nx, nf)``; ``bias`` is "zeros", "random"
    (``randn(nf) * 0.1``, drawn after the weight) or None (no bias); ``addmm`` computes the forward as
    transformers does (``addmm`` over the flattened rows) instead of ``x @ W + b``.
    """

    def __init__(self, nf, nx, *, scale=0.1, bias="zeros", addmm=False):
        super().__init__()
        self.nf = nf
        self.addmm = addmm
        self.weight = nn.Parameter(torch.randn(nx, nf) * scale)
        if bias == "zeros":
            self.bias = nn.Parameter(torch.zeros(nf))
        elif bias == "random":
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)
        elif bias is None:
            self.bias = None
        else:
            raise ValueError(f"bias must be 'zeros', 'random' or None, not {bias!r}")

    def forward(self, x):
        if self.bias is None:
            return x @ self.weight
        if self.addmm:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return out.view(*x.shape[:-1], self.nf)
        return x @ self.weight + self.bias


# the small TinyGPT of the optimizer tests; tiny_gpt(config={}) gives TinyGPT's own defaults
TINY_GPT = dict(vocab=64, ctx=16, d_model=32, n_layer=1, n_head=2)


def tiny_gpt(dtype=torch.float32, device="cpu", seed=0, config=TINY_GPT):
    """A TinyGPT(**config) initialized from ``torch.manual_seed(seed)``, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    return TinyGPT(**config).to(device=device, dtype=dtype)


def scalars(*, step, lr, weight_decay=0.1, srste_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8):
    """The precomputed scalars of one fused step (``reference.step_scalars``)."""
    return ref.step_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                            srste_decay=srste_decay)


def assert_exact(actual, expected, what):
    """Equal values, NaN for NaN (rtol = atol = 0)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_live_w(actual, expected, w_before, decay_factor, what):
    """|actual - expected| <= 1 ulp(expected) + 2^-22 |update| (the reference's sqrt rounding)."""
    update = (expected - w_before * torch.tensor(decay_factor, dtype=torch.float32)).abs()
    spacing = (torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs())
    allowed = spacing + update * 2.0**-22
    finite = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN positions differ"
    excess = (actual - expected).abs()[finite] > allowed[finite]
    assert not excess.any(), f"{what}: {int(excess.sum())} elements beyond the reference's rounding"


def assert_ulps(actual, expected, name, ulps, change=None):
    """|actual - expected| <= ulps * ulp(max(|expected|, |change|)), NaNs matching NaNs.

    ``change`` is the size of this step's update: its rounding error (torch's CPU sqrt is off by an
    ulp at times) lands on the result, so for small weights the ulp of the update sets the scale.
    """
    actual, expected = actual.float(), expected.float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    mag = e.abs() if change is None else torch.maximum(e.abs(), change.float()[~nan].abs())
    mag = mag.clamp_min(1e-30)
    ulp = torch.nextafter(mag, torch.tensor(float("inf"))) - mag
    bad = (a - e).abs() > ulps * ulp
    assert not bad.any(), (f"{name}: {int(bad.sum())} values beyond {ulps} ulp, e.g. "
                           f"{a[bad][:3].tolist()} vs {e[bad][:3].tolist()}")


# ---------------------------------------------------------------------------------------------
# the instruction-set variants of the C++ fused step
# ---------------------------------------------------------------------------------------------

# The variants csrc/fused_step_cpu.cpp compiles, widest first. The extension reads
# STEP_KERNELS_CPU_ISA at every call (pick_isa), so a test forces one by setting the variable; the
# conformance suite and the thread-count test run once per variant this CPU supports. A new
# variant is one more name here.
CPU_ISAS = ("avx512", "avx2", "baseline")


def supported_isas():
    """The names of :data:`CPU_ISAS` this CPU and this build run ([] without the built extension)."""
    if ops.backend_status("cpu", torch.device("cpu")) is not None:
        return []
    names = []
    for isa in CPU_ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STEP_KERNELS_CPU_ISA", isa)
            try:
                torch.ops.step_kernels.fused_step_cpu_isa()
            except (RuntimeError, ValueError):  # not supported by this CPU; not compiled into this build
                continue
        names.append(isa)
    return names


def isa_params():
    """One ``pytest.param`` per :data:`CPU_ISAS` entry, skipped where this CPU (or the missing
    extension) cannot run it."""
    supported = supported_isas()
    reason = ops.backend_status("cpu", torch.device("cpu"))
    return [pytest.param(isa, id=isa, marks=pytest.mark.skipif(
        isa not in supported, reason=f"backend 'cpu': {reason or f'this CPU or build does not run {isa}'}"))
        for isa in CPU_ISAS]


def force_isa(monkeypatch, isa):
    """Make every call of the C++ fused step in this test run the ``isa`` variant."""
    monkeypatch.setenv("STEP_KERNELS_CPU_ISA", isa)
    assert torch.ops.step_kernels.fused_step_cpu_isa() == isa


# ---------------------------------------------------------------------------------------------
# one fused step on per-tensor rows [w, g, m, second, out], and the C++ backend's tolerance
# ---------------------------------------------------------------------------------------------

# the scalars of the row-based checks (tests/test_fused_step_cpu.py, tests/test_backend_conformance.py)
ROW_SCALARS = dict(step=7, lr=0.05, weight_decay=0.1, srste_decay=0.3)
# (masked, frozen_v, compute_stats): dense AdamW, phase 1 with AutoSwitch sums, SR-STE, phase 2
FLAGS = {"dense": (False, False, False), "phase1": (False, False, True),
         "srste": (True, False, False), "phase2": (True, True, False)}


def make_tensors(shapes, *, frozen, g_dtype, out_dtype, p_dtype=torch.float32, seed=0):
    """Per tensor [w, g, m, second, out]. Half of each w is quantized so groups hold ties."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen)
        flat = w.view(-1)
        flat[: flat.numel() // 2] = torch.round(flat[: flat.numel() // 2] * 4) / 4
        g = (torch.randn(shape, generator=gen) * 0.5).to(g_dtype)
        m = torch.randn(shape, generator=gen) * 0.1
        if frozen:
            second = (torch.rand(shape, generator=gen) * 20 + 0.5).to(p_dtype)
        else:
            second = torch.rand(shape, generator=gen) * 0.01
        out = torch.full(shape, 7.0, dtype=out_dtype) if out_dtype is not None else None
        tensors.append([w, g, m, second, out])
    return tensors


def clone(tensors):
    return [[t.clone() if t is not None else None for t in ts] for ts in tensors]


def run(backend, tensors, *, flags, n=0, m=0, dims=None, s=None, grad_scale=None, found_inf=None):
    masked, frozen, stats = FLAGS[flags] if isinstance(flags, str) else flags
    cols = list(zip(*tensors))
    totals, _ = ops.fused_step(
        backend, *[list(c) for c in cols], masked=masked, frozen_v=frozen, n=n, m=m,
        group_dims=dims if masked else None, scalars=s or scalars(**ROW_SCALARS), grad_scale=grad_scale,
        found_inf=found_inf, compute_stats=stats,
    )
    return totals


def compare(ours, theirs, tot_ours, tot_ref, *, flags, w_before, decay_factor, n=0, m=0, dims=None):
    """The C++ backend's tolerance: bit equality except the live-v weight (tests/test_fused_step_cpu.py
    explains why); the model parameter is exactly the rounded (masked) weight of the kernel, and its
    mask exactly the reference's."""
    masked, frozen, stats = FLAGS[flags] if isinstance(flags, str) else flags
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if frozen:
            assert_exact(a[0], b[0], f"w[{i}]")
        else:
            assert_live_w(a[0], b[0], w_before[i], decay_factor, f"w[{i}]")
        assert_exact(a[2], b[2], f"m[{i}]")
        assert_exact(a[3], b[3], f"second[{i}]")
        if a[4] is not None:
            if masked:
                keep = ref.nm_mask(a[0], n, m, dims[i])
                assert torch.equal(keep, ref.nm_mask(b[0], n, m, dims[i])), f"mask of tensor {i} differs"
                expected = torch.where(keep, a[0], torch.zeros(()))
            else:
                expected = a[0]
            assert_exact(a[4], expected.to(a[4].dtype), f"model_param[{i}]")
            if frozen:
                assert_exact(a[4], b[4], f"model_param[{i}]")
    assert tot_ours.dtype == torch.float64 and tot_ours.shape == (3,)
    assert tot_ours[2].item() == tot_ref[2].item(), "flips"
    torch.testing.assert_close(tot_ours[:2], tot_ref[:2], rtol=1e-12, atol=0)


def compare_ulps(ours, theirs, tot_ours, tot_ref, *, flags, w_before, ulps, n=0, m=0, dims=None):
    """The Triton backend's tolerance (tests/test_fused_step_triton.py) on rows: w, m and a live v
    within ``ulps`` of the reference (w: of the value or of the step's update), a frozen
    preconditioner untouched, the same masks and flips, the model parameter exactly the RNE cast of
    the kernel's own masked w, AutoSwitch sums within rtol 1e-6."""
    masked, frozen, stats = FLAGS[flags] if isinstance(flags, str) else flags
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_ulps(a[0], b[0], f"w[{i}]", ulps, change=b[0] - w_before[i])
        assert_ulps(a[2], b[2], f"m[{i}]", ulps)
        if frozen:
            assert torch.equal(a[3], b[3]), f"p[{i}] must be read only"
        else:
            assert_ulps(a[3], b[3], f"v[{i}]", ulps)
        if masked:
            keep = ref.nm_mask(a[0], n, m, dims[i])
            assert torch.equal(keep, ref.nm_mask(b[0], n, m, dims[i])), f"mask[{i}] differs"
            expected = torch.where(keep, a[0], torch.zeros((), device=keep.device))
        else:
            expected = a[0]
        if a[4] is not None:
            # torch.equal, NaN for NaN (a kept NaN weight)
            assert_exact(a[4], expected.to(a[4].dtype), f"model param [{i}] is not RNE of w")
    if masked:
        assert tot_ours[2].item() == tot_ref[2].item(), "flip counts differ"
    else:
        torch.testing.assert_close(tot_ours.cpu(), tot_ref.cpu(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# the Triton file's inputs: ties on a coarse grid, a preconditioner 1 / (sqrt(v) + 1e-3)
# ---------------------------------------------------------------------------------------------


# named recipes of make_case inputs: (masked, frozen, grad dtype, model dtype, precond dtype)
RECIPES = {
    "step2-fp32": (True, True, torch.float32, torch.float32, torch.float32),
    "step2-bf16": (True, True, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "step2-fp16": (True, True, torch.float16, torch.float16, torch.float32),
    "srste-fp32": (True, False, torch.float32, torch.float32, torch.float32),
    "srste-bf16": (True, False, torch.bfloat16, torch.bfloat16, torch.float32),
}


def make_case(shapes, *, frozen, grad_dtype, out_dtype, precond_dtype, device, seed, ties=True):
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen)
        if ties:  # a coarse grid makes equal magnitudes (and +-0) common, so the tie rule is exercised
            w = torch.round(w * 4) / 4
        g = torch.randn(shape, generator=gen).to(grad_dtype)
        m1 = torch.randn(shape, generator=gen) * 0.1
        v = torch.rand(shape, generator=gen) * 1e-2
        second = (1 / (v.sqrt() + 1e-3)).to(precond_dtype) if frozen else v
        out = torch.full(shape, -7.0, dtype=out_dtype) if out_dtype is not None else None  # unwritten shows
        tensors.append([x.to(device) if x is not None else None for x in (w, g, m1, second, out)])
    return tensors


def rows(result):
    """A dict of result lists (w, m, second, out: run_both's) as rows [w, g, m, second, out], g None."""
    return [list(row) for row in zip(result["w"], [None] * len(result["w"]), result["m"], result["second"],
                                     result["out"])]


def run_to_completion(cmd, label, timeout, cwd=None):
    """Run ``cmd`` (one OpenMP thread, unbuffered output) in a session of its own and return its
    combined output. A run past ``timeout`` seconds is killed with its whole process group and
    fails the test (a hang never blocks CI); a non-zero exit fails it with the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{label} hung for {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{label} failed:\n{out[-6000:]}"
    return out


# ---------------------------------------------------------------------------------------------
# the N:M prune tests of every backend: inputs and bit comparisons
# ---------------------------------------------------------------------------------------------


def with_specials(w, seed):
    """Ties (a coarse grid), NaN, -0.0 and +-inf scattered through ``w`` (float dtypes); for int8,
    many ties and the extremes -128 and 127 (|-128| must be widened, not wrapped)."""
    gen = torch.Generator().manual_seed(seed)
    if not w.dtype.is_floating_point:
        flat = (torch.randint(-4, 5, (w.numel(),), generator=gen) * 32).clamp(-128, 127)
        return flat.reshape(w.shape).to(w.dtype)
    flat = torch.round(torch.randn(w.numel(), generator=gen) * 2) / 2
    picks = torch.randint(0, w.numel(), (max(1, w.numel() // 20),), generator=gen)
    specials = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), float("-nan")])
    flat[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return flat.reshape(w.shape).to(w.dtype)


def same_bits(a, b):
    """Same dtype and the same bits (so +0.0 differs from -0.0 and NaN payloads count)."""
    if a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    view = {torch.float64: torch.int64, torch.float32: torch.int32}.get(a.dtype, torch.int16)
    return torch.equal(a.view(view), b.view(view))


def shapes_for(m):
    """(shape, dim): last-dim groups of 1, 15 and 257 groups; first-dim (Conv1D) and middle-dim groups."""
    return [((1, m), 1), ((15, m), -1), ((257 * m,), 0), ((2, 3 * m), 1), ((m, 15), 0), ((2 * m, 257), 0),
            ((2, m, 3), 1)]


# ---------------------------------------------------------------------------------------------
# snapshots of a model and an optimizer, to show that a failed call changed nothing
# ---------------------------------------------------------------------------------------------


# ``snapshot(model, opt)`` copies everything a call could change: every parameter (values, dtype,
# shape, strides, device), its grad, every buffer, the optimizer's per-parameter state (tensors
# and Python values), its param groups (hyper-parameters, global keys, which parameters) and its
# public attributes; ``snapshot_state_dict(sd)`` copies a state dict. ``assert_same(a, b)``
# compares two snapshots bit for bit (NaNs equal to NaNs, -0.0 different from +0.0) and names the
# first entry that differs.

PUBLIC_ATTRS = ("recipe", "switch_step", "phase", "step_count", "backend", "precond_eps", "precond_dtype",
                "total_steps")


def _copy(value):
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:  # a sparse grad: its layout and dense values
            return ("tensor", t.dtype, tuple(t.shape), str(t.layout), str(t.device), t.to_dense())
        return ("tensor", t.dtype, tuple(t.shape), t.stride(), str(t.device), t.clone())
    return copy.deepcopy(value)


def snapshot(model=None, opt=None):
    """A nested dict of copies of ``model``'s parameters, grads and buffers and ``opt``'s state."""
    out = {}
    if model is not None:
        out["params"] = {name: _copy(p) for name, p in model.named_parameters()}
        out["grads"] = {name: _copy(p.grad) for name, p in model.named_parameters()}
        out["buffers"] = {name: _copy(b) for name, b in model.named_buffers()}
    if opt is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        out["opt_params"] = [_copy(p) for p in params]
        out["opt_grads"] = [_copy(p.grad) for p in params]
        out["state"] = [{key: _copy(value) for key, value in opt.state[p].items()} if p in opt.state else None
                        for p in params]
        # which tensors each group holds: the model's names for them (comparable across twin runs),
        # else their identity
        names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
        out["param_groups"] = [{key: ([names.get(id(p), id(p)) for p in value] if key == "params" else _copy(value))
                                for key, value in group.items()} for group in opt.param_groups]
        out["attrs"] = {name: _copy(getattr(opt, name)) for name in PUBLIC_ATTRS if hasattr(opt, name)}
    return out


def snapshot_state_dict(state_dict):
    """A copy of an optimizer ``state_dict()`` that :func:`assert_same` compares bit for bit."""
    return {"state": {pid: {key: _copy(value) for key, value in entry.items()}
                      for pid, entry in state_dict["state"].items()},
            "param_groups": [{key: _copy(value) for key, value in group.items()}
                             for group in state_dict["param_groups"]]}


def _bits(t):
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat


def _assert_value(a, b, where):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        assert isinstance(b, tuple) and b and b[0] == "tensor", f"{where}: a tensor became {b!r}"
        for label, x, y in zip(("dtype", "shape", "strides (or layout)", "device"), a[1:5], b[1:5]):
            assert x == y, f"{where}: {label} changed from {x} to {y}"
        if a[4] != "meta":  # meta tensors have no values
            assert torch.equal(_bits(a[5]), _bits(b[5])), f"{where}: values changed"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys changed from {sorted(map(str, a))} " \
                                                         f"to {sorted(map(str, b)) if isinstance(b, dict) else b!r}"
        for key in a:  # the order of keys is not state (torch's load_state_dict moves "params" last)
            _assert_value(a[key], b[key], f"{where}[{key!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: changed from {a!r} to {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_value(x, y, f"{where}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert type(a) is type(b) and a == b, f"{where}: changed from {a!r} to {b!r}"


def _normalized(value):
    """Tensors anywhere in ``value`` (dicts, lists, tuples) in the snapshot form ``_copy`` gives."""
    if isinstance(value, torch.Tensor):
        return _copy(value)
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and value and value[0] == "tensor"):
        return type(value)(_normalized(item) for item in value)
    return value


def assert_same(a, b, label="snapshot"):
    """Assert that two snapshots (or tensors, or nests of them) are bit-identical; the message
    names ``label`` and the first difference."""
    _assert_value(_normalized(a), _normalized(b), label)
