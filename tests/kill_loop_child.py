"""A node that persists after every round and resumes from its file: the child process of
``test_adversary.py::test_kill_9_loop_resumes_with_no_lost_round``.

    python tests/kill_loop_child.py STATE_DIR ROUNDS
    → prints "start k" (the round it resumes after), then "round k" after saving round k
"""

import sys

import torch

from fedmerge.config import TrainConfig, ValidationConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.models import build_model


def make_node() -> Agent:
    """A small MLP agent on 600 fixed random samples (3 SGD steps of 200 per round)."""
    model = build_model("mlp", in_shape=(16,), num_classes=4, seed=3, hidden=[64])
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(600, 16, generator=g), torch.randint(0, 4, (600,), generator=g)
    return Agent(0, model, AgentData(x, y, x[:0], y[:0]), train=TrainConfig(batch_size=200),
                 validation=ValidationConfig(), seed=11)  # fmt: skip


def run(state_dir: str | None, rounds: int) -> Agent:
    node = make_node()
    done = (restore_agent(node, state_dir) or 0) if state_dir else 0
    if state_dir:
        print(f"start {done}", flush=True)
    for r in range(done, rounds):
        node.train()
        if state_dir:
            save_agent(node, state_dir, r + 1)
            print(f"round {r + 1}", flush=True)
    return node


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
