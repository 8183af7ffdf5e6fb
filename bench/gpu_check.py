"""``make gpu-check`` (``python -m bench.gpu_check --out DIR``): prove the GPU kernels in one short window.

On a machine with a CUDA device it runs, offline (no pip call reaches for an index), in stages
with a time budget each and a hard total of 8 minutes:

- ``build``: incremental in-place build of ``step_kernels._C`` with its CUDA sources against the
  installed torch (``setup.py build_ext --inplace``, ninja keeps ``build/``), then an editable
  install with ``pip --no-index`` only when ``step_kernels`` is not importable yet;
- ``correctness``: the CUDA items of the test suite only (``bench/_gpu_pytest.py``): every Triton
  kernel configuration of the interpreter grid on CUDA tensors against the reference, 50 optimizer
  steps through the switch against the reference, pack24/unpack24 on CUDA against the CPU path and
  torch's conversion, the packed linear against dense, the GPU-only tests; the CPU suite is not rerun;
- ``fused_step``, ``pack24``, ``sparse_linear``: the GPU benchmarks of ``bench/`` at the sizes the
  targets name (64M and 256M parameters, Llama-sized matrices and FFN shapes).

A stage that fails or runs out of time is reported and the next stage still runs. ``DIR`` gets
``gpu_check.json`` and ``gpu_check.md`` (rewritten as results come) and one ``<stage>.log`` each;
the last thing printed is the summary table of every target with pass/fail. The exit status is 1
when a stage failed or a correctness check did not pass (a speed target missed is reported, not
an error).

Without a CUDA device (or with ``--dry-run``) nothing is built or run: it prints the plan with each
stage's estimated time on an H200 (bytes at ~4 TB/s, GEMM FLOPs at ~790 TFLOP/s, test and kernel
counts), checks that every test and benchmark the plan names exists and is collected, that the
budgets fit the total, and exits 0 with "no CUDA device". ``make test`` runs this dry run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _gpu_pytest
from ._common import git_commit, versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_S = 480  # the hard total: one command on the GPU machine, with time left there for a rerun
RESERVE_S = 10  # kept back for the summary
MAX_RESULT_FILES = 8  # what can be brought back from such a machine
ROW_TAG = "@@gpu-check-row "  # a benchmark subprocess prints each result row after this tag

# What the estimates assume of one H200 machine (measured there: KINDS.md of the device tool).
HBM_BYTES_PER_S = 4.0e12  # a device-to-device copy moved ~4.3 TB/s, read + written
GEMM_FLOP_PER_S = 790e12  # an 8192^3 bf16 matmul ran at ~790 TFLOP/s on random data
WORKERS = 8  # pytest-xdist workers of the correctness stage (16 cores; the image has pytest-xdist)
# Measured on the 2-core x86-64 development VM, one core each, and taken as they are for the
# GPU machine's cores:
SLOWEST_CXX_FILE_S = 29.0  # csrc/fused_step_cpu.cpp, the longest of the parallel compiles
COMPILE_S = 0.8  # mean Triton compile of one kernel specialisation for sm_90 (0.1 to 2.3 s)
CPU_GEN_S_PER_MELEM = 0.066  # test_pack24's random 2:4 matrix, per million elements
CPU_RANDN_S_PER_MELEM = 0.0052  # torch.randn on the CPU, per million elements
PROCESS_START_S = 8.0  # import torch and triton, create the CUDA context
DO_BENCH_S = 0.15  # one triton.testing.do_bench: 25 ms warm-up + 100 ms of timed calls + L2 flushes


@dataclass
class Check:
    """A correctness check of the issue: the node-id prefixes of its CUDA tests."""

    label: str
    prefixes: List[str]
    compiles_per_test: int  # new Triton specialisations a test of this check compiles (upper bound)


CHECKS = [
    Check("50 optimizer steps equal the reference backend (TinyGPT and an MLP; fp32, bf16; STEP, SR-STE)",
          ["tests/test_backend_conformance.py::test_fifty_optimizer_steps_match_reference_backend"], 2),
    Check("Triton fused step: every configuration of the interpreter grid against the reference",
          ["tests/test_fused_step_triton.py::", "tests/test_backend_conformance.py::"], 2),
    Check("Triton nm_prune against the reference, bit for bit", ["tests/test_nm_prune_triton.py::"], 4),
    Check("optimizer and reference ops on CUDA tensors (against torch.optim.AdamW and Python peers)",
          ["tests/test_optimizer.py::", "tests/test_reference.py::"], 2),
    Check("pack24/unpack24 on CUDA byte-identical to the CPU path and to torch's conversion",
          ["tests/test_pack24.py::", "tests/test_gpu.py::test_pack24_", "tests/test_gpu.py::test_unpack24_"], 0),
    Check("packed 2:4 linear against dense",
          ["tests/test_export.py::test_packed_linear_matches_dense_on_gpu",
           "tests/test_gpu.py::test_sparse_linear_"], 0),
    Check("Megatron-Core on the GPU (NCCL, its DDP, grad scaler and clipping)", ["tests/test_megatron.py::"], 2),
]


def check_of(nodeid: str) -> Optional[Check]:
    """The first check whose prefixes match ``nodeid`` (None when none does)."""
    for check in CHECKS:
        if any(nodeid.startswith(p) for p in check.prefixes):
            return check
    return None


@dataclass
class Stage:
    """One stage: a time budget (seconds) and what it does."""

    name: str
    budget_s: int
    what: str


STAGES = [
    Stage("build", 100, "step_kernels._C with its CUDA sources, in place and incremental; pip -e --no-index if needed"),
    Stage("correctness", 200, "the test suite's CUDA items (bench/_gpu_pytest.py), pytest-xdist when present"),
    Stage("fused_step", 60, "bench.bench_fused_step_triton at 64M and 256M params"),
    Stage("pack24", 50, "bench.bench_pack24 on Llama-sized matrices (CUDA peers included)"),
    Stage("sparse_linear", 40, "bench.bench_sparse_linear on Llama FFN shapes"),
]

CUDA = torch.device("cuda")


def bench_chunks(name: str) -> Tuple[object, List[Dict]]:
    """A benchmark stage's module and the keyword sets of its ``run`` calls (one result chunk each)."""
    if name == "fused_step":
        module = importlib.import_module("bench.bench_fused_step_triton")
        return module, [{"count": 16}, {"count": 64}]  # 67M and 268M params of [4096, 1024]
    if name == "pack24":
        module = importlib.import_module("bench.bench_pack24")
        return module, [{"shapes": [s]} for s in module.shapes_for(CUDA, quick=False)]
    module = importlib.import_module("bench.bench_sparse_linear")
    return module, [{"shapes": [s]} for s in module.SHAPES]


