"""The documentation resolves: every relative Markdown link points at a file (and heading) of the
repository, every "docs/design.md section N" citation names a section that exists, nothing cites
the design brief that lives outside the repository, and the corpus size the README states is the
one this Python gives."""

import os
import platform
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "design.md")
TEXT_SUFFIXES = (".py", ".md", ".h", ".cpp", ".cu", ".txt", ".toml", ".cfg")
SKIP_DIRS = {".git", ".venv", "build", "cmake-build", "__pycache__", ".pytest_cache", "demo_out"}

# "docs/design.md section 4", "docs/design.md sections 3 and 5", "docs/design.md section 8.1", also
# wrapped across lines of a docstring or a comment.
CITATION = re.compile(r"docs/design\.md(?:\s|#|//)+sections?\s+(\d+(?:\.\d+)?(?:(?:,\s*|\s+and\s+)\d+(?:\.\d+)?)*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _repo_files(suffixes):
    """Paths (relative to the root) of the repository's files: git's list when there is one
    (tracked and untracked, not ignored), else a walk that skips build and venv folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\n")
        files = [f for f in out if f and os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names]
    return sorted(f for f in files if f.endswith(suffixes) or os.path.basename(f) == "Makefile")


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _strip_fenced(markdown):
    """``markdown`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def _headings(markdown):
    """The headings of a Markdown text (outside fenced code blocks)."""
    return [line.lstrip("#").strip() for line in _strip_fenced(markdown).splitlines() if re.match(r"#{1,6} ", line)]


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(markdown):
    anchors, seen = set(), {}
    for heading in _headings(markdown):
        slug = github_anchor(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def design_sections():
    """The section numbers of docs/design.md: "3" for "## 3. ...", "8.1" for "### 8.1 ..."."""
    return {m.group(1) for h in _headings(_read("docs/design.md")) for m in [re.match(r"(\d+(?:\.\d+)?)\.? ", h)] if m}


def test_github_anchor_rules():
    assert github_anchor("3. Targets, groups and masks") == "3-targets-groups-and-masks"
    assert github_anchor("CPU backend (`backend=\"cpu\"`)") == "cpu-backend-backendcpu"
    assert _anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_design_sections_are_numbered():
    sections = design_sections()
    assert {"1", "3", "5", "6", "7", "8.1", "9", "13"} <= sections
    top = sorted(int(s) for s in sections if "." not in s)
    assert top == list(range(1, len(top) + 1)), f"docs/design.md: top-level sections must run 1..N, got {top}"


def test_citations_name_existing_sections():
    sections = design_sections()
    citations = 0
    bad = []
    for rel in _repo_files(TEXT_SUFFIXES):
        text = _read(rel)
        for match in CITATION.finditer(text):
            citations += 1
            for number in re.split(r",\s*|\s+and\s+", match.group(1)):
                if number not in sections:
                    line = text.count("\n", 0, match.start()) + 1
                    bad.append(f"{rel}:{line}: section {number}")
        # every mention of the design file that says "section" must have been parsed above (a
        # literal "section N" describes the form)
        loose = len(re.findall(r"docs/design\.md(?:\s|#|//)+sections?\s+(?!N\b)", text))
        assert loose == len(CITATION.findall(text)), f"{rel}: a docs/design.md citation without a section number"
    assert not bad, "citations of sections docs/design.md does not have:\n" + "\n".join(bad)
    assert citations >= 30  # the code does cite it: a broken pattern must not pass silently


def test_nothing_cites_the_brief_outside_the_repository():
    # built from parts, so this file does not match itself
    outside = re.compile("|".join([r"\bDESIGN" + r"\.md", r"\.\./shared" + "/", r"packing" + r"\.md"]))
    hits = [f"{rel}:{_read(rel).count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for rel in _repo_files(TEXT_SUFFIXES) for m in outside.finditer(_read(rel))]
    assert not hits, "files cite documents that are not in a clone (cite docs/design.md):\n" + "\n".join(hits)


def test_relative_links_resolve():
    bad = []
    checked = 0
    for rel in _repo_files((".md",)):
        text = re.sub(r"`[^`\n]*`", "", _strip_fenced(_read(rel)))  # links, not code that looks like one
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not os.path.exists(os.path.join(ROOT, resolved)):
                bad.append(f"{rel}: {target} (no {resolved})")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                bad.append(f"{rel}: {target} (no heading #{anchor} in {resolved})")
    assert not bad, "broken relative links:\n" + "\n".join(bad)
    assert checked >= 5


def test_readme_and_models_state_this_pythons_corpus():
    """README and ``stdlib_corpus``'s docstring name a Python version and the corpus size it gives;
    on that version, the size must be what ``stdlib_corpus()`` reads."""
    from step_kernels.models import stdlib_corpus

    readme = re.search(r"([\d.]+) MB of Python (\d+\.\d+\.\d+) standard-library source", _read("README.md"))
    module = re.search(r"CPython (\d+\.\d+\.\d+) this is ([\d,]+) bytes\s+\(([\d.]+) MB\)", stdlib_corpus.__doc__)
    assert readme and module, "README and stdlib_corpus's docstring must state the corpus size and Python version"
    assert (readme.group(1), readme.group(2)) == (module.group(3), module.group(1))
    assert f"{int(module.group(2).replace(',', '')) / 1e6:.2f}" == module.group(3)
    if platform.python_version() != module.group(1):
        pytest.skip(f"the documented size is CPython {module.group(1)}'s; this is {platform.python_version()}")
    assert stdlib_corpus().numel() == int(module.group(2).replace(",", ""))


def test_demo_names_the_python_version(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from step_kernels import demo
    from step_kernels.models import stdlib_corpus

    assert demo.main(["--steps", "2", "--eval-every", "1", "--recipes", "dense", "--backend", "reference",
                      "--out", str(tmp_path)]) == 0
    banner = capsys.readouterr().out.splitlines()[0]
    size = f"{stdlib_corpus().numel() / 1e6:.2f} MB"
    assert f"{size} of Python {platform.python_version()} standard-library source" in banner
    assert os.path.exists(tmp_path / "loss_curves.png")


def test_readme_links_every_docs_page():
    """The README is the entry point: every page under docs/ is linked from it."""
    readme = _read("README.md")
    pages = [rel for rel in _repo_files((".md",)) if rel.startswith("docs/") and rel.count("/") == 1]
    assert "docs/benchmarks.md" in pages and "docs/optimizer.md" in pages
    missing = [rel for rel in pages if f"]({rel})" not in readme and f"]({rel}#" not in readme]
    assert not missing, "docs pages the README does not link: " + ", ".join(missing)
