"""bench/gpu_check.py without a GPU: test outcome parsing, the stage timeout, the targets' verdicts
and the plan's consistency checks (the dry run itself runs in ``make test``)."""

import os
import sys

import pytest

from bench import _gpu_pytest
from bench import gpu_check as gc


@pytest.mark.parametrize("line,expected", [
    ("tests/test_pack24.py::test_opcheck[cuda-torch.int8] PASSED           [ 10%]",
     ("tests/test_pack24.py::test_opcheck[cuda-torch.int8]", "PASSED")),
    ("[gw3] [ 57%] FAILED "
     "tests/test_gpu.py::test_sparse_linear_matches_dense_on_ffn_shapes[torch.float16-512x4096x14336]",
     ("tests/test_gpu.py::test_sparse_linear_matches_dense_on_ffn_shapes[torch.float16-512x4096x14336]", "FAILED")),
    ("ERROR tests/test_export.py::test_packed_linear_matches_dense_on_gpu - RuntimeError: CUDA error",
     ("tests/test_export.py::test_packed_linear_matches_dense_on_gpu", "ERROR")),
    ("SKIPPED [1] tests/test_megatron.py:118: could not import 'megatron.core'", None),
    ("========== 3 passed, 1 skipped in 4.20s ==========", None),
])
def test_outcome_lines(line, expected):
    assert gc.test_outcome(line) == expected


def test_run_streamed_returns_status_and_lines(tmp_path):
    seen = []
    code = gc.run_streamed([sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"], dict(os.environ),
                           30, str(tmp_path / "x.log"), seen.append)
    assert code == 3 and seen == ["a", "b"]


def test_run_streamed_kills_at_the_budget_and_keeps_what_came(tmp_path):
    seen = []
    script = "import time; print('early', flush=True); time.sleep(60); print('late')"
    code = gc.run_streamed([sys.executable, "-c", script], dict(os.environ), 1.5, str(tmp_path / "x.log"), seen.append)
    assert code is None and seen == ["early"]
    log = (tmp_path / "x.log").read_text().splitlines()
    assert log[0].startswith("$ ") and log[1:] == ["early", "killed after 2 s"]


def fused_row(case, params, copy_share, vs_adamw):
    return {"case": case, "params": params, "copy_share": copy_share, "vs_adamw": vs_adamw, "gbps": 3500.0}


def pack_row(shape, dtype, pct, ms):
    return {"case": "ours: prune + pack", "shape": shape, "dtype": dtype, "pct_roof": pct, "ms": ms}


def verdicts(results):
    return {t["target"]: (t["measured"], t["status"]) for t in gc.evaluate_targets(results)}


def test_targets_pass_fail_and_not_run(tmp_path):
    results = gc.Results(str(tmp_path), {"seconds": 300.0})
    results.stages["correctness"] = {"status": "failed (1)", "code": 1}
    results.tests = {
        "tests/test_nm_prune_triton.py::test_empty_tensor[cuda]": "PASSED",
        "tests/test_pack24.py::test_opcheck[cuda-x]": "PASSED",
        "tests/test_pack24.py::test_pack_matches_torch_reference[cuda-simd-x]": "FAILED",
        "tests/test_megatron.py::test_distributed_optimizer_on_gpu": "SKIPPED",
    }
    size = 16 * 4096 * 1024
    results.rows["fused_step"] = [fused_row("step phase 2 fp32 model", size, 0.91, 1.2),
                                  fused_row("step phase 2 bf16 model, bf16 p", size, 0.84, 0.93)]
    results.rows["pack24"] = [pack_row("4096x14336", "bfloat16", 75.0, 0.120),
                              pack_row("4096x4096", "float16", 60.0, 0.05)]
    v = verdicts(results)
    assert v["Triton nm_prune against the reference, bit for bit"] == ("1 passed", "pass")
    assert v["pack24/unpack24 on CUDA byte-identical to the CPU path and to torch's conversion"] == (
        "1 failed, 1 passed", "FAIL")
    assert v["Megatron-Core on the GPU (NCCL, its DDP, grad scaler and clipping)"] == ("1 skipped", "skipped")
    assert v["packed 2:4 linear against dense"] == ("-", "not run")
    assert v["step phase 2 fp32 model >= 85% of a copy of the same bytes, 67M params"] == ("91.0% (3500 GB/s)", "pass")
    assert v["step phase 2 bf16 model, bf16 p >= 85% of a copy of the same bytes, 67M params"][1] == "FAIL"
    assert v["step phase 2 bf16 model, bf16 p (22 B/param) faster than fused AdamW (28 B/param), 67M"] == (
        "0.93x AdamW's time", "pass")
    # only 4096x14336 bf16 (117 MB) is >= 64 MB; 4096x4096 fp16 (34 MB) does not count
    assert v["pack24 prune + pack >= 70% of copy bandwidth for >= 64 MB inputs (fp16/bf16)"] == (
        "lowest 75% (4096x14336 bfloat16)", "pass")
    assert v["pack24 prune + pack of a 4096x14336 bf16 weight <= 100 us"] == ("120 us", "FAIL")
    assert v[f"whole check within {gc.TOTAL_S} s"] == ("300 s", "pass")


def test_tests_cut_by_a_timeout_are_incomplete(tmp_path):
    results = gc.Results(str(tmp_path), {})
    results.stages["correctness"] = {"status": "timeout", "code": None}
    results.tests = {"tests/test_reference.py::test_adamw_step_matches_torch_adamw[cuda-0.0]": "PASSED"}
    label = "optimizer and reference ops on CUDA tensors (against torch.optim.AdamW and Python peers)"
    assert verdicts(results)[label] == ("1 passed", "incomplete")


def test_plan_problems_name_what_is_missing():
    collected = [name for name in _gpu_pytest.GPU_ONLY_TESTS if "megatron" not in name] + [
        "tests/test_fused_step_triton.py::test_nan_and_signed_zero_rules[cuda]",
        "tests/test_nm_prune_triton.py::test_empty_tensor[cuda]",
        "tests/test_optimizer.py::test_resume_is_bit_identical[cuda-x]",
        "tests/test_new_module.py::test_something[cuda]",
    ]
    problems = gc.plan_problems(collected)
    assert "GPU-only test tests/test_megatron.py::test_distributed_optimizer_on_gpu is not collected" in problems
    assert any(p.startswith("check '50 optimizer steps") for p in problems)
    assert ("tests/test_new_module.py::test_something[cuda] runs on CUDA but belongs to no check of "
            "bench/gpu_check.py") in problems
    assert not any("bench_" in p or "budget" in p for p in problems)  # benchmarks and budgets are consistent