# --------------------------------------------------------------------------------------------
# time estimates (the dry run's plan)
# --------------------------------------------------------------------------------------------


def estimate_build() -> Tuple[float, str]:
    """Seconds and a note: the slowest C++ file (all compile in parallel), link, pip -e."""
    seconds = SLOWEST_CXX_FILE_S + 5 + 10
    return seconds, (f"{len(_sources('.cpp'))} C++ files + {len(_sources('.cu'))} .cu (sm_80, sm_90) in parallel: "
                     f"slowest file {SLOWEST_CXX_FILE_S:.0f} s + link 5 s + pip -e 10 s")


def _sources(ext: str) -> List[str]:
    return sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(ext))


def estimate_correctness(nodeids: List[str], counts: Dict[str, int]) -> Tuple[float, str]:
    """Seconds and a note from the collected tests per check: Triton compiles, CPU-side inputs
    of the LLM-sized tests, worker start-up, spread over ``WORKERS`` processes."""
    from test_gpu import LLM_SHAPES

    compiles = sum(counts.get(c.label, 0) * c.compiles_per_test for c in CHECKS)
    llm_tests = len([n for n in nodeids if "_on_llm_shapes" in n])
    melem = sum(r * c for r, c in LLM_SHAPES) / 1e6
    cpu_inputs = llm_tests * melem * CPU_GEN_S_PER_MELEM  # each test makes one input per LLM shape
    seconds = 2 * PROCESS_START_S + (compiles * COMPILE_S + cpu_inputs + len(nodeids) * 0.05) / WORKERS
    return seconds, (f"{len(nodeids)} tests; ~{compiles} Triton compiles x {COMPILE_S} s; {llm_tests} LLM-sized "
                     f"tests with {melem:.1f}M-element CPU inputs ({cpu_inputs:.0f} s); / {WORKERS} workers; "
                     "GPU bytes < 10 GB (< 3 ms)")


