"""Per-node persistence: an agent's state on disk, so that a crashed node resumes.

A node's file ``agent-NNNN.safetensors`` holds its model state dict plus its batch-order
generator state (key ``__rng__``, uint8) and, in the header, the round it completed; it is
written atomically (temp + fsync + rename), so a kill at any moment leaves the previous
round's file intact. Restoring sets the model and the generator, so a resumed node goes on
exactly as if it had never stopped.

:class:`Recovery` is the simulator's use of it (``faults.state_dir``, ``faults.rejoin``):
every active node saves after each round; a node rejoining after a crash gets its last
saved state (``persisted``), its initial model (``initial``), or keeps what it had
(``memory``, the old behaviour: a crash that loses nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedmerge.checkpoint import open_checkpoint, save_state_dict
from fedmerge.config import FaultsConfig
from fedmerge.errors import CheckpointError, ConfigError

RNG_KEY = "__rng__"


def state_file(state_dir: str | os.PathLike, agent_id: int) -> Path:
    return Path(state_dir) / f"agent-{agent_id:04d}.safetensors"


def save_agent(agent, state_dir: str | os.PathLike, round: int) -> Path:
    """Atomically write ``agent``'s model state and generator state after ``round``."""
    path = state_file(state_dir, agent.id)
    state = {**agent.state(), RNG_KEY: agent.generator.get_state()}
    save_state_dict(state, path, {"round": str(round), "agent": str(agent.id)})
    return path


def restore_agent(agent, state_dir: str | os.PathLike) -> int | None:
    """Load ``agent``'s last saved state; return its round, or None if it never saved.
    A file for another agent or another model is a :class:`CheckpointError`."""
    path = state_file(state_dir, agent.id)
    if not path.exists():
        return None
    with open_checkpoint(path) as ck:
        meta, state = dict(ck.metadata), ck.load()
    if meta.get("agent") != str(agent.id) or RNG_KEY not in state:
        raise CheckpointError(f"{path}: not agent {agent.id}'s state file")
    rng = state.pop(RNG_KEY)
    own = agent.state()
    if {k: (v.dtype, v.shape) for k, v in state.items()} != {
        k: (v.dtype, v.shape) for k, v in own.items()
    }:  # fmt: skip
        raise CheckpointError(
            f"{path}: keys, shapes or dtypes differ from agent {agent.id}'s model"
        )
    agent.model.load_state_dict(state)
    agent.generator.set_state(rng)
    return int(meta["round"])


class Recovery:
    """The simulator's persistence and rejoin policy over an engine's ``agents``."""

    def __init__(self, cfg: FaultsConfig, setup) -> None:
        if cfg.rejoin == "persisted" and not cfg.state_dir:
            raise ConfigError("faults.rejoin: 'persisted' needs faults.state_dir")
        self.cfg, self.setup = cfg, setup

    def before_round(self, r: int, down_until: np.ndarray, engine) -> None:
        """Nodes coming back from a crash this round take their rejoin state. Before round
        0 every node saves its initial state, so no file of an earlier run is ever read."""
        if r == 0 and self.cfg.state_dir:
            for agent in engine.agents:
                save_agent(agent, self.cfg.state_dir, 0)
        if self.cfg.rejoin == "memory" or r == 0:
            return
        for i in np.flatnonzero(down_until == r):
            agent = engine.agents[i]
            if self.cfg.rejoin == "initial" or restore_agent(agent, self.cfg.state_dir) is None:
                agent.model.load_state_dict(self.setup.model(i).state_dict())

    def after_round(self, r: int, active: np.ndarray, engine) -> None:
        if self.cfg.state_dir:
            for i in np.flatnonzero(active):
                save_agent(engine.agents[i], self.cfg.state_dir, r + 1)
