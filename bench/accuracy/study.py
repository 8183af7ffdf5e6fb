"""The accuracy study (protocol v2): plan, run what is missing, report.

``python -m bench.accuracy.study plan`` lists every run and whether its result exists;
``python -m bench.accuracy.study run [--max-minutes M] [--task lm]`` trains missing runs in plan
order (each result is one JSON file under ``bench/accuracy/results/``, so the study resumes where
it stopped and can be spread over many sessions; several ``run`` processes on one machine share
the work: each claims a run before training it, e.g. one per core with ``--threads 1``);
``python -m bench.accuracy.study report``
writes ``bench/accuracy/REPORT.md`` and its plots from the committed results, and writes
its headline (every recipe per task and ratio, AutoSwitch against the sweep, the sweep plots) with a
link to the report into the top-level README between the ``accuracy`` markers.

The plan, fixed before any result of it was seen, the same for every recipe (see ``run.py`` for
the training protocol):

1. Tuning: each recipe's peak lr is the best of ``LR_GRID`` on seed 0 at 2:4 (dense: its own
   best). If any recipe's best sits at an edge of the grid, the task's grid grows by one factor
   of two on that side for every recipe (at most ``MAX_GRID_EXTENSIONS`` times), and tuning
   goes on.
2. Seeds: every recipe x ratio runs the task's seeds with its tuned lr.
3. Switch-point sweep (``SWEEP``): STEP at its tuned lr with the switch fixed at 10, 20, 30, 40
   and 50% of the run, every seed.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import time
from typing import Dict, Iterator, List, Optional, Tuple

from .run import (
    ASP_DENSE_FRACTION,
    BETAS,
    RECIPES,
    SWITCH_POINTS,
    WEIGHT_DECAY,
    RunConfig,
    is_claimed,
    result_path,
    run_if_missing,
)
from .switch_probe import load_probes, probe_table
from .tasks import PRETRAIN_LR, PRETRAIN_STEPS, TASKS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
REPORT = os.path.join(HERE, "REPORT.md")
README = os.path.join(os.path.dirname(os.path.dirname(HERE)), "README.md")
TASK_ORDER = ("lm", "digits", "gpt2", "ft")
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
MAX_GRID_EXTENSIONS = 2
TUNE_SPARSITY = "2:4"
SWEEP = {"lm": ("2:4", "1:8"), "gpt2": ("2:4",)}  # the switch-point sweep: task -> ratios
CLAIM_POLL_S = 30  # run: how often a worker whose every planned run is held by others looks again
RECIPE_TITLES = {"dense": "dense", "asp": "ASP", "srste": "SR-STE", "step": "STEP"}


def load_results(results_dir: str = RESULTS_DIR) -> Dict[str, Dict]:
    """Every stored result, by run id."""
    out = {}
    for path in glob.glob(os.path.join(results_dir, "*", "*.json")):
        with open(path) as f:
            result = json.load(f)
        out[result["run_id"]] = result
    return out


def _better(task: str, a: float, b: float) -> bool:
    return a > b if TASKS[task].higher_is_better else a < b


def _value(result: Dict) -> float:
    return result["final"][result["metric"]]


def seed_runs(results: Dict[str, Dict], task: str, recipe: str, sparsity: Optional[str], lr: Optional[float],
              switch_at: Optional[int] = None) -> List[Dict]:
    """The stored results of (task, recipe, sparsity, lr, switch point) over the task's seeds, in
    seed order; ``sparsity`` is ignored for dense, and an lr of None (not tuned yet) has no runs."""
    if lr is None:
        return []
    configs = (RunConfig(task, recipe, None if recipe == "dense" else sparsity, lr, seed, switch_at)
               for seed in TASKS[task].seeds)
    return [results[c.run_id] for c in configs if c.run_id in results]


def _tuning_config(task: str, recipe: str, lr: float) -> RunConfig:
    return RunConfig(task, recipe, None if recipe == "dense" else TUNE_SPARSITY, lr, 0)


def _best_on(grid: Tuple[float, ...], task: str, recipe: str, results: Dict[str, Dict]) -> Optional[float]:
    best = None
    for lr in grid:
        result = results.get(_tuning_config(task, recipe, lr).run_id)
        if result is None:
            return None
        if best is None or _better(task, _value(result), best[1]):
            best = (lr, _value(result))
    return best[0]


def lr_grid(task: str, results: Dict[str, Dict]) -> Tuple[Tuple[float, ...], bool]:
    """``(grid, final)``: the task's lr grid, ``LR_GRID`` grown by a factor of two on a side where
    a recipe's best lr sits at the edge once every recipe's runs on the current grid exist; final
    when every recipe's runs exist and no edge needs growing (or the growth limit is reached)."""
    grid = tuple(LR_GRID)
    for extension in range(MAX_GRID_EXTENSIONS + 1):
        best = [_best_on(grid, task, recipe, results) for recipe in RECIPES]
        if any(b is None for b in best):
            return grid, False
        low, high = grid[0] in best, grid[-1] in best
        if not (low or high) or extension == MAX_GRID_EXTENSIONS:
            return grid, True
        grid = ((grid[0] / 2,) if low else ()) + grid + ((grid[-1] * 2,) if high else ())
    raise AssertionError("unreachable")