def estimate_fused_step() -> Tuple[float, str]:
    """Seconds and a note: per size, 5 timed cases and 5 copies through do_bench, the compiles."""
    module, chunks = bench_chunks("fused_step")
    per_call = []
    for kwargs in chunks:
        params = kwargs["count"] * module.SHAPE[0] * module.SHAPE[1]
        per_call += [bpp * params / HBM_BYTES_PER_S for *_, bpp in module.CASES]
    timed = len(chunks) * 2 * (len(module.CASES) + 1)  # the cases, fused AdamW, a copy for each
    seconds = PROCESS_START_S + len(module.CASES) * COMPILE_S + timed * DO_BENCH_S
    return seconds, (f"{timed} do_bench runs; one call moves {min(per_call) * HBM_BYTES_PER_S / 1e9:.1f}-"
                     f"{max(per_call) * HBM_BYTES_PER_S / 1e9:.1f} GB = {1e3 * min(per_call):.2f}-"
                     f"{1e3 * max(per_call):.2f} ms at 4 TB/s")


def estimate_pack24() -> Tuple[float, str]:
    """Seconds and a note: CPU generation of each input, then 51 calls of each case (ours at the
    copy's speed, torch's reference conversion assumed 20 passes, the tile packer 2, cuSPARSELt 10)."""
    module, chunks = bench_chunks("pack24")
    passes = 1 + 1 + 20 + 2 + 10  # ours (pack, prune + pack), torch reference, tile, cuSPARSELt
    gpu, melem = 0.0, 0.0
    for kwargs in chunks:
        rows, cols = kwargs["shapes"][0]
        for elem_bytes in (2, 2, 1):
            nbytes = rows * cols * elem_bytes * 1.625  # dense read, half written, metadata
            gpu += 51 * passes * nbytes / HBM_BYTES_PER_S
            melem += rows * cols / 1e6
    seconds = PROCESS_START_S + melem * CPU_RANDN_S_PER_MELEM + gpu + 2
    return seconds, (f"{len(chunks)} shapes x 3 dtypes, {melem:.0f}M elements generated on the CPU "
                     f"({melem * CPU_RANDN_S_PER_MELEM:.1f} s), 51 calls per case: {gpu:.1f} s on the GPU")


def estimate_sparse_linear() -> Tuple[float, str]:
    """Seconds and a note: 51 dense and 51 sparse GEMMs per shape and dtype at the dense rate."""
    module, chunks = bench_chunks("sparse_linear")
    flops = sum(2 * t * i * o for kwargs in chunks for t, i, o in kwargs["shapes"])
    gemm = 2 * 2 * 51 * flops / GEMM_FLOP_PER_S  # 2 dtypes, dense + sparse
    seconds = PROCESS_START_S + gemm + 2
    return seconds, f"{len(chunks)} shapes x 2 dtypes, {flops / 1e12:.1f} TFLOP per pass set: {gemm:.1f} s of GEMMs"


# --------------------------------------------------------------------------------------------
# the dry run: plan, collection and consistency checks
# --------------------------------------------------------------------------------------------


