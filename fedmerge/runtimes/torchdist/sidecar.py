"""A merge sidecar for an external trainer, over torch.distributed.

Each host runs its own trainer (any stack) and one sidecar rank beside it; the trainer and
the sidecar share a directory (the file contract: :mod:`fedmerge.decentralized.handoff`).
Node i of the run config's topology is rank i. Round r on every rank::

    wait      until ``period_s`` after the previous round's start
    take      the newest new trainer checkpoint (none: keep the last merge)
    publish   θ_i (or τ_i = θ_i − θ_ref with a reference checkpoint)
    exchange  with the neighbours, the torch.distributed runtime's data plane
    merge     the round kit's receive_and_merge with the configured gossip protocol
    agree     every rank checks in (``on_peer_failure: abort``: a lost rank stops all)
    write     merged-<r>.safetensors and merged.json; the agent state (two generations)

Restart: the ranks of a restarted run (e.g. torchrun ``--max-restarts``) resume from the
last round every rank saved (:mod:`.resume`: ``state/round-NNNNNN/``, the last two kept). A
rank saves round r only after all ranks checked in at round r, so the saved rounds differ by
at most one; the round after the agreed one is done again by everyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fedmerge.checkpoint import load_state_dict
from fedmerge.config import SimConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized import handoff
from fedmerge.decentralized.context import MergeContext
from fedmerge.decentralized.faults import check_faults
from fedmerge.decentralized.handoff import CheckpointModel, SidecarAgent
from fedmerge.decentralized.protocols import get_protocol, gossip
from fedmerge.decentralized.setup import run_topology
from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.runtimes.torchdist.exchange import Exchange
from fedmerge.runtimes.torchdist.layout import make_layout
from fedmerge.runtimes.torchdist.resume import Generations, agree_round, run_identity
from fedmerge.runtimes.torchdist.round import exchange_and_merge, join_group


@dataclass(frozen=True)
class SidecarOptions:
    """``watch``: the directory shared with the trainer; ``state``: the sidecar's own state
    directory; ``reference``: a base checkpoint (payloads are τ against it; None: θ);
    ``period_s``: seconds between round starts."""

    watch: Path
    state: Path
    reference: Path | None = None
    period_s: float = 60.0


class Sidecar:
    """One rank's merge sidecar: its agent over the trainer's checkpoints, its share of
    every round's exchange."""

    def __init__(
        self, cfg: SimConfig, store: dist.Store, rank: int, world: int, opts: SidecarOptions
    ) -> None:
        self.cfg, self.rank, self.opts = cfg, rank, opts
        self.protocol = get_protocol(cfg.protocol.name)
        if self.protocol.merge is not gossip or cfg.protocol.codec != "none" or cfg.peft.r:
            raise ConfigError(
                f"protocol: the sidecar merges with gossip-family protocols without a codec, "
                f"not {cfg.protocol.name!r} (codec {cfg.protocol.codec!r})"
            )
        if cfg.distributed.on_peer_failure != "abort":
            raise ConfigError("distributed.on_peer_failure: the sidecar restarts, it does not "
                              "continue without a peer ('abort')")  # fmt: skip
        check_faults(cfg.faults, "torchdist sidecar", ())  # real faults only
        self.topology = run_topology(cfg, self.protocol)
        self.layout = make_layout(self.topology.n, world, 1)  # one node per rank
        first = self.wait_for_checkpoint(cfg.distributed.timeout_s)
        ref = None if opts.reference is None else load_state_dict(opts.reference)
        none = torch.empty(0)
        self.agent = SidecarAgent(
            rank, CheckpointModel(load_state_dict(first)), AgentData(none, none, none, none),
            train=cfg.train, validation=cfg.validation, seed=cfg.seed, reference=ref,
        )  # fmt: skip
        self.saved = Generations(opts.state, run_identity(cfg))
        self.start = self.resume(store, world)
        self.device, self.members = join_group(cfg, store, rank, world, self.layout)
        self.exchange = Exchange.for_agents(self.members, self.device, [self.agent])

    def wait_for_checkpoint(self, timeout: float) -> Path:
        """The newest trainer checkpoint, waiting up to ``timeout`` s for the first one."""
        deadline = time.monotonic() + timeout
        while (got := handoff.newest_checkpoint(self.opts.watch, -1)) is None:
            if time.monotonic() > deadline:
                raise CheckpointError(f"{self.opts.watch}: no ckpt-<step>.safetensors within "
                                      f"{timeout:g} s")  # fmt: skip
            time.sleep(0.05)
        return got[1]

    def resume(self, store: dist.Store, world: int) -> int:
        """The round to start from: the last one every rank saved (its state loaded), or 0."""
        start = agree_round(store, self.rank, world, self.saved.held())
        if start:
            self.saved.restore({self.rank: self.agent}, start)
        return start

    def take(self, r: int) -> str:
        """Adopt the newest new trainer checkpoint; returns what the node's model now is."""
        got = handoff.newest_checkpoint(self.opts.watch, self.agent.step)
        if got is None:
            return handoff.merged_file(self.opts.watch, r).name  # the trainer resumes from it
        self.agent.take(*got)
        return got[1].name

    def round(self, r: int) -> dict:
        """Round r (0-based): take, publish, exchange, merge, agree, write; a summary."""
        i, source = self.rank, self.take(r)
        plan = self.topology.round(r, total_rounds=self.cfg.rounds)
        payload, lost = self.agent.publish(r), [False] * len(plan.messages)
        ctx = MergeContext(r, self.cfg, None, self.topology.n)
        receipts, suspects = exchange_and_merge(self.exchange, plan, lost, {i: payload},
                                                {i: self.agent}, self.protocol, ctx)  # fmt: skip
        self.members.settle(r, "exchanged", suspects)  # before anything is written
        got = receipts[i]
        handoff.write_merged(self.opts.watch, r + 1, self.agent.state(), source)
        self.saved.save({self.rank: self.agent}, r + 1, [], full=True)
        return {"round": r + 1, "source": source, "received": got.received,
                "rejected": got.rejected}  # fmt: skip

    def run(self, on_round=None) -> None:
        """Rounds ``start`` … ``rounds``−1, one every ``period_s`` seconds."""
        next_start = time.monotonic()
        for r in range(self.start, self.cfg.rounds):
            time.sleep(max(0.0, next_start - time.monotonic()))
            next_start = time.monotonic() + self.opts.period_s
            summary = self.round(r)
            if on_round:
                on_round(summary)
        dist.destroy_process_group()
