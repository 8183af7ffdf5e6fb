"""bench/readme.py: every machine's full report lands in docs/benchmarks.md, headings and plots fixed;
benchmark runs never write the README."""

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
