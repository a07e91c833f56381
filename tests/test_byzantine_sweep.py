"""The Byzantine experiment is a sweep (simulations/byzantine.yaml): a tiny grid end to end,
with the honest-node scores cross-checked against a direct simulation."""

import csv

import pytest

from fedmerge.config import default_config
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.sweep import expand, load_sweep, run_report, run_sweep, write_sweep

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


TABLE = "simulations/robustness_table.yaml"


def test_shipped_robustness_table_is_the_issue_grid():
    spec = load_sweep(TABLE)
    grid = spec["grid"]
    assert grid["data.partition"] == ["iid", "dirichlet"] and grid["faults.byzantine.count"] == [
        1,
        3,
    ]
    assert [b["attack"] for b in grid["faults.byzantine"]] == ["sign_flip", "noise", "alie", "ipm"]
    assert [p["aggregation"] for p in grid["protocol"]] == [
        "mean", "clip", "clip", "median", "trimmed_mean", "krum"]  # fmt: skip
    assert len(expand(spec)) == 2 * 4 * 2 * 6 + 12 + 4
    assert "topology=torus-4x4" in spec["set"] and spec["report"].endswith("robustness_report.py")


def test_robustness_report_pivots_the_runs(tmp_path):
    """A tiny version of the table end to end: the report's cells and gaps are the runs'."""
    spec = load_sweep(TABLE)
    spec["set"] = [*spec["set"], "rounds=2", "topology=ring-4", "model.options.hidden=[8]"]
    spec["grid"] = {"data.partition": ["iid"],
                    "faults.byzantine": [{"attack": "sign_flip", "scale": 4.0}],
                    "faults.byzantine.count": [1],
                    "protocol": [{"aggregation": "mean"},
                                 {"aggregation": "clip", "clip_screen": 2.0}]}  # fmt: skip
    spec["cells"] = [c for c in spec["cells"] if c["label"] in
                     ("iid · clean · mean", "iid · silent · 1 · mean")]  # fmt: skip
    spec["seeds"] = [0]
    results = run_sweep(spec)
    write_sweep(tmp_path, "robustness_table", results)
    written = run_report(spec, tmp_path)
    acc = {r["label"]: 100 * r["runs"][0]["summary"]["final_global_acc"] for r in results}
    worst = {r["label"]: 100 * r["runs"][0]["summary"]["worst_global_acc"] for r in results}
    text = written["table"].read_text()
    flip = 'iid · {"attack": "sign_flip", "scale": 4.0} · 1 · '
    mean, screened = (
        acc[flip + '{"aggregation": "mean"}'],
        acc[flip + '{"aggregation": "clip", "clip_screen": 2.0}'],
    )
    clean, silent = acc["iid · clean · mean"], acc["iid · silent · 1 · mean"]
    row = f"| iid | mean | {clean:.1f} ({worst['iid · clean · mean']:.0f}) | {mean:.1f} ("
    assert row in text, text
    best, best_acc = ("mean", mean) if mean >= screened else ("clip, screen 2", screened)
    gap = (
        f"| iid | 1 | sign flip | {best} | {best_acc:.1f} | {clean:.1f} | "
        f"{round(clean - best_acc, 1) + 0.0:.1f} | {round(clean - silent, 1) + 0.0:.1f} | ≤ 3 |"
    )
    assert gap in text, text
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"
