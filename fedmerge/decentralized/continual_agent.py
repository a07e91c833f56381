"""The ``disseminate`` protocol: continual dissemination as a round of the round kit.

Every agent trains once, from the shared init, in its first training round; the result is
its expert τ_i = θ_i − θ_0, which *appears* at its node (expert id: the node, ``i``). Each
round a node publishes one payload bundling the experts it first held since it last
published (``protocol.forward: once``; ``always``: every expert it holds), keyed
``"<origin>/<key>"``. A receiver checks the bundle (transport identity, content hash, key
names), unbundles it, skips experts whose content hash it already holds (duplicates),
validates the others (keys, shapes, dtypes, finiteness, norm) and folds each new one into
its continual merge (:func:`~fedmerge.continual.make_merger`, ``protocol.continual``)
exactly once, in arrival order (:class:`~fedmerge.decentralized.dissemination.Node`, the
same node logic as :func:`~fedmerge.decentralized.dissemination.disseminate`). The agent's
model is its merge; :attr:`ContinualAgent.experts` is what its metrics rows report. The
continual merge and the experts held run on the CPU, where payloads are, whatever the
agent's ``device`` (only its training and evaluation run there).

With ``protocol.codec`` (e.g. ComPEFT ``ternary``) an expert is encoded once, where it is
made (:func:`~fedmerge.decentralized.dissemination.encode_expert`), held and forwarded as
those encoded bytes (so ``bytes_sent`` counts them), and decoded safely by every receiver
before it is validated and folded; no CHOCO state is involved.

>>> bundle({3: {"w": 1}, 0: {"w": 2}})
{'3/w': 1, '0/w': 2}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmerge.config import SimConfig
from fedmerge.continual import ContinualMerger, make_merger
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent, Loss, OwnBounds
from fedmerge.decentralized.context import MergeContext
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.dissemination import FORWARD, Node, encode_expert, expert_tensors
from fedmerge.decentralized.payload import Payload
from fedmerge.device import CPU, to_device
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.statedict import StateDict, global_norm, specs_of, state_hash


def bundle(experts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One flat tensor dict for several experts: ``{"<origin>/<key>": tensor}``."""
    return {f"{origin}/{k}": v for origin, tensors in experts.items() for k, v in tensors.items()}


def unbundle(tensors: Mapping[str, torch.Tensor], who: str) -> dict[int, StateDict]:
    """The experts in a bundle by origin; a key not ``"<int>/<key>"`` is a ValidationError."""
    out: dict[int, StateDict] = {}
    for name, t in tensors.items():
        origin, sep, key = name.partition("/")
        if not sep or not origin.isdigit():
            raise ValidationError(f"{who}: bundle key {name!r} is not '<origin>/<key>'")
        out.setdefault(int(origin), {})[key] = t
    return out


