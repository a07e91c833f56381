"""The docs stay true: generated reference pages match the code, the README is short and
every link and shipped file it names exists."""

import re
from pathlib import Path

import pytest

from fedmerge import docgen

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_reference_pages_match_the_code():
    assert docgen.stale(ROOT) == [], "run: python -m fedmerge.docgen"
    pages = docgen.render_all()
    assert "| `distributed.agents_per_rank` | `0` |" in pages["config.md"]
    assert "| `density` | float | `0.2` | (0, 1] |" in pages["merge-methods.md"]
    assert "| `alpha` | float | `0.5` | [0, inf) |" in pages["continual-methods.md"]
    assert "| `hidden` | list[int] | `(128, 64)` | [1, inf) |" in pages["models.md"]


def test_stale_pages_are_named(tmp_path):
    page = tmp_path / docgen.REFERENCE / "config.md"
    page.parent.mkdir(parents=True)
    page.write_text("hand-edited\n")
    assert str(docgen.REFERENCE / "config.md") in docgen.stale(tmp_path)
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert docgen.main(["--root", str(tmp_path)]) == 0 and docgen.stale(tmp_path) == []


def test_readme_is_short_and_stays_in_the_repo():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text) <= 15_000
    assert "make run" in text and "make test" in text
    assert not [t for t in LINK.findall(text) if t.startswith("..") or "/shared/" in t]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
        assert ROOT.resolve() in path.parents or path == ROOT.resolve()


def test_shipped_files_the_readme_runs_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in set(re.findall(r"simulations/[\w/.-]+\.yaml", text)):
        assert (ROOT / name).is_file(), name
