"""The agent-state file: one format for every runtime, so that a node resumes exactly.

A node's file ``agent-NNNN.safetensors`` holds its model state dict plus its batch-order
generator state (key ``__rng__``, uint8), and with compressed gossip its CHOCO state
(``__choco__/...``: public copies, codec sender state); its header names the agent, the round it
completed and its per-sender freshness state (:attr:`Agent.last_round`, JSON), so a resumed
node still refuses replays of what it accepted before; what a kind of agent keeps besides
(:meth:`Agent.extra_state`, e.g. a continual merge) travels in the same file. It is
written atomically (temp + fsync + rename): a kill at any moment leaves the previous file
intact. The file is written from the CPU and read onto the CPU; restoring copies the model
state onto the agent's device, and CHOCO puts its copies there. Restoring sets the
model, the generator and the freshness state, so a resumed node goes on exactly as if it
had never stopped. The in-process crash/rejoin policy
(:class:`~fedmerge.decentralized.faults.Recovery`) and every Flower node keep their agents
in these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedmerge.checkpoint import open_checkpoint, save_state_dict
from fedmerge.codecs.choco import PREFIX as CHOCO_PREFIX
from fedmerge.decentralized.agent import Agent
from fedmerge.device import CPU, to_device
from fedmerge.errors import CheckpointError, ValidationError

RNG_KEY = "__rng__"
EXTRA = "__extra__."  # prefix of the tensors of Agent.extra_state


def state_file(state_dir: str | os.PathLike, agent_id: int) -> Path:
    return Path(state_dir) / f"agent-{agent_id:04d}.safetensors"


def save_agent(agent: Agent, state_dir: str | os.PathLike, round: int) -> Path:
    """Atomically write ``agent``'s model, generator and freshness state after ``round``."""
    path = state_file(state_dir, agent.id)
    extra, extra_meta = agent.extra_state()
    state = {
        **agent.state(),
        RNG_KEY: agent.generator.get_state(),
        **{EXTRA + k: v for k, v in extra.items()},
    }
    meta = {"round": str(round), "agent": str(agent.id), "extra": json.dumps(extra_meta),
            "last_round": json.dumps(sorted(agent.last_round.items()))}  # fmt: skip
    if agent.choco is not None:  # compressed gossip: public copies and codec state
        tensors, extra = agent.choco.to_tensors()
        state, meta = {**state, **tensors}, {**meta, **extra}
    save_state_dict(to_device(state, CPU), path, meta)  # from the agent's device, if not CPU
    return path


def restore_agent(agent: Agent, state_dir: str | os.PathLike) -> int | None:
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
    extra = {k.removeprefix(EXTRA): state.pop(k) for k in list(state) if k.startswith(EXTRA)}
    if agent.choco is not None:
        agent.choco.load_tensors(state, meta)
    state = {k: v for k, v in state.items() if not k.startswith(CHOCO_PREFIX)}
    own = agent.state()
    if {k: (v.dtype, v.shape) for k, v in state.items()} != {
        k: (v.dtype, v.shape) for k, v in own.items()
    }:  # fmt: skip
        raise CheckpointError(
            f"{path}: keys, shapes or dtypes differ from agent {agent.id}'s model"
        )
    try:
        last = {int(s): int(r) for s, r in json.loads(meta.get("last_round", "[]"))}
        extra_meta = json.loads(meta.get("extra", "{}"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata: {exc}") from None
    agent.model.load_state_dict(state)
    agent.generator.set_state(rng)
    agent.last_round = last
    try:
        agent.load_extra_state(extra, extra_meta)
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad extra state: {exc}") from None
    return int(meta["round"])
