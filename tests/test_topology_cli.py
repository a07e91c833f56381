"""`fedmerge topology show|list` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmerge.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_show_json_has_the_promised_fields(capsys):
    assert main(["topology", "show", "ring-8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and report["edges"] == 8
    assert report["degree_min"] == report["degree_max"] == 2 and report["degree_mean"] == 2.0
    assert report["connected"] and report["diameter"] == 4
    assert report["mixing"] == "metropolis_hastings" and report["doubly_stochastic"]
    assert report["spectral_gap"] == pytest.approx(0.19526214587563495)


def test_show_with_n_set_and_round(capsys):
    argv = ["topology", "show", "torus", "--n", "36", "--set", "mixing=uniform", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 36 and report["mixing"] == "uniform" and report["degree_max"] == 4
    argv = ["topology", "show", "complete-8", "--set", "schedule.kind=random_matching"]
    assert main([*argv, "--round", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["round"]["kind"] == "matching" and len(report["round"]["edges"]) == 4


def test_show_table_and_plot(tmp_path, capsys):
    png = tmp_path / "ring.png"
    assert main(["topology", "show", "ring-8", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "spectral gap" in out and "0.195262" in out and "in-weights" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    big = tmp_path / "big.png"
    assert main(["topology", "show", "watts_strogatz", "--n", "200", "--plot", str(big)]) == 0
    assert "in-weights" not in capsys.readouterr().out  # no per-node table for big graphs
    assert big.read_bytes()[:4] == b"\x89PNG"


def test_list_shows_presets(capsys):
    assert main(["topology", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("ring-8", "complete-8", "torus-4x4", "exponential-16", "star-8"):
        assert name in out


def test_bad_spec_is_one_line_exit_2(capsys):
    assert main(["topology", "show", "ring", "--n", "8", "--set", "mixing=magic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmerge topology: error: unknown mixing rule 'magic'")
    assert err.count("\n") == 1


def test_subprocess_from_another_directory_finds_presets(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fedmerge", "topology", "show", "exponential-16", "--json"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["degree_max"] == 7


def test_time_varying_schedule_show_and_plot_one_round(tmp_path, capsys):
    assert main(["topology", "show", "sparse-then-merge-16"]) == 0
    assert "static W" in capsys.readouterr().out
    png = tmp_path / "merge.png"
    argv = ["topology", "show", "sparse-then-merge-16", "--round", "3", "--total-rounds", "4"]
    assert main([*argv, "--plot", str(png), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["round"]["kind"] == "complete" and len(report["round"]["edges"]) == 16 * 15 // 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(argv[:-2]) == 2
    assert "needs the number of rounds" in capsys.readouterr().err
