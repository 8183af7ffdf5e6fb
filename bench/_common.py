"""Timing, machine identity and byte accounting shared by the benchmarks."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch


def machine_name(device: torch.device) -> str:
    """A file-name-safe name of the machine that runs ``device`` work, e.g. ``cpu-x86_64-2c``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def versions() -> Dict[str, Optional[str]]:
    """torch and triton versions (triton None when it is not installed)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> List[float]:
    """Wall time of each of ``reps`` calls of ``fn`` in milliseconds (after ``warmup`` calls).

    On CUDA each call is bracketed by events; on CPU by ``perf_counter``. Callers report the
    median and may interleave several functions by calling this with ``reps=1`` in a loop.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                        warmup: int = 1) -> Dict[str, float]:
    """Median milliseconds of each function, measured round-robin so drift hits all alike."""
    for fn in fns.values():
        time_ms(fn, device, reps=0, warmup=warmup)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].extend(time_ms(fn, device, reps=1, warmup=0))
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_of_bytes(nbytes: int, device: torch.device) -> Callable[[], object]:
    """A memory copy that moves ``nbytes`` in total (half read, half written): the roof."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def markdown_table(rows: List[Dict], columns: List[tuple]) -> str:
    """A markdown table of ``rows``; ``columns`` are ``(header, key or callable, format)``."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            value = key(r) if callable(key) else r.get(key)
            cells.append("-" if value is None else (format(value, fmt) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standalone_main(module, argv=None) -> None:
    """``python -m bench.<module>``: run one benchmark module alone and print its table.

    ``module`` follows the protocol of ``bench/__main__.py`` (``run``, ``to_markdown`` and
    optionally ``skip_reason``); ``--device`` defaults to CUDA when present.
    """
    parser = argparse.ArgumentParser(description=(module.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reason = getattr(module, "skip_reason", lambda d: None)(device)
    if reason:
        raise SystemExit(f"{module.NAME}: not run: {reason}")
    print(module.to_markdown(module.run(device, args.quick)))
