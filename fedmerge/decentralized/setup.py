"""Setup: everything every runtime builds from a config before round 1.

Data set, partition, topology (with the protocol's schedule), the shared reference the
payloads are task vectors against, and each agent's initial model. Every runtime (in
process, each Flower node, each torch.distributed rank) calls :func:`build_setup` on the
same config and gets the same setup. A deployed node passes its :class:`NodeSources`
(:mod:`~fedmerge.decentralized.node`): the shared parts stay the same, but its data and
starting checkpoint are its own files and nothing of the other nodes is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from fedmerge.codecs.choco import ChocoGossip
from fedmerge.config import SimConfig
from fedmerge.data.datasets import load_dataset
from fedmerge.data.partition import FederatedData, federate
from fedmerge.decentralized.agent import Agent, Loss, data_on, make_loss
from fedmerge.decentralized.node import NodeSources, load_start, node_data
from fedmerge.decentralized.pretrain import pretrain, pretrains
from fedmerge.decentralized.protocols import Protocol, get_protocol, gossip
from fedmerge.device import CPU, resolve_device, to_device
from fedmerge.errors import ConfigError
from fedmerge.hf.lora import apply_lora, trainable_keys
from fedmerge.models import build_model
from fedmerge.statedict import StateDict, is_mergeable
from fedmerge.topology import Topology, build_topology


@dataclass
class Setup:
    """Everything a runtime builds from a config before round 1."""

    config: SimConfig
    protocol: Protocol
    data: FederatedData
    topology: Topology
    reference: StateDict | None  # the shared base payloads are τ against; None: full θ
    pretrained: dict[int, StateDict] = field(default_factory=dict, repr=False)  # a cache
    node: NodeSources | None = None  # a deployed node's own sources (None: the whole split)
    device: torch.device = CPU  # where the agents compute (``device``); data and reference too

    @property
    def n(self) -> int:
        return self.topology.n

    def model(self, agent: int, pretrained: bool = True) -> nn.Module:
        """Agent ``agent``'s model at round 0 (one shared seed with ``model.init: same``),
        after the ``pretrain`` phase unless ``pretrained`` is False (the bare init); a deployed
        node's own starting checkpoint replaces both; with ``peft.r`` > 0 its LoRA adapters
        are added after pre-training."""
        cfg = self.config
        offset = agent if cfg.model.init == "different" else 0
        seed = cfg.seed * 10_007 + offset
        model = build_model(
            cfg.model.name, in_shape=self.data.in_shape, num_classes=self.data.num_classes,
            seed=seed, **cfg.model.options,
        )  # fmt: skip
        start = self.node.checkpoint if self.node and self.node.node == agent else None
        if pretrained and start is not None:
            model.load_state_dict(load_start(start, model.state_dict()))
        elif pretrained and pretrains(cfg):  # the whole model, before any LoRA adapter
            if agent not in self.pretrained:
                self.pretrained[agent] = pretrain(model, self.data.agents[agent], cfg, agent,
                                                  self.device)  # fmt: skip
            model.load_state_dict(self.pretrained[agent])
        return apply_lora(model, cfg.peft, seed) if cfg.peft.r else model

    def agent(self, i: int, loss: Loss | None = None) -> Agent:
        """Node i's :class:`Agent` (or the protocol's own kind): its initial model, its data
        partition, the shared reference (and its CHOCO-Gossip state when ``protocol.codec``
        compresses payloads; a LoRA agent shares only its adapter)."""
        cfg, p = self.config, self.config.protocol
        loss = loss or make_loss(cfg.train.loss)
        if self.protocol.agent is not None:
            return self.protocol.agent(i, self.model(i), self.data.agents[i], cfg, self.reference,
                                       loss, self.n, self.device)  # fmt: skip
        choco = None if p.codec == "none" else ChocoGossip(
            i, p.codec, p.codec_params, p.consensus_step, seed=cfg.seed, resync=p.choco_resync,
            device=self.device,
        )  # fmt: skip
        model = self.model(i)
        return Agent(
            i, model, self.data.agents[i], train=cfg.train, validation=cfg.validation,
            seed=cfg.seed, reference=self.reference, loss=loss, choco=choco,
            shared=trainable_keys(model) if cfg.peft.r else None, device=self.device,
        )  # fmt: skip

    def calibration(self) -> list[torch.Tensor] | None:
        """Shared DIMAT calibration batches (the union of training inputs), if configured."""
        if self.config.protocol.calibration != "shared":
            return None
        x = torch.cat([a.train_x for a in self.data.agents])
        return list(x.split(self.config.protocol.calibration_batch))


def build_setup(cfg: SimConfig, node: NodeSources | None = None) -> Setup:
    """Dataset, partition, topology (with the protocol's schedule) and reference weights;
    for a deployed ``node``, its own data and starting checkpoint instead of the split."""
    protocol = get_protocol(cfg.protocol.name)
    _check_peft(cfg, protocol)
    topo = run_topology(cfg, protocol)
    if node is not None:
        _check_node(cfg, protocol)
        fed = node_data(node, topo.n)
    else:
        d = cfg.data
        fed = federate(
            load_dataset(d.name, **d.options), topo.n, d.partition, alpha=d.alpha,
            test_fraction=d.test_fraction, local_test_fraction=d.local_test_fraction,
            seed=cfg.seed,
        )  # fmt: skip
    if protocol.pool_data:
        fed = FederatedData([fed.union()], fed.test_x, fed.test_y, fed.num_classes, fed.in_shape)
        topo = build_topology(nx.empty_graph(1))
    check_codec(cfg, protocol, topo)
    device = resolve_device(node.device if node is not None and node.device else cfg.device)
    setup = Setup(cfg, protocol, fed_on(fed, device), topo, None, node=node, device=device)
    if cfg.model.init == "same" and not protocol.full_weights:
        base = setup.model(0, pretrained=False).state_dict()
        ref = {k: v.detach() for k, v in base.items() if is_mergeable(v)}
        setup.reference = to_device(ref, device, copy=True)  # one copy every agent shares
    return setup


def fed_on(fed: FederatedData, device: torch.device) -> FederatedData:
    """``fed`` with every agent's splits and the global test set on ``device``."""
    if device == CPU:
        return fed
    agents = [data_on(a, device) for a in fed.agents]
    return dataclasses.replace(fed, agents=agents, test_x=fed.test_x.to(device),
                               test_y=fed.test_y.to(device))  # fmt: skip


def run_topology(cfg: SimConfig, protocol: Protocol) -> Topology:
    """The run's topology, with the schedule ``protocol`` imposes (ConfigError "topology: ...")."""
    overrides = {"schedule.kind": protocol.schedule} if protocol.schedule else None
    try:
        return build_topology(cfg.topology, n=cfg.agents or None, seed=cfg.seed,
                              overrides=overrides)  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"topology: {exc}") from exc


