"""The STEP optimizer against torch.optim.AdamW, hand-computed steps and the rules of docs/design.md."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import step_kernels as sk
from helpers import Conv1D, tiny_gpt
from step_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def batch(step, device, vocab=64, ctx=16, size=4):
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, vocab, (size, ctx + 1), generator=gen).to(device)
    return idx[:, :-1], idx[:, 1:]


def same(a, b):
    """Equal state values: tensors bit for bit (and dtype), Python values (the step count) by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def train_step(model, opt, step, device):
    opt.zero_grad(set_to_none=True)
    x, y = batch(step, device)
    model.loss(x, y).backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
# phase 1 / dense == torch.optim.AdamW
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["dense", "step"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_and_phase1_match_adamw_every_step(recipe, weight_decay, dtype, device):
    model = tiny_gpt(dtype, device)
    peer_params = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    peer = torch.optim.AdamW(peer_params, lr=2e-3, weight_decay=weight_decay, foreach=False)
    opt = sk.STEP(sk.sparse_param_groups(model), lr=2e-3, weight_decay=weight_decay, recipe=recipe,
                  backend="reference")
    params = list(model.parameters())
    for step in range(100):
        opt.zero_grad()
        x, y = batch(step, device)
        model.loss(x, y).backward()
        for p, q in zip(params, peer_params):
            q.grad = p.grad.float()
        opt.step()
        peer.step()
        for p, q in zip(params, peer_params):
            state, peer_state = opt.state[p], peer.state[q]
            master = state.get("master", p)
            torch.testing.assert_close(master, q.detach(), rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg"], peer_state["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg_sq"], peer_state["exp_avg_sq"], rtol=0, atol=0)
            assert torch.equal(p.detach(), master.to(dtype))
    assert opt.phase == "dense" and opt.step_count == 100
    if recipe == "step":
        assert len(opt.stats()["z_history"]) == 100


# ---------------------------------------------------------------------------------------------
# phase 2 and srste against hand-computed values
# ---------------------------------------------------------------------------------------------


def test_phase2_step_matches_hand_computation():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.05, 0.3, 0.2]]))
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4", "nm_dim": 1}], lr=0.01, betas=(0.9, 0.99),
                  weight_decay=0.1, srste_decay=0.5, switch=1, backend="reference")
    lin.weight.grad = torch.tensor([[0.2, 0.1, -0.1, 0.3]])
    opt.step()  # step 1: AdamW, then the switch freezes v
    assert opt.phase == "sparse" and opt.switch_step == 1
    state = opt.state[lin.weight]
    w1 = state["master"].clone()
    m1 = state["exp_avg"].clone()
    p = state["precond"].clone()
    # p = 1 / (sqrt(v / (1 - b2)) + 1e-6) with v = (1 - b2) g^2: p = 1 / (|g| + 1e-6)
    torch.testing.assert_close(p, 1 / (torch.tensor([[0.2, 0.1, 0.1, 0.3]]) + 1e-6), rtol=1e-6, atol=0)
    assert torch.equal(lin.weight.detach() != 0, ref.nm_mask(w1, 2, 4))
    g2 = [0.1, -60.0, 0.4, -0.3]  # pushes the pruned -0.05 past a kept weight: two flips
    lin.weight.grad = torch.tensor([g2])
    opt.step()
    w, m, pp = w1[0].tolist(), m1[0].tolist(), p[0].tolist()
    keep_old = ref.nm_mask(w1, 2, 4)[0].tolist()
    g = [gi + (0.0 if k else 0.5 * wi) for gi, wi, k in zip(g2, w, keep_old)]
    w = [wi * (1 - 0.01 * 0.1) for wi in w]
    m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
    w = [wi - 0.01 / (1 - 0.9**2) * mi * pi for wi, mi, pi in zip(w, m, pp)]
    torch.testing.assert_close(state["master"][0], torch.tensor(w), rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(state["exp_avg"][0], torch.tensor(m), rtol=2e-6, atol=1e-9)
    keep_new = ref.nm_mask(torch.tensor([w]), 2, 4)[0]
    expected_param = torch.where(keep_new, torch.tensor(w), torch.tensor(0.0))
    torch.testing.assert_close(lin.weight.detach()[0], expected_param, rtol=2e-6, atol=1e-8)
    hand_flips = sum(a != b for a, b in zip(keep_new.tolist(), keep_old))
    assert hand_flips == 2
    assert opt.stats()["flip_rate"] == pytest.approx(hand_flips / 4)


def test_srste_masks_at_creation_and_uses_live_v():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3, bias=False)
    dense = lin.weight.detach().clone()
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4"}], recipe="srste", lr=0.01, backend="reference")
    assert opt.phase == "sparse"
    assert torch.equal(lin.weight.detach(), torch.where(ref.nm_mask(dense, 2, 4), dense, torch.tensor(0.0)))
    assert torch.equal(opt.state[lin.weight]["master"], dense)
    g = torch.randn(3, 8)
    lin.weight.grad = g.clone()
    opt.step()
    w, m, v = dense.clone(), torch.zeros(3, 8), torch.zeros(3, 8)
    s = ref.step_scalars(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, srste_decay=2e-4)
    keep, _ = ref.masked_step(w, g, m, v, s, n=2, m=4, dim=1, frozen_v=False)
    state = opt.state[lin.weight]
    assert torch.equal(state["master"], w) and torch.equal(state["exp_avg_sq"], v)
    assert torch.equal(lin.weight.detach(), torch.where(keep, w, torch.tensor(0.0)))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (1, 16)])
