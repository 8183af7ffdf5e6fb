"""``python -m bench.readme``: copy each machine's latest report into README.md.

Every ``bench/results/<machine>.md`` written by ``python -m bench`` goes, in machine-name order,
between the README's ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers, its headings
moved two levels down (the report's title becomes a ``###``) and its plot links made relative to
the repository root; quick runs (``<machine>-quick.md``) are left out. ``python -m bench
--write-docs`` runs this after a full run.
"""

from __future__ import annotations

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def render(results_dir: str = RESULTS_DIR, root: str = os.path.dirname(README)) -> str:
    """The README section: every machine's report, headings demoted, plot paths from ``root``."""
    prefix = os.path.relpath(results_dir, root).replace(os.sep, "/")
    parts = []
    for path in sorted(p for p in glob.glob(os.path.join(results_dir, "*.md")) if not p.endswith("-quick.md")):
        with open(path) as f:
            text = f.read().strip()
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
        text = re.sub(r"!\[([^\]]*)\]\((?![a-z]+://|/)([^)]+)\)", rf"![\1]({prefix}/\2)", text)
        parts.append(text)
    return "\n\n".join(parts) if parts else "No benchmark report yet: run `python -m bench`."


def update_readme(readme: str = README, results_dir: str = RESULTS_DIR) -> bool:
    """Replace the README's bench section; False (README untouched) when the markers are missing."""
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return False
    section = f"{BEGIN}\n{render(results_dir, os.path.dirname(os.path.abspath(readme)))}\n{END}"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)
    return True


def main() -> int:
    if not update_readme():
        print(f"{README} has no {BEGIN} ... {END} section; nothing written", file=sys.stderr)
        return 1
    print(f"updated the bench section of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
