"""The CLI starts at once: ``--help`` and ``topology list`` import neither torch nor scipy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedmerge

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(*args: str) -> set[str]:
    """Top-level names of every module ``python -X importtime -m fedmerge ARGS`` imports."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedmerge", *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("import time:")]
    names = {x.rsplit("|", 1)[1].strip().split(".")[0] for x in lines[1:]}  # [0]: the header
    assert "fedmerge" in names  # the parse worked
    return names


@pytest.mark.parametrize("args", [("--help",), ("topology", "list"), ("simulate", "--help")])
def test_light_commands_import_no_heavy_library(args):
    heavy = {"torch", "scipy", "flwr", "matplotlib", "sklearn"}
    if args == ("--help",):
        heavy.add("networkx")
    assert imported_modules(*args) & heavy == set()


def test_version():
    result = subprocess.run([sys.executable, "-m", "fedmerge", "--version"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.stdout.strip() == f"fedmerge {fedmerge.__version__}"


def test_every_public_name_resolves_lazily():
    for name in fedmerge.__all__:
        assert getattr(fedmerge, name) is not None, name
    assert fedmerge.Simulator.__name__ == "Simulator"
    assert fedmerge.MERGE_METHODS is fedmerge.merging.METHODS  # renamed on export
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fedmerge.nope  # noqa: B018


@pytest.mark.parametrize("flag", ["-o", "--out", "--output"])
def test_output_flags_agree_across_commands(flag):
    from fedmerge.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["continual", "export", "store", flag, "x"]).out == "x"
    if flag != "--output":
        assert parser.parse_args(["merge", "ties", flag, "x"]).out == "x"
