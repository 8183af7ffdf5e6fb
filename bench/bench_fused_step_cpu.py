"""CPU fused step (backend "cpu") vs ``torch.optim.AdamW(fused=True)``, at 1 and 2 threads.

One transformer-shaped set (Linear weights with 2:4 targets plus LayerNorm vectors, >= 32M
parameters by default) is stepped by STEP in three configurations and by the peer, fused AdamW on
fp32 parameters and grads, interleaved round-robin in one run: STEP phase 2 on an fp32 model
(28 B/param, target <= 1.30x the peer), phase 2 on a bf16 model with a bf16 preconditioner
(22 B/param, target <= 1.10x), phase 1 on an fp32 model with the AutoSwitch sums (28 B/param,
target <= 1.15x), plus the reference backend on phase 2 fp32 (target: the cpu backend >= 20x
faster), and a memory copy of 28 B/param (the bandwidth roof: if 2 threads nearly halve the
time of every kernel but not of the copy, the machine is core-bound).

Then every instruction-set variant of the kernel (``STEP_KERNELS_CPU_ISA``: avx512, avx2,
baseline), each in its own process at 1 thread, against the peer at the matching
``ATEN_CPU_CAPABILITY`` (avx512, avx2, default; torch reads it once a process, hence the processes):
phase 2 fp32 and phase 2 bf16 with a bf16 preconditioner at 2:4 and at 1:8, and phase 1 fp32, as x
fused AdamW; three processes per variant (quick: one), interleaved, each case the median of them.
A variant this build lacks or this CPU cannot run is reported as such.

Run alone: ``python -m bench.bench_fused_step_cpu [--quick] [--params N] [--reps R] [--threads 1 2]``;
the variants alone: ``python -m bench.bench_fused_step_cpu --isas [--params N] [--reps R] [--processes P]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

import step_kernels

from ._common import copy_of_bytes, interleaved_medians, markdown_table
from .bench_optimizer_step import Case, build, make_params, step_bytes, transformer_shapes

NAME = "fused_step_cpu"
GB = 1e9
PEER = Case("adamw fused fp32", "adamw-fused")
# (case, ratio target vs the peer: the time of ours / the time of fused AdamW)
CASES = [
    (Case("step phase 2 fp32", "step", "sparse"), 1.30),
    # The accuracy study's bf16-preconditioner ablation asks what the 2 bytes/param it saves are worth.
    (Case("step phase 2 fp32, bf16 precond", "step", "sparse", torch.float32, torch.bfloat16), 1.30),
    (Case("step phase 2 bf16, bf16 precond", "step", "sparse", torch.bfloat16, torch.bfloat16), 1.10),
    (Case("step phase 1 fp32", "step", "dense"), 1.15),
]
REFERENCE_CASE = Case("step phase 2 fp32", "step", "sparse")
# The kernel's variants (STEP_KERNELS_CPU_ISA) and the peer's matching ATEN_CPU_CAPABILITY.
ISAS = [("avx512", "avx512"), ("avx2", "avx2"), ("baseline", "default")]
# The cases of the per-variant table, in its column order: phase 2 at 2:4 and at 1:8 (the
# selection's cost grows with M: 2 and 4 rotations a group on AVX2), phase 1 (no selection).
ISA_CASES = [CASES[0][0], Case("step phase 2 fp32 1:8", "step", "sparse", sparsity="1:8"), CASES[2][0],
             Case("step phase 2 bf16, bf16 precond 1:8", "step", "sparse", torch.bfloat16, torch.bfloat16, "1:8"),
             CASES[3][0]]
ISA_CHILD_TIMEOUT_S = 900


def skip_reason(device: torch.device) -> Optional[str]:
    """Why this benchmark cannot run on ``device`` (None when it can)."""
    if device.type != "cpu":
        return "the 'cpu' backend runs on CPU tensors"
    try:
        step_kernels.resolve_backend("cpu", device)
    except step_kernels.BackendUnavailableError as exc:
        return str(exc)
    return None


def _row(case: str, backend: str, ms: float, nbytes: int, numel: int, peer_ms: Optional[float],
         threads: int, target: Optional[float] = None) -> Dict:
    return {
        "bench": NAME, "case": case, "backend": backend, "ms": ms, "params": numel,
        "bytes_per_param": nbytes / numel, "gbps": nbytes / (ms * 1e-3) / GB,
        "ratio_vs_peer": ms / peer_ms if peer_ms else None, "target": target, "threads": threads,
    }


def measure(threads: int, n_params: int, reps: int, reference_reps: int,
            progress: Callable[[str], None] = print) -> List[Dict]:
    """Rows for one thread count: the peer, each case on the cpu backend, the reference, a copy."""
    device = torch.device("cpu")
    torch.set_num_threads(threads)
    shapes = transformer_shapes(n_params)
    peer_params = make_params(shapes, torch.float32, device)
    numel = sum(p.numel() for p in peer_params)
    peer = build(PEER, peer_params, None)
    opts = {case.label: build(case, make_params(shapes, case.model_dtype, device), "cpu") for case, _ in CASES}
    fns = {PEER.label: peer.step, **{label: opt.step for label, opt in opts.items()},
           "copy 28 B/param": copy_of_bytes(28 * numel, device)}
    ms = interleaved_medians(fns, device, reps=reps)
    peer_ms = ms[PEER.label]
    rows = [_row(PEER.label, "torch", peer_ms, step_bytes(peer, PEER), numel, peer_ms, threads)]
    for case, target in CASES:
        rows.append(_row(case.label, "cpu", ms[case.label], step_bytes(opts[case.label], case), numel,
                         peer_ms, threads, target))
    rows.append(_row("copy 28 B/param", "torch", ms["copy 28 B/param"], 28 * numel, numel, peer_ms, threads))
    del opts
    if reference_reps:
        ref = build(REFERENCE_CASE, make_params(shapes, torch.float32, device), "reference")
        ref_ms = interleaved_medians({"ref": ref.step}, device, reps=reference_reps)["ref"]
        cpu_ms = ms[REFERENCE_CASE.label]
        row = _row(REFERENCE_CASE.label, "reference", ref_ms, step_bytes(ref, REFERENCE_CASE), numel, peer_ms,
                   threads)
        row["speedup_of_cpu"] = ref_ms / cpu_ms
        rows.append(row)
    for r in rows:
        ratio = f"{r['ratio_vs_peer']:.2f}x peer" if r["ratio_vs_peer"] else ""
        progress(f"  {threads} thr {numel / 1e6:6.1f}M  {r['case']:<34} {r['backend']:<9} {r['ms']:9.2f} ms "
                 f"{r['gbps']:6.1f} GB/s {ratio}")
    return rows


def run_threads(thread_counts: Sequence[int] = (1, 2), n_params: int = 2**25, reps: int = 7,
                reference_reps: int = 2, progress: Callable[[str], None] = print) -> List[Dict]:
    """Result dicts {case, backend, ms, gbps, ratio_vs_peer, threads, ...} for each thread count,
    plus ``scaling`` (time at the fewest threads / time here) on every row."""
    before = torch.get_num_threads()
    try:
        rows = [r for t in thread_counts for r in measure(t, n_params, reps, reference_reps, progress)]
    finally:
        torch.set_num_threads(before)
    first = {(r["case"], r["backend"]): r["ms"] for r in rows if r["threads"] == min(thread_counts)}
    for r in rows:
        r["scaling"] = first[(r["case"], r["backend"])] / r["ms"]
    return rows


def measure_this_isa(n_params: int, reps: int) -> List[Dict]:
    """Rows of the variant this process runs (``STEP_KERNELS_CPU_ISA``), at 1 thread: the peer at
    this process's ATen capability, then each of ``ISA_CASES``; ``isa`` and ``peer_capability``
    name what ran. One row with ``skipped`` when this build or CPU cannot run the variant asked for."""
    wanted = os.environ.get("STEP_KERNELS_CPU_ISA", "")
    reason = skip_reason(torch.device("cpu"))
    if reason is None:
        try:
            isa = torch.ops.step_kernels.fused_step_cpu_isa()
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
    if reason is not None:
        return [{"bench": NAME, "isa": wanted, "skipped": reason}]
    device = torch.device("cpu")
    torch.set_num_threads(1)
    shapes = transformer_shapes(n_params)
    peer_params = make_params(shapes, torch.float32, device)
    numel = sum(p.numel() for p in peer_params)
    peer = build(PEER, peer_params, None)
    opts = {case.label: build(case, make_params(shapes, case.model_dtype, device), "cpu") for case in ISA_CASES}
    ms = interleaved_medians({PEER.label: peer.step, **{label: opt.step for label, opt in opts.items()}}, device,
                             reps=reps)
    capability = torch.backends.cpu.get_cpu_capability().lower()
    rows = [_row(PEER.label, "torch", ms[PEER.label], step_bytes(peer, PEER), numel, ms[PEER.label], 1)]
    rows += [_row(case.label, "cpu", ms[case.label], step_bytes(opts[case.label], case), numel, ms[PEER.label], 1)
             for case in ISA_CASES]
    for r in rows:
        r.update(isa=isa, peer_capability=capability)
    return rows


def run_isas(n_params: int = 2**23, reps: int = 5, isas: Sequence[str] = tuple(name for name, _ in ISAS),
             processes: int = 3, progress: Callable[[str], None] = print) -> List[Dict]:
    """``measure_this_isa`` for each variant in ``isas``, each in a fresh interpreter started with
    ``STEP_KERNELS_CPU_ISA`` and the peer's matching ``ATEN_CPU_CAPABILITY`` set; ``processes``
    rounds over the variants, and each case keeps the median over its processes (``ratios`` lists
    every process's ratio). On the project's VM one process in a few runs every case of a variant
    20-30% slower than the others, so a single process per variant can misreport it."""
    capability = dict(ISAS)
    runs: Dict[str, List[List[Dict]]] = {isa: [] for isa in isas}
    for round_ in range(processes):
        for isa in isas:
            env = dict(os.environ, STEP_KERNELS_CPU_ISA=isa, ATEN_CPU_CAPABILITY=capability[isa], OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "bench.bench_fused_step_cpu", "--isa-child", "--params", str(n_params),
                   "--reps", str(reps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=ISA_CHILD_TIMEOUT_S,
                                  cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            if done.returncode != 0:
                raise RuntimeError(f"{NAME}: the {isa} process failed ({done.returncode}):\n{done.stderr[-4000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            for r in got:
                if r.get("skipped"):
                    progress(f"  isa {isa:<9} skipped: {r['skipped']}")
                else:
                    ratio = f"{r['ratio_vs_peer']:.2f}x peer at {r['peer_capability']}"
                    progress(f"  isa {isa:<9} {round_ + 1}/{processes} {r['params'] / 1e6:6.1f}M  {r['case']:<34} "
                             f"{r['ms']:9.2f} ms {ratio}")
            runs[isa].append(got)
    return [row for isa in isas for row in _median_rows(runs[isa])]


def _median_rows(runs: List[List[Dict]]) -> List[Dict]:
    """One row per case of one variant from several processes' rows (same cases, same order): the
    median time and the median ratio to the peer, every process's ratio in ``ratios``."""
    if runs[0][0].get("skipped"):
        return runs[0]
    merged = []
    for i, row in enumerate(runs[0]):
        ms = statistics.median(run[i]["ms"] for run in runs)
        ratios = [run[i]["ratio_vs_peer"] for run in runs]
        merged.append(dict(row, ms=ms, gbps=row["gbps"] * row["ms"] / ms, ratio_vs_peer=statistics.median(ratios),
                           ratios=ratios))
    return merged


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> List[Dict]:
    """The ``python -m bench`` entry: 1 and 2 threads, 2**25 parameters (2**22 when quick), then
    every variant at 1 thread, 2**23 parameters (2**20 when quick)."""
    if quick:
        rows = run_threads(n_params=2**22, reps=3, reference_reps=1, progress=progress)
        return rows + run_isas(n_params=2**20, reps=3, processes=1, progress=progress)
    return run_threads(progress=progress) + run_isas(progress=progress)


def isa_table(results: List[Dict]) -> str:
    """The per-variant table: one row per variant (``isa`` rows of ``results``), the time of each of
    ``ISA_CASES`` as x fused AdamW at the matching ATen capability, and the peer's ms."""
    by_isa: Dict[str, Dict] = {}
    for r in results:
        if "isa" in r:
            by_isa.setdefault(r["isa"], {"isa": r["isa"]}).update(
                {"skipped": r["skipped"]} if r.get("skipped") else {r["case"]: r})
    lines = ["| variant | peer: fused AdamW at | peer ms | " + " | ".join(c.label for c in ISA_CASES) + " |",
             "|---|---|---|" + "---|" * len(ISA_CASES)]
    for isa, entry in by_isa.items():
        if "skipped" in entry:
            lines.append(f"| {isa} | not run: {entry['skipped']} |" + " - |" * (len(ISA_CASES) + 1))
            continue
        peer = entry.get(PEER.label, {})
        cells = [f"{entry[c.label]['ratio_vs_peer']:.2f}" if c.label in entry else "-" for c in ISA_CASES]
        peer_cells = [peer.get("peer_capability", "-"), f"{peer['ms']:.2f}" if peer else "-"]
        lines.append("| " + " | ".join([isa] + peer_cells + cells) + " |")
    return "\n".join(lines)


def to_markdown(results: List[Dict]) -> str:
    """The thread-count table (rows by thread count then case), then the per-variant table."""
    thread_rows = [r for r in results if "isa" not in r]
    isa_rows = [r for r in results if "isa" in r]
    text = thread_table(thread_rows) if thread_rows else ""
    if isa_rows:
        params = next((r["params"] for r in isa_rows if "params" in r), None)
        size = f", {params / 1e6:.1f}M parameters" if params else ""
        text += (f"\n\nEach variant (`STEP_KERNELS_CPU_ISA`) in its own process at 1 thread{size}, as x "
                 f"`torch.optim.AdamW(fused=True)` at the matching `ATEN_CPU_CAPABILITY`:\n\n" + isa_table(isa_rows))
    return text.strip()


def thread_table(results: List[Dict]) -> str:
    """One table: rows by thread count then case."""
    columns = [
        ("threads", "threads", None), ("params", lambda r: f"{r['params'] / 1e6:.1f}M", None),
        ("case", "case", None), ("backend", "backend", None), ("ms", "ms", ".2f"),
        ("B/param", "bytes_per_param", ".0f"), ("GB/s", "gbps", ".1f"),
        ("x fused AdamW", "ratio_vs_peer", ".2f"), ("target", "target", ".2f"),
        ("speed-up vs 1 thread", "scaling", ".2f"), ("cpu backend faster by", "speedup_of_cpu", ".1f"),
    ]
    return markdown_table(results, columns)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2**22 parameters, 3 reps")
    parser.add_argument("--params", type=int, default=None,
                        help="parameter count of the set (default 2**25; with --isas 2**23)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (the median is kept)")
    parser.add_argument("--reference-reps", type=int, default=2, help="0 skips the slow reference backend")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--isas", action="store_true",
                        help="only the per-variant table (default 2**23 parameters), one process per variant")
    parser.add_argument("--processes", type=int, default=3,
                        help="--isas: processes per variant (each case keeps the median)")
    parser.add_argument("--isa-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.reps, args.reference_reps = 2**20 if args.isas else 2**22, 3, 1
    if args.params is None:
        args.params = 2**23 if args.isas else 2**25
    if args.isa_child:  # one variant, started by run_isas: its rows as JSON
        print(json.dumps(measure_this_isa(args.params, args.reps)))
        return
    reason = skip_reason(torch.device("cpu"))
    if reason:
        raise SystemExit(f"{NAME}: {reason}")
    if args.isas:
        print(to_markdown(run_isas(args.params, args.reps, processes=args.processes)))
        return
    print(to_markdown(run_threads(args.threads, args.params, args.reps, args.reference_reps)))


if __name__ == "__main__":
    main()
