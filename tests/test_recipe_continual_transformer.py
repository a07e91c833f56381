"""The transformer-regime continual recipe (simulations/continual_transformer): a tiny ViT
body, peft LoRA experts merged back to dense bodies, folded by every continual method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.config import load_config
from fedmerge.continual import make_merger
from fedmerge.continual.experts import evaluate, prepare
from fedmerge.recipe import load_script

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "simulations" / "continual_transformer" / "vit.yaml"
recipe = load_script(ROOT / "simulations" / "continual_transformer" / "run.py")
TINY = {
    "tasks": ["rot90", "permute_a"],
    "orders": 2,
    "data": {"augment": 0},
    "model": {"arch": "vit", "vit": {"hidden_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "intermediate_size": 64,
                                     "patch_size": 4}},
    "pretrain": {"steps": 150, "lr": 3e-3},
    "probe": {"steps": 100},
    "finetune": {"steps": 60, "lr": 5e-3, "lora": {"r": 4, "alpha": 8.0, "modules_to_save": [],
                 "target_modules": ["q_proj", "v_proj", "fc1", "fc2"]}},
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def setup():
    return prepare(load_config(TINY, schema=recipe.TransformerConfig))


def _norm(state: dict, base: dict) -> float:
    return float(torch.cat([(state[k] - base[k]).double().flatten() for k in base]).norm())


def test_lora_experts_are_low_rank_dense_bodies_that_beat_the_pretrained_one(setup):
    base = evaluate(setup, setup.base)
    for k, expert in enumerate(setup.experts):
        assert set(expert) == set(setup.base)  # merge_and_unload: the body's own keys
        own = evaluate(setup, expert)[k]
        assert own > base[k], (setup.family.names[k], own, base[k])
        q = "vit.layers.0.attention.q_proj.weight"
        assert torch.linalg.matrix_rank(expert[q] - setup.base[q]) <= 4  # ΔW = s·B @ A, r = 4
        k_proj = "vit.layers.0.attention.k_proj.weight"  # not a LoRA target: unchanged
        assert torch.equal(expert[k_proj], setup.base[k_proj])
        assert q in setup.projectable


def test_opcm_keeps_the_merge_at_the_mean_task_vector_norm(setup):
    merger = make_merger("opcm", setup.base, projectable=setup.projectable, alpha=0.5)
    norms = []
    for expert in reversed(setup.experts):
        merger.add(expert)
        norms.append(_norm(expert, setup.base))
        assert _norm(merger.merged(), setup.base) == pytest.approx(np.mean(norms), abs=1e-4)


def test_recipe_end_to_end(tmp_path):
    cfg = load_config({**TINY, "out": str(tmp_path)}, schema=recipe.TransformerConfig)
    result = recipe.continual.run(cfg, lambda *_: None)
    recipe.RECIPE.write(result, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["orders"]) == 2 and summary["tasks"] == TINY["tasks"]
    methods = summary["methods"]
    assert {"opcm", "continual_task_arithmetic", "running_average", "continual_ties", "magmax",
            "individual", "multitask", "pretrained"} <= set(methods)  # fmt: skip
    for s in methods.values():
        assert all(0.0 <= a <= 1.0 for a in s["final_avg_acc_per_order"])
    for name, acc in summary["expert_acc"].items():
        assert acc > summary["pretrained_acc"][name]
    assert "| opcm |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "accuracy_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def test_shipped_yaml_is_the_default():
    assert recipe.RECIPE.load(SHIPPED) == recipe.RECIPE.load(None)
    assert recipe.RECIPE.load(None).finetune.lora.r == 8
