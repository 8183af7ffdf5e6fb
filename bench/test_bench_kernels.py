"""pytest-benchmark entry points: ``pytest bench --benchmark-only`` (not part of ``make test``).

The same cases as ``python -m bench`` at one size, for pytest-benchmark's statistics, comparisons
between saved runs (``--benchmark-autosave``, ``--benchmark-compare``) and histograms.
"""

import pytest
import torch

from bench import bench_optimizer_step as opt_bench
from bench import bench_pack24 as pack_bench
from bench._common import sync

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_PARAMS = 2**24 if DEVICE.type == "cuda" else 2**22


@pytest.mark.parametrize("case", opt_bench.CASES, ids=lambda c: c.label.replace(" ", "-"))
@pytest.mark.parametrize("backend", ["torch"] + opt_bench.backends_for(DEVICE))
def test_optimizer_step(benchmark, case, backend):
    if (backend == "torch") != case.recipe.startswith("adamw"):
        pytest.skip("torch's AdamW cases run only as backend 'torch'")
    params = opt_bench.make_params(opt_bench.transformer_shapes(N_PARAMS), case.model_dtype, DEVICE)
    opt = opt_bench.build(case, params, None if backend == "torch" else backend)
    benchmark.extra_info["bytes"] = opt_bench.step_bytes(opt, case)
    benchmark(lambda: (opt.step(), sync(DEVICE)))


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8], ids=str)
def test_pack24(benchmark, dtype, prune):
    reason = pack_bench.skip_reason(DEVICE)
    if reason:
        pytest.skip(reason)
    from step_kernels import pack24
    from step_kernels.reference import nm_prune

    dense = (torch.randn(2048, 4096) * 50).to(dtype).to(DEVICE)
    source = dense if prune else nm_prune(dense, 2, 4)[0]
    benchmark(lambda: (pack24(source, prune=prune), sync(DEVICE)))
