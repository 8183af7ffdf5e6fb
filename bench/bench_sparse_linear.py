"""2:4 sparse linear on a GPU: our packed weights through torch's sparse matmul vs dense ``F.linear``.

For LLM-shaped layers (tokens x in -> out, fp16/bf16) the weight is pruned and packed with
``step_kernels.pack24`` and wrapped by ``step_kernels.export.to_sparse_semi_structured`` (torch's
CUTLASS tensor on sm_8x; on Hopper it routes through cuSPARSELt, see ``export``), then timed
against the dense GEMM of the same (pruned) weight. Needs a CUDA GPU of compute capability 8.0+.

Run alone: ``python -m bench.bench_sparse_linear [--quick]``.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ._common import interleaved_medians, markdown_table, standalone_main

NAME = "sparse_linear"

# (tokens, in_features, out_features): Llama-3-8B-like projections at a few token counts.
SHAPES = [(4096, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096), (16384, 4096, 14336)]
QUICK_SHAPES = [(4096, 4096, 14336)]


def skip_reason(device: torch.device) -> Optional[str]:
    """Why this benchmark cannot run here (None when it can)."""
    if device.type != "cuda":
        return "needs a CUDA GPU (sm_80 or newer): torch's semi-structured sparse matmul has no CPU kernel"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"needs compute capability 8.0+, this GPU is {torch.cuda.get_device_capability(device)}"
    from step_kernels import _extension

    if not _extension.has_op("pack24"):
        return f"the extension has no pack24 op ({_extension.missing_reason() or 'older build'})"
    return None


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print,
        shapes: Optional[List[tuple]] = None) -> List[Dict]:
    """Dense vs 2:4 sparse time and TFLOP/s for each (tokens, in, out) shape (default ``SHAPES``,
    ``QUICK_SHAPES`` when ``quick``) and dtype."""
    from step_kernels.export import to_sparse_semi_structured
    from step_kernels.reference import nm_prune

    results = []
    for tokens, d_in, d_out in shapes or (QUICK_SHAPES if quick else SHAPES):
        for dtype in (torch.float16, torch.bfloat16):
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(tokens, d_in, device=device, dtype=dtype, generator=gen)
            weight = nm_prune(torch.randn(d_out, d_in, device=device, dtype=dtype, generator=gen), 2, 4)[0]
            sparse = to_sparse_semi_structured(weight)
            torch.testing.assert_close(F.linear(x[:64], sparse), F.linear(x[:64], weight), rtol=2e-2, atol=2e-1)
            timings = interleaved_medians({"dense": lambda: F.linear(x, weight),
                                           "sparse": lambda: F.linear(x, sparse)}, device, reps=20 if quick else 50)
            flops = 2 * tokens * d_in * d_out
            row = {"bench": NAME, "device": device.type, "shape": f"{tokens}x{d_in}->{d_out}",
                   "dtype": str(dtype).replace("torch.", ""), "dense_ms": timings["dense"],
                   "sparse_ms": timings["sparse"], "speedup": timings["dense"] / timings["sparse"],
                   "dense_tflops": flops / timings["dense"] / 1e9, "sparse_tflops": flops / timings["sparse"] / 1e9,
                   "sparse_tensor": type(sparse).__name__}
            results.append(row)
            progress(f"  {row['shape']:<22} {row['dtype']:<9} dense {row['dense_ms']:.3f} ms, 2:4 "
                     f"{row['sparse_ms']:.3f} ms: {row['speedup']:.2f}x ({row['sparse_tensor']})")
    return results


def to_markdown(results: List[Dict]) -> str:
    """One row per (shape, dtype)."""
    return markdown_table(results, [
        ("tokens x in -> out", "shape", None), ("dtype", "dtype", None), ("dense ms", "dense_ms", ".3f"),
        ("2:4 ms", "sparse_ms", ".3f"), ("speedup", "speedup", ".2f"), ("dense TFLOP/s", "dense_tflops", ".0f"),
        ("2:4 TFLOP/s (dense-equivalent)", "sparse_tflops", ".0f"), ("sparse tensor", "sparse_tensor", None),
    ])


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
