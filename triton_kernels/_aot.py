"""Compile-only inspection of every shipped kernel configuration (no GPU or driver needed).

``report()`` compiles each configuration of ``kernel_configs()`` for ``GPUTarget("cuda", cc, 32)``
with ``triton.compile(ASTSource(...))``, then reads the cubin with the ``cuobjdump`` shipped in
the triton wheel: registers, stack/local bytes (spills) and the 128-bit global loads and stores
(``LDG.E.128`` / ``STG.E.128``) against the number the main streams need. Used by
``tests/test_triton_aot.py`` and the benchmark report. Uses ``ASTSource`` as Triton 3.6 and 3.9
take it (``signature`` by name, ``constexprs`` by name, ``attrs`` by argument index).
"""

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import triton
import triton.language as tl

from . import fused_step, nm_prune
from ._nm import strided_launch_shape

_TL_NAMES = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16", tl.uint16: "u16"}
_BYTES = {tl.float32: 4, tl.bfloat16: 2, tl.float16: 2, tl.uint16: 2}


@dataclass
class KernelConfig:
    """One compiled variant: the kernel, its typed signature, constexprs and the vector loads it needs."""

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    divisible: Sequence[int]  # argument indices the JIT marks 16-byte aligned / divisible by 16
    num_warps: int
    min_vector_loads: int  # 128-bit loads per thread the main streams need in the aligned path
    min_vector_stores: int


