"""Round protocols: what an agent does with the payloads it accepted this round.

Each protocol is one short merge function ``merge(agent, received, self_weight, ctx)``
(``received``: validated (payload, π_ij) pairs; weights are renormalized over what actually
arrived) plus a few declared facts the simulator reads:

- ``gossip``: θ_i ← Σ_j π_ij θ_j / Σ_j π_ij over the closed neighbourhood (D-PSGD / "WA");
- ``local``: no communication;
- ``centralized``: one agent trains on the union of all data for the same epochs (upper line);
- ``single_global_merge``: gossip on the ``sparse_then_complete`` schedule (sparse random
  gossip, then one complete merge in the last round);
- ``dimat`` / ``dimat_wm``: :func:`fedmerge.dimat.dimat_merge` with activation / weight
  matching; payloads carry full weights θ_j (agents may start from different inits);
  calibration on the agent's own data, or a shared set (``protocol.calibration: shared``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.config import SimConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent, Loss
from fedmerge.decentralized.context import MergeContext
from fedmerge.decentralized.continual_agent import continual_agent, fold_experts
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.robust import as_state_merge, make_rule
from fedmerge.dimat import dimat_merge, uniform_over
from fedmerge.hf.lora import product_gossip
from fedmerge.registry import Entry, Registry
from fedmerge.statedict import StateDict

Received = Sequence[tuple[Payload, float]]
MergeFn = Callable[[Agent, Received, float, MergeContext], None]
AgentFactory = Callable[
    [int, nn.Module, AgentData, SimConfig, StateDict | None, Loss, int, torch.device], Agent
]
"""(node i, its initial model, its data, the config, the shared reference, the loss, the
number of nodes, the device it computes on) → agent"""


@dataclass(frozen=True)
class Protocol(Entry):
    """A registered protocol; its ``target`` is the merge function (None: agents never
    communicate). ``full_weights``: payloads carry θ even with a shared init.
    ``vectorizable``: the stacked path computes the same merge as a W product.
    ``schedule``: the topology schedule the protocol imposes; ``pool_data``: one agent on
    the union of all data; ``options``: fixed settings of the merge function; ``agent``:
    the factory of the protocol's own kind of agent (:data:`AgentFactory`);
    ``one_shot_codec``: with ``protocol.codec`` each payload is encoded once by its maker
    and forwarded as is (experts), instead of CHOCO-Gossip on compressed differences."""

    full_weights: bool = False
    vectorizable: bool = False
    schedule: str | None = None
    pool_data: bool = False
    options: dict = field(default_factory=dict)
    agent: AgentFactory | None = None  # builds node i's agent; None: a plain Agent
    one_shot_codec: bool = False

    @property
    def merge(self) -> MergeFn | None:
        return self.target


def gossip(agent: Agent, received: Received, self_weight: float, ctx: MergeContext) -> None:
    """θ_i ← (π_ii θ_i + Σ_j π_ij θ_j) / (π_ii + Σ_j π_ij), on τ or θ alike; or the robust
    rule ``protocol.aggregation`` names (:mod:`fedmerge.decentralized.robust`). With a codec
    the payloads are compressed differences and the step is CHOCO-Gossip's
    (:mod:`fedmerge.codecs.choco`: x_i += γ Σ_j π_ij (x̂_j − x̂_i), raw π). LoRA agents with
    ``peft.lora_merge: product`` average B@A instead (:mod:`fedmerge.hf.lora`)."""
    if agent.choco is not None:
        heard = [(p.sender, p.tensors, w) for p, w in received]
        keyframes = {p.sender for p, _ in received if agent.choco.is_keyframe(p.round)}
        agent.load_tensors(agent.choco.merge(agent.tensors(), heard, keyframes))
        return
    if ctx.config is not None and ctx.config.peft.r and ctx.config.peft.lora_merge == "product":
        others = [(p.tensors, w) for p, w in received]
        agent.load_tensors(product_gossip(agent.tensors(), others, self_weight, agent.reference,
                                          ctx.config.peft.r))  # fmt: skip
        return
    if ctx.config is not None and ctx.config.protocol.aggregation != "mean":
        rule = make_rule(ctx.config.protocol)
        others = [(p.tensors, w) for p, w in received]
        agent.load_tensors(rule((agent.tensors(), self_weight), others))
        return
    total = self_weight + sum(w for _, w in received)
    merged = {k: self_weight * v for k, v in agent.tensors().items()}
    for payload, w in received:
        for k, v in payload.tensors.items():
            merged[k] += w * v
    agent.load_tensors({k: v / total for k, v in merged.items()})


def dimat(agent: Agent, received: Received, self_weight: float, ctx: MergeContext) -> None:
    """θ_i ← Σ_j π_ij P_j(θ_j) with BN resets, by :func:`fedmerge.dimat.dimat_merge`.

    With ``protocol.broadcast`` and a round where this node hears all ``ctx.nodes`` nodes
    with equal weights (:func:`fedmerge.dimat.uniform_over`), the neighbours are aligned to
    the lowest-id node instead of to this one: the merge the DIMAT code computes once at
    agent 0 and broadcasts (identical on every node when calibration is shared)."""
    if not received:  # nobody to align with: DIMAT's merge is then the identity
        return
    own = agent.state()
    states = {agent.id: own, **{p.sender: {**own, **p.tensors} for p, _ in received}}
    weights = {agent.id: self_weight, **{p.sender: w for p, w in received}}
    anchor, model = agent.id, agent.model
    if ctx.config.protocol.broadcast and uniform_over(list(weights.values()), ctx.nodes):
        anchor = min(states)  # everyone takes the merge aligned to the lowest id
        model = copy.deepcopy(agent.model)
        model.load_state_dict(states[anchor])
    neighbours = [(s, weights[j]) for j, s in sorted(states.items()) if j != anchor]
    method = PROTOCOLS[ctx.config.protocol.name].options["method"]
    merged = dimat_merge(
        model, neighbours, weights[anchor], ctx.calibration(agent), method,
        seed=ctx.config.seed + ctx.round, aggregate=as_state_merge(make_rule(ctx.config.protocol)),
    )  # fmt: skip
    agent.model.load_state_dict(merged)


PROTOCOLS: Registry[Protocol] = Registry("protocol", field="protocol.name", entry=Protocol)
# fmt: off
PROTOCOLS.add("gossip", gossip, vectorizable=True,
              doc="mixing-weighted averaging of τ or θ with the neighbours (D-PSGD)")
PROTOCOLS.add("local", None, vectorizable=True, doc="local training only, no communication")
PROTOCOLS.add("centralized", None, vectorizable=True, pool_data=True,
              doc="one model trained on the union of all data (the upper line)")
PROTOCOLS.add("single_global_merge", gossip, vectorizable=True, schedule="sparse_then_complete",
              doc="sparse random gossip, then one complete merge in the last round")
PROTOCOLS.add("dimat", dimat, full_weights=True, options={"method": "activation"},
              doc="DIMAT: align neighbours by activation matching, average, train")
PROTOCOLS.add("dimat_wm", dimat, full_weights=True, options={"method": "weight"},
              doc="DIMAT with weight matching instead of activation matching")
PROTOCOLS.add("disseminate", fold_experts, agent=continual_agent, one_shot_codec=True,
              doc="continual dissemination: each agent's expert floods the graph and every "
                  "node folds each one once (protocol.continual, e.g. OPCM)")
# fmt: on


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name`` (a ConfigError naming ``protocol.name`` otherwise)."""
    return PROTOCOLS.lookup(name)
