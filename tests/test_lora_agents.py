"""LoRA agents: a tiny ViT (built offline from a config) wrapped with peft; agents train and
share only the adapter; ``peft.lora_merge`` averages factors or products."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fedmerge.cli import main  # noqa: E402
from fedmerge.config import load_config  # noqa: E402
from fedmerge.decentralized.protocols import MergeContext, gossip  # noqa: E402
from fedmerge.decentralized.setup import build_setup  # noqa: E402
from fedmerge.errors import ConfigError  # noqa: E402
from fedmerge.hf.lora import product_gossip  # noqa: E402
from fedmerge.runtimes import run  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
LORA = ["model.name=hf", "topology=ring-4", "rounds=2", "train.steps=3", "train.optimizer=adam",
        "train.lr=0.01", "peft.r=2"]  # fmt: skip


def perturb(agent, seed: int) -> None:
    """Random adapter values (LoRA initializes B = 0, which makes every product zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in agent.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_a_lora_agent_shares_only_its_adapter(one_thread):
    setup = build_setup(load_config(None, LORA))
    agent = setup.agent(0)
    shared = agent.tensors()
    assert shared and all(".lora_" in k or ".modules_to_save." in k for k in shared)
    full = build_setup(load_config(None, ["model.name=hf", "topology=ring-4"])).agent(0)
    n_full = sum(t.numel() for t in full.tensors().values())
    n_lora = sum(t.numel() for t in shared.values())
    # 2 layers × (q, v) × r=2 × (32 + 32), plus the classifier copy 32 × 10 + 10
    assert n_lora == 2 * 2 * 2 * 64 + 330
    assert agent.publish(1).nbytes * 15 < full.publish(1).nbytes
    assert n_full > 20 * n_lora


def test_product_merge_is_the_best_rank_r_approximation_of_the_mean_product(one_thread):
    cfg = load_config(None, [*LORA, "peft.lora_merge=product"])
    setup = build_setup(cfg)
    agents = [setup.agent(i) for i in range(3)]
    for i, a in enumerate(agents):
        perturb(a, i)
    theta = [{k: v + a.reference[k] for k, v in a.tensors().items()} for a in agents]
    received = [(agents[1].publish(1), 0.25), (agents[2].publish(1), 0.25)]
    expected = product_gossip(agents[0].tensors(), [(p.tensors, w) for p, w in received], 0.5,
                              agents[0].reference, 2)  # fmt: skip
    gossip(agents[0], received, 0.5, MergeContext(1, cfg))
    got = agents[0].tensors()
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k])
    a_keys = [k for k in got if ".lora_A." in k]
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        mean = sum(w * (t[b_key].double() @ t[a_key].double())
                   for t, w in zip(theta, (0.5, 0.25, 0.25), strict=True))  # fmt: skip
        s = torch.linalg.svdvals(mean)
        ref = agents[0].reference
        merged = (got[b_key] + ref[b_key]).double() @ (got[a_key] + ref[a_key]).double()
        assert float((merged - mean).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-4)
        weights = (0.5, 0.25, 0.25)
        mean_b = sum(w * t[b_key].double() for t, w in zip(theta, weights, strict=True))
        mean_a = sum(w * t[a_key].double() for t, w in zip(theta, weights, strict=True))
        # averaging the factors is also rank r, but further from the mean product
        assert float((mean_b @ mean_a - mean).norm()) > 1.1 * float((merged - mean).norm())


@pytest.mark.parametrize("merge", ["factors", "product"])
def test_lora_run_in_process(merge, one_thread):
    cfg = load_config(None, [*LORA, f"peft.lora_merge={merge}"])
    rows, details = run(cfg)
    assert details["path"] == "per-agent"
    payload = build_setup(cfg).agent(0).publish(1).nbytes
    assert all(r["bytes_sent"] == 2 * payload for r in rows)  # ring: two neighbours


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="peft.r: LoRA agents need one shared base"):
        build_setup(load_config(None, [*LORA, "protocol.name=dimat"]))
    with pytest.raises(ConfigError, match="peft.lora_merge: product averages"):
        build_setup(load_config(None, [*LORA, "peft.lora_merge=product",
                                       "protocol.aggregation=median"]))  # fmt: skip
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build_setup(load_config(None, [*LORA, "peft.target_modules=[nope]"])).agent(0)


@pytest.mark.slow
def test_shipped_lora_config_runs_through_the_cli(tmp_path, one_thread):
    config = Path(__file__).resolve().parents[1] / "simulations" / "lora_gossip.yaml"
    argv = ["simulate", str(config), "--set", "rounds=1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    assert (tmp_path / "summary.json").exists()
