"""`fedmerge sweep`: grid expansion, seeds, the table and the files."""

import json

import pytest
import yaml

from fedmerge.cli import main
from fedmerge.errors import ConfigError
from fedmerge.sweep import expand, load_sweep


def test_grid_and_cells_expand_in_order():
    spec = {"grid": {"protocol.name": ["gossip", "local"], "topology": ["ring-4", "ring-8"]},
            "cells": [{"label": "lossy", "set": ["faults.message_loss=0.5"]}]}  # fmt: skip
    cells = expand(spec)
    assert [c.label for c in cells] == [
        "gossip · ring-4", "gossip · ring-8", "local · ring-4", "local · ring-8", "lossy",
    ]  # fmt: skip
    assert cells[1].sets == ("protocol.name=gossip", "topology=ring-8")


def test_bad_sweeps_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="needs a grid or cells"):
        expand({})
    with pytest.raises(ConfigError, match="lists of values"):
        expand({"grid": {"rounds": 3}})
    bad = tmp_path / "s.yaml"
    bad.write_text("grids: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['grids'\]"):
        load_sweep(bad)


def test_sweep_cli_runs_every_cell_and_seed(tmp_path, capsys):
    spec = {"name": "t", "base": "default", "set": ["rounds=3", "topology=ring-4"],
            "cells": [{"label": "gossip", "set": []},
                      {"label": "local", "set": ["protocol.name=local"]}],
            "seeds": [0, 1]}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 0
    assert "sweep t" in capsys.readouterr().out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["label"] for r in results] == ["gossip", "local"]
    assert [run["seed"] for run in results[0]["runs"]] == [0, 1]
    assert results[0]["runs"][0]["summary"] != results[0]["runs"][1]["summary"]
    assert results[1]["runs"][0]["summary"]["bytes_sent"] == 0 < results[0]["runs"][0][
        "summary"]["bytes_sent"]  # fmt: skip
    csv = (tmp_path / "o" / "table.csv").read_text().splitlines()
    assert csv[0].startswith("cell,seeds,final_global_acc") and len(csv) == 3
    assert (tmp_path / "o" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
