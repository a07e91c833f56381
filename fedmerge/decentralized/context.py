"""MergeContext: what a protocol's merge may need besides the agent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmerge.config import SimConfig
from fedmerge.decentralized.agent import Agent


@dataclass
class MergeContext:
    """What a merge may need besides the agent: the round, the config, shared calibration."""

    round: int
    config: SimConfig
    shared_calibration: list[torch.Tensor] | None = None
    nodes: int = 0  # nodes taking part in the round (0: unknown; DIMAT's broadcast needs it)

    def calibration(self, agent: Agent) -> list[torch.Tensor]:
        """DIMAT's calibration batches: shared when configured, else the agent's own inputs."""
        if self.shared_calibration is not None:
            return self.shared_calibration
        return list(agent.data.train_x.split(self.config.protocol.calibration_batch))