def pytest_command(collect_only: bool, workers: int = 0) -> List[str]:
    """The correctness stage's pytest command line (``workers`` > 0 adds ``-n workers``)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "bench._gpu_pytest", "--gpu-only", "-p", "no:cacheprovider"]
    if collect_only:
        return cmd + ["--collect-only", "-q", "tests"]
    return cmd + (["-n", str(workers)] if workers else []) + ["-v", "-rfEs", "tests"]


def collect_gpu_tests() -> List[str]:
    """Node ids of the CUDA items, collected as a CUDA machine would (works without a GPU)."""
    env = dict(os.environ, **{_gpu_pytest.COLLECT_AS_CUDA: "1"})
    proc = subprocess.run(pytest_command(collect_only=True), cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"collecting the GPU tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def plan_problems(nodeids: List[str]) -> List[str]:
    """What is wrong with the plan: a named test not collected, a collected test outside every
    check, a benchmark or case the targets read that is missing, budgets over the total."""
    problems = []
    bases = {n.split("[")[0] for n in nodeids}
    for name in _gpu_pytest.GPU_ONLY_TESTS:
        if name not in bases:
            problems.append(f"GPU-only test {name} is not collected")
    for check in CHECKS:
        if not any(check_of(n) is check for n in nodeids):
            problems.append(f"check {check.label!r}: no test collected for {check.prefixes}")
    for n in nodeids:
        if check_of(n) is None:
            problems.append(f"{n} runs on CUDA but belongs to no check of bench/gpu_check.py")
    for stage in STAGES[2:]:
        module, chunks = bench_chunks(stage.name)
        missing = [a for a in ("NAME", "skip_reason", "run", "to_markdown") if not hasattr(module, a)]
        problems += [f"{module.__name__} has no {a}" for a in missing]
        params = inspect.signature(module.run).parameters
        for kwargs in chunks:
            problems += [f"{module.__name__}.run takes no {k!r}" for k in kwargs if k not in params]
    fused = importlib.import_module("bench.bench_fused_step_triton")
    labels = {case[0] for case in fused.CASES}
    problems += [f"bench_fused_step_triton has no case {c!r}" for c in FUSED_TARGET_CASES if c not in labels]
    if sum(s.budget_s for s in STAGES) + RESERVE_S > TOTAL_S:
        problems.append(f"stage budgets add up to more than {TOTAL_S - RESERVE_S} s")
    if len(STAGES) + 2 > MAX_RESULT_FILES:
        problems.append(f"more than {MAX_RESULT_FILES} result files")
    return problems


def dry_run(reason: str) -> int:
    """Print the plan with estimates, check it, and return the exit status (0 when it holds)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    nodeids = collect_gpu_tests()
    counts: Dict[str, int] = {}
    for n in nodeids:
        check = check_of(n)
        if check is not None:
            counts[check.label] = counts.get(check.label, 0) + 1
    estimates = {"build": estimate_build(), "correctness": estimate_correctness(nodeids, counts),
                 "fused_step": estimate_fused_step(), "pack24": estimate_pack24(),
                 "sparse_linear": estimate_sparse_linear()}
    print(f"GPU check plan: {len(STAGES)} stages, hard total {TOTAL_S} s; estimates for one H200 "
          f"(HBM ~{HBM_BYTES_PER_S / 1e12:.0f} TB/s, GEMM ~{GEMM_FLOP_PER_S / 1e12:.0f} TFLOP/s, "
          f"{WORKERS} test workers)")
    print("| stage | budget s | est. H200 s | what | estimate from |\n|---|---|---|---|---|")
    for stage in STAGES:
        seconds, note = estimates[stage.name]
        print(f"| {stage.name} | {stage.budget_s} | {seconds:.0f} | {stage.what} | {note} |")
    total = sum(s for s, _ in estimates.values())
    print(f"| total | {sum(s.budget_s for s in STAGES)} | {total:.0f} | + {RESERVE_S} s for the summary | |")
    print(f"\ncorrectness: {len(nodeids)} CUDA tests collected (as on a GPU machine)")
    for check in CHECKS:
        print(f"  {counts.get(check.label, 0):4d}  {check.label}")
    for stage in STAGES[2:]:
        module, chunks = bench_chunks(stage.name)
        print(f"{stage.name}: {module.__name__}.run(cuda, quick=False, **kw) for kw in {chunks}")
    problems = plan_problems(nodeids)
    if total > TOTAL_S:
        problems.append(f"the estimates add up to {total:.0f} s, over {TOTAL_S} s")
    for p in problems:
        print(f"PLAN PROBLEM: {p}")
    if problems:
        return 1
    print(f"\n{reason}: dry run only; the plan holds ({len(nodeids)} tests in {len(CHECKS)} checks collected, "
          f"{len(STAGES) - 2} benchmarks found, estimated {total:.0f} s of {TOTAL_S} s)")
    return 0


