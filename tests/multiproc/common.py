"""The model, data and training loop shared by the multi-process workers and the single-process
runs they are compared with (tests/test_distributed.py).

A global batch of 8 samples is split into ``world`` equal micro-batches; the single-process run
computes the same micro-batches one by one and averages their grads, which is what DDP's and
FSDP2's gradient reductions do for 2 ranks, so the two runs see bit-identical grads.
"""

import functools
import os
import sys

import torch
from torch import nn

import step_kernels as sk

# tests/ holds helpers.py; the workers run as scripts, outside pytest's sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 30
SWITCH = 10
# beta2 = 0.9 gives an AutoSwitch window of 10 steps, so a 30-step run can switch on its own.
BETAS = (0.9, 0.9)


# the multi-process runs' Conv1D: weights drawn at scale 0.2 (their numbers depend on it)
Conv1D = functools.partial(helpers.Conv1D, scale=0.2)


class Net(nn.Module):
    """Linear (groups along dim 1) -> Conv1D (groups along dim 0) -> Linear -> head (dense).

    ``dead_inputs`` input features are zeroed: those columns of fc1.weight never get a gradient
    (v == 0 in a fed tensor, whose preconditioner comes from the whole tensor's v)."""

    def __init__(self, width=16, hidden=32, dead_inputs=0):
        super().__init__()
        self.dead_inputs = dead_inputs
        self.fc1 = nn.Linear(width, hidden)
        self.proj = Conv1D(width, hidden)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        if self.dead_inputs:
            x = torch.cat([torch.zeros_like(x[:, :self.dead_inputs]), x[:, self.dead_inputs:]], dim=1)
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.proj(h))
        return self.head(torch.tanh(self.fc2(h)))


# Run kinds: "fixed" and "auto" (recipe "step", fp32); "srste_bf16" (recipe "srste", a bf16 model
# with fp32 masters, masked from the first step); "unfed" ("fixed" with 4 dead input features).
KINDS = ("fixed", "auto", "srste_bf16", "unfed")


def build_model(kind="fixed", seed=0):
    torch.manual_seed(seed)
    return Net(dead_inputs=4 if kind == "unfed" else 0).to(torch.bfloat16 if kind == "srste_bf16" else torch.float32)


def global_batch(step):
    # Two alternating batches: the loss falls, so AutoSwitch's Z settles.
    gen = torch.Generator().manual_seed(100 + step % 2)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 4, generator=gen)
    return x, y


def micro_batch(step, rank, world):
    x, y = global_batch(step)
    size = GLOBAL_BATCH // world
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def loss_fn(model, x, y):
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def switch_arg(kind):
    """The optimizer's ``switch`` for a run kind: a fixed step, or an AutoSwitch."""
    if kind in ("fixed", "unfed"):
        return SWITCH
    # Threshold read off a single-process run's Z history: the 10-step window mean is 1.13e-5,
    # 1.02e-5 and 9.6e-6 at steps 10, 11 and 12, so it switches at step 12 with margins of 2-4%,
    # far above reduction-order noise (~1e-7 relative).
    return sk.AutoSwitch(threshold=AUTO_THRESHOLD, rule="absolute")


AUTO_THRESHOLD = 9.8e-6


def make_optimizer(model, kind, cls=None, **kwargs):
    cls = cls or sk.STEP
    groups = sk.sparse_param_groups(model, "2:4", weight_decay=0.01)
    if kind == "srste_bf16":
        return cls(groups, lr=1e-2, betas=BETAS, recipe="srste", backend="reference", **kwargs)
    return cls(groups, lr=1e-2, betas=BETAS, switch=switch_arg(kind), backend="reference", **kwargs)


def single_process_run(kind, world=2, steps=STEPS):
    """The reference: one process, the same global batch as ``world`` micro-batches."""
    model = build_model(kind)
    opt = make_optimizer(model, kind)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        grads = None
        for rank in range(world):
            model.zero_grad(set_to_none=True)
            loss_fn(model, *micro_batch(step, rank, world)).backward()
            these = [p.grad.clone() for p in model.parameters()]
            grads = these if grads is None else [a + b for a, b in zip(grads, these)]
        for p, g in zip(model.parameters(), grads):
            p.grad = g / world
        opt.step()
    return summary(model, opt)


def summary(model, opt, full=lambda t: t):
    """Master weights, model parameters, optimizer globals: what the tests compare."""
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    masters = {}
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            masters[names[id(p)]] = full(state.get("master", p)).detach().clone()
    return {
        "masters": masters,
        "params": {n: full(p).detach().clone() for n, p in params.items()},
        "switch_step": opt.switch_step,
        "step": opt.step_count,
        "phase": opt.phase,
        "z_history": list(opt.stats()["z_history"]),
        "flip_rate": opt.stats()["flip_rate"],
        "precond_floor_count": opt.stats()["precond_floor_count"],
    }


def exit_now():
    """Leave without tearing gloo down: on a loaded machine, a rank whose peer has already closed
    its sockets can abort in gloo's destructor ("terminate called without an active exception")
    after all the work is done and saved. Every rank has passed the final barrier here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
