"""The Byzantine experiment is a sweep (simulations/byzantine.yaml): a tiny grid end to end,
with the honest-node scores cross-checked against a direct simulation."""

import csv

import pytest

from fedmerge.config import default_config
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.sweep import expand, load_sweep, run_sweep, write_sweep

SHIPPED = "simulations/byzantine.yaml"


def test_shipped_grid_is_the_experiment():
    spec = load_sweep(SHIPPED)
    assert len(expand(spec)) == 2 * 3 * 5 and spec["seeds"] == [0]
    assert {"rounds=20", "data.partition=iid", "faults.byzantine.scale=4.0"} <= set(spec["set"])


def test_tiny_grid_writes_table_and_scores_the_honest_nodes(tmp_path):
    spec = load_sweep(SHIPPED)
    spec["set"] = [*spec["set"], "rounds=2"]
    spec["grid"] = {"topology": ["ring-4"], "faults.byzantine.count": [0, 1],
                    "protocol.aggregation": ["mean", "median"]}  # fmt: skip
    results = run_sweep(spec)
    rows = write_sweep(tmp_path, "byzantine", results)
    assert [r["cell"] for r in rows] == [
        "ring-4 · 0 · mean", "ring-4 · 0 · median", "ring-4 · 1 · mean", "ring-4 · 1 · median",
    ]  # fmt: skip
    summary = results[3]["runs"][0]["summary"]
    assert 0 <= summary["worst_global_acc"] <= summary["final_global_acc"] <= 1
    assert summary["agents"] == 3  # the Byzantine node is not scored
    cfg = default_config([*spec["set"], *results[3]["sets"], "seed=0"])
    last = [r for r in Simulator(cfg).run() if r["round"] == 2 and not r["byzantine"]]
    honest = [r["global_acc"] for r in last]
    assert summary["final_global_acc"] == pytest.approx(sum(honest) / len(honest))
    assert summary["worst_global_acc"] == pytest.approx(min(honest))
    table = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert float(table[3]["final_global_acc"]) == pytest.approx(summary["final_global_acc"])
    assert (tmp_path / "table.md").read_text().startswith("| cell | final global acc |")
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
