"""The dimat_paper recipe: its sweep file expands to the cells the docs table reads, and the
report reduces per-round curves to mean ± std over seeds."""

import importlib.util
import json
from pathlib import Path

import pytest

from fedmerge.config import load_config
from fedmerge.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1] / "simulations" / "dimat_paper"


def _report():
    spec = importlib.util.spec_from_file_location("dimat_paper_report", ROOT / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_cells_are_valid_configs_naming_every_method():
    sweep = load_sweep(ROOT / "sweep.yaml")
    cells = expand(sweep)
    report = _report()
    methods = set()
    for cell in cells:
        cfg = load_config(sweep["base"], list(cell.sets))
        assert cfg.pretrain.epochs == 100 and cfg.pretrain.optimizer == "adam"
        assert cfg.train.epochs == 2 and cfg.rounds >= 15 and cfg.agents == 5
        fields = {k: v for k, _, v in (s.partition("=") for s in cell.sets)}
        fields = {k: json.loads(v) if v.startswith("{") else v for k, v in fields.items()}
        methods.add((fields["data.partition"], report.method_of(fields)))
    want = {(p, m) for p in ("iid", "shards") for m in report.METHODS}
    assert methods == want and sweep["seeds"] == [0, 1, 2]


def test_report_table_is_mean_and_std_over_seeds(tmp_path):
    curve = lambda acc, tr: [  # noqa: E731
        {"global_acc": a, "acc_trained": t, "consensus": 1.0, "consensus_aligned": 0.5,
         "disagreement": 0.1} for a, t in zip(acc, tr, strict=True)
    ]  # fmt: skip
    results = [{
        "label": "x", "sets": ["data.partition=iid", "topology=ring",
                               'protocol={"name": "dimat", "calibration": "shared"}'],
        "runs": [{"seed": 0, "curve": curve([0.8, 0.9], [0.7, 0.95])},
                 {"seed": 1, "curve": curve([0.6, 0.9], [0.7, 0.85])}],
    }]  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = _report()
    cells = report.load(tmp_path)
    row = report.table(cells).splitlines()[2]
    # first merge: mean 0.7, sample std 0.141; last training: 0.9 ± 0.071; last merge 0.9 ± 0
    assert row.startswith("| iid | ring | dimat-shared | 0.700 ± 0.141 | 0.900 ± 0.071 |")
    assert "0.900 ± 0.000" in row
    report.plot(cells, tmp_path / "dimat_paper.png")
    assert (tmp_path / "dimat_paper.png").read_bytes()[:4] == b"\x89PNG"
    assert cells[("iid", "ring", "dimat-shared")]["global_acc"].shape == (2, 2)
    with pytest.raises(KeyError):
        cells[("iid", "complete", "dimat-shared")]