def tuned_lr(task: str, recipe: str, results: Dict[str, Dict]) -> Optional[float]:
    """The best lr of the task's grid for ``recipe`` on seed 0 at 2:4, once tuning is final."""
    grid, final = lr_grid(task, results)
    return _best_on(grid, task, recipe, results) if final else None


def plan(results: Dict[str, Dict], tasks=TASK_ORDER) -> Iterator[RunConfig]:
    """Every run of the study in order; runs that depend on a tuned lr appear once it is known."""
    for task in tasks:
        for recipe in RECIPES:
            for lr in lr_grid(task, results)[0]:
                yield _tuning_config(task, recipe, lr)
        for recipe in RECIPES:
            lr = tuned_lr(task, recipe, results)
            if lr is None:
                continue
            for sparsity in ([None] if recipe == "dense" else TASKS[task].sparsities):
                for seed in TASKS[task].seeds:
                    yield RunConfig(task, recipe, sparsity, lr, seed)
        lr = tuned_lr(task, "step", results)
        for sparsity in SWEEP.get(task, ()) if lr is not None else ():
            for switch_at in SWITCH_POINTS:
                for seed in TASKS[task].seeds:
                    yield RunConfig(task, "step", sparsity, lr, seed, switch_at)


def planned_total(results: Dict[str, Dict], tasks=TASK_ORDER) -> int:
    """How many runs the plan holds once tuning is done on the lr grids grown so far (exact once
    every task's tuning is final; a grid that still has to grow adds its runs then)."""
    total = 0
    for task in tasks:
        t = TASKS[task]
        sparse_recipes = len(RECIPES) - 1
        total += len(RECIPES) * len(lr_grid(task, results)[0])  # tuning, seed 0 at 2:4
        total += len(t.seeds) - 1 + sparse_recipes * (len(t.sparsities) * len(t.seeds) - 1)
        total += len(SWEEP.get(task, ())) * len(SWITCH_POINTS) * len(t.seeds)
    return total


def _unique(configs: Iterator[RunConfig]) -> List[RunConfig]:
    seen, out = set(), []
    for c in configs:
        if c.run_id not in seen:
            seen.add(c.run_id)
            out.append(c)
    return out


def cmd_plan(args) -> None:
    results = load_results(args.results)
    configs = _unique(plan(results, args.tasks))
    done = sum(c.run_id in results for c in configs)
    for c in configs:
        print(f"{'done' if c.run_id in results else 'todo'}  {c.run_id}")
    print(f"{done}/{len(configs)} runs done; {planned_total(results, args.tasks)} in all once tuning is "
          "complete (runs that need a tuned lr appear then)")


