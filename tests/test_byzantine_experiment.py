"""The Byzantine experiment end to end at a tiny size: files, table, determinism."""

import csv

import pytest

from fedmerge.experiments.byzantine import honest_accuracy, main


def test_tiny_grid_writes_table_csv_and_plot(tmp_path, capsys):
    args = ["--rounds", "2", "--topologies", "ring-4", "--byzantine", "0,1",
            "--rules", "mean,median", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [(r["byzantine"], r["rule"]) for r in rows] == [
        ("0", "mean"), ("0", "median"), ("1", "mean"), ("1", "median"),
    ]  # fmt: skip
    assert all(0 <= float(r["worst"]) <= float(r["accuracy"]) <= 1 for r in rows)
    again = honest_accuracy("ring-4", 1, "median", rounds=2, scale=4.0, seed=0)
    assert again == pytest.approx((float(rows[3]["accuracy"]), float(rows[3]["worst"])))
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0] == "| topology | Byzantine | mean | median |" and len(md) == 4
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "honest global accuracy" in capsys.readouterr().out