def test_conv1d_groups_run_along_dim0(n, m):
    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(nf=16, nx=32), nn.ReLU(), nn.Linear(16, 32))
    groups = sk.sparse_param_groups(model, sparsity=f"{n}:{m}", exclude=[])
    assert {(g["sparsity"], g["nm_dim"]) for g in groups} == {(f"{n}:{m}", 0), (f"{n}:{m}", 1), (None, None)}
    opt = sk.STEP(groups, switch=2, lr=1e-2, backend="reference")
    x = torch.randn(16, 32)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    conv_w, lin_w = model[0].weight, model[2].weight
    for p, dim in ((conv_w, 0), (lin_w, 1)):
        master = opt.state[p]["master"]
        keep = ref.nm_mask(master, n, m, dim)
        assert torch.equal(p.detach(), torch.where(keep, master, torch.tensor(0.0)))
        counts = (p.detach() != 0).movedim(dim, -1).reshape(-1, m).sum(-1)
        assert (counts <= n).all() and (keep.movedim(dim, -1).reshape(-1, m).sum(-1) == n).all()


@pytest.mark.parametrize("precond_eps,decays", [(1e-6, True), (1e-8, False)])
def test_floor_coordinate_decays_under_srste(precond_eps, decays):
    """A weight whose phase-1 gradients were ~0 (1e-9 here) has sqrt(v_hat) below the floor, so
    p ~ 1 / precond_eps. Pruned, its SR-STE term must shrink it; with a 1e-8 floor the same term
    overshoots and it grows (docs/design.md section 7)."""
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.05, 0.8]]))
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4"}], switch=3, lr=1e-3, precond_eps=precond_eps,
                  backend="reference")
    for _ in range(3):
        lin.weight.grad = torch.tensor([[0.1, 0.1, 1e-9, 0.1]])
        opt.step()
    assert opt.stats()["precond_floor_count"] == 1
    start = opt.state[lin.weight]["master"][0, 2].item()
    trajectory = []
    for _ in range(60):
        lin.weight.grad = torch.zeros(1, 4)
        opt.step()
        trajectory.append(opt.state[lin.weight]["master"][0, 2].item())
    if decays:  # a damped oscillation (momentum): never above where it started, then small
        assert max(abs(x) for x in trajectory) <= abs(start)
        assert max(abs(x) for x in trajectory[-10:]) < 0.2 * abs(start)
    else:
        assert max(abs(x) for x in trajectory) > 10 * abs(start)


# ---------------------------------------------------------------------------------------------
# targets without a settled v, steps without grads (docs/design.md sections 4 and 7; issue 12 item 1)
# ---------------------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    """Two 2:4 targets; branch ``b`` can be unused, frozen or multiplied by zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4, bias=False)
        self.b = nn.Linear(8, 4, bias=False)

    def loss(self, step, use_b=True, b_scale=1.0):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        out = self.a(x) + (b_scale * self.b(x) if use_b else 0.0)
        return (out - y).pow(2).mean()


def expected_masked_step(state, grad, group, frozen):
    """One masked step of a target computed by the reference on copies of its state, with the
    target's own step count: (master, exp_avg, second) after it."""
    w, m1 = state["master"].clone(), state["exp_avg"].clone()
    second = (state["precond"] if frozen else state["exp_avg_sq"]).clone()
    beta1, beta2 = group["betas"]
    s = ref.step_scalars(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], step=state["step"] + 1,
                         srste_decay=group["srste_decay"])
    ref.masked_step(w, grad, m1, second, s, n=2, m=4, dim=1, frozen_v=frozen)
    return w, m1, second


