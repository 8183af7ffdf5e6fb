"""2:4 packing: ours (pack only, and prune + pack in one pass) vs torch's conversions and a copy roof.

Peers: torch's reference CUTLASS conversion
(``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``, on any
device); on a GPU also ``torch._sparse_semi_structured_tile`` (prune + pack, both orientations)
and ``torch._cslt_compress`` (cuSPARSELt pack of an already 2:4 matrix). Bytes are the minimum one
orientation moves: read the dense matrix, write half of it plus the metadata (``meta.nbytes``:
1/8 of the dense bytes for 16-bit types, 1/16 for int8).

Run alone: ``python -m bench.bench_pack24 [--quick] [--device cuda]``.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch

from ._common import copy_of_bytes, interleaved_medians, markdown_table, standalone_main

NAME = "pack24"
GB = 1e9


def skip_reason(device: torch.device) -> Optional[str]:
    """Why this benchmark cannot run here (None when it can)."""
    from step_kernels import _extension

    if not _extension.has_op("pack24"):
        return f"the extension has no pack24 op ({_extension.missing_reason() or 'older build'})"
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("step_kernels::pack24", "CUDA"):
        return "the extension was built without CUDA sources"
    return None


def shapes_for(device: torch.device, quick: bool) -> List[tuple]:
    """LLM-shaped weights ``[out, in]``; the largest CPU shape keeps torch's reference under a minute."""
    if device.type == "cuda":
        return [(4096, 4096)] if quick else [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]
    return [(1024, 1024)] if quick else [(1024, 1024), (2048, 4096), (4096, 4096)]


def _pruned(dense: torch.Tensor) -> torch.Tensor:
    from step_kernels.reference import nm_prune

    return nm_prune(dense, 2, 4)[0]


def _cases(dense: torch.Tensor, pruned: torch.Tensor) -> Dict[str, Callable[[], object]]:
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    from step_kernels import pack24

    cases = {
        "ours: pack": lambda: pack24(pruned),
        "ours: prune + pack": lambda: pack24(dense, prune=True),
        "torch reference conversion (pack)": lambda: sparse_semi_structured_from_dense_cutlass(pruned),
    }
    if dense.is_cuda and dense.dtype != torch.int8:
        cases["torch._sparse_semi_structured_tile (prune + pack, both orientations)"] = (
            lambda: torch._sparse_semi_structured_tile(dense))
        cases["torch._cslt_compress (pack)"] = lambda: torch._cslt_compress(pruned)
    return cases


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print,
        shapes: Optional[List[tuple]] = None) -> List[Dict]:
    """Time every case for each shape (default ``shapes_for(device, quick)``) and dtype on ``device``."""
    from step_kernels import pack24

    reps = (10 if quick else 50) if device.type == "cuda" else (3 if quick else 5)
    results = []
    for rows, cols in shapes or shapes_for(device, quick):
        for dtype in (torch.float16, torch.bfloat16, torch.int8):
            gen = torch.Generator().manual_seed(0)
            if dtype == torch.int8:
                dense = torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
            else:
                dense = torch.randn(rows, cols, generator=gen).to(dtype)
            dense = dense.to(device)
            pruned = _pruned(dense)
            values, meta = pack24(pruned)
            nbytes = dense.nbytes + values.nbytes + meta.nbytes
            fns = {}
            for name, fn in _cases(dense, pruned).items():
                try:
                    fn()
                    fns[name] = fn
                except (RuntimeError, NotImplementedError) as err:  # a peer without this dtype/device
                    progress(f"  {rows}x{cols} {str(dtype)[6:]:<8} {name}: not run ({str(err).splitlines()[0][:80]})")
            timings = interleaved_medians({**fns, "copy": copy_of_bytes(nbytes, device)}, device, reps=reps)
            for name in fns:
                ms = timings[name]
                row = {"bench": NAME, "device": device.type, "shape": f"{rows}x{cols}",
                       "dtype": str(dtype).replace("torch.", ""), "case": name, "ms": ms,
                       "gbps": nbytes / (ms * 1e-3) / GB, "copy_gbps": nbytes / (timings["copy"] * 1e-3) / GB}
                row["pct_roof"] = 100 * row["gbps"] / row["copy_gbps"]
                results.append(row)
                progress(f"  {rows}x{cols} {row['dtype']:<8} {name:<40} {ms:9.3f} ms {row['gbps']:7.2f} GB/s "
                         f"({row['pct_roof']:5.1f}% of copy)")
            ref = {r["case"]: r["ms"] for r in results[-len(fns):]}
            for r in results[-len(fns):]:
                base = ref.get("torch reference conversion (pack)")
                r["speedup_vs_torch_ref"] = base / r["ms"] if base else None
    return results


def to_markdown(results: List[Dict]) -> str:
    """One row per (shape, dtype, case)."""
    return markdown_table(results, [
        ("shape", "shape", None), ("dtype", "dtype", None), ("case", "case", None), ("ms", "ms", ".3f"),
        ("GB/s (one orientation's bytes)", "gbps", ".2f"), ("% of copy", "pct_roof", ".0f"),
        ("x faster than torch's reference", "speedup_vs_torch_ref", ".1f"),
    ])


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
