"""User text is never read as rich markup (issue 19 defect 8): ids, paths and names made of
markup brackets are printed as typed and never crash a command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fedmerge.checkpoint import save_state_dict
from fedmerge.cli import main

HOSTILE = "[/bold]"  # a closing tag: rich raises MarkupError
OPENING = "x[red]"  # an opening tag: rich would swallow it (run names cannot hold "/")


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    """No wrapping: long temp paths stay on one line in the assertions."""
    monkeypatch.setenv("COLUMNS", "400")


def model(value: float) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((3, 2), value), "fc.bias": torch.full((3,), value)}


def test_continual_ids_paths_and_params(tmp_path, capsys):
    base, expert = tmp_path / "[/x]base.safetensors", tmp_path / "[red]e.safetensors"
    save_state_dict(model(0.0), base)
    save_state_dict(model(1.0), expert)
    store = str(tmp_path / "[/s]")
    assert (
        main(
            [
                "continual",
                "init",
                store,
                "--base",
                str(base),
                "--method",
                "continual_task_arithmetic",
                "--param",
                "scaling_factor=0.5",
            ]
        )
        == 0
    )
    assert main(["continual", "add", store, str(expert), "--id", HOSTILE]) == 0
    assert main(["continual", "status", store]) == 0
    assert main(["continual", "export", store, "-o", str(tmp_path / "[/o].safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"added '{HOSTILE}'" in out and f"wrote {tmp_path}/[/o].safetensors" in out
    assert "[/s]" in out and out.count(HOSTILE) >= 2  # the add line and the status table


def test_merge_output_path(tmp_path, capsys):
    for name, value in (("b", 0.0), ("e1", 1.0), ("e2", 2.0)):
        save_state_dict(model(value), tmp_path / f"{name}.safetensors")
    out = tmp_path / "[/x].safetensors"
    assert main(["merge", "average", "--base", str(tmp_path / "b.safetensors"),
                 str(tmp_path / "e1.safetensors"), str(tmp_path / "e2.safetensors"),
                 "-o", str(out), "--no-progress"]) == 0  # fmt: skip
    assert f"{tmp_path}/[/x].safetensors" in capsys.readouterr().out


def test_simulate_and_sweep_names(tmp_path, capsys, one_thread):
    tiny = ["rounds=1", "topology=ring-4", "train.steps=1", f"name={OPENING}"]
    args = ["simulate", "--out", str(tmp_path / "run")]
    assert main([*args, *(x for s in tiny for x in ("--set", s))]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["name"] == OPENING
    assert f"summary: {OPENING}" in capsys.readouterr().out
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": OPENING, "set": tiny[:3], "seeds": [0],
                                     "cells": [{"label": "[/cell]", "set": []}]}))  # fmt: skip
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert f"sweep {OPENING}" in out and "[/cell]" in out


def test_topology_name(tmp_path, capsys):
    spec = tmp_path / "[bold]t.yaml"
    spec.write_text(yaml.safe_dump({"graph": "ring", "n": 4}))
    assert main(["topology", "show", str(spec)]) == 0
    assert "[bold]t" in capsys.readouterr().out
