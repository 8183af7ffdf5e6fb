"""``python -m bench`` (``make bench``): run every benchmark this machine supports and write a report.

Writes ``bench/results/<machine>.json`` (machine, versions, git commit, every result row) and
``bench/results/<machine>.md`` (one table per benchmark) plus a PNG plot per benchmark that has
one. ``--quick`` keeps sizes small (under 3 minutes on 2 CPU cores) and writes
``<machine>-quick.*`` instead, so a quick look never replaces a machine's full results;
``--only a,b`` picks benchmarks by name. Nothing outside the output folder changes unless
``--write-docs`` is given (full runs only): then docs/benchmarks.md and the README's per-variant
CPU table are regenerated from every machine's full report (``bench/readme.py``). No benchmark run
writes the rest of the README.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Dict, List

import torch

from . import readme
from ._common import cpu_model, git_commit, machine_name, versions

# Benchmark modules in report order. Each has NAME, run(device, quick, progress) -> rows,
# to_markdown(rows), optionally plot(rows, path) and skip_reason(device) -> Optional[str].
MODULES = ["bench.bench_optimizer_step", "bench.bench_fused_step_triton", "bench.bench_fused_step_cpu",
           "bench.bench_pack24", "bench.bench_sparse_linear", "bench.static_kernels"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _previous_seconds(path: str) -> Dict[str, float]:
    """Seconds per benchmark in the last report at ``path`` (skipped ones count 0), or {}."""
    try:
        with open(path) as f:
            benchmarks = json.load(f)["benchmarks"]
    except (OSError, ValueError, KeyError):
        return {}
    return {name: entry.get("seconds", 0.0) for name, entry in benchmarks.items()}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under 3 minutes on 2 CPU cores")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS_DIR, help="directory for the .json, .md and .png files")
    parser.add_argument("--write-docs", action="store_true",
                        help="after a full run, regenerate docs/benchmarks.md and the README's CPU variant "
                             "table from every machine's full report")
    args = parser.parse_args(argv)
    if args.write_docs and (args.quick or args.only):
        parser.error("--write-docs publishes full runs only: drop --quick and --only")
    device = torch.device(args.device)
    modules = [importlib.import_module(name) for name in MODULES]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.NAME for m in modules}
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {sorted(unknown)}; known: {[m.NAME for m in modules]}")
        modules = [m for m in modules if m.NAME in wanted]

    machine = machine_name(device)
    stem = f"{machine}-quick" if args.quick else machine
    meta = {
        "machine": machine, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_threads": torch.get_num_threads(), "quick": args.quick, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **versions(),
    }
    print(f"bench on {meta['device_name']} ({machine}), torch {meta['torch']}, triton {meta['triton']}, "
          f"commit {meta['commit']}{', quick' if args.quick else ''}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {"meta": meta, "benchmarks": {}}
    sections = [f"# Benchmarks on {meta['device_name']} (`{machine}`)\n",
                f"torch {meta['torch']}, triton {meta['triton']}, commit `{meta['commit']}`, "
                f"{meta['date']}, {'quick' if args.quick else 'full'} run, "
                f"{meta['cpu_threads']} CPU threads. Regenerate: `python -m bench"
                f"{' --quick' if args.quick else ''}`.\n"]
    previous = _previous_seconds(os.path.join(args.out, f"{stem}.json"))
    for index, module in enumerate(modules, start=1):
        left = [previous.get(m.NAME) for m in modules[index - 1:]]
        eta = f", about {sum(left):.0f} s left by the last run" if left and None not in left else ""
        print(f"[{index}/{len(modules)}] {module.NAME}{eta}", flush=True)
        skip = getattr(module, "skip_reason", lambda d: None)(device)
        if skip:
            print(f"[{module.NAME}] skipped: {skip}", flush=True)
            report["benchmarks"][module.NAME] = {"skipped": skip}
            sections.append(f"## {module.NAME}\n\nNot run: {skip}\n")
            continue
        start = time.perf_counter()
        rows = module.run(device, args.quick, progress=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
        report["benchmarks"][module.NAME] = {"seconds": seconds, "rows": rows}
        sections.append(f"## {module.NAME}\n\n{(module.__doc__ or '').strip().splitlines()[0]}\n\n"
                        f"{module.to_markdown(rows)}\n")
        if hasattr(module, "plot") and rows:
            png = os.path.join(args.out, f"{stem}-{module.NAME}.png")
            module.plot(rows, png)
            sections.append(f"![{module.NAME}]({os.path.basename(png)})\n")
        print(f"[{module.NAME}] {seconds:.0f} s", flush=True)
    json_path = os.path.join(args.out, f"{stem}.json")
    md_path = os.path.join(args.out, f"{stem}.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write("\n".join(sections))
    print(f"wrote {json_path} and {md_path}")
    if args.write_docs:
        print(f"wrote {readme.write_docs(results_dir=args.out)}")
        print(f"wrote {readme.write_readme(results_dir=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
