"""The pre-training phase: before round 1 every agent trains alone, on its own data, from
its own init (DIMAT's protocol: 100 epochs of Adam at 1e-3, then merge-and-train rounds).

The phase is ``pretrain`` in the config (:class:`~fedmerge.config.PretrainConfig`: the
fields of ``train``, with epochs 0 by default, meaning no phase). It runs with the
agent's own trainer (:meth:`fedmerge.decentralized.agent.Agent.train`, one optimizer for the whole
phase) on batches drawn from a generator of its own (:func:`pretrain_generator`), so the
rounds' batch orders are the same with or without it, and every runtime that builds its
agents from :meth:`fedmerge.decentralized.setup.Setup.model` starts from the same
pre-trained models.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.config import SimConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent, make_loss
from fedmerge.device import CPU, to_device
from fedmerge.statedict import StateDict


def pretrain_generator(seed: int, agent: int) -> torch.Generator:
    """The generator behind agent ``agent``'s pre-training batch order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + agent * 7_919 + 29)


def pretrains(cfg: SimConfig) -> bool:
    return bool(cfg.pretrain.epochs or cfg.pretrain.steps)


def pretrain(
    model: nn.Module, data: AgentData, cfg: SimConfig, agent: int, device: torch.device = CPU
) -> StateDict:
    """Train ``model`` in place on ``data`` as ``cfg.pretrain`` says, on ``device`` (the model
    is back where it was afterwards); return a copy of its state (the agent's model at round
    0), on the CPU."""
    home = next(model.parameters()).device
    trainer = Agent(
        agent, model, data, train=cfg.pretrain, validation=cfg.validation, seed=cfg.seed,
        loss=make_loss(cfg.pretrain.loss), device=device,
    )  # fmt: skip
    trainer.generator = pretrain_generator(cfg.seed, agent)
    trainer.train()
    state = to_device({k: v.detach() for k, v in model.state_dict().items()}, CPU, copy=True)
    model.to(home)
    return state
