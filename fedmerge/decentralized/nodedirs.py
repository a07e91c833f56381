"""Export a simulated split as one directory per node, in the deployed-node layout.

``export_split(cfg, out)`` writes ``out/node-<i>/`` for every node i of ``cfg``'s split:
``data.safetensors`` (its train and local test samples), ``start.safetensors`` (its model at
round 0, after any pre-training), ``eval.safetensors`` (the global test set, public) and
``node.yaml`` (the node file naming them). A deployment over these directories computes
the same rounds as the simulator does from ``cfg`` — the way to check a deployment, and to
try one on one machine before the nodes' own data exists.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fedmerge.atomic import atomic_write_text
from fedmerge.checkpoint import save_state_dict
from fedmerge.config import SimConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.node import write_samples
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError


def export_split(cfg: SimConfig, out: str | Path) -> list[Path]:
    """Write ``cfg``'s split as per-node directories under ``out``; return the node files."""
    if cfg.peft.r:
        raise ConfigError("peft.r: a LoRA run's starting checkpoints cannot be exported yet")
    setup = build_setup(cfg)
    fed, files = setup.data, []
    public = AgentData(fed.test_x[:0], fed.test_y[:0], fed.test_x, fed.test_y)
    for i in range(setup.n):
        folder = Path(out) / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_samples(folder / "data.safetensors", fed.agents[i], fed.num_classes)
        write_samples(folder / "eval.safetensors", public, fed.num_classes, splits=("test",))
        start = {k: v.detach().clone().contiguous() for k, v in setup.model(i).state_dict().items()}
        save_state_dict(start, folder / "start.safetensors")
        node = {"node": i, "data": "data.safetensors", "checkpoint": "start.safetensors",
                "eval": "eval.safetensors", "state_dir": "state"}  # fmt: skip
        atomic_write_text(folder / "node.yaml", yaml.safe_dump(node, sort_keys=False))
        files.append(folder / "node.yaml")
    return files
