"""Restart and resume: a rank's saved rounds on disk, and the round a restarted run resumes at.

A rank that has a state directory saves every round ``r`` it completes as one generation::

    STATE/round-000007/agent-0002.safetensors   its agents (fedmerge.decentralized.persist)
    STATE/round-000007/round.json               {"run", "round", "full", "rows"}, written last

``round.json`` is the commit mark: a generation without it (a rank killed while saving) is
not used and is rewritten when that round is done again. Every file is written atomically.
A rank keeps its last two complete generations and the last one saved while every rank was
alive (``full``), so that after ``on_peer_failure: continue`` the survivors still hold the
round the lost rank can resume from.

When the ranks of a run start again (torchrun ``--max-restarts``, or every host running its
command again with the same run id), each publishes the rounds it holds on the rendezvous
store and all resume at the newest round every rank holds (0: from the start); a rank keeps
its rows of the rounds before, so the leader's report still covers the whole run. The rounds
after it are done again, and since every round is a function of the saved state (seeded
faults, plans and batch orders), the resumed run ends with the numbers of an uninterrupted
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fedmerge.atomic import atomic_write_text
from fedmerge.config import SimConfig, dump_config
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.errors import CheckpointError
from fedmerge.runtimes.torchdist.control import gather

log = logging.getLogger("fedmerge.torchdist")
Rows = list[dict[str, Any]]
MARK = "round.json"


class Generations:
    """The saved rounds of one rank under ``root`` for run ``run`` (a run id: generations of
    another run are ignored, and pruned as this run saves its own)."""

    def __init__(self, root: str | Path, run: str) -> None:
        self.root, self.run = Path(root), run

    def dir(self, round: int) -> Path:
        return self.root / f"round-{round:06d}"

    def mark(self, round: int) -> dict | None:
        """Generation ``round``'s commit mark, or None if it is incomplete or of another run."""
        try:
            mark = json.loads((self.dir(round) / MARK).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(mark, dict) and mark.get("run") == self.run and mark.get("round") == round
        ok = ok and isinstance(mark.get("full"), bool) and isinstance(mark.get("rows"), list)
        return mark if ok else None

    def complete(self) -> dict[int, dict]:
        """{round: commit mark} of the rounds of this run saved completely, newest first."""
        marks = {}
        for d in self.root.glob("round-[0-9]*") if self.root.is_dir() else ():
            r = d.name.removeprefix("round-")
            if r.isdigit() and (mark := self.mark(int(r))) is not None:
                marks[int(r)] = mark
        return dict(sorted(marks.items(), reverse=True))

    def held(self) -> list[int]:
        """The rounds of this run saved completely, newest first."""
        return list(self.complete())

    def save(self, agents: Mapping[int, Agent], round: int, rows: Rows, full: bool) -> None:
        """Save generation ``round``: the agents, then the mark with ``rows`` (this rank's rows
        of rounds 1 … round); ``full``: every rank was alive. Then prune."""
        d = self.dir(round)
        if d.exists():  # an earlier try at this round (a killed save, or a resumed run)
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for agent in agents.values():
            save_agent(agent, d, round)
        mark = {"run": self.run, "round": round, "full": full, "rows": rows}
        atomic_write_text(d / MARK, json.dumps(mark))
        self.prune(round)

    def prune(self, newest: int) -> None:
        """Remove every generation but the two newest complete ones and the newest ``full``
        one (anything this run saved after ``newest`` is stale: it is being done again)."""
        marks = {r: m for r, m in self.complete().items() if r <= newest}
        keep = set(list(marks)[:2]) | set([r for r, m in marks.items() if m["full"]][:1])
        for d in self.root.glob("round-*"):
            r = d.name.removeprefix("round-")
            if d.is_dir() and not (r.isdigit() and int(r) in keep):
                shutil.rmtree(d)

    def restore(self, agents: Mapping[int, Agent], round: int) -> Rows:
        """Load generation ``round`` into ``agents``; return its rows (CheckpointError if it is
        not there or a file is not this agent's)."""
        mark = self.mark(round)
        if mark is None:
            raise CheckpointError(f"{self.dir(round)}: no complete saved round {round}")
        for agent in agents.values():
            got = restore_agent(agent, self.dir(round))
            if got != round:
                why = "no state file" if got is None else f"its state file is of round {got}"
                raise CheckpointError(f"{self.dir(round)}: agent {agent.id}: {why}")
        return mark["rows"]


def run_identity(cfg: SimConfig) -> str:
    """What a state directory must have been saved by to be resumed: the same config and,
    under torchrun, the same run id (``--rdzv-id``, ``TORCHELASTIC_RUN_ID``)."""
    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{digest}"


def agree_round(store: dist.Store, rank: int, world: int, held: list[int]) -> int:
    """The round every rank resumes at: the newest that every rank ``held``, or 0. Each rank
    publishes its rounds on ``store`` and reads everyone's (waiting for them)."""
    published = gather(store, rank, world, "resume", json.dumps(held), "where to resume")
    each = [set(json.loads(v)) for v in published]
    start = max(set.intersection(*each), default=0)
    newest = max((max(s) for s in each if s), default=0)
    if newest > start + 1:
        rounds = "; ".join(f"rank {k}: {sorted(s, reverse=True) or 'none'}"
                           for k, s in enumerate(each))  # fmt: skip
        log.warning("resuming at round %d, the newest every rank holds (%s)", start, rounds)
    return start


def share_history(store: dist.Store, rank: int, world: int, start: int, rows: Rows,
                  n: int) -> list[Rows]:  # fmt: skip
    """Every rank's saved ``rows`` through the store: the run's rows of rounds 1 … start, per
    round (a node no rank reported, e.g. dropped by ``continue``, reads as inactive)."""
    published = gather(store, rank, world, "history", json.dumps(rows), "the run's history")
    got = {(row["round"], row["agent"]): row for v in published for row in json.loads(v)}
    return [[got.get((r, i)) or metrics_row(r, i) for i in range(n)] for r in range(1, start + 1)]
