"""The accuracy study's machinery: configs, the schedule, lr tuning and its grid growth, the plan."""

import math
import statistics
import subprocess

import pytest

from bench.accuracy import study
from bench.accuracy.run import RunConfig, lr_factor, train
from bench.accuracy.tasks import TASKS


def test_run_config_rejects_inconsistent_runs():
    with pytest.raises(ValueError, match="task"):
        RunConfig("imagenet", "step", "2:4", 1e-3, 0)
    with pytest.raises(ValueError, match="sparsity must be None"):
        RunConfig("lm", "dense", "2:4", 1e-3, 0)
    with pytest.raises(ValueError, match="switch_at"):
        RunConfig("lm", "srste", "2:4", 1e-3, 0, 30)
    with pytest.raises(ValueError, match="switch_at"):
        RunConfig("lm", "step", "2:4", 1e-3, 0, 35)
    assert RunConfig("lm", "step", "1:16", 4e-3, 2, 30).run_id == "lm-step-1of16-lr0.004-s2-switch30"


def test_schedule_warms_up_then_decays_along_a_cosine_to_a_tenth():
    steps = 3000  # warm-up: 150 steps
    assert lr_factor(0, steps) == pytest.approx(1 / 150)
    assert lr_factor(149, steps) == pytest.approx(1.0)
    assert lr_factor(150, steps) == pytest.approx(1.0)
    middle = 150 + (steps - 150) // 2
    assert lr_factor(middle, steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-3)
    assert lr_factor(steps, steps) == pytest.approx(0.1)
    values = [lr_factor(s, steps) for s in range(150, steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def _fake(config, value):
    return {config.run_id: {"run_id": config.run_id, "metric": "val_loss", "final": {"val_loss": value}}}


def _tune(results, task, grid, best_of):
    """Fake seed-0 tuning results on ``grid``: recipe r's loss is lowest at ``best_of[r]``."""
    for recipe in study.RECIPES:
        for lr in grid:
            sparsity = None if recipe == "dense" else study.TUNE_SPARSITY
            better = -1 if not TASKS[task].higher_is_better else 1
            results.update(_fake(RunConfig(task, recipe, sparsity, lr, 0), 3.0 + better * (lr == best_of[recipe])))


def test_tuned_lr_waits_for_every_recipe_then_picks_the_best():
    results = {}
    grid = study.LR_GRID
    inner = {r: grid[1] for r in study.RECIPES}
    _tune(results, "lm", grid[:-1], inner)
    assert study.tuned_lr("lm", "srste", results) is None
    assert not any(c.seed == 1 for c in study.plan(results, ("lm",)))
    _tune(results, "lm", grid[-1:], inner)
    assert study.lr_grid("lm", results) == (grid, True)
    assert study.tuned_lr("lm", "srste", results) == grid[1]
    seeds = [c for c in study.plan(results, ("lm",)) if c.recipe == "srste" and c.lr == grid[1]]
    assert {(c.sparsity, c.seed) for c in seeds} >= {("1:16", 2), ("1:8", 1), ("2:4", 0)}
    sweep = {(c.sparsity, c.switch_at) for c in study.plan(results, ("lm",)) if c.switch_at is not None}
    assert sweep == {(s, p) for s in study.SWEEP["lm"] for p in (10, 20, 30, 40, 50)}


def test_a_best_lr_at_the_edge_grows_the_grid_for_every_recipe():
    results = {}
    grid = study.LR_GRID
    best = {r: grid[1] for r in study.RECIPES}
    best["step"] = grid[0]  # one recipe at the low edge
    _tune(results, "lm", grid, best)
    grown, final = study.lr_grid("lm", results)
    assert grown == (grid[0] / 2,) + grid and not final
    table = study._tuning_table(results, "lm")
    assert f"peak lr {grid[0] / 2:g}" in table[2] and "in progress" in table[0]
    step_row = next(row for row in table if row.startswith("| step |"))
    assert step_row.split(" | ")[1:3] == ["-", "2.0000"]  # the new lr not run yet; 3.0 - 1 at the old edge
    assert study.tuned_lr("lm", "dense", results) is None
    todo = {(c.recipe, c.lr) for c in study.plan(results, ("lm",)) if c.run_id not in results}
    assert todo == {(r, grid[0] / 2) for r in study.RECIPES}
    best["step"] = grid[0]  # still best at the old edge, now interior: tuning is final
    _tune(results, "lm", (grid[0] / 2,), best)
    assert study.lr_grid("lm", results) == (grown, True)
    assert study.tuned_lr("lm", "step", results) == grid[0]
    assert len(study._unique(study.plan(results, ("lm",)))) == study.planned_total(results, ("lm",))


def test_a_grid_at_its_growth_limit_is_final_and_says_which_best_sits_at_the_edge():
    results = {}
    grid = study.LR_GRID
    best = {r: grid[1] for r in study.RECIPES}
    for _ in range(study.MAX_GRID_EXTENSIONS + 1):  # dense best at the low edge every time the grid grows
        grid = study.lr_grid("lm", results)[0]
        best["dense"] = grid[0]
        _tune(results, "lm", grid, best)
    grown, final = study.lr_grid("lm", results)
    assert final and grown == (study.LR_GRID[0] / 2 ** study.MAX_GRID_EXTENSIONS,) + grown[1:]
    assert len(grown) == len(study.LR_GRID) + study.MAX_GRID_EXTENSIONS
    assert study.tuned_lr("lm", "dense", results) == grown[0]
    title = study._tuning_table(results, "lm")[0]
    assert "final" in title and f"only {study.MAX_GRID_EXTENSIONS} times, and dense is best at its edge" in title
    assert len(study._unique(study.plan(results, ("lm",)))) == study.planned_total(results, ("lm",))


def test_step_run_records_the_autoswitch_statistic_and_switch():
    # 40 steps: T_max = 20 comes before the 1000-step window fills, so AutoSwitch switches at T_max.
    auto = train(RunConfig("lm", "step", "2:4", 1e-3, 0), steps=40)
    assert auto["switch_step"] == 20 and auto["pattern_ok"] is True
    assert len(auto["z_history"]) == 20 and all(z > 0 for z in auto["z_history"])
    assert auto["autoswitch"] == {"rule": "relative", "threshold": 2.0}
    assert auto["betas"] == [0.9, 0.999] and auto["precond_floor_count"] is not None
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head.startswith(auto["commit"].split("-")[0]) and len(auto["commit"]) >= 7
    fixed = train(RunConfig("lm", "step", "2:4", 1e-3, 0, 30), steps=40)
    assert fixed["switch_step"] == 12 and fixed["z_history"] == [] and fixed["autoswitch"] is None


def test_asp_run_ends_n_m_sparse_without_switch_or_flips():
    pytest.importorskip("sklearn")
    result = train(RunConfig("digits", "asp", "2:4", 2e-3, 0), steps=20)
    assert result["pattern_ok"] is True
    assert result["switch_step"] is None and result["flip_rate"] == []
    assert result["final"]["step"] == 20 and 0.0 <= result["final"]["val_acc"] <= 1.0


def test_fine_tuning_continues_the_pretraining_adamw_state(monkeypatch, tmp_path):
    from bench.accuracy import tasks

    monkeypatch.setattr(tasks, "PRETRAIN_STEPS", 6)
    monkeypatch.setattr(tasks, "CACHE_DIR", str(tmp_path))
    task = TASKS["ft"]()
    assert task.start_step(0) == 6
    assert set(task.corpus()[:1000].tolist()) <= set(range(256)) and task.corpus_bytes > 100_000
    result = train(RunConfig("ft", "step", "2:4", 1e-3, 0), steps=20)
    assert result["start_step"] == 6 and result["switch_step"] == 10  # T_max: 50% of the 20 steps
    asp = train(RunConfig("ft", "asp", "1:8", 1e-3, 0), steps=4)
    assert asp["pattern_ok"] is True  # pruned at once: the pretrained model is the one ASP masks


def _hold_lock(path):
    """A separate process holding an exclusive flock on ``path`` (a worker training that run)."""
    import sys

    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # "held", or "" at once if the lock was taken (LOCK_NB fails)
    holder.stdout.close()
    assert line == "held\n"
    return holder


def test_workers_sharing_a_results_folder_claim_each_run_once(monkeypatch, tmp_path):
    import os

    from bench.accuracy import run

    trained = []

    def fake_train(config, progress=None):
        assert run.is_claimed(str(tmp_path), config)  # held while it trains
        trained.append(config.run_id)
        return {"run_id": config.run_id}

    monkeypatch.setattr(run, "train", fake_train)
    held, left, free = (RunConfig("lm", "srste", "2:4", 1e-3, s) for s in range(3))
    os.makedirs(os.path.dirname(run.claim_path(str(tmp_path), held)))
    holder = _hold_lock(run.claim_path(str(tmp_path), held))
    try:
        with open(run.claim_path(str(tmp_path), left), "w"):
            pass  # the claim file of a worker that was killed: nobody holds its lock
        assert run.is_claimed(str(tmp_path), held) and not run.is_claimed(str(tmp_path), left)
        assert not run.is_claimed(str(tmp_path), free)
        assert run.run_if_missing(held, str(tmp_path)) is None and trained == []
        assert run.run_if_missing(left, str(tmp_path)) == {"run_id": left.run_id}  # taken over
        assert run.run_if_missing(free, str(tmp_path)) == {"run_id": free.run_id}
    finally:
        holder.kill()
        holder.wait()
    assert not run.is_claimed(str(tmp_path), held)  # its worker ended: the lock went with it
    assert trained == [left.run_id, free.run_id]
    for config in (left, free):
        assert os.path.exists(run.result_path(str(tmp_path), config))
        assert not os.path.exists(run.claim_path(str(tmp_path), config))  # removed after the run
    assert run.run_if_missing(free, str(tmp_path)) is None and len(trained) == 2  # done: not again

    def failing_train(config, progress=None):
        raise RuntimeError("diverged")

    monkeypatch.setattr(run, "train", failing_train)
    broken = RunConfig("lm", "step", "2:4", 1e-3, 0)
    with pytest.raises(RuntimeError, match="diverged"):
        run.run_if_missing(broken, str(tmp_path))
    assert not run.is_claimed(str(tmp_path), broken)  # a failed run frees its claim


def test_a_run_finished_while_its_claim_was_taken_is_not_trained_again(monkeypatch, tmp_path):
    import contextlib
    import json
    import os

    from bench.accuracy import run

    config = RunConfig("lm", "asp", "1:8", 1e-3, 1)
    locked = run._locked

    @contextlib.contextmanager
    def finished_meanwhile(path, create=True):
        with locked(path, create) as got:
            with open(run.result_path(str(tmp_path), config), "w") as f:
                json.dump({"run_id": config.run_id}, f)  # another worker's result, written before our lock
            yield got

    def must_not_train(config, progress=None):
        raise AssertionError("trained a run whose result exists")

    monkeypatch.setattr(run, "_locked", finished_meanwhile)
    monkeypatch.setattr(run, "train", must_not_train)
    os.makedirs(os.path.dirname(run.result_path(str(tmp_path), config)))
    assert run.run_if_missing(config, str(tmp_path)) is None


def test_study_run_skips_the_runs_other_workers_hold(monkeypatch, tmp_path):
    import os

    from bench.accuracy import run

    first, second = study._unique(study.plan({}, ("lm",)))[:2]
    os.makedirs(os.path.dirname(run.claim_path(str(tmp_path), first)))
    holder = _hold_lock(run.claim_path(str(tmp_path), first))
    chosen = []

    class Chosen(Exception):
        pass

    def record(config, results_dir, progress=None):
        chosen.append(config)
        raise Chosen

    monkeypatch.setattr(study, "run_if_missing", record)
    try:
        with pytest.raises(Chosen):
            study.main(["run", "--task", "lm", "--results", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    assert chosen == [second]


def test_student_t_p_value_matches_closed_forms_and_tables():
    for t in (0.3, 1.0, 2.5, 9.0):  # df = 2: p = 1 - t / sqrt(t^2 + 2); df = 1: the Cauchy law
        assert study.student_t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)
        assert study.student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)
    for t, df in ((2.776, 4), (2.262, 9), (2.042, 30)):  # tabulated 5% two-sided critical values
        assert study.student_t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)


def test_paired_comparison_matches_seeds_and_counts_wins():
    def runs(values):
        return [{"config": {"seed": s, "task": "lm"}, "metric": "val_loss", "final": {"val_loss": v}}
                for s, v in values.items()]

    a, b = runs({0: 1.0, 1: 2.0, 2: 3.5, 7: 0.0}), runs({0: 1.5, 1: 2.25, 2: 3.6})
    mean, p, wins, n = study.paired(a, b)
    diffs = [-0.5, -0.25, -0.1]  # seed 7 has no partner
    assert n == 3 and wins == 3 and mean == pytest.approx(sum(diffs) / 3)
    t = abs(mean) / (statistics.stdev(diffs) / math.sqrt(3))
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert study.paired(a[:1], b) is None


def test_headline_table_shows_each_tuned_recipe_per_ratio_with_the_paired_step_test():
    results = {}
    lr = study.LR_GRID[1]
    _tune(results, "lm", study.LR_GRID, {r: lr for r in study.RECIPES})
    values = {"dense": (1.40, 1.41, 1.42), "asp": (1.50, 1.52, 1.51), "srste": (1.60, 1.62, 1.64),
              "step": (1.55, 1.63, 1.60)}
    for recipe, losses in values.items():
        for seed, loss in enumerate(losses):
            config = RunConfig("lm", recipe, None if recipe == "dense" else "2:4", lr, seed)
            results[config.run_id] = {"run_id": config.run_id, "metric": "val_loss", "final": {"val_loss": loss},
                                      "config": {"seed": seed, "task": "lm"}}
    header, _, *rows, blank, legend, end = study.headline_table(results)
    assert header.split(" | ")[2:6] == ["dense", "ASP", "SR-STE", "STEP"] and blank == end == ""
    assert legend == "Tasks: lm: TinyGPT, d_model 128, 2 layers, 4 heads, context 64 (0.43M parameters)."
    assert [row.split(" | ")[1] for row in rows] == TASKS["lm"].sparsities  # digits, gpt2, ft: not tuned
    cells = rows[0].strip("| ").split(" | ")
    assert cells[2:6] == [study._stats(list(values[r])) for r in study.RECIPES]
    diffs = [a - b for a, b in zip(values["step"], values["srste"])]
    assert cells[6].startswith(f"{statistics.fmean(diffs):+.4f} (paired t-test p = ")
    assert cells[6].endswith("better on 2 of 3 seeds)")
    one_eight = rows[1].strip("| ").split(" | ")
    assert one_eight[2] == cells[2] and one_eight[3:] == ["-"] * 4  # dense repeats; no 1:8 runs yet
    assert study.headline_table({}) == []


def test_planned_total_counts_the_whole_plan_once_tuned():
    results = {}
    for task in study.TASK_ORDER:
        _tune(results, task, study.LR_GRID, {r: study.LR_GRID[1] for r in study.RECIPES})
    assert len(study._unique(study.plan(results))) == study.planned_total(results)


def test_plan_eta_uses_each_task_median_and_counts_untimed_tasks():
    def done(task, seed, wall):
        config = RunConfig(task, "dense", None, 1e-3, seed)
        return config.run_id, {"config": {"task": task}, "wall_s": wall}

    results = dict([done("lm", 0, 100.0), done("lm", 1, 300.0), done("lm", 2, 200.0)])
    todo = [RunConfig("lm", "asp", "2:4", 1e-3, s) for s in range(18)] + [RunConfig("gpt2", "asp", "2:4", 1e-3, 0)]
    assert study._plan_eta(results, todo) == ("19 runs planned so far, about 1.0 h at this machine's median per "
                                              "task (+1 of tasks not timed yet)")
    assert study._plan_eta({}, todo) == "19 runs to go (no timing yet)"


def test_switch_probe_forks_one_dense_run_into_continuations_on_the_same_batches():
    import torch

    from bench.accuracy import switch_probe
    from bench.accuracy.run import BETAS, EPS, WEIGHT_DECAY
    from step_kernels.reference import parse_sparsity
    from step_kernels.targets import find_targets

    at, after, lr = 5, 10, 4e-3
    result = switch_probe.probe("lm", "1:8", 0, lr, at, after)
    # The dense branch is the uninterrupted AdamW run: torch's AdamW for at + after steps, same batches.
    task = TASKS["lm"]()
    model = task.build(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, task.steps))
    gen = torch.Generator().manual_seed(1_000_003 * 0 + 17)
    targets = [t.param for t in find_targets(model, exclude=task.exclude)]

    def v_hat_sum():
        return sum(float(opt.state[p]["exp_avg_sq"].double().sum()) / (1 - BETAS[1] ** float(opt.state[p]["step"]))
                   for p in targets)

    energy = []
    for k in range(at + after):
        opt.zero_grad(set_to_none=True)
        task.loss(model, gen).backward()
        if k == at:
            v_hat_fork = v_hat_sum()
        opt.step()
        schedule.step()
        if k >= at:
            energy.append(sum(float(p.grad.double().square().sum()) for p in targets))
    straight = task.evaluate(model)["val_loss"]
    dense = result["branches"]["dense"]["curve"][-1]
    assert dense["after"] == after
    assert dense["val_loss"] == pytest.approx(straight, rel=1e-5)  # fp32 AdamW vs STEP's dense recipe
    # The gradient energy and v growth it records are torch AdamW's on the same steps.
    assert result["v_hat_fork"] == pytest.approx(v_hat_fork, rel=1e-5)
    grown = result["branches"]["dense"]
    assert grown["grad_energy_mean"] == pytest.approx(sum(energy) / after / v_hat_fork, rel=1e-4)
    assert grown["grad_energy_first10"] == pytest.approx(sum(energy[:10]) / 10 / v_hat_fork, rel=1e-4)
    assert grown["v_hat_growth"] == pytest.approx(v_hat_sum() / v_hat_fork, rel=1e-4)
    assert result["branches"]["step"]["v_hat_growth"] is None  # frozen: no v to grow
    # Every branch starts from the same model: ASP's +0 is the pruned fork, worse than the fork itself.
    asp = result["branches"]["asp"]["curve"]
    assert asp[0]["after"] == 0 and asp[0]["val_loss"] > result["fork"]["val_loss"]
    # STEP switched at the fork (v frozen as AdamW left it, phase 2 from its first step); SR-STE has no switch.
    assert result["branches"]["step"]["switch_step"] == at
    assert result["branches"]["srste"]["switch_step"] is None
    for name in ("srste", "step"):
        assert 0 < result["branches"][name]["flip_rate_mean"] < 1
    n, m = parse_sparsity("1:8")
    table = switch_probe.probe_table([result])
    assert len(table) == 2 + len(switch_probe.BRANCHES) and f"| lm | {n}:{m} | 0 | {at}," in table[2]
