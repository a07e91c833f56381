"""The sweep runner: grids expand to the right cells, every run is the simulator's, outputs
agree with each other, and bad sweeps are clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from fedmerge.config import load_config
from fedmerge.errors import ConfigError
from fedmerge.experiments.sweep import cells, load_sweep, main, panels, run_cell

SWEEP = {
    "name": "tiny",
    "base": {
        "rounds": 2,
        "topology": {"graph": "ring", "n": 3},
        "model": {"init": "different"},
        "train": {"steps": 2},
    },  # fmt: skip
    "seeds": [0, 1],
    "grids": [
        {"protocol.name": ["dimat", "gossip"], "data.partition": ["iid", "shards"]},
        {"protocol.name": ["local"]},
    ],
}


def write(tmp_path, sweep) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return str(path)


def test_grid_expansion_and_references(tmp_path):
    sweep = load_sweep(write(tmp_path, SWEEP), ["train.lr=0.05"])
    grid = cells(sweep)
    assert [c.values for c in grid] == [
        {"protocol.name": "dimat", "data.partition": "iid"},
        {"protocol.name": "dimat", "data.partition": "shards"},
        {"protocol.name": "gossip", "data.partition": "iid"},
        {"protocol.name": "gossip", "data.partition": "shards"},
        {"protocol.name": "local"},
    ]
    assert sweep.base["train"]["lr"] == 0.05
    groups = panels(sweep, grid)  # one panel per partition; `local` is a reference in both
    assert list(groups) == ["iid", "shards"]
    assert [len(groups[p][0]) for p in groups] == [2, 2]
    assert all(groups[p][1] == [grid[4]] for p in groups)


def test_end_to_end_matches_direct_simulator_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([write(tmp_path, SWEEP), "--out", str(out), "--seeds", "0,1"]) == 0
    assert "tiny: mean global test accuracy" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 5 * 2
    summary = json.loads((out / "summary.json").read_text())
    first = summary["cells"][0]  # dimat, iid: rerun seed 1 directly, compare
    direct = load_config(
        {**SWEEP["base"], "seed": 1, "protocol": {"name": "dimat"}, "data": {"partition": "iid"}}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep runs: the same kernels give the same floats
    try:
        curve, sent, _ = run_cell(direct)
    finally:
        torch.set_num_threads(threads)
    assert first["final_per_seed"][1] == pytest.approx(curve[-1], abs=1e-12)
    assert float(rows[1]["final_acc"]) == pytest.approx(curve[-1], abs=1e-6)
    assert int(rows[1]["bytes_sent"]) == sent > 0
    finals = np.array(first["final_per_seed"])
    assert first["final_mean"] == pytest.approx(finals.mean())
    assert first["final_std"] == pytest.approx(finals.std(ddof=1))
    assert first["best_mean"] >= first["final_mean"]
    local = summary["cells"][4]
    assert local["bytes_sent"] == 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.md").read_text().count("\n") == 2 + 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grids": [{"protocol.name": "dimat"}]}, r"grids\[0\].protocol.name: must be a non-empty"),
        ({"grids": [{"protocol.name": ["nope"]}]}, r"cell nope: protocol.name: unknown 'nope'"),
        ({"grids": [{"train.lr": [-1]}]}, r"train.lr: must be > 0"),
        ({"seeds": "zero"}, r"seeds: must be a list of integers"),
        ({"colour": 1}, r"colour: unknown sweep field"),
        ({"base": {"rounds": 0}}, r"rounds: must be > 0"),
    ],
)
def test_bad_sweeps_are_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, {**SWEEP, **change}))
