"""recipe="dense" against each of torch.optim.AdamW's CPU implementations: exactly the README's
claim (section "Reliability"). m and v are bit-identical to every one of them; the weight is bit-identical
to the implementation that computes the update the same way (the reference backend: torch's
for-loop and foreach AdamW, the default on CPU being the for-loop; the cpu backend: fused AdamW)
and differs from the others within the bound of the CPU backend's sqrt (tests/test_fused_step_cpu.py).
"""

import pytest
import torch

import step_kernels as sk
from helpers import assert_live_w, assert_same, tiny_gpt
from step_kernels import ops
from test_optimizer import batch

BACKENDS = ["reference"] + (["cpu"] if ops.backend_status("cpu", torch.device("cpu")) is None else [])
PEERS = {"default": {}, "for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
BIT_EXACT = {"reference": {"default", "for-loop", "foreach"}, "cpu": {"fused"}}
LR = 2e-3


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_recipe_against_each_adamw_implementation(backend, weight_decay):
    model = tiny_gpt()
    opt = sk.STEP(model.parameters(), lr=LR, weight_decay=weight_decay, recipe="dense", backend=backend)
    peers = {}
    for name, kwargs in PEERS.items():
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        peers[name] = (params, torch.optim.AdamW(params, lr=LR, weight_decay=weight_decay, **kwargs))
    differed = set()
    for step in range(8):
        opt.zero_grad()
        x, y = batch(step, "cpu")
        model.loss(x, y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        for name, (params, peer) in peers.items():
            for p, q in zip(model.parameters(), params):
                q.grad = p.grad.clone()
            peer.step()
            for i, (p, q) in enumerate(zip(model.parameters(), params)):
                assert_same(opt.state[p]["exp_avg"], peer.state[q]["exp_avg"], f"{name} m[{i}] step {step}")
                assert_same(opt.state[p]["exp_avg_sq"], peer.state[q]["exp_avg_sq"], f"{name} v[{i}] step {step}")
                if name in BIT_EXACT[backend]:
                    assert_same(p.detach(), q.detach(), f"{name} w[{i}] step {step}")
                    continue
                if not torch.equal(p, q):
                    differed.add(name)
                assert_live_w(q.detach(), p.detach(), before[i], 1 - LR * weight_decay, f"{name} w[{i}] step {step}")
                with torch.no_grad():
                    q.copy_(p)  # the next step starts from the same weight
    assert differed == set(PEERS) - BIT_EXACT[backend]
