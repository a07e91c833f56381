"""Config robustness (issue 19 defect 11): one hardened YAML reader for the config, topology
and sweep loaders (size, depth and alias limits applied before anything runs; non-UTF-8 is a
clear error), ranges for every numeric field, run names confined to the output root, and
factories that import only trusted code."""

from __future__ import annotations

import os

import pytest
import yaml

from fedmerge import yamlio
from fedmerge.cli import main
from fedmerge.config import SimConfig, field_docs, load_config
from fedmerge.errors import ConfigError
from fedmerge.factory import import_factory
from fedmerge.sweep import load_sweep
from fedmerge.topology.specs import resolve_spec

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)  # 9 levels of 10 aliases: 10⁹ nodes once expanded, ~800 bytes of text
DEEP = "a: " + "[" * 330 + "]" * 330 + "\n"


def loaders(tmp_path):
    """(name, load(path)) for every loader that reads YAML from a file."""
    return [
        ("config", lambda p: load_config(p)),
        ("topology spec", lambda p: resolve_spec(p)),
        ("sweep", lambda p: load_sweep(p)),
    ]


@pytest.mark.parametrize(
    "body,match",
    [
        (LAUGHS, "aliases are expanded"),
        (DEEP, "nested deeper than 64"),
        (b"name: caf\xe9\n", "not UTF-8 text .* at byte 9"),
    ],
)
def test_every_loader_refuses_bombs_and_bad_bytes(tmp_path, body, match):
    assert len(LAUGHS) < 1024
    file = tmp_path / "x.yaml"
    file.write_bytes(body if isinstance(body, bytes) else body.encode())
    for what, load in loaders(tmp_path):
        with pytest.raises(ConfigError, match=f"{what} {file}: .*{match}"):
            load(file)


def test_set_values_and_topology_overrides_share_the_reader():
    with pytest.raises(ConfigError, match="--set .*nested deeper"):
        load_config(None, ["model.options={a: " + "[" * 200 + "]" * 200 + "}"])
    with pytest.raises(ConfigError, match="override .*aliases are expanded"):
        resolve_spec("ring-8", overrides=["params={" + LAUGHS.replace("\n", ", ") + "}"])


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(yamlio, "MAX_BYTES", 100)
    file = tmp_path / "big.yaml"
    file.write_text("rounds: 1\n" * 20)
    with pytest.raises(ConfigError, match="larger than the 100-byte limit"):
        load_config(file)


def test_a_bomb_is_refused_before_the_run_starts(tmp_path, capsys):
    file = tmp_path / "c.yaml"
    file.write_text(LAUGHS.replace("a:", "model: {options: {a:", 1).replace("\n", "}}\n", 1))
    assert main(["simulate", str(file), "--out", str(tmp_path / "out")]) == 2
    assert "aliases are expanded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("item,field", [
    ("seed=18446744073709551616000", "seed"), ("seed=-1", "seed"), ("agents=1000000000", "agents"),
    ("train.steps=1000000000000", "train.steps"), ("train.batch_size=1e30", "train.batch_size"),
    ("train.batch_size=1000000000000000000000000000000", "train.batch_size"),
    ("train.lr=.inf", "train.lr"), ("train.lr=1e999", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("rounds=10000000", "rounds"), ("train.epochs=100000", "train.epochs"),
    ("faults.byzantine.scale=-.inf", "faults.byzantine.scale"),
    ("validation.max_norm_ratio=.inf", "validation.max_norm_ratio"),
    ("distributed.timeout_s=1e300", "distributed.timeout_s"),
])  # fmt: skip
def test_numbers_out_of_range_name_the_field(item, field):
    with pytest.raises(ConfigError, match=rf"^{field}: must be"):
        load_config(None, [item])


def test_the_batch_plan_budget_is_a_cross_field_check():
    load_config(None, ["train.steps=1000", "train.batch_size=1000"])
    with pytest.raises(ConfigError, match=r"train.steps × train.batch_size: must be ≤ 100,000,000"):
        load_config(None, ["train.steps=1000000", "train.batch_size=1000"])


def test_every_numeric_field_has_a_range():
    for dotted, default, _ in field_docs(SimConfig):
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
                load_config(None, [f"{dotted}=1e300"])


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "a\\b", "n" * 129])
def test_sweep_names_stay_inside_the_output_root(tmp_path, name):
    """A sweep's name is its folder runs/<name>: it must be a plain name."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": name, "cells": [{"label": "a", "set": []}]}))
    with pytest.raises(ConfigError, match="name must be a plain name"):
        load_sweep(sweep)


def test_run_names_are_text_and_their_folders_stay_in_runs(tmp_path):
    """A run's folder is a slug of its name (fedmerge.runs), so '../../x' stays inside;
    the name itself may be any text without control characters."""
    from fedmerge.runs import new_run_dir

    assert load_config({"name": "../../x"}).name == "../../x"
    folder = new_run_dir("../../x", root=tmp_path / "runs")
    assert folder.parent == tmp_path / "runs"
    for bad in ("", "x\ny", "n" * 1001):
        with pytest.raises(ConfigError, match="^name: must be 1 to 1000 characters"):
            load_config({"name": bad})


def test_untrusted_factories_are_never_imported(monkeypatch, tmp_path, capsys):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    monkeypatch.delenv("FEDMERGE_TRUSTED_MODULES", raising=False)
    for field in ("model.name", "data.name", "train.loss"):
        rc = main(["simulate", "--set", f"{field}=os:system", "--set", "rounds=1",
                   "--out", str(tmp_path / "o")])  # fmt: skip
        assert rc == 2 and "which is not trusted" in capsys.readouterr().err
    assert called == []
    with pytest.raises(ConfigError, match="not trusted"):
        import_factory("fedmergex.evil:f", "model.name", [])  # a prefix is not a package


def test_trusted_factories_opt_in_by_environment(monkeypatch):
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", " tests , other")
    assert import_factory("tests.user_factories:blobs", "data.name", []).__name__ == "blobs"
    with pytest.raises(ConfigError, match="no callable 'nope'"):
        import_factory("tests.user_factories:nope", "data.name", [])
    with pytest.raises(ConfigError, match="cannot import 'tests.missing'"):
        import_factory("tests.missing:f", "data.name", [])
