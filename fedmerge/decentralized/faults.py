"""The fault model: who is up, who trains, which messages are lost, how crashed nodes rejoin.

:class:`FaultModel` draws every round's faults from seeded generators, so every runtime (and
every rank of one) sees the same faults for a seed. :class:`Recovery` is the crash/rejoin
policy over per-node state files (:mod:`fedmerge.decentralized.persist`).

Each runtime declares the faults it can run (:data:`FAULTS` names them); asking one for a
fault it does not support is a :class:`ConfigError` naming the field (:func:`check_faults`):

>>> from fedmerge.config import FaultsConfig
>>> check_faults(FaultsConfig(duplicate=0.1), "flower", ("dropout",))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: faults.duplicate: not supported by runtime 'flower' (it runs ...)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from fedmerge.config import FaultsConfig
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.errors import ConfigError
from fedmerge.statedict import StateDict

FAULTS = ("dropout", "straggler", "crash", "message_loss", "duplicate", "reorder", "byzantine",
          "state_dir", "rejoin")  # fmt: skip
"""Every fault kind a runtime may declare (``faults.<name>`` in the config)."""


def faults_in_use(cfg: FaultsConfig) -> list[str]:
    """The fault kinds ``cfg`` turns on, in :data:`FAULTS` order."""
    default = FaultsConfig()
    on = {k: getattr(cfg, k) != getattr(default, k) for k in FAULTS if k != "byzantine"}
    on["byzantine"] = bool(cfg.byzantine.count or cfg.byzantine.nodes)
    return [k for k in FAULTS if on[k]]


def check_faults(cfg: FaultsConfig, runtime: str, supported: Collection[str]) -> None:
    """Refuse, by field name, the faults ``runtime`` does not declare in ``supported``."""
    refused = [f"faults.{k}" for k in faults_in_use(cfg) if k not in supported]
    if refused:
        runs = ", ".join(f"faults.{k}" for k in FAULTS if k in supported) or "no faults"
        raise ConfigError(f"{', '.join(refused)}: not supported by runtime {runtime!r} "
                          f"(it runs {runs})")  # fmt: skip


class FaultModel:
    """Seeded per-round faults: dropout, stragglers, crash + rejoin, message loss.

    Each kind draws from its own generator keyed by (seed, round, kind), so adding
    message loss does not change who drops out.
    """

    def __init__(self, cfg: FaultsConfig, n: int, seed: int) -> None:
        self.cfg, self.n, self.seed = cfg, n, seed
        self.down_until = np.zeros(n, dtype=np.int64)  # crashed nodes rejoin at this round

    def _hit(self, r: int, kind: int, p: float, size: int) -> np.ndarray:
        """(size,) bool: each entry hit with probability ``p`` in round r; kind ``kind``'s
        own stream (with p = 0 nothing is drawn: every stream is seeded per round, so
        skipping one changes no other draw)."""
        if p == 0:
            return np.zeros(size, dtype=bool)
        return np.random.default_rng([self.seed, r, kind]).random(size) < p

    def nodes(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(active (n,) bool, trains (n,) bool) for round r (call once per round, in order)."""
        c = self.cfg
        alive = self.down_until <= r
        crash = alive & self._hit(r, 1, c.crash, self.n)
        self.down_until[crash] = r + c.crash_rounds
        active = alive & ~crash & ~self._hit(r, 2, c.dropout, self.n)
        trains = active & ~self._hit(r, 3, c.straggler, self.n)
        return active, trains

    def lost(self, r: int, messages: int) -> np.ndarray:
        """(messages,) bool: which of the round's messages (in plan order) are lost."""
        return self._hit(r, 4, self.cfg.message_loss, messages)


class Recovery:
    """Persistence and the rejoin policy (``faults.state_dir``, ``faults.rejoin``): every
    active node saves after each round; a node rejoining after a crash gets its last saved
    state (``persisted``), its initial state (``initial``), or keeps what it had
    (``memory``: a crash that loses nothing)."""

    def __init__(self, cfg: FaultsConfig, initial: Callable[[int], StateDict]) -> None:
        """``initial(i)``: node i's initial state dict (for ``rejoin: initial``)."""
        if cfg.rejoin == "persisted" and not cfg.state_dir:
            raise ConfigError("faults.rejoin: 'persisted' needs faults.state_dir")
        self.cfg, self.initial = cfg, initial

    def before_round(self, r: int, down_until: np.ndarray, agents: Sequence[Agent]) -> None:
        """Nodes coming back from a crash this round take their rejoin state. Before round
        0 every node saves its initial state, so no file of an earlier run is ever read."""
        if r == 0 and self.cfg.state_dir:
            for agent in agents:
                save_agent(agent, self.cfg.state_dir, 0)
        if self.cfg.rejoin == "memory" or r == 0:
            return
        for i in np.flatnonzero(down_until == r):
            agent = agents[i]
            if self.cfg.rejoin == "initial" or restore_agent(agent, self.cfg.state_dir) is None:
                agent.model.load_state_dict(self.initial(int(i)))

    def after_round(self, r: int, active: np.ndarray, agents: Sequence[Agent]) -> None:
        if self.cfg.state_dir:
            for i in np.flatnonzero(active):
                save_agent(agents[i], self.cfg.state_dir, r + 1)
