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


def test_sweep_reports_each_run_and_resumes_after_an_interruption(tmp_path, capsys):
    spec = {"name": "r", "base": "default", "set": ["rounds=2", "topology=ring-4"],
            "cells": [{"label": "gossip", "set": []},
                      {"label": "local", "set": ["protocol.name=local"]}]}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "o"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["[1/2] gossip · seed 0", "[2/2] local · seed 0"]
    saved = {p: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(saved) == 2
    first = json.loads((out / "results.json").read_text())
    # interrupted after the local run: only its file is left
    gossip = next(p for p, run in saved.items() if run["summary"]["bytes_sent"] > 0)
    gossip.unlink()
    (out / "results.json").unlink()
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[1/2] gossip · seed 0: final global acc" in err and "s elapsed" in err
    assert "[2/2] local · seed 0" in err and err.count("resumed from an earlier run") == 1
    assert "1 of 2 run(s) resumed" in err
    again = json.loads((out / "results.json").read_text())
    for a, b in zip(first, again, strict=True):
        assert a["runs"][0]["summary"]["final_global_acc"] == b["runs"][0]["summary"][
            "final_global_acc"]  # fmt: skip
