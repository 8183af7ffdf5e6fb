"""bench/bench_fused_step_cpu.py's per-variant run: one process per instruction-set variant, each
with the variant forced and torch's fused AdamW at the matching ATen capability (set before torch
is imported), every row naming what ran."""

import pytest
import torch

from bench import bench_fused_step_cpu as bench

pytestmark = pytest.mark.skipif(bench.skip_reason(torch.device("cpu")) is not None,
                                reason="the C++ extension is not built")


def test_every_variant_runs_in_its_own_process_against_the_matching_peer():
    rows = bench.run_isas(n_params=2**14, reps=1, processes=2, progress=lambda line: None)
    by_isa = {}
    for r in rows:
        by_isa.setdefault(r["isa"], []).append(r)
    assert list(by_isa) == [name for name, _ in bench.ISAS]
    assert not any(r.get("skipped") for r in by_isa["baseline"]), "baseline runs on every CPU"
    for isa, capability in bench.ISAS:
        if by_isa[isa][0].get("skipped"):  # a variant this CPU or build lacks says so, in one row
            assert len(by_isa[isa]) == 1 and "STEP_KERNELS_CPU_ISA" in by_isa[isa][0]["skipped"]
            continue
        assert [r["case"] for r in by_isa[isa]] == [bench.PEER.label] + [c.label for c in bench.ISA_CASES]
        # the peer ran at the capability asked for: ATen's dispatch level was set before its import
        assert {r["peer_capability"] for r in by_isa[isa]} == {capability}
        assert all(r["ms"] > 0 and r["threads"] == 1 for r in by_isa[isa])
        # each case is the median of the two processes' ratios (of two: their mean)
        assert all(len(r["ratios"]) == 2 and r["ratio_vs_peer"] == sum(r["ratios"]) / 2 for r in by_isa[isa])
    table = bench.to_markdown(rows).splitlines()
    assert [line.split(" | ")[0] for line in table[-3:]] == ["| avx512", "| avx2", "| baseline"]


def test_a_variant_keeps_the_median_of_its_processes():
    def process(scale):  # one process's rows: the peer, then one case at 1.2x, everything times `scale`
        return [{"case": "peer", "ms": 5.0 * scale, "gbps": 40.0 / scale, "ratio_vs_peer": 1.0},
                {"case": "ours", "ms": 6.0 * scale, "gbps": 30.0 / scale, "ratio_vs_peer": 1.2 + (scale - 1)}]

    merged = bench._median_rows([process(1.0), process(1.3), process(1.02)])  # one slow process
    assert [r["case"] for r in merged] == ["peer", "ours"]
    assert merged[1]["ms"] == 6.0 * 1.02 and merged[1]["ratio_vs_peer"] == 1.2 + (1.02 - 1)
    assert merged[1]["ratios"] == [1.2, 1.2 + (1.3 - 1), 1.2 + (1.02 - 1)]
    assert abs(merged[1]["gbps"] - 30.0 / 1.02) < 1e-12
    skipped = [{"isa": "avx2", "skipped": "not built"}]
    assert bench._median_rows([skipped, skipped]) == skipped
