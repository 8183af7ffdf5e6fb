"""AutoSwitch and the loss scale: Adam's update does not change when the loss is multiplied by a
constant, and neither may the default switch decision (docs/design.md section 6).

The same fp32 regression run is trained with the loss multiplied by 1e-4, 1 and 1e4: the default
("relative") rule switches at exactly the same step at every scale, on every CPU backend; the
reimplementation's "absolute" rule, shown for contrast, switches as soon as its window is full at
1e-4 and only at T_max at 1e4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import step_kernels as sk

SCALES = (1e-4, 1.0, 1e4)
STEPS = 400
BACKENDS = ("reference", "cpu")
BETAS = (0.9, 0.99)  # a 100-step window, so a 400-step run can switch on the rule


def switch_step(backend: str, rule: str, scale: float) -> tuple:
    """(switch step, Z history) of a 2-layer regression trained with the loss times ``scale``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 8, generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    opt = sk.STEP(sk.sparse_param_groups(model, "2:4", exclude=[]), lr=1e-2, betas=BETAS,
                  switch=sk.AutoSwitch(max_step=STEPS, rule=rule), backend=backend)
    for step in range(STEPS):
        batch = torch.randint(0, 64, (16,), generator=gen)
        loss = nn.functional.mse_loss(model(x[batch]), y[batch]) * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if opt.phase == "sparse":
            break
    return opt.switch_step, opt.stats()["z_history"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_rule_switches_at_the_same_step_at_every_loss_scale(backend):
    runs = {scale: switch_step(backend, "relative", scale) for scale in SCALES}
    steps = {scale: run[0] for scale, run in runs.items()}
    window = sk.reference.autoswitch_window(BETAS[1])
    assert window < steps[1.0] < STEPS, steps  # the rule decided, not the window fill or T_max
    assert len(set(steps.values())) == 1, steps
    # The statistic itself is scale-free; the runs drift apart only through Adam's eps (1e-8 is
    # not negligible next to sqrt(v) ~ 1e-5 at scale 1e-4), by under 1% over the run here.
    for scale in (1e-4, 1e4):
        assert runs[scale][1] == pytest.approx(runs[1.0][1], rel=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absolute_rule_depends_on_the_loss_scale(backend):
    steps = {scale: switch_step(backend, "absolute", scale)[0] for scale in SCALES}
    window = sk.reference.autoswitch_window(BETAS[1])
    assert steps[1e-4] == window  # tiny gradients: below 1e-8 as soon as the window is full
    assert steps[1e4] == STEPS  # large gradients: never below it, T_max decides


def test_a_nan_gradient_leaves_only_t_max_and_poisons_like_adamw():
    """Without a GradScaler a NaN gradient is stepped, as torch.optim.AdamW steps it: the
    coordinate's weight becomes NaN in both, and so does its v, for good. Every later Z sample is
    NaN, no window holding one decides, so only T_max switches; the optimizer warns once."""
    beta2 = 0.9  # a 10-step window
    t_max, nan_step = 30, 4
    lin = nn.Linear(4, 4, bias=False)
    peer = nn.Linear(4, 4, bias=False)
    peer.load_state_dict(lin.state_dict())
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4"}], lr=1e-2, betas=(0.9, beta2),
                  switch=sk.AutoSwitch(threshold=1e6, max_step=t_max), backend="reference")  # any full window
    adamw = torch.optim.AdamW(peer.parameters(), lr=1e-2, betas=(0.9, beta2), weight_decay=0.0)
    with pytest.warns(RuntimeWarning, match="NaN") as caught:
        for step in range(1, t_max + 1):
            grad = torch.full((4, 4), 0.5)
            if step == nan_step:
                grad[1, 2] = float("nan")
            lin.weight.grad, peer.weight.grad = grad.clone(), grad.clone()
            opt.step()
            adamw.step()
    assert len([w for w in caught if "AutoSwitch" in str(w.message)]) == 1
    z = opt.stats()["z_history"]
    assert all(math.isfinite(v) for v in z[:nan_step - 1]) and all(math.isnan(v) for v in z[nan_step - 1:])
    assert opt.switch_step == t_max
    master = opt.state[lin.weight]["master"]
    assert torch.equal(torch.isnan(master), torch.isnan(peer.weight)) and torch.isnan(master[1, 2])


def test_every_param_group_holds_the_same_z_history_also_after_a_resume():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = sk.STEP([{"params": [model[0].weight], "sparsity": "2:4"}], betas=(0.9, 0.9),
                  switch=sk.AutoSwitch(threshold=0.0), backend="reference")
    opt.add_param_group({"params": [model[1].weight], "sparsity": "2:4"})

    def train(optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            optimizer.step()

    train(opt, 3)
    histories = [g["z_history"] for g in opt.state_dict()["param_groups"]]
    assert len(histories[0]) == 3 and histories[1] == histories[0]
    resumed = sk.STEP([{"params": [model[0].weight], "sparsity": "2:4"}], betas=(0.9, 0.9),
                      switch=sk.AutoSwitch(threshold=0.0), backend="reference")
    resumed.add_param_group({"params": [model[1].weight], "sparsity": "2:4"})
    resumed.load_state_dict(opt.state_dict())
    train(resumed, 2)
    histories = [g["z_history"] for g in resumed.state_dict()["param_groups"]]
    assert len(histories[0]) == 5 and histories[1] == histories[0] == resumed.stats()["z_history"]


def test_repr_summarises_the_z_history_and_keeps_every_setting():
    """The Z history grows by a value a step; repr shows its length and last value, not the list."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = sk.STEP([{"params": [model[0].weight], "sparsity": "2:4", "lr": 5e-3}, {"params": [model[1].weight]}],
                  betas=(0.9, 0.9), switch=sk.AutoSwitch(threshold=0.0), backend="reference")
    assert "    z_history: []\n" in repr(opt)
    for _ in range(40):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
    history = opt.stats()["z_history"]
    text = repr(opt)
    assert len(history) == 40 and text.count(f"    z_history: [40 values, last {history[-1]:.4g}]\n") == 2
    assert str(history[-1]) not in text.replace(f"{history[-1]:.4g}", "")
    assert "    lr: 0.005\n" in text and "    sparsity: 2:4\n" in text and "    phase: dense\n" in text
    assert text.startswith("STEP (\nParameter Group 0\n") and text.endswith("\n)")