# --------------------------------------------------------------------------------------------
# running on a GPU
# --------------------------------------------------------------------------------------------


def run_streamed(cmd: List[str], env: Dict[str, str], timeout_s: float, log_path: str,
                 on_line: Callable[[str], None]) -> Optional[int]:
    """Run ``cmd`` in its own process group, echo and log every line and hand it to ``on_line``;
    kill the group after ``timeout_s``. Returns the exit status, None on a timeout."""
    deadline = time.monotonic() + max(1.0, timeout_s)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    with open(log_path, "a", buffering=1) as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.write(f"killed after {timeout_s:.0f} s\n")
                return None
            if line is None:
                return proc.wait()
            log.write(line)
            if not line.startswith(ROW_TAG):
                print(f"  {line}", end="", flush=True)
            on_line(line.rstrip("\n"))


@dataclass
class Results:
    """Everything the run found so far; written to ``gpu_check.json`` and ``gpu_check.md``."""

    out: str
    meta: Dict
    stages: Dict[str, Dict] = field(default_factory=dict)
    tests: Dict[str, str] = field(default_factory=dict)  # node id -> PASSED, FAILED, SKIPPED, ERROR
    rows: Dict[str, List[Dict]] = field(default_factory=dict)  # benchmark stage -> result rows

    def write(self) -> None:
        """Rewrite both result files with what is known now."""
        data = {"meta": self.meta, "stages": self.stages, "tests": self.tests, "benchmarks": self.rows,
                "targets": evaluate_targets(self)}
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write(markdown(self, data["targets"]))


OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def test_outcome(line: str) -> Optional[Tuple[str, str]]:
    """``(node id, outcome)`` from a ``pytest -v`` line, serial or pytest-xdist form."""
    node = re.search(r"(tests/\S+::\S+)", line)
    outcome = OUTCOME.search(line)
    if node and outcome:
        return node.group(1), outcome.group(1)
    return None


