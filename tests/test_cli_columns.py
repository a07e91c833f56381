"""Every table reads at 80 columns (any piped output): nothing is dropped or cut."""

from __future__ import annotations

import re

import pytest

from fedmerge.cli import main
from fedmerge.merging import METHODS
from fedmerge.topology.specs import list_presets, resolve_spec


@pytest.fixture
def at_80_columns(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str) -> list[str]:
        assert main(list(args)) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert "…" not in "".join(lines)  # nothing cut short
        return lines

    return run


def words(lines: list[str]) -> str:
    """The table's text without borders, one space between words (wrapped cells joined)."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩━─┳┻╇┼┬┴├┤└┘┌┐]", " ", " ".join(lines)).split())


def test_topology_list_keeps_every_column(at_80_columns):
    lines = at_80_columns("topology", "list")
    text = words(lines)
    for name in list_presets():
        row = next(x for x in lines if x.startswith(f"│ {name} "))
        spec = resolve_spec(name)
        if spec["n"] is not None:
            assert f" {spec['n']} │" in row, row
        assert f"{spec['graph']} · {spec['mixing']}" in row
        assert " ".join(spec["description"].split()) in text


def test_merge_list_is_short_and_complete(at_80_columns):
    lines = at_80_columns("merge", "--list")
    assert len(lines) <= 4 + 5 * len(METHODS)  # was 262 lines
    text = words(lines)
    for name, method in METHODS.items():
        assert any(x.startswith(f"│ {name} ") for x in lines)
        for p in method.params:
            assert f"{p.name}={p.default!r}" in text


def test_merge_list_of_one_method_shows_its_parameters(at_80_columns):
    text = words(at_80_columns("merge", "--list", "ties"))
    for p in METHODS["ties"].params:
        assert p.name in text and " ".join(p.doc.split()) in text
