"""The README and docs/: short front page in the promised order, links that resolve, generated blocks
that equal what their command writes from the committed run files."""

import re
from pathlib import Path

from qvlib.plots import VERDICT_BLOCK, readme_block

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_short_front_page_in_the_promised_order():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    first = "\n".join(lines[:40])
    assert "make run" in first and "make test" in first  # the two commands
    assert "rho_D = theta_QAT(D) - theta_FT(D)" in first  # what the method does, with its equation
    assert "![" in first and "<!-- verdict:start -->" in first  # the result's picture and its verdict
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## The demo's result", "## The two commands", "## Use it on your own checkpoints",
                        "## What lands in `results/`", "## The paper's grid on a GPU cluster", "## More"]


def test_every_relative_link_of_the_readme_and_docs_resolves():
    for page in [README, *DOCS]:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / image).stat().st_size > 1000, image


def test_readme_verdict_block_is_the_committed_run_summarys():
    """`make docs` copies a run's summary.md to docs/demo-summary.md and the block from it: the README's
    block must be exactly that file's (rerun `make docs` after a run, never edit the block by hand)."""
    summary = (REPO / "docs" / "demo-summary.md").read_text()
    block = readme_block(summary, VERDICT_BLOCK)
    assert block in README.read_text()
    assert "Measured on:" in block and "seeds" in block


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {Path(t).name for t in LINK.findall(README.read_text()) if t.startswith("docs/")}
    pages = {p.name for p in DOCS} - {"demo-summary.md"}  # the run's own summary, copied by make docs
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