def gpu_env() -> Dict[str, str]:
    """This environment without ``TRITON_INTERPRET``: the kernels must run compiled, on the GPU."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def build_stage(timeout_s: float, results: Results) -> Optional[int]:
    """Build the extension in place (offline), install editable only if needed, check CUDA ops."""
    log = os.path.join(results.out, "build.log")
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 8), PIP_NO_INDEX="1")
    start = time.monotonic()
    status = run_streamed([sys.executable, "setup.py", "build_ext", "--inplace"], env, timeout_s, log, lambda _: None)
    if status != 0:
        return status
    probe = [sys.executable, "-c", "import step_kernels.triton_kernels"]
    if subprocess.run(probe, cwd=ROOT, capture_output=True).returncode != 0:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."]
        status = run_streamed(pip, dict(env, STEP_KERNELS_NO_EXTENSION="1"), timeout_s - (time.monotonic() - start),
                              log, lambda _: None)
        if status != 0:
            return status
    check = ("import torch, step_kernels.triton_kernels; from step_kernels import _extension; "
             "assert _extension.missing_reason() is None, _extension.missing_reason(); "
             "assert torch._C._dispatch_has_kernel_for_dispatch_key('step_kernels::pack24', 'CUDA'), "
             "'step_kernels._C has no CUDA kernels (see the build log)'; print('extension with CUDA kernels: ok')")
    return run_streamed([sys.executable, "-c", check], env, max(5.0, timeout_s - (time.monotonic() - start)), log,
                        lambda _: None)


def correctness_stage(timeout_s: float, results: Results) -> Optional[int]:
    """The CUDA items of the test suite, outcomes recorded as they come."""
    workers = WORKERS if importlib.util.find_spec("xdist") else 0
    if not workers:
        print("pytest-xdist not installed: the tests run in one process")
    if importlib.util.find_spec("megatron") is None:
        print("megatron-core not installed: its GPU tests are skipped")
    env = dict(gpu_env(), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 16) // max(1, workers))))
    last_write = [0.0]

    def on_line(line: str) -> None:
        found = test_outcome(line)
        if found:
            results.tests[found[0]] = found[1]
            if time.monotonic() - last_write[0] > 1.0:
                results.write()
                last_write[0] = time.monotonic()

    return run_streamed(pytest_command(False, workers), env, timeout_s, os.path.join(results.out, "correctness.log"),
                        on_line)


def bench_stage(name: str, timeout_s: float, results: Results) -> Optional[int]:
    """One benchmark module in a subprocess; each row is recorded and written as it arrives."""
    rows = results.rows.setdefault(name, [])

    def on_line(line: str) -> None:
        if line.startswith(ROW_TAG):
            rows.append(json.loads(line[len(ROW_TAG):]))
            results.write()

    cmd = [sys.executable, "-m", "bench.gpu_check", "--bench", name]
    return run_streamed(cmd, gpu_env(), timeout_s, os.path.join(results.out, f"{name}.log"), on_line)


def bench_main(name: str) -> int:
    """``--bench NAME`` (internal): run one benchmark stage's chunks, printing tagged rows."""
    module, chunks = bench_chunks(name)
    reason = module.skip_reason(CUDA)
    if reason:
        print(f"{module.NAME}: not run: {reason}")
        return 1
    for kwargs in chunks:
        for row in module.run(CUDA, False, progress=print, **kwargs):
            print(ROW_TAG + json.dumps(row, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# targets and the summary
# --------------------------------------------------------------------------------------------

ISSUE3 = "issue 3"
NOTES = "notes/performance.md s7 (suggested)"
FUSED_TARGET_CASES = ["step phase 2 fp32 model", "step phase 2 bf16 model, bf16 p"]


def evaluate_targets(results: Results) -> List[Dict]:
    """Every target with its source, what was measured and ``pass``/``FAIL``/``not run``/``info``."""
    out = []

    def add(target, source, measured, ok):
        status = "not run" if ok is None else ok if isinstance(ok, str) else ("pass" if ok else "FAIL")
        out.append({"target": target, "source": source, "measured": measured, "status": status})

    # pytest's exit status 0 or 1 means every collected test ran (1: some failed)
    complete = results.stages.get("correctness", {}).get("code") in (0, 1)
    for check in CHECKS:
        found = [o for n, o in results.tests.items() if check_of(n) is check]
        count = {o: found.count(o) for o in sorted(set(found))}
        measured = ", ".join(f"{v} {k.lower()}" for k, v in count.items()) or "-"
        bad = count.get("FAILED", 0) + count.get("ERROR", 0)
        if bad:
            ok = False
        elif not found:
            ok = None
        elif count.get("PASSED", 0) == 0:
            ok = "skipped"
        else:
            ok = True if complete else "incomplete"
        add(check.label, "issue 16", measured, ok)
    fused = results.rows.get("fused_step", [])
    for size in sorted({r["params"] for r in fused}):
        by_case = {r["case"]: r for r in fused if r["params"] == size}
        for case in FUSED_TARGET_CASES:
            r = by_case.get(case)
            add(f"{case} >= 85% of a copy of the same bytes, {size / 1e6:.0f}M params", ISSUE3,
                f"{100 * r['copy_share']:.1f}% ({r['gbps']:.0f} GB/s)" if r else "-",
                r["copy_share"] >= 0.85 if r else None)
        r = by_case.get(FUSED_TARGET_CASES[1])
        add(f"{FUSED_TARGET_CASES[1]} (22 B/param) faster than fused AdamW (28 B/param), {size / 1e6:.0f}M", ISSUE3,
            f"{r['vs_adamw']:.2f}x AdamW's time" if r else "-", r["vs_adamw"] < 1.0 if r else None)
    if not fused:
        add("fused step phase 2 >= 85% of copy; bf16 phase 2 faster than fused AdamW", ISSUE3, "-", None)
    pack = [r for r in results.rows.get("pack24", []) if r["case"] == "ours: prune + pack" and r["dtype"] != "int8"]
    big = [r for r in pack if _shape_bytes(r) >= 64e6]
    if big:
        worst = min(big, key=lambda r: r["pct_roof"])
        add("pack24 prune + pack >= 70% of copy bandwidth for >= 64 MB inputs (fp16/bf16)", NOTES,
            f"lowest {worst['pct_roof']:.0f}% ({worst['shape']} {worst['dtype']})", worst["pct_roof"] >= 70)
    else:
        add("pack24 prune + pack >= 70% of copy bandwidth for >= 64 MB inputs (fp16/bf16)", NOTES, "-", None)
    llama = [r for r in pack if r["shape"] == "4096x14336" and r["dtype"] == "bfloat16"]
    add("pack24 prune + pack of a 4096x14336 bf16 weight <= 100 us", NOTES,
        f"{1e3 * llama[0]['ms']:.0f} us" if llama else "-", llama[0]["ms"] <= 0.1 if llama else None)
    linear = results.rows.get("sparse_linear", [])
    add("2:4 linear vs dense on FFN shapes (no target; H100 reports 1.0-1.2x)", NOTES,
        ", ".join(f"{r['shape']} {r['dtype']}: {r['speedup']:.2f}x" for r in linear) or "-",
        "info" if linear else None)
    total = results.meta.get("seconds")
    add(f"whole check within {TOTAL_S} s", "issue 16", f"{total:.0f} s" if total else "-",
        total <= TOTAL_S if total else None)
    return out


def _shape_bytes(row: Dict) -> float:
    rows, cols = map(int, row["shape"].split("x"))
    return rows * cols * (1 if row["dtype"] == "int8" else 2)


def markdown(results: Results, targets: List[Dict]) -> str:
    """The report: where and what ran, the stages, the targets, each benchmark's table, failures."""
    m = results.meta
    lines = [f"# GPU check on {m['device_name']}", "",
             f"commit `{m['commit']}`, {m['date']}, torch {m['torch']}, triton {m['triton']}, "
             f"nvcc {m['nvcc']}, driver {m['driver']}. Regenerate: `make gpu-check OUT=dir COMMIT=hash`.", "",
             "| stage | status | seconds | budget |", "|---|---|---|---|"]
    for stage in STAGES:
        s = results.stages.get(stage.name, {})
        seconds = s.get("seconds")
        lines.append(f"| {stage.name} | {s.get('status', 'not run')} | "
                     f"{'-' if seconds is None else f'{seconds:.0f}'} | {stage.budget_s} |")
    lines += ["", "| target | source | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['source']} | {t['measured']} | {t['status']} |" for t in targets]
    for name, rows in results.rows.items():
        if rows:
            module, _ = bench_chunks(name)
            lines += ["", f"## {name}", "", (module.__doc__ or "").strip().splitlines()[0], "",
                      module.to_markdown(rows)]
    failed = [n for n, o in results.tests.items() if o in ("FAILED", "ERROR")]
    if failed:
        lines += ["", "## failed tests", ""] + [f"- `{n}`" for n in failed]
    return "\n".join(lines) + "\n"


def print_summary(results: Results, targets: List[Dict]) -> None:
    """The last lines of the output: stages, then every target with its status."""
    m = results.meta
    print(f"\n=== GPU check summary: {m['device_name']}, commit {m['commit']}, {m['date']}, torch {m['torch']}, "
          f"triton {m['triton']} ===")
    for stage in STAGES:
        s = results.stages.get(stage.name, {})
        seconds = s.get("seconds")
        print(f"  {stage.name:<14} {s.get('status', 'not run'):<10} "
              f"{'-' if seconds is None else f'{seconds:5.0f} s'} of {stage.budget_s} s")
    width = max(len(t["target"]) for t in targets)
    for t in targets:
        print(f"  {t['status']:<10} {t['target']:<{width}}  {t['measured']}  [{t['source']}]")
    print(f"results: {os.path.join(results.out, 'gpu_check.json')} and gpu_check.md")


def _tool_version(cmd: List[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    found = re.search(pattern, out)
    return found.group(1) if found else "unknown"


def gpu_run(out: str, commit: Optional[str], only: Optional[List[str]]) -> int:
    """Run the stages on the CUDA device; returns the exit status."""
    start = time.monotonic()
    os.makedirs(out, exist_ok=True)
    meta = {"device_name": torch.cuda.get_device_name(0), "commit": commit or git_commit() or "unknown (pass COMMIT=)",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **versions(),
            "nvcc": _tool_version(["nvcc", "--version"], r"release ([\d.]+)"),
            "driver": _tool_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], r"(\S+)"),
            "cpu_count": os.cpu_count(), "total_budget_s": TOTAL_S}
    results = Results(out, meta)
    print(f"gpu check on {meta['device_name']}, commit {meta['commit']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, nvcc {meta['nvcc']}", flush=True)
    runners = {"build": build_stage, "correctness": correctness_stage}
    for stage in STAGES:
        if only and stage.name not in only:
            continue
        left = TOTAL_S - RESERVE_S - (time.monotonic() - start)
        timeout = min(stage.budget_s, left)
        if timeout < 5:
            results.stages[stage.name] = {"status": "no time"}
            continue
        print(f"\n[{stage.name}] budget {timeout:.0f} s: {stage.what}", flush=True)
        t0 = time.monotonic()
        try:
            runner = runners.get(stage.name)
            code = runner(timeout, results) if runner else bench_stage(stage.name, timeout, results)
            status = "timeout" if code is None else "passed" if code == 0 else f"failed ({code})"
        except Exception as exc:  # a broken stage is reported; the next one still runs
            code, status = None, f"error: {type(exc).__name__}: {exc}"
        results.stages[stage.name] = {"status": status, "code": code, "seconds": time.monotonic() - t0,
                                      "budget_s": stage.budget_s}
        print(f"[{stage.name}] {status} in {time.monotonic() - t0:.0f} s", flush=True)
        results.write()
    results.meta["seconds"] = time.monotonic() - start
    results.write()
    targets = evaluate_targets(results)
    print_summary(results, targets)
    stage_bad = any(s["status"] != "passed" for s in results.stages.values())
    test_bad = any(t["status"] == "FAIL" for t in targets if t["source"] == "issue 16")
    return 1 if stage_bad or test_bad else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check-out", help="directory for gpu_check.json, .md and the logs")
    parser.add_argument("--commit", default=None, help="the commit checked (default: git's HEAD, when .git is there)")
    parser.add_argument("--dry-run", action="store_true", help="print and check the plan only, even on a GPU")
    parser.add_argument("--only", default=None, help="comma-separated stages, for a rerun: " +
                        ",".join(s.name for s in STAGES))
    parser.add_argument("--bench", default=None, help=argparse.SUPPRESS)  # internal: one benchmark stage
    args = parser.parse_args(argv)
    if args.bench:
        return bench_main(args.bench)
    only = args.only.split(",") if args.only else None
    unknown = set(only or []) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"--only: unknown stage(s) {sorted(unknown)}")
    if args.dry_run or not torch.cuda.is_available():
        return dry_run("dry run requested" if args.dry_run and torch.cuda.is_available() else "no CUDA device")
    return gpu_run(os.path.abspath(args.out), args.commit, only)


if __name__ == "__main__":
    sys.exit(main())
