"""What every fused-step backend must do, run on each of them: the C++ backend ("cpu") and the
Triton backend ("triton", on CPU tensors under TRITON_INTERPRET=1 and on CUDA when present), each
against the reference or an independent peer within its own tolerance (``BACKENDS``).

The backend files keep what is backend-specific: tests/test_fused_step_cpu.py (instruction sets,
thread counts, the C++ error messages), tests/test_fused_step_triton.py (the interpreter, launch
counts, the kernel's signature and error messages).
"""

import os

import pytest
import torch

from helpers import assert_ulps
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

# Each backend with the tolerance its results are held to against the reference and torch's
# AdamW: "cpu" is exact but for torch's CPU sqrt (1 ulp; 4 ulps of the value or the update covers
# it), "triton" within 4 ulps (tests/test_fused_step_triton.py explains the bound).
BACKENDS = {"cpu": dict(ulps=4), "triton": dict(ulps=4)}
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
