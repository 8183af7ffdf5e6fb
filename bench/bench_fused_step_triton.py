"""Triton fused step at kernel level: STEP phase 2, SR-STE and AdamW vs a copy of the same bytes.

Calls ``step_kernels.triton_kernels.fused_step.fused_step`` directly (no optimizer around it) on
``tensors`` x [4096, 1024] parameters (16 -> 64M, ``--quick`` 4 -> 16M) in one launch, and in the
same run times (a) a device-to-device copy that reads and writes the same number of bytes as each
case, (b) ``torch.optim.AdamW(fused=True)`` on fp32 parameters and grads of the same count
(28 B/param). Times are medians of ``triton.testing.do_bench`` (L2 flushed between calls).
Targets (issue 3): phase 2 >= 85% of the copy bandwidth at 64M+ params, and the bf16 phase 2
(22 B/param) faster than fused AdamW (28 B/param). Needs CUDA.

Run alone: ``python -m bench.bench_fused_step_triton [--quick]``; the module has the
``NAME``/``skip_reason``/``run``/``to_markdown`` interface of ``bench/__main__.py``'s MODULES.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch

from ._common import standalone_main

NAME = "fused_step_triton"
GB = 1e9
SHAPE = (4096, 1024)

# label, masked, frozen_v, grad/model dtype, second-moment dtype, bytes per param (read + written)
CASES = [
    ("step phase 2 bf16 model, bf16 p", True, True, torch.bfloat16, torch.bfloat16, 22),
    ("step phase 2 fp32 model", True, True, torch.float32, torch.float32, 28),
    ("srste bf16 model", True, False, torch.bfloat16, torch.float32, 28),
    ("adamw fp32 (phase 1, no model copy)", False, False, torch.float32, torch.float32, 28),
]


def skip_reason(device: torch.device) -> Optional[str]:
    """Why this benchmark cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return "needs a CUDA device (the kernel-level bandwidth target is a GPU measurement)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'triton>=3.6,<4')"
    return None


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def _copy_ms(nbytes: int, device: torch.device) -> float:
    src = torch.randn(nbytes // 8, device=device)  # copy reads n/2 and writes n/2 bytes
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src))


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print,
        count: Optional[int] = None) -> List[Dict]:
    """One row per case: median ms, GB/s, share of the copy of the same bytes, time vs fused AdamW.

    ``count`` [4096, 1024] tensors are stepped (default 16, 4 when ``quick``; 64 is 256M params).
    """
    from step_kernels import reference as ref
    from step_kernels.triton_kernels.fused_step import fused_step

    count = count or (4 if quick else 16)
    params = count * SHAPE[0] * SHAPE[1]
    gen = torch.Generator(device=device).manual_seed(0)
    scalars = ref.step_scalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=100,
                               srste_decay=2e-4)

    peer_p = [torch.randn(SHAPE, device=device, generator=gen) * 0.02 for _ in range(count)]
    for p in peer_p:
        p.grad = torch.randn(SHAPE, device=device, generator=gen) * 1e-3
    adamw = torch.optim.AdamW(peer_p, lr=1e-4, weight_decay=0.01, fused=True)
    adamw.step()
    adamw_ms = _bench(adamw.step)
    del adamw, peer_p
    rows = [{"bench": NAME, "case": "torch AdamW fused fp32", "params": params, "bytes_per_param": 28,
             "ms": adamw_ms, "gbps": 28 * params / adamw_ms / 1e6, "copy_share": None, "vs_adamw": 1.0}]
    rows[0]["copy_share"] = rows[0]["gbps"] / (28 * params / _copy_ms(28 * params, device) / 1e6)
    progress(f"  {rows[0]['case']:<40} {adamw_ms:8.3f} ms {rows[0]['gbps']:7.0f} GB/s")
    for label, masked, frozen, dtype, second_dtype, bpp in CASES:
        w = [torch.randn(SHAPE, device=device, generator=gen) * 0.02 for _ in range(count)]
        g = [(torch.randn(SHAPE, device=device, generator=gen) * 1e-3).to(dtype) for _ in range(count)]
        m1 = [torch.zeros(SHAPE, device=device) for _ in range(count)]
        second = [torch.full(SHAPE, 10.0 if frozen else 1e-6, device=device, dtype=second_dtype)
                  for _ in range(count)]
        out = [torch.empty(SHAPE, device=device, dtype=dtype) for _ in range(count)] if masked else [None] * count

        # F821 (below) is a false finding: ruff takes the `del` that frees the tensors for an earlier unbinding.
        def step():
            fused_step(w, g, m1, second, out, masked=masked, frozen_v=frozen, n=2 if masked else 0,  # noqa: F821
                       m=4 if masked else 0, group_dims=[1] * count if masked else None, scalars=scalars)

        step()
        ms = _bench(step)
        copy_ms = _copy_ms(bpp * params, device)
        row = {"bench": NAME, "case": label, "params": params, "bytes_per_param": bpp, "ms": ms,
               "gbps": bpp * params / ms / 1e6, "copy_share": copy_ms / ms, "vs_adamw": ms / adamw_ms}
        rows.append(row)
        progress(f"  {label:<40} {ms:8.3f} ms {row['gbps']:7.0f} GB/s {100 * row['copy_share']:5.1f}% of copy, "
                 f"{row['vs_adamw']:.2f}x fused AdamW time")
        del w, g, m1, second, out
    return rows


def to_markdown(rows: List[Dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| case | params | B/param | median ms | GB/s | share of copy | time / fused AdamW |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['bytes_per_param']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.0f} | {100 * r['copy_share']:.1f}% | {r['vs_adamw']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
