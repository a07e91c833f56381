"""`fedmerge simulate` end to end, and config validation naming the field."""

import json

import pytest
import yaml

from fedmerge.cli import main
from fedmerge.config import default_config, dump_config, load_config
from fedmerge.errors import ConfigError


def test_default_simulation_learns_and_writes_its_report(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "summary: default" in out and "final global acc" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 50 and summary["agents"] == 8
    assert summary["final_global_acc"] > 0.3  # chance is 0.1; measured 0.39
    assert (
        summary["final_global_acc"]
        > json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["global_acc"]
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 50 and {r["agent"] for r in rows} == set(range(8))
    assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in rows) > 0
    assert load_config(tmp_path / "config.yaml") == default_config(["agents=8"])
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("round,agent,active") and len(csv) == 1 + 8 * 50
    for png in ("accuracy.png", "consensus.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_config_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "t", "rounds": 2, "topology": "complete-8",
                                   "protocol": {"name": "local"}}))  # fmt: skip
    assert main(["simulate", str(cfg), "--set", "rounds=3", "--quiet", "--out",
                 str(tmp_path / "o")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["bytes_sent"] == 0 and summary["name"] == "t rounds=3"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["trian.lr=0.1"], "trian: unknown field"),
        (["train.lr=-1"], "train.lr: must be > 0"),
        (["train.lr=fast"], "train.lr: must be a number"),
        (["rounds=2.5"], "rounds: must be an integer"),
        (["data.partition=random"], "data.partition: must be one of iid, dirichlet, shards"),
        (["faults.message_loss=1.5"], r"faults.message_loss: must be in \[0, 1\)"),
        (["protocol.name=fedavg"], "protocol.name: unknown protocol 'fedavg'"),
        (["topology=no-such-preset"], "topology"),
        (["model.name=transformer"], "model.name: unknown model 'transformer'"),
        (["train"], "use key=value"),
    ],
)
def test_config_errors_name_the_field(sets, message, capsys, tmp_path):
    args = ["simulate", "--quiet", "--out", str(tmp_path)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err


def test_show_config_round_trips(capsys):
    assert main(["simulate", "--show-config", "--set", "seed=7"]) == 0
    cfg = load_config(yaml.safe_load(capsys.readouterr().out))
    assert cfg.seed == 7 and cfg == default_config(["seed=7", "name=default seed=7"])
    assert yaml.safe_load(dump_config(cfg))["protocol"]["name"] == "gossip"
    assert default_config().topology == "ring-8"


def test_unknown_nested_field_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match=r"faults.loss: unknown field \(known: dropout"):
        load_config({"faults": {"loss": 0.1}})
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_fields_lists_every_option(capsys):
    assert main(["simulate", "--fields"]) == 0
    out = capsys.readouterr().out
    for name in ("train.lr", "faults.message_loss", "protocol.calibration", "vectorize"):
        assert name in out
