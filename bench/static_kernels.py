"""Static kernel report: registers, spills and 16-byte access share of every Triton configuration.

Compiles each configuration of ``step_kernels.triton_kernels._aot.kernel_configs()`` for sm_80
and sm_90 with ``triton.compile`` (no GPU or driver needed) and reads the cubin with the
``cuobjdump`` shipped in the triton wheel. "need" is the number of 128-bit accesses per thread the
main streams require in the aligned variant; stack or local bytes above 0 mean spills.

Run alone: ``python -m bench.static_kernels [--quick]``.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict, List, Optional

import torch

from ._common import standalone_main

NAME = "static_kernels"


def skip_reason(device: torch.device) -> Optional[str]:
    """Why this report cannot be made here (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'triton>=3.6,<4')"
    return None


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> List[Dict]:
    """One row per (configuration, sm); ``--quick`` compiles for sm_90 only."""
    from step_kernels.triton_kernels import _aot

    rows = []
    for cfg in _aot.kernel_configs():
        for row in _aot.report((90,) if quick else (80, 90), [cfg]):
            row["bench"] = NAME
            rows.append(row)
            progress(f"  sm_{row['sm']} {row['name']:<48} regs {row['registers']:3d} stack {row['stack']} "
                     f"LDG.128 {row['loads_128']}/{row['loads']}")
    return rows


def to_markdown(rows: List[Dict]) -> str:
    """The table of ``_aot.format_report``."""
    from step_kernels.triton_kernels import _aot

    return _aot.format_report(rows)


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