def _check_node(cfg: SimConfig, protocol: Protocol) -> None:
    """A deployed node sees only its own data: no pooled baseline, no shared calibration."""
    if protocol.pool_data:
        raise ConfigError(f"protocol.name {protocol.name!r} pools every node's data; a "
                          "deployed node has only its own")  # fmt: skip
    if cfg.protocol.calibration == "shared":
        raise ConfigError("protocol.calibration: 'shared' uses every node's training inputs; "
                          "a deployed node calibrates on its own data ('local')")  # fmt: skip


def _check_peft(cfg: SimConfig, protocol: Protocol) -> None:
    """LoRA agents share adapters against one shared init, merged by averaging."""
    if not cfg.peft.r:
        return
    if protocol.full_weights or cfg.model.init != "same":
        raise ConfigError(
            f"peft.r: LoRA agents need one shared base (model.init: same) and a protocol that "
            f"averages (not {cfg.protocol.name!r} with init {cfg.model.init!r})"
        )
    if cfg.peft.lora_merge == "product" and cfg.protocol.aggregation != "mean":
        raise ConfigError("peft.lora_merge: product averages B@A; use protocol.aggregation: mean")


def check_codec(cfg: SimConfig, protocol: Protocol, topo: Topology) -> None:
    """A codec (name and parameters checked by the config) runs only where CHOCO-Gossip keeps
    the average: gossip (mean) on a static topology, no Byzantine senders; or where each
    payload is encoded once (``disseminate``: experts) (ConfigError)."""
    p = cfg.protocol
    if p.codec == "none":
        return
    if protocol.one_shot_codec:
        if cfg.faults.byzantine.count:
            raise ConfigError(f"protocol.codec {p.codec!r}: Byzantine senders would corrupt "
                              "encoded parts")  # fmt: skip
        return
    why = (
        f"protocol.name {protocol.name!r} is not gossip" if protocol.merge is not gossip
        else f"the {topo.schedule.kind!r} schedule changes the edges (CHOCO's public copies "
        "follow fixed ones)" if topo.schedule.kind != "static"
        else f"protocol.aggregation {p.aggregation!r} is not mean" if p.aggregation != "mean"
        else "Byzantine senders would corrupt encoded parts" if cfg.faults.byzantine.count
        else None
    )  # fmt: skip
    if why:
        raise ConfigError(
            f"protocol.codec {p.codec!r} (CHOCO-Gossip) needs plain gossip or disseminate: {why}"
        )