class ContinualAgent(Agent):
    """An agent that makes one expert and folds every expert that reaches it (see module)."""

    def __init__(
        self, *args: Any, method: str, forward: str, nodes: int, codec: str = "none",
        codec_params: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """``nodes``: how many nodes (so experts) there are, which bounds a bundle's size;
        ``codec``: how the agent's own expert travels (encoded once, forwarded as is)."""
        super().__init__(*args, **kwargs)
        self.nodes, self.codec, self.codec_params = nodes, codec, codec_params
        self.codec_seed = kwargs["seed"] * 1_000_003 + self.id  # as disseminate() seeds it
        if self.reference is None:
            raise ConfigError("protocol.name: disseminate needs a shared init (model.init: same)")
        if forward not in FORWARD:
            raise ConfigError(f"protocol.forward: must be one of {', '.join(FORWARD)}")
        self.method, self.forward = method, forward
        self.base = to_device(self.reference, CPU)  # θ_0 of the (CPU-side) continual merge
        self.node = Node(self.id, make_merger(method, self.base), rejected=self.rejected)
        self.made_expert = False

    def byte_limit(self) -> int:
        """A bundle holds at most one expert per node, each within the agent's own limit."""
        return self.nodes * super().byte_limit()

    def tensor_limit(self) -> int:
        return self.nodes * super().tensor_limit()

    @property
    def experts(self) -> list[int]:
        return [int(e) for e in self.node.order]

    def train(self) -> int:
        """Train the agent's expert once; it appears at this node (and is folded here)."""
        if self.made_expert:
            return 0
        self.model.load_state_dict({**self.state(), **self.reference})  # from θ_0, always
        steps = super().train()
        self.made_expert = True
        own = to_device(self.tensors(), CPU)
        tau = encode_expert(own, self.codec, self.codec_params, self.codec_seed)
        mine = Payload.make(tau, sender=self.id, round=0, samples=self.data.samples,
                            kind="delta", expert=str(self.id))  # fmt: skip
        self.node.offer(mine, self.base, self.check_expert)
        self.sync()
        return steps

    def publish(self, round: int) -> Payload:
        """One bundle of the experts to forward this round (possibly none)."""
        out = list(self.node.held.values()) if self.forward == "always" else self.node.fresh
        self.node.fresh = []
        tensors = bundle({int(p.expert): p.tensors for p in out})
        return Payload.make(tensors, sender=self.id, round=round, samples=self.data.samples,
                            kind="delta")  # fmt: skip

    def validate(self, delivery: Delivery, own: OwnBounds) -> Payload:
        """A bundle must be a delta with a matching content hash and well-formed keys; each
        expert in it is checked when offered (``own`` bounds single experts, not bundles)."""
        p = delivery.item
        who = f"payload from agent {p.sender} (round {p.round})"
        if p.kind != "delta":
            raise ValidationError(f"{who}: kind {p.kind!r}, expected 'delta'")
        if state_hash(p.tensors) != p.hash:
            raise ValidationError(f"{who}: content hash mismatch")
        unbundle(p.tensors, who)
        return p

    def arrive(self, payload: Payload) -> Payload:
        """Bundles stay on the CPU: they are held, forwarded and folded there."""
        return payload

    def receive(
        self, deliveries: Sequence[Delivery], round: int | None = None
    ) -> list[tuple[Payload, float]]:
        """The experts in the accepted bundles, one payload each, in arrival order."""
        out = []
        for bundled, w in super().receive(deliveries, round):
            who = f"payload from agent {bundled.sender} (round {bundled.round})"
            for origin, tensors in unbundle(bundled.tensors, who).items():
                expert = Payload.make(tensors, sender=origin, round=bundled.round, samples=0,
                                      kind="delta", expert=str(origin))  # fmt: skip
                out.append((expert, w))
        return out

    def check_expert(self, p: Payload) -> StateDict:
        """An expert must (decode to and) look like this agent's own task vector
        (:func:`~fedmerge.decentralized.dissemination.expert_tensors`); its τ to fold."""
        return expert_tensors(
            p, specs=specs_of(self.tensors()), own_norm=global_norm(self.state()),
            max_norm_ratio=self.validation.max_norm_ratio, max_bytes=super().byte_limit(),
        )  # fmt: skip

    def sync(self) -> None:
        """The model takes the current merge θ_0 + merged τ."""
        self.model.load_state_dict({**self.state(), **self.node.merger.merged()})

    def extra_state(self) -> tuple[StateDict, dict]:
        merger = self.node.merger.state_dict()
        tensors = {f"acc.{k}": v for k, v in merger["tensors"].items()}
        for e, p in self.node.held.items():
            tensors.update({f"held.{e}.{k}": v for k, v in p.tensors.items()})
        meta = {"merger": merger["meta"], "order": self.node.order, "made": self.made_expert,
                "fresh": [p.expert for p in self.node.fresh],
                "duplicates": self.node.duplicates}  # fmt: skip
        return tensors, meta

    def load_extra_state(self, tensors: StateDict, meta: dict) -> None:
        acc = {k.removeprefix("acc."): v for k, v in tensors.items() if k.startswith("acc.")}
        state = {"tensors": acc, "meta": meta["merger"]}
        merger = ContinualMerger.from_state(self.base, state)
        held: dict[str, StateDict] = {}
        for name, v in tensors.items():
            if name.startswith("held."):
                _, e, key = name.split(".", 2)
                held.setdefault(e, {})[key] = v
        node = Node(self.id, merger, rejected=self.rejected)
        for e in meta["order"]:
            node.held[e] = Payload.make(held[e], sender=int(e), round=0, samples=0, kind="delta",
                                        expert=e)  # fmt: skip
            node.hashes[node.held[e].hash] = e
        node.order = list(meta["order"])
        node.fresh = [node.held[e] for e in meta["fresh"]]
        node.duplicates = int(meta["duplicates"])
        self.node, self.made_expert = node, bool(meta["made"])


def continual_agent(
    i: int, model: nn.Module, data: AgentData, cfg: SimConfig, reference: StateDict | None,
    loss: Loss, nodes: int, device: torch.device = CPU,
) -> ContinualAgent:  # fmt: skip
    """Node i's agent for the ``disseminate`` protocol (the protocol's agent factory)."""
    return ContinualAgent(
        i, model, data, train=cfg.train, validation=cfg.validation, seed=cfg.seed,
        reference=reference, loss=loss, method=cfg.protocol.continual,
        forward=cfg.protocol.forward, nodes=nodes, codec=cfg.protocol.codec,
        codec_params=cfg.protocol.codec_params, device=device,
    )  # fmt: skip


def fold_experts(
    agent: Agent, received: Sequence[tuple[Payload, float]], self_weight: float, ctx: MergeContext
) -> None:
    """The ``disseminate`` merge: offer each received expert to the node, then take the merge."""
    if not isinstance(agent, ContinualAgent):
        raise TypeError(f"disseminate merges ContinualAgents, got {type(agent).__name__}")
    for payload, _ in received:
        agent.node.offer(payload, agent.base, agent.check_expert)
    agent.sync()