def skip_unavailable(backend):
    reason = sk.ops.backend_status(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("how", ["late_branch", "unfrozen_layer", "zero_grads", "added_after_switch"])
def test_target_without_settled_v_steps_with_live_v_then_freezes(how, backend):
    """A target no gradient (or only zeros) reached before the switch is not frozen with
    p = 1 / precond_eps: it takes live-v masked steps with its own step count, is frozen after
    switch_step steps of its own, and its weight moves by Adam-sized steps throughout."""
    skip_unavailable(backend)
    k, lr = 3, 1e-2
    model = TwoBranch()
    params_b = [] if how == "added_after_switch" else [model.b.weight]
    opt = sk.STEP([{"params": [model.a.weight] + params_b, "sparsity": "2:4"}], lr=lr, switch=k, backend=backend)
    if how == "unfrozen_layer":
        model.b.weight.requires_grad_(False)
    for step in range(k):
        opt.zero_grad()
        model.loss(step, use_b=how in ("unfrozen_layer", "zero_grads"),
                   b_scale=0.0 if how == "zero_grads" else 1.0).backward()
        opt.step()
    assert opt.phase == "sparse" and opt.switch_step == k
    if how == "added_after_switch":
        opt.add_param_group({"params": [model.b.weight], "sparsity": "2:4"})
    model.b.weight.requires_grad_(True)
    state_b = opt.state[model.b.weight]
    assert "precond" not in state_b and state_b["step"] == 0  # zero grads: its count restarted
    assert torch.equal(state_b["exp_avg_sq"], torch.zeros(4, 8)) and "precond" in opt.state[model.a.weight]
    group = opt.param_groups[-1]
    for step in range(k, 2 * k + 2):
        opt.zero_grad()
        model.loss(step).backward()
        frozen = "precond" in state_b
        assert frozen == (step >= 2 * k)  # frozen at the end of its k-th own step
        w, m1, second = expected_masked_step(state_b, model.b.weight.grad, group, frozen)
        before = state_b["master"].clone()
        opt.step()
        tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state_b["master"], w, **tol)
        torch.testing.assert_close(state_b["exp_avg"], m1, **tol)
        keep = ref.nm_mask(state_b["master"], 2, 4, 1)
        assert torch.equal(model.b.weight.detach(), torch.where(keep, state_b["master"], torch.zeros(())))
        assert (state_b["master"] - before).abs().max() < 3 * lr  # Adam-sized, not 1e6 x lr
        if step == 2 * k - 1:  # frozen now: p of its own v after k own steps
            expected_p = ref.preconditioner(second, beta2=0.999, step=k, precond_eps=1e-6)
            assert "exp_avg_sq" not in state_b and state_b["step"] == k
            torch.testing.assert_close(state_b["precond"], expected_p, rtol=1e-6, atol=0)
    assert opt.stats()["precond_floor_count"] == 0


def test_unfed_coordinates_of_a_fed_target_get_the_tensors_rms_preconditioner():
    """Input feature 5 is 0 during phase 1: column 5 of the weight has v == 0 exactly. Its p is
    that of the tensor's RMS v (computed here in double), the others' p is unchanged, and when
    the feature comes alive the weight moves by a step of typical size instead of jumping."""
    k, lr = 4, 1e-2
    lins, opts = [], []
    for switch in (k, 100):  # the second never switches: it shows the v the first one froze
        torch.manual_seed(0)
        lins.append(nn.Linear(8, 4, bias=False))
        opts.append(sk.STEP([{"params": [lins[-1].weight], "sparsity": "2:4"}], lr=lr, switch=switch,
                            backend="reference"))
    for step in range(k):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=gen)
        x[:, 5] = 0.0
        for lin, opt in zip(lins, opts):
            opt.zero_grad()
            lin(x).pow(2).mean().backward()
            opt.step()
    lin, opt = lins[0], opts[0]
    v = opts[1].state[lins[1].weight]["exp_avg_sq"].double()
    fed = v != 0
    assert int((~fed).sum()) == 4 and bool((~fed[:, 5]).all())
    p = opt.state[lin.weight]["precond"]
    assert opt.stats()["precond_floor_count"] == 4  # the unfed coordinates are the ones below the floor
    rms = math.sqrt(v[fed].mean().item() / (1 - 0.999**k))
    torch.testing.assert_close(p[:, 5], torch.full((4,), 1 / (rms + 1e-6), dtype=torch.float32), rtol=1e-6, atol=0)
    torch.testing.assert_close(p[fed], ref.preconditioner(v.float(), beta2=0.999, step=k, precond_eps=1e-6)[fed],
                               rtol=0, atol=0)
    assert p[:, 5].max() <= p[fed].max()  # the RMS is at least the smallest fed sqrt(v_hat)
    before = opt.state[lin.weight]["master"].clone()
    x = torch.zeros(16, 8)
    x[:, 5] = 1.0
    opt.zero_grad()
    lin(x).pow(2).mean().backward()
    w, _, _ = expected_masked_step(opt.state[lin.weight], lin.weight.grad, opt.param_groups[0], frozen=True)
    opt.step()
    assert torch.equal(opt.state[lin.weight]["master"], w)
    assert (w - before).abs().max() < 3 * lr


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("recipe,switch", [("step", None), ("step", 3), ("srste", None), ("dense", None)])
def test_step_without_grads_changes_nothing_and_counts_nowhere(recipe, switch, backend):
    """As in torch's optimizers: no t, no AutoSwitch sample, no switch (at t = switch - 1 here),
    nothing written. A run with such steps interleaved equals a run without them."""
    from helpers import assert_same, snapshot

    skip_unavailable(backend)
    runs = []
    for idle in (False, True):
        model = TwoBranch()
        opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), recipe=recipe, backend=backend,
                      switch=sk.AutoSwitch(threshold=1.0, rule="absolute") if switch is None else switch,
                      betas=(0.9, 0.5))
        for step in range(6):
            if idle:
                opt.zero_grad(set_to_none=True)
                before = snapshot(model, opt)
                assert opt.step() is None
                assert_same(before, snapshot(model, opt))
            opt.zero_grad()
            model.loss(step).backward()
            opt.step()
        runs.append(snapshot(model, opt))
        if recipe == "step":  # the switch happened after real step 2 (AutoSwitch: window of 2) or 3
            assert opt.switch_step == (2 if switch is None else 3)
            assert len(opt.stats()["z_history"]) == opt.switch_step * (switch is None)
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("recipe", ["dense", "step"])
def test_parameters_that_skip_steps_match_adamw_per_parameter_counts(recipe):
    """torch.optim.AdamW counts steps per parameter (only those with a grad) and bias-corrects
    with that count; so does STEP (phase 1 / dense), bit for bit on the reference backend."""
    model = TwoBranch()
    peer_model = TwoBranch()
    opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), lr=1e-2, weight_decay=0.1, recipe=recipe,
                  switch=100, backend="reference")
    peer = torch.optim.AdamW(peer_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(8):
        use_b = step >= 3  # b first gets a grad at step 3
        for mdl, o in ((model, opt), (peer_model, peer)):
            o.zero_grad(set_to_none=True)
            mdl.loss(step, use_b=use_b).backward()
            if step == 5:
                mdl.a.weight.grad = None  # a skips one step
            o.step()
    for (name, p), q in zip(model.named_parameters(), peer_model.parameters()):
        assert torch.equal(p, q), name
        assert opt.state[p]["step"] == int(peer.state[q]["step"]) == {"a.weight": 7, "b.weight": 5}[name]
        assert torch.equal(opt.state[p]["exp_avg"], peer.state[q]["exp_avg"]), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], peer.state[q]["exp_avg_sq"]), name
    assert opt.step_count == 8


