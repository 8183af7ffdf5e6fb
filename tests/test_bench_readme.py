"""bench/readme.py: every machine's report lands in the README section, headings and plots fixed."""

from bench import readme


def _write(path, text):
    path.write_text(text)
    return path


def test_reports_of_every_machine_replace_the_section_and_nothing_else(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    _write(results / "gpu-h100.md", "# Benchmarks on H100\n\n## pack24\n\n| a |\n\n![pack24](gpu-h100-pack24.png)\n")
    _write(results / "cpu-x86.md", "# Benchmarks on EPYC\n\n## optimizer_step\n\n| b |\n")
    readme_md = _write(tmp_path / "README.md", "intro\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\ntail\n")
    assert readme.update_readme(str(readme_md), str(results))
    text = readme_md.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("tail\n")
    assert text.index("### Benchmarks on EPYC") < text.index("### Benchmarks on H100")  # machine-name order
    assert "#### optimizer_step" in text and "#### pack24" in text
    assert "![pack24](bench/results/gpu-h100-pack24.png)" in text


def test_readme_without_markers_is_left_alone(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    _write(results / "cpu-x86.md", "# Benchmarks\n")
    readme_md = _write(tmp_path / "README.md", "no markers here\n")
    assert readme.update_readme(str(readme_md), str(results)) is False
    assert readme_md.read_text() == "no markers here\n"


def test_a_quick_run_writes_its_own_files_and_leaves_the_readme_alone(tmp_path, monkeypatch):
    import pytest

    from bench import __main__ as driver

    written = []
    monkeypatch.setattr(readme, "update_readme", lambda *a, **k: written.append(k) or True)
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
