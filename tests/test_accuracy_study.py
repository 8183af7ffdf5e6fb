"""The accuracy study's machinery: configs, lr tuning, the ASP and raw-v variants."""

import pytest
import torch

from bench.accuracy import study
from bench.accuracy.run import RunConfig, _RawVSTEP, train
from bench.accuracy.tasks import TASKS
from step_kernels import sparse_param_groups
from step_kernels.models import TinyGPT


def test_run_config_rejects_inconsistent_runs():
    with pytest.raises(ValueError, match="task"):
        RunConfig("imagenet", "step", "2:4", 1e-3, 0)
    with pytest.raises(ValueError, match="sparsity must be None"):
        RunConfig("lm", "dense", "2:4", 1e-3, 0)
    with pytest.raises(ValueError, match="ablation"):
        RunConfig("lm", "srste", "2:4", 1e-3, 0, "raw_v")
    assert RunConfig("lm", "step", "1:16", 4e-3, 2, "ste").run_id == "lm-step-1of16-lr0.004-s2-ste"


def _fake(config, value):
    return {config.run_id: {"run_id": config.run_id, "metric": "val_loss", "final": {"val_loss": value}}}


def test_tuned_lr_waits_for_the_whole_grid_then_picks_the_best():
    results = {}
    for i, lr in enumerate(study.LR_GRID[:-1]):
        results.update(_fake(RunConfig("lm", "srste", "2:4", lr, 0), 3.0 - 0.1 * (i == 1)))
    assert study.tuned_lr("lm", "srste", results) is None
    assert not any(c.recipe == "srste" and c.seed == 1 for c in study.plan(results, ("lm",)))
    results.update(_fake(RunConfig("lm", "srste", "2:4", study.LR_GRID[-1], 0), 3.5))
    assert study.tuned_lr("lm", "srste", results) == study.LR_GRID[1]
    seeds = [c for c in study.plan(results, ("lm",)) if c.recipe == "srste" and c.lr == study.LR_GRID[1]]
    assert {(c.sparsity, c.seed) for c in seeds} >= {("1:16", 2), ("1:8", 1), ("2:4", 0)}


def test_raw_v_preconditioner_skips_bias_correction():
    torch.manual_seed(0)
    model = TinyGPT(vocab=32, ctx=8, d_model=16, n_layer=1, n_head=2)
    opt = _RawVSTEP(sparse_param_groups(model, "2:4"), lr=1e-2, betas=(0.9, 0.99), switch=3)
    x = torch.randint(0, 32, (2, 9))
    for step in range(3):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        if step == 2:
            # v at the end of step 3, from v after step 2 and step 3's grads
            v_end = {id(p): 0.99 * opt.state[p]["exp_avg_sq"] + 0.01 * p.grad.float() ** 2
                     for _, p, _ in opt._targets()}
        opt.step()
    assert opt.phase == "sparse"
    for _, p, _ in opt._targets():
        torch.testing.assert_close(opt.state[p]["precond"], 1.0 / (v_end[id(p)].sqrt() + opt.precond_eps))
    floor = sum(int((v.sqrt() < opt.precond_eps).sum()) for v in v_end.values())
    assert opt.stats()["precond_floor_count"] == floor


def test_step_run_records_autoswitch_statistic_and_switch():
    # 20 steps: T_max = 10 comes before the 100-step window fills, so AutoSwitch switches at T_max.
    auto = train(RunConfig("lm", "step", "2:4", 1e-3, 0), steps=20)
    assert auto["switch_step"] == 10 and auto["pattern_ok"] is True
    assert len(auto["z_history"]) == 10 and all(z > 0 for z in auto["z_history"])
    assert auto["autoswitch_threshold"] == 1e-8 and auto["precond_floor_count"] is not None
    fixed = train(RunConfig("lm", "step", "2:4", 1e-3, 0, "switch_tmax"), steps=20)
    assert fixed["switch_step"] == 10 and fixed["z_history"] == [] and fixed["autoswitch_threshold"] is None


def test_asp_run_ends_n_m_sparse_without_switch_or_flips():
    pytest.importorskip("sklearn")
    result = train(RunConfig("digits", "asp", "2:4", 2e-3, 0), steps=20)
    assert result["pattern_ok"] is True
    assert result["switch_step"] is None and result["flip_rate"] == []
    assert result["final"]["step"] == 20 and 0.0 <= result["final"]["val_acc"] <= 1.0


def test_sweep_at_an_aggressive_ratio_runs_seeds_at_its_own_best_lr():
    results = {}
    for recipe in study.RECIPES:
        for lr in study.LR_GRID:
            sparsity = None if recipe == "dense" else study.TUNE_SPARSITY
            results.update(_fake(RunConfig("lm", recipe, sparsity, lr, 0), 3.0 - (lr == study.LR_GRID[1])))
    assert not any(c.sparsity == study.SWEEP_SPARSITY and c.lr == study.LR_GRID[3] and c.seed == 1
                   for c in study.plan(results, ("lm",)))
    for lr in study.LR_GRID:
        results.update(_fake(RunConfig("lm", "srste", study.SWEEP_SPARSITY, lr, 0), 3.0 - (lr == study.LR_GRID[3])))
    assert study.tuned_lr("lm", "srste", results, study.SWEEP_SPARSITY) == study.LR_GRID[3]
    seeds = {c.seed for c in study.plan(results, ("lm",))
             if c.recipe == "srste" and c.sparsity == study.SWEEP_SPARSITY and c.lr == study.LR_GRID[3]}
    assert seeds == set(TASKS["lm"].seeds)