# ---------------------------------------------------------------------------------------------
# AutoSwitch on a replayed v trajectory
# ---------------------------------------------------------------------------------------------


def replay_expected(grads, beta2, threshold, t_min, t_max, rule):
    """Independent replay of docs/design.md section 6 in double precision: (Z history, switch step)."""
    v = [0.0] * len(grads[0])
    history, window = [], max(1, round(1 / (1 - beta2)))
    for t, g in enumerate(grads, start=1):
        new = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        a = sum(abs(x - y) for x, y in zip(new, v))
        s = sum(new)
        v = new
        history.append((a / ((1 - beta2) * s) if s else math.inf) if rule == "relative" else a / len(v))
        full = len(history) >= window
        if (t_max is not None and t >= t_max) or (full and t >= t_min and sum(history[-window:]) / window <= threshold):
            return history, t
    return history, None


@pytest.mark.parametrize("case", ["window_fill", "t_min", "t_max", "total_steps", "relative", "relative_default",
                                  "threshold"])
def test_autoswitch_replayed_trajectory(case):
    beta2 = 0.9  # window of 10
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(16, generator=gen) + 0.5
    grads = [(base * 0.7**t).tolist() for t in range(120)]  # shrinking grads: Z falls geometrically
    threshold, min_step, max_step, total, rule = 1e6, None, None, None, "absolute"
    if case == "t_min":
        min_step = 23
    elif case == "t_max":
        threshold, max_step = 0.0, 17
    elif case == "total_steps":
        threshold, total = 0.0, 50  # T_min 5, T_max 25
    elif case == "relative":
        rule, threshold = "relative", 5.0
    elif case == "relative_default":  # v filling up from 0 keeps Z above 2 for the first steps
        rule, threshold = "relative", sk.AutoSwitch.DEFAULT_THRESHOLDS["relative"]
    elif case == "threshold":
        threshold = 1e-4
    t_min, t_max = ref.autoswitch_bounds(min_step, max_step, total)
    history, expected_switch = replay_expected(grads, beta2, threshold, t_min, t_max, rule)
    assert expected_switch is not None
    lin = nn.Linear(4, 4, bias=False)
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4"}], betas=(0.9, beta2), total_steps=total,
                  switch=sk.AutoSwitch(min_step=min_step, max_step=max_step, threshold=threshold,
                                       rule=rule), backend="reference")
    for g in grads:
        lin.weight.grad = torch.tensor(g).view(4, 4)
        opt.step()
        if opt.phase == "sparse":
            break
    assert opt.switch_step == expected_switch
    got = opt.stats()["z_history"]
    assert len(got) == len(history)
    for a, b in zip(got, history):
        assert a == pytest.approx(b, rel=1e-5)
    if case == "window_fill":
        assert expected_switch == 10