def _plan_eta(results: Dict[str, Dict], todo: List[RunConfig]) -> str:
    """The time the runs in ``todo`` need at the median wall time of each task's stored runs."""
    medians = {task: statistics.median(r["wall_s"] for r in results.values() if r["config"]["task"] == task)
               for task in {r["config"]["task"] for r in results.values()}}
    known = [medians[c.task] for c in todo if c.task in medians]
    if not known:
        return f"{len(todo)} runs to go (no timing yet)"
    hours = sum(known) / 3600
    unknown = len(todo) - len(known)
    return (f"{len(todo)} runs planned so far, about {hours:.1f} h at this machine's median per task"
            + (f" (+{unknown} of tasks not timed yet)" if unknown else ""))


def cmd_run(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    deadline = time.time() + args.max_minutes * 60 if args.max_minutes else None
    waiting = False
    while True:
        results = load_results(args.results)
        todo = [c for c in _unique(plan(results, args.tasks)) if c.run_id not in results]
        if not todo:
            print("nothing left to run")
            return
        if deadline is not None and time.time() > deadline:
            print(f"stopping: --max-minutes {args.max_minutes} reached; {len(todo)} runs left")
            return
        free = [c for c in todo if not is_claimed(args.results, c)]
        if not free:  # other workers hold every run planned now; theirs may unlock more (tuning)
            if not waiting:
                print(f"waiting: other workers are training the {len(todo)} runs planned now", flush=True)
            waiting = True
            time.sleep(CLAIM_POLL_S)
            continue
        waiting = False
        config = free[0]
        print(f"[{len(results) + 1}/{planned_total(results, args.tasks)}] {config.run_id}; {_plan_eta(results, todo)}",
              flush=True)
        start = time.time()
        result = run_if_missing(config, args.results, progress=lambda s: print(s, flush=True))
        if result is None:  # another worker took it between the check and the claim: look again
            time.sleep(1)
        else:
            print(f"    -> {result['metric']} {result['final'][result['metric']]:.4f}, switch "
                  f"{result['switch_step']}, {time.time() - start:.0f} s -> {result_path(args.results, config)}",
                  flush=True)


def _stats(values: List[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {spread:.4f} (n={len(values)})"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def student_t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isinf(t):
        return 0.0
    if t == 0:
        return 1.0
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def paired(a: List[Dict], b: List[Dict]) -> Optional[Tuple[float, float, int, int]]:
    """Paired by seed: ``(mean of a - b, two-sided p of the paired t-test, seeds where a is
    better, seeds)`` over the seeds both have, or None with fewer than two."""
    by_seed = {r["config"]["seed"]: _value(r) for r in b}
    pairs = [(_value(r), by_seed[r["config"]["seed"]]) for r in a if r["config"]["seed"] in by_seed]
    if len(pairs) < 2:
        return None
    task = a[0]["config"]["task"]
    diffs = [x - y for x, y in pairs]
    mean, spread = statistics.fmean(diffs), statistics.stdev(diffs)
    t = math.inf if spread == 0 else mean / (spread / math.sqrt(len(diffs)))
    p = 1.0 if mean == 0 else student_t_two_sided_p(abs(t), len(diffs) - 1)
    return mean, p, sum(_better(task, x, y) for x, y in pairs), len(pairs)


def _step_minus_srste(step_runs: List[Dict], srste_runs: List[Dict]) -> str:
    """STEP minus SR-STE paired by seed as text (mean difference, p, wins), or "" with fewer than
    two shared seeds; the headline and the per-task tables both print this one test."""
    test = paired(step_runs, srste_runs)
    if test is None:
        return ""
    mean, p, wins, n = test
    return f"{mean:+.4f} (paired t-test p = {p:.2g}; STEP better on {wins} of {n} seeds)"


def _switches(runs: List[Dict]) -> str:
    steps = [r["switch_step"] for r in runs if r["switch_step"] is not None]
    return f"{statistics.fmean(steps):.0f} ({min(steps)}-{max(steps)})" if steps else "-"


def _task_summary(task: str) -> str:
    """The first line of the task class's docstring, without its full stop."""
    return TASKS[task].__doc__.splitlines()[0].rstrip(".")


def _task_title(task: str) -> str:
    t = TASKS[task]
    direction = "higher" if t.higher_is_better else "lower"
    return f"**{task}** ({_task_summary(task)}): {t.metric}, {direction} is better"


def _tuning_table(results: Dict[str, Dict], task: str) -> List[str]:
    """Markdown lines: the seed-0 2:4 metric of every recipe at every lr of the task's grid."""
    grid, final = lr_grid(task, results)
    rows = []
    for recipe in RECIPES:
        cells = []
        for lr in grid:
            result = results.get(_tuning_config(task, recipe, lr).run_id)
            cells.append(f"{_value(result):.4f}" if result else "-")
        rows.append(f"| {recipe} | {' | '.join(cells)} |")
    if all(cell == "-" for row in rows for cell in row.strip("| ").split(" | ")[1:]):
        return []
    state = "final" if final else "in progress"
    at_edge = [r for r in RECIPES if _best_on(grid, task, r, results) in (grid[0], grid[-1])] if final else []
    if at_edge:
        state += f"; the grid may grow only {MAX_GRID_EXTENSIONS} times, and {', '.join(at_edge)} is best at its edge"
    return [f"Tuning ({task}, seed 0, {TUNE_SPARSITY}; dense unmasked; {TASKS[task].metric}; {state})", "",
            "| recipe | " + " | ".join(f"peak lr {lr:g}" for lr in grid) + " |",
            "|" + "---|" * (len(grid) + 1), *rows, ""]


def summary_tables(results: Dict[str, Dict]) -> str:
    """Markdown: per task, the tuning grid, recipe x ratio mean ± std with the paired STEP-vs-SR-STE
    test; then the switch-point sweep and AutoSwitch's place in it."""
    lines = []
    for task in TASK_ORDER:
        lines += _tuning_table(results, task)
        metric = TASKS[task].metric
        extra = [] if metric == "val_loss" else ["val_loss"]  # the classifier also shows its loss
        rows = []
        for recipe in RECIPES:
            lr = tuned_lr(task, recipe, results)
            for sparsity in ([None] if recipe == "dense" else TASKS[task].sparsities) if lr else ():
                runs = seed_runs(results, task, recipe, sparsity, lr)
                cells = [_stats([r["final"][name] for r in runs]) for name in [metric] + extra]
                rows.append(f"| {recipe} | {sparsity or '-'} | {lr:g} | {' | '.join(cells)} | {_switches(runs)} |")
        if not rows:
            continue
        steps = TASKS[task].steps
        header = ["recipe", "N:M", "peak lr (tuned)", *(f"{name} mean ± std" for name in [metric] + extra),
                  f"switch step, mean (range); T_min {int(0.1 * steps)}, T_max {int(0.5 * steps)}"]
        lines += [_task_title(task), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]
        lines += _paired_lines(results, task)
    lines += _sweep_table(results)
    lines += _autoswitch_table(results)
    return "\n".join(lines)


def headline_table(results: Dict[str, Dict]) -> List[str]:
    """Markdown lines: one row per task x ratio with every recipe's mean ± std at its tuned lr
    (dense repeated on each ratio of its task) and STEP minus SR-STE paired by seed; tasks whose
    tuning is not final are left out."""
    rows, shown = [], []
    for task in TASK_ORDER:
        lrs = {recipe: tuned_lr(task, recipe, results) for recipe in RECIPES}
        if any(lr is None for lr in lrs.values()):
            continue
        shown.append(task)
        t = TASKS[task]
        label = f"{task}, {t.metric} ({'higher' if t.higher_is_better else 'lower'} is better)"
        for sparsity in t.sparsities:
            runs = {recipe: seed_runs(results, task, recipe, sparsity, lrs[recipe]) for recipe in RECIPES}
            cells = [_stats([_value(r) for r in runs[recipe]]) for recipe in RECIPES]
            versus = _step_minus_srste(runs["step"], runs["srste"]) or "-"
            rows.append(f"| {label} | {sparsity} | {' | '.join(cells)} | {versus} |")
    if not rows:
        return []
    legend = "; ".join(f"{task}: {_task_summary(task)}" for task in shown)
    return ["| task, metric | N:M | " + " | ".join(RECIPE_TITLES[r] for r in RECIPES)
            + " | STEP minus SR-STE, paired by seed |", "|" + "---|" * (len(RECIPES) + 3), *rows, "",
            f"Tasks: {legend}.", ""]


def _paired_lines(results: Dict[str, Dict], task: str) -> List[str]:
    """Markdown lines: STEP minus SR-STE per ratio, paired by seed, each at its tuned lr."""
    step_lr, srste_lr = tuned_lr(task, "step", results), tuned_lr(task, "srste", results)
    out = []
    for sparsity in TASKS[task].sparsities:
        versus = _step_minus_srste(seed_runs(results, task, "step", sparsity, step_lr),
                                   seed_runs(results, task, "srste", sparsity, srste_lr))
        if versus:
            out.append(f"{sparsity}: {versus}")
    if not out:
        return []
    return [f"STEP minus SR-STE ({TASKS[task].metric}), paired by seed: " + "; ".join(out) + ".", ""]


def _sweep_table(results: Dict[str, Dict]) -> List[str]:
    """Markdown lines: STEP with the switch fixed at each point of the sweep, and with AutoSwitch."""
    rows = []
    for task, ratios in SWEEP.items():
        lr = tuned_lr(task, "step", results)
        for sparsity in ratios if lr else ():
            cells = [_stats([_value(r) for r in seed_runs(results, task, "step", sparsity, lr, p)])
                     for p in SWITCH_POINTS]
            auto = seed_runs(results, task, "step", sparsity, lr)
            cells.append(f"{_stats([_value(r) for r in auto])}, switch {_switches(auto)}")
            rows.append(f"| {task} | {sparsity} | {lr:g} | {' | '.join(cells)} |")
    if not rows:
        return []
    return ["**Switch-point sweep**: STEP with the switch fixed at a share of the run, and with AutoSwitch "
            "(metric as in the task's table)", "",
            "| task | N:M | peak lr | " + " | ".join(f"switch at {p}%" for p in SWITCH_POINTS) + " | AutoSwitch |",
            "|" + "---|" * (len(SWITCH_POINTS) + 4), *rows, ""]


def _autoswitch_table(results: Dict[str, Dict]) -> List[str]:
    """Markdown lines: where AutoSwitch switched and whether its result is within seed noise of the
    sweep's best fixed switch (the difference of the means within the larger of the two stds)."""
    rows = []
    for task, ratios in SWEEP.items():
        lr = tuned_lr(task, "step", results)
        for sparsity in ratios if lr else ():
            auto = seed_runs(results, task, "step", sparsity, lr)
            sweep = {p: seed_runs(results, task, "step", sparsity, lr, p) for p in SWITCH_POINTS}
            if len(auto) < 2 or any(len(r) < 2 for r in sweep.values()):
                continue
            means = {p: statistics.fmean(_value(r) for r in runs) for p, runs in sweep.items()}
            best = min(means, key=means.get) if not TASKS[task].higher_is_better else max(means, key=means.get)
            auto_values = [_value(r) for r in auto]
            gap = statistics.fmean(auto_values) - means[best]
            noise = max(statistics.stdev(auto_values), statistics.stdev(_value(r) for r in sweep[best]))
            verdict = "yes" if abs(gap) <= noise else ("no, better" if _better(task, gap + means[best], means[best])
                                                       else "no, worse")
            rows.append(f"| {task} | {sparsity} | {_switches(auto)} | {best}% | {gap:+.4f} | {noise:.4f} | {verdict} |")
    if not rows:
        return []
    return ["**AutoSwitch** (default rule: relative change of v, threshold 2): where it switches, and its "
            "result against the sweep's best fixed switch", "",
            "| task | N:M | switch step, mean (range) | best fixed switch | AutoSwitch minus best | "
            "seed noise (larger std) | within noise |", "|---|---|---|---|---|---|---|", *rows, ""]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(results: Dict[str, Dict], task: str, path: str) -> bool:
    """Validation curves (mean over seeds) per ratio, and seed 0's flip rate, for each recipe."""
    plt = _pyplot()

    sparsities = TASKS[task].sparsities
    fig, axes = plt.subplots(2, len(sparsities), figsize=(4.2 * len(sparsities), 7), squeeze=False)
    drawn = False
    for col, sparsity in enumerate(sparsities):
        ax, fax = axes[0][col], axes[1][col]
        for recipe in RECIPES:
            lr = tuned_lr(task, recipe, results)
            runs = seed_runs(results, task, recipe, sparsity, lr)
            if not runs:
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            metric = runs[0]["metric"]
            mean = [statistics.fmean(r["curve"][i][metric] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, label=f"{recipe}, lr {lr:g} (n={len(runs)})")
            if recipe == "asp" and TASKS[task].asp_dense_fraction:
                ax.axvline(ASP_DENSE_FRACTION * TASKS[task].steps, color="gray", ls=":", lw=1)
            if runs[0]["flip_rate"]:
                fs, fr = zip(*runs[0]["flip_rate"])
                fax.semilogy(fs, [max(v, 1e-7) for v in fr], label=recipe)
            drawn = True
        ax.set_title(f"{task} {sparsity}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{TASKS[task].metric} (validation)")
        if ax.get_lines():
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fax.set_xlabel("optimizer step")
        fax.set_ylabel("mask flip rate per step (seed 0; 0 drawn at 1e-7)")
        if fax.get_lines():
            fax.legend(fontsize=7)
        fax.grid(alpha=0.3)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_sweep(results: Dict[str, Dict], task: str, path: str) -> bool:
    """The sweep, one panel per ratio: the metric against the switch point (mean ± std over
    seeds), AutoSwitch marked at its mean switch step, SR-STE and dense as reference lines."""
    plt = _pyplot()

    lr = tuned_lr(task, "step", results)
    ratios = SWEEP.get(task, ()) if lr else ()
    steps = TASKS[task].steps
    fig, axes = plt.subplots(1, max(1, len(ratios)), figsize=(5 * max(1, len(ratios)), 4), squeeze=False)
    drawn = False
    for ax, sparsity in zip(axes[0], ratios):
        points = [(p, [_value(r) for r in seed_runs(results, task, "step", sparsity, lr, p)]) for p in SWITCH_POINTS]
        points = [(p, v) for p, v in points if v]
        if not points:
            continue
        ax.errorbar([p * steps / 100 for p, _ in points], [statistics.fmean(v) for _, v in points],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points], marker="o", capsize=3,
                    label="STEP, fixed switch")
        auto = seed_runs(results, task, "step", sparsity, lr)
        if auto:
            values = [_value(r) for r in auto]
            ax.errorbar([statistics.fmean(r["switch_step"] for r in auto)], [statistics.fmean(values)],
                        yerr=[statistics.stdev(values) if len(values) > 1 else 0.0], marker="*", markersize=14,
                        capsize=3, ls="", label="STEP, AutoSwitch (mean switch step)")
        for recipe, style in (("srste", "--"), ("dense", ":")):
            peers = [_value(r) for r in seed_runs(results, task, recipe, sparsity, tuned_lr(task, recipe, results))]
            if peers:
                ax.axhline(statistics.fmean(peers), color="gray", ls=style, lw=1,
                           label=f"{RECIPE_TITLES[recipe]} (mean of {len(peers)} seeds)")
        ax.set_title(f"{task} {sparsity}: STEP's switch point", fontsize=10)
        ax.set_xlabel(f"switch step (optimizer steps; run length {steps})")
        ax.set_ylabel(f"final {TASKS[task].metric} (validation; mean ± std over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        drawn = True
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _plot_autoswitch(results: Dict[str, Dict], path: str) -> bool:
    """AutoSwitch's statistic: the window mean of Z per step in each task's tuned step 2:4 run on
    seed 0, against the threshold it is compared with."""
    plt = _pyplot()

    from step_kernels.reference import autoswitch_window

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    threshold = None
    for task in TASK_ORDER:
        lr = tuned_lr(task, "step", results)
        result = results.get(RunConfig(task, "step", TUNE_SPARSITY, lr, 0).run_id) if lr else None
        if not result or not result.get("z_history"):
            continue
        window = autoswitch_window(result["betas"][1])
        z = result["z_history"]
        means = [(t, statistics.fmean(z[t - window:t])) for t in range(window, len(z) + 1)]
        ax.semilogy(range(1, len(z) + 1), z, lw=0.6, alpha=0.4)
        if means:
            ax.semilogy(*zip(*means), color=ax.get_lines()[-1].get_color(),
                        label=f"{task}: window mean (switch at {result['switch_step']})")
        threshold = result["autoswitch"]["threshold"]
    if threshold is None:
        plt.close(fig)
        return False
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("optimizer step of the run (phase 1)")
    ax.set_ylabel("Z = sum|v_t - v_(t-1)| / ((1 - beta2) sum v_t)  (dimensionless)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _probe_section() -> str:
    """REPORT.md's section on the switch probes (``bench/accuracy/switch_probe.py``), if any ran."""
    probes = load_probes()
    table = probe_table(probes)
    if not table:
        return ""
    commits = ", ".join(f"`{c}`" for c in sorted({p["commit"][:7] for p in probes}))
    return ("\n\n## What happens at the switch (diagnostic)\n\n"
            "Not part of the protocol and tuning nothing: one dense AdamW run of the study's schedule, forked at "
            "step `at` into four continuations on the same batches (`python -m bench.accuracy.switch_probe "
            "--task T --lr PEAK --sparsity N:M --seed S --at STEP`, PEAK being STEP's tuned lr on the "
            "task): dense; ASP (magnitude prune at the fork, mask fixed; +0 is the "
            "pruned model before any step); SR-STE with live v; STEP's phase 2 (SR-STE with v frozen at the "
            "fork). SR-STE and STEP differ only in v. Gradient energy: per step, the targets' summed g^2 over "
            "their summed bias-corrected v at the fork (about 1 when training goes on as before the fork; a frozen "
            "preconditioner's steps grow about as its square root), mean over the first 10 and over all steps "
            "after the fork; v_hat growth: the summed bias-corrected v at the end over the fork's (live v only). "
            f"Made on the same machine, 1 thread, by commit(s) {commits}.\n\n" + "\n".join(table))


def cmd_report(args) -> None:
    results = load_results(args.results)
    configs = _unique(plan(results))
    done = sum(c.run_id in results for c in configs)
    total = max(len(configs), planned_total(results))
    tables = summary_tables(results)
    plots, sweep_plots = [], []
    for task in TASK_ORDER:
        png = os.path.join(HERE, f"{task}.png")
        if _plot(results, task, png):
            plots.append(f"![{task}](bench/accuracy/{task}.png)")
        png = os.path.join(HERE, f"{task}_switch.png")
        if _plot_sweep(results, task, png):
            sweep_plots.append(f"![{task} switch-point sweep](bench/accuracy/{task}_switch.png)")
            plots.append(sweep_plots[-1])
    if _plot_autoswitch(results, os.path.join(HERE, "autoswitch.png")):
        plots.append("![autoswitch](bench/accuracy/autoswitch.png)")
    machines = sorted({f"{r['threads']} thread(s), torch {r['torch']}, Python {r['python']}, backend {r['backend']}"
                       for r in results.values()})
    commits = sorted({r["commit"][:7] for r in results.values()})
    made_on = (f"Made on a 2-core x86_64 CPU VM with {'; '.join(machines) or 'no runs yet'}, by commit(s) "
               f"{', '.join(f'`{c}`' for c in commits) or '-'} of the study code.")
    headline = headline_table(results)
    if headline:
        headline = ["Every recipe at its tuned peak lr, final metric, mean ± std over seeds:", "", *headline]
    steps = TASKS["lm"].steps
    body = (f"{done} runs done of {total} planned (the count grows if an lr grid "
            f"has to grow). {made_on} Regenerate with "
            f"`python -m bench.accuracy.study report`; continue with `python -m bench.accuracy.study run`.\n\n"
            f"Method (protocol v2, fixed before any of its results): every run trains {steps} steps with "
            f"AdamW betas {tuple(BETAS)}, eps 1e-8, weight decay {WEIGHT_DECAY:g}, the lr warmed up linearly over "
            f"the first 5% of the steps, then decayed along a cosine to 10% of its peak. Each recipe's peak lr is "
            f"the best of {', '.join(f'{lr:g}' for lr in LR_GRID)} on seed 0 at 2:4 (the same grid for every "
            f"recipe; a best at an edge grows the grid by a factor of two for every recipe, at most "
            f"{MAX_GRID_EXTENSIONS} times) and is reused at the "
            f"other ratios; seed 0's tuning run is one of the seeds reported, for every recipe alike. STEP uses "
            f"the default AutoSwitch (relative change of v, threshold 2, T_min 10% and T_max 50% of the run). "
            f"ASP trains dense for {ASP_DENSE_FRACTION:.0%} of the steps (its curve before the dotted line is the "
            f"dense model), prunes by magnitude once and trains on with the mask fixed. Fine-tuning (ft): TinyGPT "
            f"pretrained dense with AdamW ({PRETRAIN_STEPS} steps, peak lr {PRETRAIN_LR:g}, same schedule) on the "
            f"lm corpus, then every recipe continues the pretrained model and its AdamW state on other "
            f"standard-library packages (STEP through `STEP.from_adamw`; ASP prunes at once). The corpora are "
            f"standard-library sources, so they depend on the Python version (recorded per run).\n\n"
            + ("## Summary\n\n" + "\n".join(headline) + "\n## Every table\n\n" if headline else "")
            + f"{tables}\n" + "\n".join(plots) + _probe_section()
            + "\n\nThe first study (protocol v1: 1000 steps, beta2 0.99, constant lr) is archived in "
            "[REPORT_v1.md](bench/accuracy/REPORT_v1.md).\n")
    with open(REPORT, "w") as f:
        f.write("# Accuracy study\n\n" + body.replace("](bench/accuracy/", "]("))
    # The README gets the headline: every recipe per task and ratio, AutoSwitch against the sweep and
    # the sweep's plots; the tuning grids, curves, probes and method live in REPORT.md.
    status = "\n".join([
        f"Protocol v2: {done} runs done of {total} planned. {made_on} Method, "
        f"tuning grids, curves and every table: [bench/accuracy/REPORT.md](bench/accuracy/REPORT.md) "
        f"(regenerate with `python -m bench.accuracy.study report`; continue with "
        f"`python -m bench.accuracy.study run`).", "",
        *headline, *_autoswitch_table(results), *sweep_plots]).rstrip("\n") + "\n"
    with open(README) as f:
        readme = f.read()
    begin, end = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
    if begin in readme and end in readme:
        readme = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{status}{end}", readme,
                        flags=re.S)
        with open(README, "w") as f:
            f.write(readme)
    print(body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("plan", "run", "report"))
    parser.add_argument("--task", dest="tasks", action="append", choices=TASK_ORDER,
                        help="restrict to a task (repeatable); default: all, in the order lm, digits, gpt2, ft")
    parser.add_argument("--max-minutes", type=float, default=None, help="run: stop starting runs after this")
    parser.add_argument("--threads", type=int, default=None, help="run: torch threads (default: torch's)")
    parser.add_argument("--results", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.tasks = tuple(args.tasks) if args.tasks else TASK_ORDER
    {"plan": cmd_plan, "run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
