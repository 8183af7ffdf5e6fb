"""The reference spec against independent peers: torch.optim.AdamW, hand-computed cases and a
plain-Python top-N selection."""

import math

import pytest
import torch

from helpers import NM_REFERENCE as NM_LIST
from step_kernels import reference as ref


def python_topn(values, n):
    """Independent peer: sort by (-|x| with NaN as +inf, index) and keep the first n."""
    keys = [math.inf if math.isnan(v) else abs(v) for v in values]
    order = sorted(range(len(values)), key=lambda i: (-keys[i], i))
    kept = set(order[:n])
    return [i in kept for i in range(len(values))]


@pytest.mark.parametrize("n,m", NM_LIST)
def test_nm_mask_matches_python_peer_with_ties_and_nan(n, m, device):
    gen = torch.Generator().manual_seed(n * 100 + m)
    # Few distinct magnitudes force many ties; sprinkle NaN, inf, -0.0 and +0.0.
    w = torch.randint(-3, 4, (6, 4 * m), generator=gen).float()
    w[0, 0] = float("nan")
    w[1, 1] = float("inf")
    w[2, 2] = -0.0
    w[3, :m] = float("nan")
    w = w.to(device)
    keep = ref.nm_mask(w, n, m, dim=1).cpu()
    for r in range(w.shape[0]):
        for g in range(4):
            group = w[r, g * m:(g + 1) * m].cpu().tolist()
            assert keep[r, g * m:(g + 1) * m].tolist() == python_topn(group, n)
    assert (keep.view(6, 4, m).sum(-1) == n).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nm_mask_dim0_is_transpose_of_dim1(dtype, device):
    w = torch.randn(24, 40, dtype=dtype, device=device)
    assert torch.equal(ref.nm_mask(w, 2, 8, dim=0), ref.nm_mask(w.t().contiguous(), 2, 8, dim=1).t())


def test_nm_mask_zero_signs_tie_and_lower_index_wins():
    w = torch.tensor([[-0.0, 0.0, 0.0, -0.0], [1.0, -1.0, 1.0, -1.0]])
    assert ref.nm_mask(w, 2, 4).tolist() == [[True, True, False, False], [True, True, False, False]]
    pruned, _ = ref.nm_prune(torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), 2, 4)
    assert pruned.tolist() == [[0.0, 0.0, -3.0, -4.0]]
    assert not torch.signbit(pruned[0, :2]).any()  # pruned entries are +0.0


def test_nm_mask_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"lin\.weight: size 6 of dim 1 .* not divisible by M=4"):
        ref.nm_mask(torch.zeros(2, 6), 2, 4, dim=1, name="lin.weight")


@pytest.mark.parametrize("good,expected", [("2:4", (2, 4)), (" 1 : 32 ", (1, 32)), ("4:8", (4, 8))])
def test_parse_sparsity_accepts(good, expected):
    assert ref.parse_sparsity(good) == expected