# ---------------------------------------------------------------------------------------------
# resume bit-identically
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stop_at", [3, 9])  # mid phase 1, mid phase 2 (switch at 5)
def test_resume_is_bit_identical(dtype, stop_at, device):
    total = 12

    def make():
        model = tiny_gpt(dtype, device)
        opt = sk.STEP(sk.sparse_param_groups(model), lr=3e-3, weight_decay=0.01, switch=5, backend="reference")
        return model, opt

    model_a, opt_a = make()
    for step in range(total):
        train_step(model_a, opt_a, step, device)

    model_b, opt_b = make()
    for step in range(stop_at):
        train_step(model_b, opt_b, step, device)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model_c, opt_c = make()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    for step in range(stop_at, total):
        train_step(model_c, opt_c, step, device)

    assert opt_c.phase == opt_a.phase == "sparse" and opt_c.switch_step == 5
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
        sa, sc = opt_a.state[pa], opt_c.state[pc]
        assert sa.keys() == sc.keys()
        for key in sa:
            assert same(sa[key], sc[key]), key


def test_load_keeps_fp32_state_for_bf16_model():
    model = tiny_gpt(torch.bfloat16)
    opt = sk.STEP(sk.sparse_param_groups(model), backend="reference", switch=1)
    train_step(model, opt, 0, "cpu")
    sd = copy.deepcopy(opt.state_dict())
    model2 = tiny_gpt(torch.bfloat16, seed=1)
    opt2 = sk.STEP(sk.sparse_param_groups(model2), backend="reference", switch=1)
    opt2.load_state_dict(sd)
    for p in model2.parameters():
        assert opt2.state[p]["master"].dtype == torch.float32
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
    # the model was rewritten from the masters (masked targets)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# GradScaler, schedulers, closures, param groups, from_adamw
# ---------------------------------------------------------------------------------------------


def test_gradscaler_scaled_step_equals_unscaled_and_nan_step_counts_nowhere():
    model_a, model_b = tiny_gpt(), tiny_gpt()
    opt_a = sk.STEP(sk.sparse_param_groups(model_a), switch=3, backend="reference")
    opt_b = sk.STEP(sk.sparse_param_groups(model_b), switch=3, backend="reference")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step in range(6):
        train_step(model_a, opt_a, step, "cpu")
        opt_b.zero_grad()
        x, y = batch(step, "cpu")
        scaler.scale(model_b.loss(x, y)).backward()
        scaler.step(opt_b)
        scaler.update()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        for key in opt_a.state[pa]:
            assert same(opt_a.state[pa][key], opt_b.state[pb][key])
    before_params = [p.detach().clone() for p in model_b.parameters()]
    before_state = copy.deepcopy(opt_b.state_dict())
    opt_b.zero_grad()
    x, y = batch(99, "cpu")
    scaler.scale(model_b.loss(x, y)).backward()
    next(model_b.parameters()).grad.view(-1)[0] = float("nan")
    scaler.step(opt_b)
    scaler.update()
    assert opt_b.step_count == 6 and opt_b.stats()["kernel_launches"] == 0
    for p, before in zip(model_b.parameters(), before_params):
        assert torch.equal(p.detach(), before)
    for pid, state in before_state["state"].items():
        p = [q for g in opt_b.param_groups for q in g["params"]][pid]
        for key, value in state.items():
            assert same(opt_b.state[p][key], value)