def _vectors(dtypes, elems_per_thread: int) -> int:
    return sum(max(1, elems_per_thread * _BYTES[d] // 16) for d in dtypes)


def _fused_config(name, *, g, s, out, masked, frozen, stats=False, strided=False, n=0, m=1) -> KernelConfig:
    out_kind = {None: 0, tl.float32: 1, tl.bfloat16: 2, tl.float16: 3}[out]
    o_dtype = tl.float32 if out in (None, tl.float32) else tl.uint16
    block, warps = fused_step.launch_shape(strided, m)
    sig = {"tensors": "*i64", "blocks": "*i32", "partials": "*fp64", "grad_scale_ptr": "*fp32",
           "found_inf_ptr": "*fp32"}
    for arg in fused_step.KERNEL_SCALARS:
        sig[arg] = "fp32"
    constexprs = dict(G_DTYPE=g, S_DTYPE=s, OUT_KIND=out_kind, O_DTYPE=o_dtype, MASKED=masked, FROZEN_V=frozen,
                      STATS=stats, STRIDED=strided, N=n, M=m, BLOCK=block, HAS_SCALE=True,
                      HAS_INF=True, ALIGNED=True)
    for key in constexprs:
        sig[key] = "constexpr"
    per_thread = block // (32 * warps)
    loads = [tl.float32, g, tl.float32, s]
    stores = [tl.float32, tl.float32] + ([] if frozen else [tl.float32]) + ([] if out is None else [o_dtype])
    return KernelConfig(name, fused_step._fused_step_kernel, sig, constexprs, (0, 1, 2, 3, 4), warps,
                        _vectors(loads, per_thread), _vectors(stores, per_thread))


def kernel_configs() -> List[KernelConfig]:
    """Every kernel configuration the compile test checks (about 25 per target)."""
    f32, bf16, f16 = tl.float32, tl.bfloat16, tl.float16
    configs = [
        _fused_config("adamw fp32", g=f32, s=f32, out=None, masked=False, frozen=False),
        _fused_config("adamw fp32 +stats", g=f32, s=f32, out=None, masked=False, frozen=False, stats=True),
        _fused_config("adamw bf16 +stats", g=bf16, s=f32, out=bf16, masked=False, frozen=False, stats=True),
        _fused_config("adamw fp16", g=f16, s=f32, out=f16, masked=False, frozen=False),
        _fused_config("srste fp32 2:4", g=f32, s=f32, out=f32, masked=True, frozen=False, n=2, m=4),
        _fused_config("srste bf16 2:4 conv1d", g=bf16, s=f32, out=bf16, masked=True, frozen=False, strided=True,
                      n=2, m=4),
        _fused_config("step2 fp32 2:4", g=f32, s=f32, out=f32, masked=True, frozen=True, n=2, m=4),
        _fused_config("step2 fp32 1:4 conv1d", g=f32, s=f32, out=f32, masked=True, frozen=True, strided=True,
                      n=1, m=4),
        _fused_config("step2 fp16 2:4", g=f16, s=f32, out=f16, masked=True, frozen=True, n=2, m=4),
    ]
    for n, m in ((1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (1, 8), (1, 16), (16, 32)):
        configs.append(_fused_config(f"step2 bf16 {n}:{m}", g=bf16, s=bf16, out=bf16, masked=True, frozen=True,
                                     n=n, m=m))
    for n, m in ((2, 4), (1, 16), (16, 32)):
        configs.append(_fused_config(f"step2 bf16 {n}:{m} conv1d", g=bf16, s=bf16, out=bf16, masked=True,
                                     frozen=True, strided=True, n=n, m=m))
    configs.append(KernelConfig(
        "sum partials", fused_step._sum_partials_kernel,
        {"partials": "*fp64", "totals": "*fp64", "num_blocks": "i32", "RBLOCK": "constexpr"},
        {"RBLOCK": fused_step.REDUCE_BLOCK}, (0, 1), 4, 0, 0))
    for dtype, n, m, strided in ((f32, 2, 4, False), (bf16, 16, 32, False), (bf16, 2, 4, True), (bf16, 16, 32, True)):
        name = f"nm_prune {_TL_NAMES[dtype]} {n}:{m}" + (" strided" if strided else "")
        block, warps = strided_launch_shape(m) if strided else (nm_prune.BLOCK, nm_prune.NUM_WARPS)
        sig = {"w_ptr": f"*{_TL_NAMES[dtype]}", "out_ptr": f"*{_TL_NAMES[dtype]}", "mask_ptr": "*i1",
               "numel": "i32", "cols": "i32", "N": "constexpr", "M": "constexpr", "BLOCK": "constexpr",
               "STRIDED": "constexpr"}
        per_thread = block // (32 * warps)
        configs.append(KernelConfig(
            name, nm_prune._nm_prune_kernel, sig, dict(N=n, M=m, BLOCK=block, STRIDED=strided),
            (0, 1, 2, 3, 4), warps, _vectors([dtype], per_thread), _vectors([dtype], per_thread)))
    return configs


def compile_config(cfg: KernelConfig, capability: int):
    """Compile ``cfg`` for ``GPUTarget("cuda", capability, 32)``; returns Triton's compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in cfg.divisible}
    src = ASTSource(fn=cfg.fn, signature=cfg.signature, constexprs=cfg.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": cfg.num_warps, "enable_fp_fusion": False})


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def inspect_cubin(cubin: bytes) -> Dict[str, int]:
    """Registers, stack and local bytes, and global load/store counts (all and 128-bit) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    loads = re.findall(r"\bLDG\.E[.\w]*", sass)
    stores = re.findall(r"\bSTG\.E[.\w]*", sass)
    return {
        "registers": fields.get("REG", -1), "stack": fields.get("STACK", -1), "local": fields.get("LOCAL", -1),
        "shared": fields.get("SHARED", -1),
        "loads": len(loads), "loads_128": sum(".128" in x for x in loads),
        "stores": len(stores), "stores_128": sum(".128" in x for x in stores),
        "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
    }


def report(capabilities: Sequence[int] = (80, 90), configs: Optional[List[KernelConfig]] = None) -> List[dict]:
    """One row per (configuration, capability): name, sm, registers, stack, local, spill ops, loads.

    Under ``TRITON_INTERPRET=1`` the kernels cannot be compiled in this process, so the work goes
    to :func:`report_in_subprocess`.
    """
    configs = configs if configs is not None else kernel_configs()
    if not isinstance(fused_step._fused_step_kernel, triton.runtime.JITFunction):
        return report_in_subprocess(capabilities, [cfg.name for cfg in configs])
    rows = []
    for cfg in configs:
        for cc in capabilities:
            compiled = compile_config(cfg, cc)
            rows.append({"name": cfg.name, "sm": cc, "min_vector_loads": cfg.min_vector_loads,
                         "min_vector_stores": cfg.min_vector_stores, **inspect_cubin(compiled.asm["cubin"])})
    return rows


def format_report(rows: List[dict]) -> str:
    """A markdown table of :func:`report`'s rows."""
    head = ("| kernel | sm | regs | stack | local | LDG.128 / LDG (need) | STG.128 / STG (need) |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['sm']} | {r['registers']} | {r['stack']} | {r['local']} | "
                     f"{r['loads_128']} / {r['loads']} ({r['min_vector_loads']}) | "
                     f"{r['stores_128']} / {r['stores']} ({r['min_vector_stores']}) |")
    return "\n".join(lines)


def report_in_subprocess(capabilities: Sequence[int] = (80, 90), names: Optional[Sequence[str]] = None,
                         jobs: int = 2) -> List[dict]:
    """:func:`report` run in ``jobs`` fresh interpreters with ``TRITON_INTERPRET`` unset (under the
    interpreter ``@triton.jit`` yields functions that cannot be compiled) and FP fusion pinned off;
    rows come back in configuration order."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    names = list(names) if names is not None else [cfg.name for cfg in kernel_configs()]
    shares = [names[i::jobs] for i in range(jobs) if names[i::jobs]]
    procs = [subprocess.Popen([sys.executable, "-m", __name__, "--json", "--sm", ",".join(map(str, capabilities)),
                               "--names", json.dumps(share)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for share in shares]
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compile-only report failed:\n{err[-4000:]}")
        rows += json.loads(out)
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda row: (order[row["name"]], row["sm"]))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m step_kernels.triton_kernels._aot [--json] [--sm 80,90]``: print the report."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.add_argument("--sm", default="80,90", help="compute capabilities, comma separated")
    parser.add_argument("--names", default=None, help="JSON list of configuration names (default: all)")
    args = parser.parse_args(argv)
    configs = kernel_configs()
    if args.names:
        wanted = set(json.loads(args.names))
        configs = [c for c in configs if c.name in wanted]
    rows = report([int(x) for x in args.sm.split(",")], configs)
    print(json.dumps(rows) if args.json else format_report(rows))


if __name__ == "__main__":
    main()
