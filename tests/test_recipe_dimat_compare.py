"""DIMAT-vs-gossip comparison of a sweep result (simulations/dimat/compare.py, the report
script of simulations/dimat_sweep.yaml): pairing by seed, differences, wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmerge.errors import ConfigError
from fedmerge.recipe import load_script
from fedmerge.sweep import load_sweep, run_report

ROOT = Path(__file__).parents[1]
compare = load_script(ROOT / "simulations" / "dimat" / "compare.py")
compare_rows, load_runs, main = compare.compare_rows, compare.load_runs, compare.main


def cell(protocol, partition, topology, finals, r1=0.1, extra=()):
    sets = [f"protocol.name={protocol}", "model.name=mlp", f"data.partition={partition}",
            *extra]  # fmt: skip
    if topology is not None:
        sets += ["model.init=different", f"topology={topology}"]
    runs = [
        {"seed": s, "summary": {"bytes_sent": 1000 * (topology is not None)},
         "curve": [{"global_acc": r1}, {"global_acc": f}]}
        for s, f in enumerate(finals)
    ]  # fmt: skip
    return {"label": protocol, "sets": sets, "runs": runs}


def test_pairs_by_seed_and_counts_wins(tmp_path, capsys):
    results = [
        cell("dimat", "shards", "ring", [0.5, 0.2, 0.4], r1=0.3),
        cell("gossip", "shards", "ring", [0.3, 0.3, 0.3]),
        cell("dimat", "shards", "{graph: torus, rows: 2, cols: 3}", [0.1, 0.1, 0.1]),
        cell("gossip", "shards", "{graph: torus, rows: 2, cols: 3}", [0.2, 0.2, 0.2]),
        cell("local", "shards", None, [0.15, 0.15, 0.15]),
        cell("local", "iid", None, [0.9, 0.9, 0.9]),
    ]
    (tmp_path / "results.json").write_text(json.dumps(results))
    rows = compare_rows(load_runs(tmp_path))
    assert [r["topology"] for r in rows] == ["ring", "torus"]
    ring, torus = rows
    assert ring["diff_final"] == pytest.approx([0.2, -0.1, 0.1])
    assert ring["wins"] == 2 and torus["wins"] == 0
    assert ring["dimat_r1"] == [0.3] * 3 and ring["mb_dimat"] == ring["mb_gossip"] == 0.001
    assert ring["local"] == [0.15] * 3 and ring["centralized"] == []
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "compare.md").read_text()
    assert "| mlp | shards | different | ring | 0.300 ± 0.000 |" in md
    assert "| 0.067 ± 0.153 | 2/3 |" in md  # mean and sample std of (0.2, -0.1, 0.1)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="results.json: cannot read sweep results"):
        load_runs(tmp_path)


def test_the_sweep_runs_it_as_its_report(tmp_path):
    spec = load_sweep(ROOT / "simulations" / "dimat_sweep.yaml")
    assert spec["report"] == str(ROOT / "simulations" / "dimat" / "compare.py")
    results = [cell("dimat", "iid", "ring", [0.5]), cell("gossip", "iid", "ring", [0.4])]
    (tmp_path / "results.json").write_text(json.dumps(results))
    paths = run_report(spec, tmp_path)
    assert paths == {"table": tmp_path / "compare.md", "plot": tmp_path / "compare.png"}
    assert "| mlp | iid | different | ring |" in paths["table"].read_text()


def test_the_dimat_paper_sweep_runs_its_report(tmp_path):
    spec = load_sweep(ROOT / "simulations" / "dimat_paper" / "sweep.yaml")
    point = {"global_acc": 0.5, "acc_trained": 0.6, "consensus": 1.0, "consensus_aligned": 0.5,
             "disagreement": 0.1}  # fmt: skip
    sets = ["data.partition=iid", "topology=ring", "protocol.name=gossip", "model.init=same"]
    runs = [{"seed": s, "summary": {}, "curve": [point, point]} for s in (0, 1)]
    (tmp_path / "results.json").write_text(json.dumps([{"label": "x", "sets": sets, "runs": runs}]))
    paths = run_report(spec, tmp_path)
    assert "| iid | ring | gossip | 0.500 ± 0.000 | 0.600 ± 0.000 |" in paths["table"].read_text()
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