def test_lr_scheduler_and_closure_match_adamw():
    model = tiny_gpt()
    peer_model = copy.deepcopy(model)
    opt = sk.STEP(model.parameters(), lr=1e-2, recipe="dense", backend="reference")
    peer = torch.optim.AdamW(peer_model.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    peer_sched = torch.optim.lr_scheduler.LambdaLR(peer, lambda s: 1.0 / (1 + s))
    for step in range(5):
        x, y = batch(step, "cpu")

        def closure():
            opt.zero_grad()
            loss = model.loss(x, y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        peer.zero_grad()
        peer_loss = peer_model.loss(x, y)
        peer_loss.backward()
        peer.step()
        assert loss.item() == peer_loss.item()
        sched.step()
        peer_sched.step()
    for p, q in zip(model.parameters(), peer_model.parameters()):
        assert torch.equal(p, q)


def test_add_param_group_creates_state_and_bad_group_is_not_added():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    opt = sk.STEP([{"params": [a.weight], "sparsity": "2:4"}], recipe="srste", backend="reference")
    opt.add_param_group({"params": [b.weight], "sparsity": "1:4"})
    assert set(opt.state[b.weight]) == {"step", "exp_avg", "exp_avg_sq", "master"}
    assert ((b.weight != 0).view(-1, 4).sum(-1) == 1).all()
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['params'\]\[0\]: input size 6 .* by M=4"):
        opt.add_param_group({"params": [nn.Linear(6, 4).weight], "sparsity": "2:4"})
    assert len(opt.param_groups) == 2


def five_adamw_steps(model: nn.Module) -> torch.optim.AdamW:
    """The dense run that STEP.from_adamw continues in these tests: 5 AdamW steps on ``model``."""
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, foreach=False)
    for step in range(5):
        adamw.zero_grad()
        x, y = batch(step, "cpu")
        model.loss(x, y).backward()
        adamw.step()
    return adamw


def test_from_adamw_continues_the_dense_run():
    model = tiny_gpt()
    adamw = five_adamw_steps(model)
    peer_model = tiny_gpt(seed=9)
    peer_model.load_state_dict(model.state_dict())
    peer = torch.optim.AdamW(peer_model.parameters(), lr=2e-3, weight_decay=0.0, foreach=False)
    peer.load_state_dict(adamw.state_dict())
    opt = sk.STEP.from_adamw(model, adamw.state_dict(), switch=7, backend="reference")
    assert opt.step_count == 5
    for step in range(5, 7):  # steps t = 6 and 7 are dense: identical to AdamW carrying on
        train_step(model, opt, step, "cpu")
        train_step(peer_model, peer, step, "cpu")
        for p, q in zip(model.parameters(), peer_model.parameters()):
            master = opt.state[p].get("master", p)
            assert torch.equal(master, q)
            assert torch.equal(opt.state[p]["exp_avg"], peer.state[q]["exp_avg"])
    assert opt.phase == "sparse" and opt.switch_step == 7
    with pytest.raises(ValueError, match="covers"):
        sk.STEP.from_adamw(nn.Linear(4, 4), adamw.state_dict())


def test_from_adamw_switch_at_the_adamw_step_count_switches_when_built():
    model = tiny_gpt()
    adamw = five_adamw_steps(model)
    state = adamw.state_dict()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"switch=4 lies before the AdamW run's step count 5"):
        sk.STEP.from_adamw(model, state, switch=4, backend="reference")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt = sk.STEP.from_adamw(model, state, switch=5, backend="reference")
    assert opt.phase == "sparse" and opt.switch_step == 5 and opt.step_count == 5
    pids = dict(zip(model.parameters(), state["param_groups"][0]["params"]))
    targets = list(opt._targets())
    assert targets
    for _, p, group in targets:
        v = state["state"][pids[p]]["exp_avg_sq"]
        # v frozen as AdamW left it: the reference's preconditioner of AdamW's v at step 5
        unfed = ref.unfed_preconditioner(int(torch.count_nonzero(v)), v.sum(dtype=torch.float64).item(),
                                         beta2=group["betas"][1], step=5, precond_eps=opt.precond_eps)
        expected = ref.preconditioner(v, beta2=group["betas"][1], step=5, precond_eps=opt.precond_eps, unfed=unfed)
        assert torch.equal(opt.state[p]["precond"], expected)
        n, m = ref.parse_sparsity(group["sparsity"])
        master = opt.state[p]["master"]
        assert torch.equal(p.detach(), master * ref.nm_mask(master, n, m, group["nm_dim"]))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(recipe="sgd"), "recipe"),
    (dict(backend="gpu"), "backend"),
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(srste_decay=-1.0), "srste_decay"),
    (dict(precond_eps=0.0), "precond_eps"),
    (dict(precond_dtype=torch.float16), "precond_dtype"),
    (dict(switch=0), "switch"),
    (dict(switch=True), "switch"),
    (dict(switch="auto"), "switch"),
    (dict(total_steps=0), "total_steps"),
])
def test_constructor_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.STEP(nn.Linear(4, 4).parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_step=-1), "min_step"), (dict(max_step=1.5), "max_step"),
    (dict(min_step=5, max_step=3), "max_step"), (dict(threshold=-1.0), "threshold"),
    (dict(threshold=True), "threshold"), (dict(rule="median"), "rule"), (dict(rule=None), "rule"),
])
def test_autoswitch_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.AutoSwitch(**kwargs)


def test_groups_reject_bad_sparsity_shapes_and_dtypes():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: sparsity"):
        sk.STEP([{"params": [lin.weight], "sparsity": "2:5"}])
    with pytest.raises(ValueError, match="must be 2-D"):
        sk.STEP([{"params": [lin.bias], "sparsity": "2:4"}])
    with pytest.raises(ValueError, match="nm_dim"):
        sk.STEP([{"params": [lin.weight], "sparsity": "2:4", "nm_dim": 2}])
    with pytest.raises(ValueError, match=r"fc\.weight: input size 6"):
        sk.sparse_param_groups(nn.ModuleDict({"fc": nn.Linear(6, 4)}), exclude=[])
    with pytest.raises(ValueError, match="dtype torch.float64"):
        sk.STEP(nn.Linear(4, 4).double().parameters())


