"""The runtime registry: one ``run(config)`` for the CLI and sweeps, declared faults, and
sweep cells that run on the runtime they name."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedmerge.cli import main
from fedmerge.config import load_config
from fedmerge.decentralized.faults import FAULTS
from fedmerge.errors import ConfigError
from fedmerge.runtimes import RUNTIMES, get_runtime, run
from fedmerge.runtimes.local import Simulator

SMALL = ["topology=ring-4", "rounds=2", "model.options.hidden=[16]", "train.steps=2"]


def test_every_runtime_is_registered_with_the_faults_it_runs():
    assert list(RUNTIMES) == ["local", "flower", "torchdist"]
    assert get_runtime("local").faults == FAULTS
    assert all(set(rt.faults) <= set(FAULTS) and rt.doc for rt in RUNTIMES.values())
    for name in ("flower", "torchdist"):
        assert set(get_runtime(name).faults) == {"dropout", "straggler", "crash", "message_loss"}


@pytest.mark.parametrize("runtime", ["flower", "torchdist"])
@pytest.mark.parametrize(
    ("fault", "field"),
    [("faults.duplicate=0.1", "faults.duplicate"), ("faults.byzantine.count=1",
     "faults.byzantine"), ("faults.rejoin=initial", "faults.rejoin")],
)  # fmt: skip
def test_unsupported_faults_are_refused_by_name_before_anything_starts(
    runtime, fault, field, monkeypatch
):
    real = importlib.import_module

    def guarded(name, *args):  # the runtime's module is not even imported
        assert not name.startswith(f"fedmerge.runtimes.{runtime}"), f"imported {name}"
        return real(name, *args)

    cfg = load_config(None, [*SMALL, f"runtime={runtime}", fault])
    monkeypatch.setattr("fedmerge.runtimes.importlib.import_module", guarded)
    with pytest.raises(ConfigError, match=rf"^{field}: not supported by runtime '{runtime}'"):
        run(cfg)


def test_options_a_runtime_does_not_take_are_errors():
    with pytest.raises(ConfigError, match="runtime 'local' takes no option 'procs'"):
        run(load_config(None, SMALL), procs=2)


@pytest.mark.parametrize("runtime", ["flower", "torchdist"])
@pytest.mark.parametrize(
    ("field", "value"), [("threads", 2), ("threads", 0), ("metrics.eval_every", 3)]
)
def test_local_only_fields_are_refused_by_name_elsewhere(runtime, field, value):
    cfg = load_config(None, [*SMALL, f"runtime={runtime}", f"{field}={value}"])
    with pytest.raises(ConfigError, match=rf"^{field}: only the local runtime takes it"):
        run(cfg)


def test_local_run_is_the_simulator_and_names_its_path(one_thread):
    cfg = load_config(None, SMALL)
    rows, details = run(cfg)
    assert details == {"runtime": "local", "path": "vectorized", "threads": 1, "device": "cpu"}
    assert rows == [{**r, "wall_s": rows[i]["wall_s"]} for i, r in enumerate(Simulator(cfg).run())]


def sweep_file(tmp_path, runtimes: list[str]) -> str:
    spec = {"name": "rt", "base": "default", "set": [*SMALL, "vectorize=never"],
            "cells": [{"label": rt, "set": [f"runtime={rt}"]} for rt in runtimes],
            "seeds": [0]}  # fmt: skip
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def check_sweep(tmp_path, runtimes: list[str]) -> None:
    out = tmp_path / "o"
    assert main(["sweep", sweep_file(tmp_path, runtimes), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    summaries = {r["label"]: r["runs"][0]["summary"] for r in results}
    assert [summaries[rt]["runtime"] for rt in runtimes] == runtimes
    ref = summaries["local"]
    for rt in runtimes:  # same numbers on every runtime
        for key in ("final_global_acc", "best_global_acc", "bytes_sent", "bytes_received"):
            assert summaries[rt][key] == pytest.approx(ref[key], abs=1e-6), (rt, key)


def test_sweep_cells_run_on_torchdist(tmp_path, one_thread):
    check_sweep(tmp_path, ["local", "torchdist"])


@pytest.mark.slow
def test_sweep_cells_run_on_flower_and_torchdist(tmp_path, one_thread):
    check_sweep(tmp_path, ["local", "torchdist", "flower"])


def test_import_fedmerge_is_lazy_and_imports_no_runtime():
    code = ("import sys, fedmerge; fedmerge.Simulator; fedmerge.Payload; "
            "print([m for m in sys.modules if m.startswith(('flwr', 'ray', "
            "'fedmerge.runtimes.torchdist', 'fedmerge.runtimes.flower'))])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_layering_contract_holds():
    """lint-imports: layers import only downward; no runtime imports another (so none
    imports the in-process simulator)."""
    root = Path(__file__).resolve().parent.parent
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout, not an installed copy
    out = subprocess.run([str(exe)], cwd=root, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_engines_and_runners_implement_the_declared_interfaces():
    from fedmerge.decentralized.engine import Engine, RoundRunner
    from fedmerge.runtimes.torchdist import RankRunner

    for vectorize, name in (("always", "vectorized"), ("never", "per-agent")):
        sim = Simulator(load_config(None, [*SMALL, f"vectorize={vectorize}"]))
        assert isinstance(sim.engine, Engine) and sim.engine.name == name
        assert isinstance(sim, RoundRunner)
    assert callable(RankRunner.round)  # torch.distributed ranks drive rounds the same way