@pytest.mark.parametrize("bad", ["2:3", "4:4", "0:4", "2:64", "2-4", "a:b", 24, None, "1:1"])
def test_parse_sparsity_rejects(bad):
    with pytest.raises(ValueError, match="fc.sparsity"):
        ref.parse_sparsity(bad, "fc.sparsity")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_step_matches_torch_adamw(weight_decay, device):
    torch.manual_seed(0)
    p_ref = torch.randn(37, 13, device=device)
    w = p_ref.clone()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    peer = torch.optim.AdamW([p_ref.requires_grad_()], lr=3e-3, betas=(0.8, 0.99), eps=1e-7,
                             weight_decay=weight_decay, foreach=False)
    for t in range(1, 31):
        g = torch.randn_like(w)
        p_ref.grad = g.clone()
        peer.step()
        s = ref.step_scalars(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay, step=t)
        ref.adamw_step(w, g, m, v, s)
        state = peer.state[p_ref]
        torch.testing.assert_close(w, p_ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(m, state["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(v, state["exp_avg_sq"], rtol=0, atol=0)


def test_adamw_step_statistics():
    w, g = torch.ones(2, 4), torch.full((2, 4), 2.0)
    m, v = torch.zeros(2, 4), torch.full((2, 4), 1.0)
    s = ref.step_scalars(lr=0.1, beta1=0.9, beta2=0.5, eps=1e-8, weight_decay=0.0, step=1)
    abs_dv, v_sum = ref.adamw_step(w, g, m, v, s)
    # v = 0.5 * 1 + 0.5 * 4 = 2.5 per coordinate: |dv| = 1.5
    assert abs_dv.item() == pytest.approx(8 * 1.5)
    assert v_sum.item() == pytest.approx(8 * 2.5)


def hand_masked_step(w, g, m, second, *, lr, b1, b2, eps, wd, decay, t, frozen, n=2):
    """Plain-Python (double precision) masked step on one group, for checking the reference."""
    keep_old = python_topn(w, n)
    g = [gi + (0.0 if k else decay * wi) for gi, wi, k in zip(g, w, keep_old)]
    w = [wi * (1 - lr * wd) for wi in w]
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    bc1 = 1 - b1**t
    if frozen:
        w = [wi - lr / bc1 * mi * pi for wi, mi, pi in zip(w, m, second)]
    else:
        second = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(second, g)]
        bc2 = 1 - b2**t
        w = [wi - lr / bc1 * mi / (math.sqrt(vi / bc2) + eps) for wi, mi, vi in zip(w, m, second)]
    return w, m, second, python_topn(w, n), keep_old


@pytest.mark.parametrize("frozen", [True, False])
def test_masked_step_matches_hand_computation(frozen):
    w0 = [0.5, -0.05, 0.3, 0.2]
    g0 = [0.1, -6.0, 0.4, -0.3]
    m0 = [0.01, 0.02, -0.03, 0.04]
    second0 = [2.0, 50.0, 3.0, 4.0] if frozen else [0.01, 0.02, 0.03, 0.04]
    hyper = dict(lr=0.01, b1=0.9, b2=0.99, eps=1e-8, wd=0.1, decay=0.5, t=7)
    w_exp, m_exp, s_exp, keep_exp, keep_old = hand_masked_step(w0, g0, m0, second0, frozen=frozen, **hyper)
    w, g, m, second = (torch.tensor([x]) for x in (w0, g0, m0, second0))
    s = ref.step_scalars(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=7, srste_decay=0.5)
    keep, flips = ref.masked_step(w, g, m, second, s, n=2, m=4, dim=1, frozen_v=frozen)
    torch.testing.assert_close(w[0], torch.tensor(w_exp), rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(m[0], torch.tensor(m_exp), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(second[0], torch.tensor(s_exp), rtol=2e-6, atol=1e-9)
    assert keep[0].tolist() == keep_exp
    assert flips.item() == sum(a != b for a, b in zip(keep_exp, keep_old))
    if frozen:
        assert flips.item() == 2  # the -6.0 grad on the pruned -0.05 pushes it past the kept 0.3


def test_preconditioner_matches_formula():
    v = torch.tensor([0.0, 1e-12, 4e-6, 1.0])
    p = ref.preconditioner(v, beta2=0.999, step=10, precond_eps=1e-6)
    bc2 = 1 - 0.999**10
    expected = [1.0 / (math.sqrt(x / bc2) + 1e-6) for x in v.tolist()]
    torch.testing.assert_close(p, torch.tensor(expected), rtol=1e-6, atol=0)
    assert ref.preconditioner(v, beta2=0.999, step=10, precond_eps=1e-6, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_autoswitch_window_and_bounds():
    assert ref.autoswitch_window(0.999) == 1000
    assert ref.autoswitch_window(0.99) == 100
    assert ref.autoswitch_window(0.0) == 1
    assert ref.autoswitch_bounds(None, None, 1000) == (100, 500)
    assert ref.autoswitch_bounds(7, None, 1000) == (7, 500)
    assert ref.autoswitch_bounds(None, None, None) == (0, None)
    assert ref.autoswitch_z(2.0, 4.0, 8, rule="absolute") == 0.25
    assert ref.autoswitch_z(2.0, 4.0, 8, rule="relative", beta2=0.75) == pytest.approx(2.0)
    assert ref.autoswitch_z(2.0, 0.0, 8, rule="relative") == math.inf
    with pytest.raises(ValueError, match="rule"):
        ref.autoswitch_z(2.0, 4.0, 8, rule="median")


def test_autoswitch_decide_rules():
    kw = dict(beta2=0.9, threshold=1.0)  # window 10
    assert not ref.autoswitch_decide([0.0] * 9, 9, t_min=0, t_max=None, **kw)  # window not full
    assert ref.autoswitch_decide([0.0] * 10, 10, t_min=0, t_max=None, **kw)
    assert not ref.autoswitch_decide([0.0] * 10, 10, t_min=11, t_max=None, **kw)  # before T_min
    assert not ref.autoswitch_decide([5.0] * 10 + [0.0], 11, t_min=0, t_max=None, **kw)  # mean 5.0 > 1
    assert ref.autoswitch_decide([5.0] * 3, 3, t_min=0, t_max=3, **kw)  # T_max forces it
    assert ref.autoswitch_decide([1.0] * 10, 10, t_min=0, t_max=None, **kw)  # <= threshold
    for bad in (math.nan, math.inf):  # a non-finite sample blocks the rule while it is in the window
        assert not ref.autoswitch_decide([0.0] * 9 + [bad], 10, t_min=0, t_max=None, **kw)
        assert ref.autoswitch_decide([bad] + [0.0] * 10, 11, t_min=0, t_max=None, **kw)
        assert ref.autoswitch_decide([bad] * 10, 10, t_min=0, t_max=10, **kw)  # T_max still forces it


def test_fused_step_found_inf_is_a_noop():
    w = torch.randn(4, 8)
    before = w.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    s = ref.step_scalars(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)
    totals, _ = ref.fused_step([w], [torch.ones_like(w)], [m], [v], [None], masked=False, frozen_v=False,
                               scalars=s, found_inf=torch.tensor([1.0]), compute_stats=True)
    assert torch.equal(w, before) and not m.any() and not v.any()
    assert totals.tolist() == [0.0, 0.0, 0.0]