def test_bad_grad_fails_before_anything_changes():
    model = tiny_gpt()
    opt = sk.STEP(sk.sparse_param_groups(model), backend="reference")
    train_step(model, opt, 0, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    x, y = batch(1, "cpu")
    opt.zero_grad()
    model.loss(x, y).backward()
    params = list(model.parameters())
    good_grad = params[-1].grad.clone()
    params[-1].grad.data = torch.zeros(3)  # .data bypasses autograd's own checks
    with pytest.raises(ValueError, match=r"ln_f\.bias: grad shape \(3,\) != param shape \(32,\)"):
        opt.step()
    params[-1].grad.data = good_grad.double()
    with pytest.raises(ValueError, match="grad dtype torch.float64"):
        opt.step()
    assert opt.step_count == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    opt_params = [q for g in opt.param_groups for q in g["params"]]
    for pid, st in state_before["state"].items():
        for key, value in st.items():
            assert same(opt.state[opt_params[pid]][key], value)


def test_state_dict_from_another_config_is_rejected_and_changes_nothing():
    model = tiny_gpt()
    opt = sk.STEP(sk.sparse_param_groups(model, sparsity="2:4"), backend="reference", switch=1)
    train_step(model, opt, 0, "cpu")
    snapshot = copy.deepcopy(opt.state_dict())
    for other in (sk.STEP(sk.sparse_param_groups(tiny_gpt(), sparsity="1:4"), backend="reference"),
                  sk.STEP(sk.sparse_param_groups(tiny_gpt(), sparsity="2:4"), recipe="srste",
                          backend="reference")):
        with pytest.raises(ValueError, match="sparsity|recipe"):
            opt.load_state_dict(copy.deepcopy(other.state_dict()))
    fewer = copy.deepcopy(snapshot)
    fewer["param_groups"] = fewer["param_groups"][:1]
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(fewer)
    now = opt.state_dict()
    assert now["param_groups"][0]["phase"] == "sparse"
    for pid, st in snapshot["state"].items():
        for key, value in st.items():
            assert same(now["state"][pid][key], value)


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sk.BackendUnavailableError, match="triton"):
        sk.STEP(nn.Linear(4, 4).parameters(), backend="triton")
    auto = sk.STEP(nn.Linear(4, 4).parameters())
    assert auto.backend in ("cpu", "reference")


def test_stats_keys_and_launch_counts():
    model = tiny_gpt()
    opt = sk.STEP(sk.sparse_param_groups(model), switch=1, backend="reference")
    train_step(model, opt, 0, "cpu")
    train_step(model, opt, 1, "cpu")
    stats = opt.stats()
    assert {"flip_rate", "z_history", "sparsity", "precond_floor_count", "kernel_launches"} <= stats.keys()
    n_targets = sum(len(g["params"]) for g in opt.param_groups if g["sparsity"])
    target_numel = sum(p.numel() for g in opt.param_groups if g["sparsity"] for p in g["params"])
    assert stats["sparsity"] == pytest.approx(0.5, abs=10.0 / target_numel)
    assert stats["kernel_launches"] == len(list(model.parameters()))  # reference: one per tensor
    assert n_targets == 4


# ---------------------------------------------------------------------------------------------
# torch.optim conventions, as torch's generic optimizer tests check them (issue 12 item 8)
# ---------------------------------------------------------------------------------------------


def four_steps(*, lr, before_step=None, pre_hook=None):
    """Four steps of TwoBranch on the reference backend (the switch at step 2); ``before_step(opt,
    step)`` runs before each, ``pre_hook`` is registered as a step pre-hook. Returns copies of the
    parameters after them."""
    model = TwoBranch()
    opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), lr=lr, switch=2, backend="reference")
    if pre_hook is not None:
        opt.register_step_pre_hook(pre_hook)
    for step in range(4):
        if before_step is not None:
            before_step(opt, step)
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_tensor_lr_is_one_element_as_in_torch():
    """A multi-element tensor lr is the ValueError torch's own AdamW raises; a one-element one
    steps exactly as the same float."""
    params = [nn.Parameter(torch.randn(4, 8))]
    with pytest.raises(ValueError, match="Tensor lr must be 1-element") as peer_error:
        torch.optim.AdamW(params, lr=torch.tensor([1e-3, 1e-3]), foreach=False)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element") as ours:
        sk.STEP(params, lr=torch.tensor([1e-3, 1e-3]))
    assert type(ours.value) is type(peer_error.value)
    runs = [four_steps(lr=lr) for lr in (3e-3, torch.tensor(3e-3, dtype=torch.float64))]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_step_hooks_run_around_every_step():
    model = TwoBranch()
    opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), switch=1, backend="reference")
    calls = []

    def pre(o, args, kwargs):  # args are step's own: (the optimizer,)
        calls.append(("pre", o.step_count, args == (opt,), kwargs))

    def post(o, args, kwargs):
        calls.append(("post", o.step_count, args == (opt,), kwargs))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    opt.zero_grad()
    model.loss(0).backward()
    opt.step()
    opt.zero_grad()
    opt.step()  # no grads: hooks still run (as torch's), nothing counts
    assert calls == [("pre", 0, True, {}), ("post", 1, True, {}), ("pre", 1, True, {}), ("post", 1, True, {})]
    for handle in handles:
        handle.remove()
    model.loss(1).backward()
    opt.step()
    assert len(calls) == 4 and opt.step_count == 2


