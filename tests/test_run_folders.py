"""Runs never overwrite each other; names say what ran; one set of defaults; ready configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fedmerge.cli import main
from fedmerge.config import default_config, field_docs, load_config
from fedmerge.errors import ConfigError
from fedmerge.runs import new_run_dir, run_name

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--set", "rounds=2", "--set", "topology=ring-4", "--quiet"]


def test_two_identical_runs_get_two_folders_and_latest_follows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", *QUICK, "--set", "protocol.name=local"]) == 0
    assert main(["simulate", *QUICK, "--set", "protocol.name=local"]) == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and runs[0].name != runs[1].name
    stem = "default_rounds-2_topology-ring-4_protocol.name-local-"
    assert all(p.name.startswith(stem) for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == max(runs, key=os.path.getmtime).resolve()
    summary = json.loads((latest / "summary.json").read_text())
    assert summary["name"] == "default rounds=2 topology=ring-4 protocol.name=local"
    assert (summary["protocol"], summary["topology"], summary["agents"]) == ("local", "ring-4", 4)
    assert summary["chance_acc"] == pytest.approx(0.1)  # digits: 10 classes
    saved = yaml.safe_load((latest / "config.yaml").read_text())
    assert saved["agents"] == 4 and saved["protocol"]["name"] == "local"  # not 0


def test_new_run_dir_counts_up_within_a_second(tmp_path):
    first = new_run_dir("a b=1", tmp_path, now=0.0)
    second = new_run_dir("a b=1", tmp_path, now=0.0)
    assert second.name == first.name + "-2" and first.is_dir() and second.is_dir()
    assert (tmp_path / "latest").resolve() == second.resolve()
    assert run_name("x", ["name=mine"]) == "mine"


def test_explicit_out_is_used_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", *QUICK, "--out", "here"]) == 0
    assert (tmp_path / "here" / "summary.json").exists() and not (tmp_path / "runs").exists()


def test_one_set_of_defaults():
    shipped = load_config(ROOT / "simulations" / "default.yaml")
    assert shipped == load_config(None) == default_config()
    docs = {name: default for name, default, _ in field_docs()}
    assert (docs["rounds"], docs["train.lr"], docs["train.steps"]) == (50, 0.5, 2)
    assert docs["model.options"] == {"hidden": [64]}
    minimal = load_config({"topology": "ring-4"})  # a minimal file: the same defaults
    assert (minimal.rounds, minimal.train.lr) == (50, 0.5)


def test_derived_defaults_follow_the_config():
    by_epochs = load_config({"train": {"epochs": 2}})
    assert (by_epochs.train.epochs, by_epochs.train.steps) == (2, 0)
    assert load_config(None, ["model.name=cnn"]).model.options == {}
    assert load_config(None, ["model.name=mlp"]).model.options == {"hidden": [64]}


@pytest.mark.parametrize("name", ["default", "dimat", "flower", "torchdist"])
def test_shipped_plain_configs_load(name):
    cfg = load_config(ROOT / "simulations" / f"{name}.yaml")
    assert cfg.name == name and cfg.runtime == ("local" if name in ("default", "dimat") else name)


def test_simulate_given_a_sweep_file_points_to_sweep(capsys):
    path = ROOT / "simulations" / "faults_digits.yaml"
    assert main(["simulate", str(path)]) == 2
    assert f"is a sweep file: run 'fedmerge sweep {path}'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="base: unknown field"):
        load_config(path)
