"""bench/readme.py: every machine's full report lands in docs/benchmarks.md, headings and plots fixed,
and its CPU per-variant table in the README's generated block; benchmark runs never write the README."""

from bench import readme


def _write(path, text):
    path.write_text(text)
    return path


def test_reports_of_every_machine_make_the_page(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    _write(results / "gpu-h100.md", "# Benchmarks on H100\n\n## pack24\n\n| a |\n\n![pack24](gpu-h100-pack24.png)\n")
    _write(results / "cpu-x86.md", "# Benchmarks on EPYC\n\n## optimizer_step\n\n| b |\n")
    page = _write(tmp_path / "docs" / "benchmarks.md", "old table\n")
    assert readme.write_docs(str(page), str(results)) == str(page)
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n")
    assert text.index("## Benchmarks on EPYC") < text.index("## Benchmarks on H100")  # machine-name order
    assert "### optimizer_step" in text and "### pack24" in text
    assert "![pack24](../bench/results/gpu-h100-pack24.png)" in text


def test_a_quick_run_writes_its_own_files_and_no_docs(tmp_path, monkeypatch):
    import pytest

    from bench import __main__ as driver

    written = []
    monkeypatch.setattr(readme, "write_docs", lambda *a, **k: written.append(k) or "")
    monkeypatch.setattr(readme, "write_readme", lambda *a, **k: written.append(k) or "")
    assert driver.main(["--quick", "--only", "pack24", "--device", "cpu", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all(name.endswith(("-quick.json", "-quick.md")) or "-quick-" in name for name in names)
    assert written == []
    with pytest.raises(SystemExit):
        driver.main(["--quick", "--write-docs", "--out", str(tmp_path)])
    assert written == []


def test_quick_reports_are_not_published(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    _write(results / "cpu-x86.md", "# Benchmarks full\n")
    _write(results / "cpu-x86-quick.md", "# Benchmarks quick\n")
    text = readme.render(str(results), str(tmp_path))
    assert "full" in text and "quick" not in text


def test_the_committed_page_is_what_the_committed_reports_give():
    import os

    with open(readme.DOCS) as f:
        committed = f.read()
    assert committed == readme.INTRO + "\n" + readme.render(readme.RESULTS_DIR, os.path.dirname(readme.DOCS)) + "\n"


def test_progress_estimates_come_from_the_last_report(tmp_path):
    import json

    from bench import __main__ as driver

    report = tmp_path / "cpu-x86.json"
    report.write_text(json.dumps({"benchmarks": {"pack24": {"seconds": 4.5}, "sparse_linear": {"skipped": "no GPU"}}}))
    assert driver._previous_seconds(str(report)) == {"pack24": 4.5, "sparse_linear": 0.0}
    assert driver._previous_seconds(str(tmp_path / "missing.json")) == {}


def _isa_rows(isa, capability, peer_ms, ratios):
    rows = [{"bench": "fused_step_cpu", "isa": isa, "peer_capability": capability, "case": "adamw fused fp32",
             "ms": peer_ms, "params": 8_000_000, "ratio_vs_peer": 1.0}]
    from bench import bench_fused_step_cpu

    for case, ratio in zip([c.label for c in bench_fused_step_cpu.ISA_CASES], ratios):
        rows.append({"bench": "fused_step_cpu", "isa": isa, "peer_capability": capability, "case": case,
                     "ms": peer_ms * ratio, "params": 8_000_000, "ratio_vs_peer": ratio})
    return rows


def test_the_readme_cpu_table_comes_from_the_full_reports(tmp_path):
    import json

    results = tmp_path / "results"
    results.mkdir()
    thread_row = {"bench": "fused_step_cpu", "case": "step phase 2 fp32", "ms": 1.0, "threads": 1}
    rows = ([thread_row] + _isa_rows("avx512", "avx512", 3.5, [1.26, 1.31, 1.0, 1.02, 0.99])
            + _isa_rows("avx2", "avx2", 3.47, [12.98, 14.0, 13.53])
            + [{"bench": "fused_step_cpu", "isa": "baseline", "skipped": "not built"}])
    report = {"meta": {"machine": "cpu-x86_64-2c", "device_name": "EPYC", "commit": "abc1234"},
              "benchmarks": {"fused_step_cpu": {"seconds": 1.0, "rows": rows}}}
    (results / "cpu-x86_64-2c.json").write_text(json.dumps(report))
    quick = dict(report, meta=dict(report["meta"], machine="quick-machine"))
    (results / "cpu-x86_64-2c-quick.json").write_text(json.dumps(quick))
    page = _write(tmp_path / "README.md", f"intro\n\n{readme.ISA_BEGIN}\nold\n{readme.ISA_END}\n\nrest\n")
    assert readme.write_readme(str(page), str(results)) == str(page)
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith(f"{readme.ISA_END}\n\nrest\n") and "old" not in text
    assert "quick-machine" not in text and "`cpu-x86_64-2c` (EPYC, commit `abc1234`, 8.0M parameters" in text
    assert "median of" not in text  # rows of one process per variant
    for r in rows:
        if "isa" in r and not r.get("skipped"):
            r["ratios"] = [r["ratio_vs_peer"]] * 3
    (results / "cpu-x86_64-2c.json").write_text(json.dumps(report))
    assert "8.0M parameters, 1 thread, median of 3 processes per variant;" in readme.render_isa_tables(str(results))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| variant | peer: fused AdamW at | peer ms | step phase 2 fp32 | step phase 2 fp32 1:8 | "
                        "step phase 2 bf16, bf16 precond | step phase 2 bf16, bf16 precond 1:8 | step phase 1 fp32 |")
    assert lines[1:] == ["| avx512 | avx512 | 3.50 | 1.26 | 1.31 | 1.00 | 1.02 | 0.99 |",
                         "| avx2 | avx2 | 3.47 | 12.98 | 14.00 | 13.53 | - | - |",  # a case missing: "-"
                         "| baseline | not run: not built | - | - | - | - | - | - |"]
    missing = _write(tmp_path / "other.md", "no block\n")
    import pytest

    with pytest.raises(ValueError, match="no block"):
        readme.write_readme(str(missing), str(results))


def test_the_committed_readme_block_is_what_the_committed_reports_give():
    with open(readme.README) as f:
        text = f.read()
    block = text[text.index(readme.ISA_BEGIN) + len(readme.ISA_BEGIN):text.index(readme.ISA_END)]
    assert block == "\n\n" + readme.render_isa_tables(readme.RESULTS_DIR) + "\n\n"