def test_a_pre_hook_that_sets_lr_acts_on_that_step():
    def by_hand(opt, step):
        for g in opt.param_groups:
            g["lr"] = 1e-2 / (1 + step)

    def decay_lr(o, args, kwargs):
        for g in o.param_groups:
            g["lr"] = 1e-2 / (1 + o.step_count)

    runs = [four_steps(lr=1e-2, before_step=by_hand), four_steps(lr=1e-2, pre_hook=decay_lr)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_state_dict_and_load_state_dict_hooks_run():
    model = TwoBranch()
    opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), switch=1, backend="reference")
    opt.zero_grad()
    model.loss(0).backward()
    opt.step()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))

    def sd_post(o, sd):
        seen.append("sd_post")
        sd["param_groups"][0]["note"] = "from a hook"
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert seen == ["sd_pre", "sd_post"] and sd["param_groups"][0]["note"] == "from a hook"

    other_model = TwoBranch()
    other = sk.STEP(sk.sparse_param_groups(other_model, exclude=[]), switch=1, backend="reference")

    def load_pre(o, state_dict):
        seen.append("load_pre")
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.5
        return state_dict

    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(lambda o: seen.append(("load_post", o.phase, o.step_count)))
    other.load_state_dict(sd)
    assert seen[2:] == ["load_pre", ("load_post", "sparse", 1)]
    assert other.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 1e-3


def test_repr_lists_every_group_and_its_hyper_parameters():
    model = TwoBranch()
    opt = sk.STEP([{"params": [model.a.weight], "sparsity": "2:4", "lr": 5e-3}, {"params": [model.b.weight]}],
                  switch=1, backend="reference")
    for step in range(2):
        text = repr(opt)
        assert text.startswith("STEP (") and text.endswith(")")
        assert "Parameter Group 0" in text and "Parameter Group 1" in text and "Parameter Group 2" not in text
        assert "    lr: 0.005\n" in text and "    lr: 0.001\n" in text and "    sparsity: 2:4\n" in text
        assert f"    phase: {opt.phase}\n" in text and str(opt) == text
        opt.zero_grad()
        model.loss(step).backward()
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_state_dict_is_deterministic_and_round_trips(backend):
    """Two identical runs give identical state dicts (keys, order, values, bit for bit); a state
    dict loaded into a fresh optimizer comes back out unchanged, and both continue identically."""
    from helpers import assert_same, snapshot, snapshot_state_dict

    def run():
        model = TwoBranch()
        opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), switch=2, backend=backend)
        for step in range(3):
            opt.zero_grad()
            model.loss(step).backward()
            opt.step()
        return model, opt

    (model_a, opt_a), (_, opt_b) = run(), run()
    saved = snapshot_state_dict(opt_a.state_dict())
    assert_same(saved, snapshot_state_dict(opt_b.state_dict()))
    assert_same(saved, snapshot_state_dict(opt_a.state_dict()))
    model_c = TwoBranch()
    model_c.load_state_dict(model_a.state_dict())
    opt_c = sk.STEP(sk.sparse_param_groups(model_c, exclude=[]), switch=2, backend=backend)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert_same(saved, snapshot_state_dict(opt_c.state_dict()))
    for model, opt in ((model_a, opt_a), (model_c, opt_c)):
        opt.zero_grad()
        model.loss(3).backward()
        opt.step()
    assert_same(snapshot(model_a, opt_a), snapshot(model_c, opt_c))


def test_param_groups_hyper_parameters_and_added_groups_match_adamw():
    """Per-group lr and weight decay, changed mid-run, and a group added mid-run: recipe "dense"
    against torch.optim.AdamW doing the same, bit for bit on the reference backend."""
    model, peer_model = TwoBranch(), TwoBranch()
    extra = nn.Parameter(torch.randn(4, 8))
    peer_extra = nn.Parameter(extra.detach().clone())
    opt = sk.STEP([{"params": [model.a.weight], "lr": 2e-2, "weight_decay": 0.1}, {"params": [model.b.weight]}],
                  recipe="dense", lr=1e-2, backend="reference")
    peer = torch.optim.AdamW([{"params": [peer_model.a.weight], "lr": 2e-2, "weight_decay": 0.1},
                              {"params": [peer_model.b.weight]}], lr=1e-2, weight_decay=0.0, foreach=False)
    for step in range(6):
        if step == 2:
            for o in (opt, peer):
                o.param_groups[1]["lr"] = 5e-3
                o.param_groups[0]["betas"] = (0.8, 0.99)
        if step == 3:
            opt.add_param_group({"params": [extra], "weight_decay": 0.05})
            peer.add_param_group({"params": [peer_extra], "weight_decay": 0.05})
        for mdl, o, e in ((model, opt, extra), (peer_model, peer, peer_extra)):
            o.zero_grad()
            mdl.loss(step).backward()
            e.grad = torch.full_like(e, 0.1 * (step + 1))
            o.step()
    for p, q in ((model.a.weight, peer_model.a.weight), (model.b.weight, peer_model.b.weight), (extra, peer_extra)):
        assert torch.equal(p, q)
        assert opt.state[p]["step"] == int(peer.state[q]["step"])
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in peer.param_groups]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("recipe", ["step", "srste"])
def test_grads_are_never_written_into(recipe, backend):
    skip_unavailable(backend)
    model = TwoBranch()
    opt = sk.STEP(sk.sparse_param_groups(model, exclude=[]), recipe=recipe, switch=1, backend=backend)
    for step in range(3):  # phase 1, the switch, phase 2
        opt.zero_grad()
        model.loss(step).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)

