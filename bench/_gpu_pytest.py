"""pytest plugin of ``bench.gpu_check``: run (or collect) only the tests that run on a GPU.

Loaded with ``-p bench._gpu_pytest``. ``--gpu-only`` keeps the items a CUDA machine adds to the
suite: those whose ``device`` fixture is ``cuda`` (``tests/conftest.py`` adds that parameter when a
GPU is present) and the GPU-only tests of ``GPU_ONLY_TESTS``; every CPU item is deselected, so the
CPU suite is not rerun. With ``STEP_KERNELS_COLLECT_AS_CUDA=1`` in the environment (set by the dry
run of ``bench.gpu_check``, with ``--collect-only`` only) ``torch.cuda.is_available()`` answers True
while pytest starts, so a machine without a GPU collects exactly the items a GPU machine would.
"""

from __future__ import annotations

import os

import pytest

# Tests that exist only on a CUDA machine (skipped elsewhere), by node id.
GPU_ONLY_TESTS = [
    "tests/test_export.py::test_packed_linear_matches_dense_on_gpu",
    "tests/test_megatron.py::test_megatron_ddp_clip_and_loss_scale_on_gpu",
    "tests/test_megatron.py::test_distributed_optimizer_on_gpu",
    "tests/test_gpu.py::test_pack24_cuda_equals_cpu_and_torch_on_llm_shapes",
    "tests/test_gpu.py::test_unpack24_cuda_equals_cpu_and_torch_on_llm_shapes",
    "tests/test_gpu.py::test_sparse_linear_matches_dense_on_ffn_shapes",
]

COLLECT_AS_CUDA = "STEP_KERNELS_COLLECT_AS_CUDA"

if os.environ.get(COLLECT_AS_CUDA) == "1":
    import torch

    # Before tests/conftest.py is imported, so its DEVICES gains "cuda" as on a GPU machine.
    torch.cuda.is_available = lambda: True


def pytest_addoption(parser):
    """``--gpu-only``: deselect every item that does not run on CUDA."""
    parser.addoption("--gpu-only", action="store_true", help="keep only the items that run on a CUDA device")


def pytest_configure(config):
    """Refuse a patched ``torch.cuda.is_available`` outside ``--collect-only``."""
    if os.environ.get(COLLECT_AS_CUDA) == "1" and not config.option.collectonly:
        raise pytest.UsageError(f"{COLLECT_AS_CUDA}=1 only makes sense with --collect-only")


def is_gpu_item(item) -> bool:
    """Whether ``item`` runs on CUDA: a ``device=cuda`` parametrisation or a named GPU-only test."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and str(callspec.params.get("device")) == "cuda":
        return True
    return item.nodeid.split("[")[0] in GPU_ONLY_TESTS


def pytest_collection_modifyitems(config, items):
    """With ``--gpu-only``, keep the GPU items and report the rest as deselected."""
    if not config.getoption("gpu_only"):
        return
    keep = [item for item in items if is_gpu_item(item)]
    drop = [item for item in items if not is_gpu_item(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
