"""CPU fused step (backend "cpu") vs ``torch.optim.AdamW(fused=True)``, at 1 and 2 threads.

One transformer-shaped set (Linear weights with 2:4 targets plus LayerNorm vectors, >= 32M
parameters by default) is stepped by STEP in three configurations and by the peer, fused AdamW on
fp32 parameters and grads, interleaved round-robin in one run: STEP phase 2 on an fp32 model
(28 B/param, target <= 1.30x the peer), phase 2 on a bf16 model with a bf16 preconditioner
(22 B/param, target <= 1.10x), phase 1 on an fp32 model with the AutoSwitch sums (28 B/param,
target <= 1.15x), plus the reference backend on phase 2 fp32 (target: the cpu backend >= 20x
faster), and a memory copy of 28 B/param (the bandwidth roof: if 2 threads nearly halve the
time of every kernel but not of the copy, the machine is core-bound).

Run alone: ``python -m bench.bench_fused_step_cpu [--quick] [--params N] [--reps R] [--threads 1 2]``.
"""

from __future__ import annotations

import argparse
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


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> List[Dict]:
    """The ``python -m bench`` entry: 1 and 2 threads, 2**25 parameters (2**22 when quick)."""
    if quick:
        return run_threads(n_params=2**22, reps=3, reference_reps=1, progress=progress)
    return run_threads(progress=progress)


def to_markdown(results: List[Dict]) -> str:
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
    parser.add_argument("--params", type=int, default=2**25, help="parameter count of the set")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (the median is kept)")
    parser.add_argument("--reference-reps", type=int, default=2, help="0 skips the slow reference backend")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.reps, args.reference_reps = 2**22, 3, 1
    reason = skip_reason(torch.device("cpu"))
    if reason:
        raise SystemExit(f"{NAME}: {reason}")
    print(to_markdown(run_threads(args.threads, args.params, args.reps, args.reference_reps)))


if __name__ == "__main__":
    main()
