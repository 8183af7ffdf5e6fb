"""Optimizer step: every backend and recipe phase vs ``torch.optim.AdamW`` and a copy roof.

For each parameter count (a transformer-shaped set of Linear weights, 2:4 targets, plus LayerNorm
vectors) this measures one ``opt.step()`` of STEP for each available backend in each phase
(dense, STEP phase 1, STEP phase 2, SR-STE; fp32 and bf16 models), torch's AdamW (foreach and
fused) on the same fp32 parameters, and a memory copy that moves the same number of bytes as each
case. It reports the median time, the effective GB/s (minimal bytes read + written / time), the
share of the copy roof and the kernel launches per step.

Run alone: ``python -m bench.bench_optimizer_step [--quick] [--device cuda]``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import step_kernels
from step_kernels import STEP, AutoSwitch

from ._common import copy_of_bytes, interleaved_medians, markdown_table, standalone_main

NAME = "optimizer_step"
GB = 1e9


@dataclass(frozen=True)
class Case:
    """One optimizer configuration to time."""

    label: str
    recipe: str  # "dense" | "step" | "srste" | "adamw-foreach" | "adamw-fused"
    phase: Optional[str] = None  # for "step": "dense" (phase 1) or "sparse" (phase 2)
    model_dtype: torch.dtype = torch.float32
    precond_dtype: torch.dtype = torch.float32
    sparsity: str = "2:4"  # N:M of the Linear weights (STEP's targets)


CASES = [
    Case("adamw foreach fp32", "adamw-foreach"),
    Case("adamw fused fp32", "adamw-fused"),
    Case("dense fp32", "dense"),
    Case("step phase 1 fp32", "step", "dense"),
    Case("step phase 2 fp32", "step", "sparse"),
    Case("step phase 2 fp32, bf16 precond", "step", "sparse", torch.float32, torch.bfloat16),
    Case("srste fp32", "srste"),
    Case("step phase 1 bf16", "step", "dense", torch.bfloat16),
    Case("step phase 2 bf16, bf16 precond", "step", "sparse", torch.bfloat16, torch.bfloat16),
]


def transformer_shapes(n_params: int) -> List[tuple]:
    """Linear weight shapes ([out, in]) and LayerNorm vectors of a GPT-like stack of ~n_params."""
    d = 256 if n_params <= 4e6 else 512 if n_params <= 16e6 else 1024 if n_params <= 64e6 else 2048
    layers = max(1, round(n_params / (12 * d * d)))
    shapes: List[tuple] = []
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,), (d,), (d,)]
    return shapes


def make_params(shapes: List[tuple], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Parameters with fixed random values and grads (grads in the parameter dtype)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def build(case: Case, params: List[torch.nn.Parameter], backend: Optional[str]):
    """The optimizer of ``case`` over ``params``, already in the phase to time."""
    if case.recipe == "adamw-foreach":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
    if case.recipe == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    groups = [{"params": [p for p in params if p.dim() == 2], "sparsity": case.sparsity, "nm_dim": 1},
              {"params": [p for p in params if p.dim() == 1]}]
    # Phase 1 is timed with AutoSwitch running (it sums A and S every step) but never switching.
    switch = 1 if case.phase == "sparse" else AutoSwitch(min_step=10**9, max_step=10**9)
    opt = STEP(groups, lr=1e-3, weight_decay=0.01, recipe=case.recipe, backend=backend,
               switch=switch if case.recipe == "step" else None, precond_dtype=case.precond_dtype)
    opt.step()  # creates the state; for phase 2 the switch happens at the end of this step
    if case.phase is not None:
        assert opt.phase == case.phase, (case, opt.phase)
    return opt


def step_bytes(opt, case: Case) -> int:
    """Minimal bytes one step reads and writes (each operand read once, each result written once)."""
    if not isinstance(opt, STEP):
        return sum(28 * p.numel() for g in opt.param_groups for p in g["params"])
    total = 0
    for group in opt.param_groups:
        frozen = opt.recipe == "step" and opt.phase == "sparse" and group.get("sparsity") is not None
        for p in group["params"]:
            state = opt.state[p]
            n = p.numel()
            second = state["precond"] if frozen else state["exp_avg_sq"]
            reads = 4 + p.grad.element_size() + 4 + second.element_size()
            writes = 4 + 4 + (0 if frozen else 4)
            if "master" in state:
                writes += p.element_size()
            total += n * (reads + writes)
    return total


def backends_for(device: torch.device) -> List[str]:
    """The STEP backends that run on ``device`` here (the Triton interpreter is not benchmarked)."""
    out = []
    for name in ("triton", "cpu", "reference"):
        if name == "triton" and device.type != "cuda":
            continue
        if name == "cpu" and device.type != "cpu":
            continue
        try:
            step_kernels.resolve_backend(name, device)
        except step_kernels.BackendUnavailableError:
            continue
        out.append(name)
    return out


def sizes_for(device: torch.device, quick: bool) -> List[int]:
    """Parameter counts: up to 64M on CPU, 256M on GPU."""
    if device.type == "cuda":
        return [2**20, 2**24] if quick else [2**20, 2**22, 2**24, 2**26, 2**28]
    return [2**20, 2**22] if quick else [2**20, 2**22, 2**24, 2**26]


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> List[Dict]:
    """Time every case on ``device``; one result dict per (size, case, backend)."""
    reps = (5 if quick else 20) if device.type == "cuda" else (3 if quick else 5)
    results = []
    for size in sizes_for(device, quick):
        shapes = transformer_shapes(size)
        for case in CASES:
            case_backends = [None] if case.recipe.startswith("adamw") else backends_for(device)
            for backend in case_backends:
                if case.recipe.startswith("adamw") and case.model_dtype != torch.float32:
                    continue
                params = make_params(shapes, case.model_dtype, device)
                numel = sum(p.numel() for p in params)
                opt = build(case, params, backend)
                nbytes = step_bytes(opt, case)
                timings = interleaved_medians({"step": opt.step, "copy": copy_of_bytes(nbytes, device)},
                                              device, reps=reps)
                roof = timings["copy"]
                launches = opt.stats()["kernel_launches"] if isinstance(opt, STEP) else None
                row = {
                    "bench": NAME, "device": device.type, "params": numel, "case": case.label,
                    "backend": backend or "torch", "ms": timings["step"],
                    "bytes_per_param": nbytes / numel, "gbps": nbytes / (timings["step"] * 1e-3) / GB,
                    "copy_gbps": nbytes / (roof * 1e-3) / GB, "launches": launches,
                    "threads": torch.get_num_threads() if device.type == "cpu" else None,
                }
                row["pct_roof"] = 100.0 * row["gbps"] / row["copy_gbps"]
                results.append(row)
                progress(f"  {numel / 1e6:7.1f}M  {case.label:<34} {row['backend']:<9} "
                         f"{row['ms']:9.2f} ms {row['gbps']:7.1f} GB/s ({row['pct_roof']:5.1f}% of copy)")
                del opt, params
    _add_peer_ratios(results)
    return results


def _add_peer_ratios(results: List[Dict]) -> None:
    """``vs_fused``: time relative to fused AdamW on the same set (None where it was not run)."""
    peer = {(r["device"], r["params"]): r["ms"] for r in results if r["case"] == "adamw fused fp32"}
    for r in results:
        base = peer.get((r["device"], r["params"]))
        r["vs_fused"] = r["ms"] / base if base else None


def to_markdown(results: List[Dict]) -> str:
    """A table per device, rows by size then case."""
    columns = [
        ("params", lambda r: f"{r['params'] / 1e6:.1f}M", None), ("case", "case", None),
        ("backend", "backend", None), ("ms", "ms", ".2f"), ("B/param", "bytes_per_param", ".0f"),
        ("GB/s", "gbps", ".1f"), ("% of copy", "pct_roof", ".0f"), ("x fused AdamW", "vs_fused", ".2f"),
        ("launches", "launches", None),
    ]
    return markdown_table(results, columns)


def plot(results: List[Dict], path: str) -> None:
    """GB/s against parameter count, one line per (case, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines: Dict[tuple, List[tuple]] = {}
    for r in results:
        lines.setdefault((r["case"], r["backend"]), []).append((r["params"], r["gbps"]))
    for (case, backend), pts in sorted(lines.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker=".", label=f"{case} [{backend}]")
    copy = sorted({(r["params"], r["copy_gbps"]) for r in results if r["case"] == "adamw fused fp32"})
    if copy:
        ax.plot(*zip(*copy), "k--", label="copy of the same bytes")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parameters")
    ax.set_ylabel("effective GB/s")
    ax.set_title("optimizer step")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
