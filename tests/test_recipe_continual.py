"""The continual-merging recipe on digits tasks (simulations/continual): metrics, experts,
outputs, and its command line (fedmerge sweep and the script's own)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.cli import main as fedmerge_main
from fedmerge.config import load_config
from fedmerge.continual.experts import evaluate, multitask_state, prepare, task_vector_cosines
from fedmerge.continual.metrics import avg_seen, backward_transfer, mean_std
from fedmerge.errors import ConfigError
from fedmerge.recipe import load_script

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "simulations" / "continual" / "digits.yaml"
recipe = load_script(ROOT / "simulations" / "continual" / "run.py")
Run, RECIPE, task_orders = recipe.Run, recipe.RECIPE, recipe.task_orders
main = RECIPE.main


def config_from_mapping(raw: dict):
    return load_config(raw, schema=recipe.ContinualConfig)


SMALL = {
    "tasks": ["rot90", "invert", "permute_a"],
    "orders": 2,
    "model": {"hidden": [32], "features": 16},
    "pretrain": {"steps": 150, "lr": 3e-3},
    "probe": {"steps": 150, "lr": 1e-2},
    "finetune": {"steps": 80, "lr": 1e-3},
}


pytestmark = pytest.mark.usefixtures("one_thread_module")


# --- metrics on hand-constructed accuracy matrices -------------------------------------------


def test_bwt_and_average_accuracy_by_hand():
    R = np.array(
        [
            [0.90, 0.10, 0.20, 0.30],
            [0.80, 0.95, 0.20, 0.30],
            [0.70, 0.90, 0.85, 0.30],
            [0.60, 0.92, 0.75, 0.88],
        ]
    )
    # BWT = ((0.60-0.90) + (0.92-0.95) + (0.75-0.85)) / 3 ; the last task is excluded
    assert backward_transfer(R) == pytest.approx((-0.30 - 0.03 - 0.10) / 3)
    np.testing.assert_allclose(avg_seen(R), [0.90, 0.875, 0.8166666667, 0.7875])
    assert math.isnan(backward_transfer(np.array([[0.5]])))
    assert backward_transfer(np.full((3, 3), 0.4)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        avg_seen(np.zeros((2, 3)))


def test_mean_std_uses_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and std == pytest.approx(np.sqrt(14 / 3))
    assert mean_std([0.7])[1] == 0.0


def test_run_matrix_is_in_order_positions():
    acc = np.arange(9.0).reshape(3, 3)  # acc[t, k]: task k (family order) after step t
    run = Run("m", 0, [2, 0, 1], acc)
    np.testing.assert_array_equal(run.R[:, 0], acc[:, 2])  # first merged task = task 2
    np.testing.assert_array_equal(run.R[:, 2], acc[:, 1])


def test_task_orders_are_seeded_permutations():
    orders = task_orders(8, 10, seed=0)
    assert orders == task_orders(8, 10, seed=0) != task_orders(8, 10, seed=1)
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) == 10


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    return prepare(config_from_mapping(SMALL))


def test_experts_beat_the_pretrained_body_on_their_own_task(setup):
    base = evaluate(setup, setup.base)
    for k, expert in enumerate(setup.experts):
        own = evaluate(setup, expert)[k]
        assert own > base[k] + 0.02, (setup.family.names[k], own, base[k])
        assert own > 0.8


def test_experts_change_only_the_body_and_differ(setup):
    assert set(setup.experts[0]) == set(setup.base)
    assert setup.projectable == {"0.weight", "2.weight"}  # Linear weights; not LayerNorm's
    diffs = [float((e["0.weight"] - setup.base["0.weight"]).norm()) for e in setup.experts]
    assert all(d > 0 for d in diffs)
    assert not np.allclose(setup.experts[0]["0.weight"], setup.experts[1]["0.weight"])


def test_prepare_is_deterministic(setup):
    again = prepare(config_from_mapping(SMALL))
    for a, b in zip(setup.experts, again.experts, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


# --- a quick end-to-end run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual_digits")
    overrides = [f"tasks={SMALL['tasks']}".replace("'", ""), "orders=2", "model.hidden=[32]",
                 "model.features=16", "pretrain.steps=150", "probe.steps=150",
                 "finetune.steps=80", "finetune.lr=1e-3"]  # fmt: skip
    argv = ["sweep", str(SHIPPED), "--out", str(out), *sum((["--set", o] for o in overrides), [])]
    return out, fedmerge_main(argv)


def test_quick_run_writes_well_formed_outputs(quick_run, capsys):
    out, code = quick_run
    assert code == 0
    rows = list(csv.DictReader((out / "steps.csv").open()))
    methods = ["individual", "pretrained", "multitask", "opcm", "continual_task_arithmetic",
               "running_average", "continual_ties", "magmax"]  # fmt: skip
    assert len(rows) == len(methods) * 2 * 3
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    for r in rows:
        for key in ("avg_acc_seen", "avg_acc_all", "acc_rot90", "acc_invert", "acc_permute_a"):
            assert 0.0 <= float(r[key]) <= 1.0
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| opcm |" in (out / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == SMALL["tasks"] and len(summary["orders"]) == 2
    assert set(summary["methods"]) == set(methods)


def _R_from_csv(rows: list[dict], method: str, order: int) -> np.ndarray:
    """Rebuild the accuracy matrix of one run from the CSV (order positions)."""
    run = sorted((r for r in rows if r["method"] == method and int(r["order"]) == order),
                 key=lambda r: int(r["step"]))  # fmt: skip
    added = [r["task_added"] for r in run]
    return np.array([[float(r[f"acc_{name}"]) for name in added] for r in run])


def test_summary_json_agrees_with_the_csv(quick_run):
    out, _ = quick_run
    rows = list(csv.DictReader((out / "steps.csv").open()))
    summary = json.loads((out / "summary.json").read_text())["methods"]
    for method in ("opcm", "running_average", "magmax"):
        Rs = [_R_from_csv(rows, method, o) for o in (0, 1)]
        finals = [avg_seen(R)[-1] for R in Rs]
        bwts = [backward_transfer(R) for R in Rs]
        s = summary[method]
        assert s["final_avg_acc_mean"] == pytest.approx(np.mean(finals), abs=1e-5)
        assert s["final_avg_acc_std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-5)
        assert s["bwt_mean"] == pytest.approx(np.mean(bwts), abs=1e-5)
        assert s["final_avg_acc_min"] <= s["final_avg_acc_mean"] <= s["final_avg_acc_max"]


def test_first_step_is_the_first_expert_and_references_are_flat(quick_run):
    out, _ = quick_run
    rows = list(csv.DictReader((out / "steps.csv").open()))
    summary = json.loads((out / "summary.json").read_text())
    experts = summary["expert_acc"]
    for o in (0, 1):
        for method in ("opcm", "running_average"):  # θ^(1) = θ_1 for both
            first = next(r for r in rows if r["method"] == method and r["order"] == str(o)
                         and r["step"] == "1")  # fmt: skip
            assert float(first["avg_acc_seen"]) == pytest.approx(experts[first["task_added"]])
        R = _R_from_csv(rows, "pretrained", o)
        np.testing.assert_allclose(R, np.tile(R[0], (3, 1)))
    assert summary["methods"]["individual"]["final_avg_acc_mean"] == pytest.approx(
        np.mean(list(experts.values()))
    )


def test_run_in_process_matches_units():
    cfg = config_from_mapping({**SMALL, "orders": 1, "methods": {"running_average": {}}})
    ticks = []
    result = recipe.run(cfg, ticks.append)
    assert len(ticks) == recipe.units(cfg)
    assert [r.method for r in result.runs] == [
        "individual", "pretrained", "multitask", "running_average"
    ]  # fmt: skip
    # task arithmetic's grid: θ₀ + λ·Στ over all tasks, recomputed by hand
    setup = prepare(cfg)
    for lam in (0.3, 1.0):
        state = {k: setup.base[k] + lam * sum(e[k] - setup.base[k] for e in setup.experts)
                 for k in setup.base}  # fmt: skip
        np.testing.assert_allclose(result.ta_grid[lam], evaluate(setup, state), atol=1e-6)
    assert list(result.ta_grid) == [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    np.testing.assert_allclose(result.cosines, task_vector_cosines(setup), atol=1e-9)


def test_task_vector_cosines_by_hand(setup):
    cos = task_vector_cosines(setup)
    flat = [torch.cat([(e[k] - setup.base[k]).double().flatten() for k in sorted(setup.base)])
            for e in setup.experts]  # fmt: skip
    want = float(flat[0] @ flat[2] / (flat[0].norm() * flat[2].norm()))
    assert cos[0, 2] == pytest.approx(want, abs=1e-9) and cos[2, 0] == pytest.approx(want)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-12)


def test_multitask_reference_beats_the_pretrained_body(setup):
    cfg = config_from_mapping(SMALL)
    base = evaluate(setup, setup.base).mean()
    multi = evaluate(setup, multitask_state(setup, cfg.finetune, cfg.seed)).mean()
    assert multi > base + 0.05, (multi, base)


def test_shared_head_mode_uses_the_frozen_pretraining_head_for_every_task():
    cfg = config_from_mapping({**SMALL, "heads": "shared", "data": {"augment": 1}})
    shared = prepare(cfg)
    first = shared.heads[0].state_dict()
    for head in shared.heads[1:]:
        assert all(torch.equal(first[k], v) for k, v in head.state_dict().items())
    family = shared.family  # the pretraining head was trained on the pool plus 1 distorted copy
    assert first["weight"].shape == (10, SMALL["model"]["features"])
    X, _ = family.pretraining_data(1, cfg.seed)
    assert len(X) == 2 * len(family.y_pretrain)
    base, experts = evaluate(shared, shared.base), [evaluate(shared, e) for e in shared.experts]
    for k, acc in enumerate(experts):  # only the body adapts, and it does
        assert acc[k] > base[k] + 0.1, (family.names[k], acc[k], base[k])


# --- configuration and errors -----------------------------------------------------------------


def test_yaml_config_is_the_default():
    assert RECIPE.load(SHIPPED) == RECIPE.load(None)
    assert RECIPE.load(None).methods["opcm"] == {"alpha": 0.5, "zero_diagonal": True}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"ordres": 3}, "ordres"),
        ({"finetune": {"lr": "fast"}}, "finetune.lr"),
        ({"model": {"hidden": [32, "x"]}}, "model.hidden"),
        ({"orders": 0}, "orders"),
        ({"tasks": ["rot90"]}, "tasks"),
        ({"methods": {"opcm": {}, "nope": {}}}, "methods.nope"),
    ],
)
def test_bad_config_names_the_field(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_mapping(raw)


def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["--set", "methods={nope: {}}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("continual: error: methods.nope") and err.count("\n") == 1
    bad_param = ["--set", "methods={opcm: {alfa: 1}}", "--out", str(tmp_path)]
    assert main(bad_param + [f"--set={k}" for k in ("orders=1", "tasks=[rot90,invert]",
             "pretrain.steps=5", "probe.steps=5", "finetune.steps=5")]) == 2  # fmt: skip
    assert "alfa" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written on error
