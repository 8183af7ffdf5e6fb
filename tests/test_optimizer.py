"""The STEP optimizer against torch.optim.AdamW, hand-computed steps and DESIGN.md's rules."""

import copy
import io
import math

import pytest
import torch
from torch import nn

import step_kernels as sk
from step_kernels import reference as ref
from step_kernels.models import TinyGPT

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tiny_gpt(dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return TinyGPT(vocab=64, ctx=16, d_model=32, n_layer=1, n_head=2).to(device=device, dtype=dtype)


def batch(step, device, vocab=64, ctx=16, size=4):
    gen = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, vocab, (size, ctx + 1), generator=gen).to(device)
    return idx[:, :-1], idx[:, 1:]


def train_step(model, opt, step, device):
    opt.zero_grad(set_to_none=True)
    x, y = batch(step, device)
    model.loss(x, y).backward()
    opt.step()


class Conv1D(nn.Module):
    """transformers' Conv1D layout: weight [in, out], y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


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
def test_zero_v_coordinate_decays_under_srste(precond_eps, decays):
    """A weight that saw no gradient in phase 1 has v = 0, so p = 1 / precond_eps. Pruned, its SR-STE
    term must shrink it; with a 1e-8 floor the same term overshoots and it grows (DESIGN.md)."""
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.05, 0.8]]))
    opt = sk.STEP([{"params": [lin.weight], "sparsity": "2:4"}], switch=3, lr=1e-3, precond_eps=precond_eps,
                  backend="reference")
    for _ in range(3):
        lin.weight.grad = torch.tensor([[0.1, 0.1, 0.0, 0.1]])
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
# AutoSwitch on a replayed v trajectory
# ---------------------------------------------------------------------------------------------


def replay_expected(grads, beta2, threshold, t_min, t_max, rule):
    """Independent replay of DESIGN.md's rule in double precision: (Z history, switch step)."""
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
            assert sa[key].dtype == sc[key].dtype
            assert torch.equal(sa[key], sc[key]), key


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
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])
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
            assert torch.equal(opt_b.state[p][key], value)


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
    assert set(opt.state[b.weight]) == {"exp_avg", "exp_avg_sq", "master"}
    assert ((b.weight != 0).view(-1, 4).sum(-1) == 1).all()
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['params'\]\[0\]: input size 6 .* by M=4"):
        opt.add_param_group({"params": [nn.Linear(6, 4).weight], "sparsity": "2:4"})
    assert len(opt.param_groups) == 2


def test_from_adamw_continues_the_dense_run():
    model = tiny_gpt()
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, foreach=False)
    for step in range(5):
        adamw.zero_grad()
        x, y = batch(step, "cpu")
        model.loss(x, y).backward()
        adamw.step()
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
            assert torch.equal(opt.state[opt_params[pid]][key], value)


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
            assert torch.equal(now["state"][pid][key], value)


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
