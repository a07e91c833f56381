"""Which rank hosts which node, and which backend and device a rank uses."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedmerge.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Which rank hosts which node: contiguous blocks of ``per_rank`` nodes."""

    n: int
    per_rank: int

    def rank_of(self, node: int) -> int:
        return node // self.per_rank

    def nodes_of(self, rank: int) -> list[int]:
        return list(range(rank * self.per_rank, min(self.n, (rank + 1) * self.per_rank)))

    def describe(self, ranks: Iterable[int]) -> str:
        """'rank 2 (node 2), rank 3 (nodes 6, 7)'."""
        parts = []
        for k in sorted(ranks):
            nodes = self.nodes_of(k)
            parts.append(f"rank {k} (node{'s' * (len(nodes) > 1)} {', '.join(map(str, nodes))})")
        return ", ".join(parts)


def make_layout(n: int, world: int, agents_per_rank: int) -> Layout:
    """Node blocks for ``world`` ranks; every rank must host at least one node."""
    per = agents_per_rank or math.ceil(n / world)
    need = math.ceil(n / per)
    if need != world:
        raise ConfigError(
            f"distributed.agents_per_rank: {n} agents at {per} per rank need {need} ranks, "
            f"got {world}"
        )
    return Layout(n, per)


def pick_backend(choice: str) -> str:
    """gloo or nccl, as this rank sees it: ``auto`` takes nccl when CUDA is there, LOCAL_RANK
    is set and every local rank gets its own GPU."""
    cuda = torch.cuda.is_available()
    if choice == "nccl" and not cuda:
        raise ConfigError("distributed.backend: nccl needs CUDA; none is available here")
    if choice != "auto":
        return choice
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    fits = cuda and torch.cuda.device_count() >= local_world
    return "nccl" if fits and "LOCAL_RANK" in os.environ else "gloo"


def wire_device(backend: str) -> torch.device:
    """Where payload buffers move: NCCL sends from this rank's GPU (``cuda:LOCAL_RANK``),
    gloo from the CPU."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")
