"""The agent: a model, its reference point, its data, a local trainer; it publishes
payloads, validates what it receives, takes merged weights, and evaluates itself.

Nothing here knows about runtimes: the simulator, Flower and torch.distributed call the
same methods. Batch orders come from a per-agent generator (:func:`agent_generator`), so
any runtime, and the simulator's vectorized path, sees the same batches for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs import pack_tensors
from fedmerge.codecs.choco import ChocoGossip
from fedmerge.config import TrainConfig, ValidationConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.adversary import freshest
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.payload import Payload, decode_payload, validate_payload
from fedmerge.device import CPU, to_device
from fedmerge.errors import ValidationError
from fedmerge.factory import import_factory
from fedmerge.statedict import StateDict, global_norm, is_mergeable, specs_of

log = logging.getLogger("fedmerge.decentralized.agent")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def agent_generator(seed: int, agent: int) -> torch.Generator:
    """The generator behind agent ``agent``'s batch order (independent of everything else)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + agent * 7_919 + 17)


def batch_plan(n: int, train: TrainConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of one round: ``epochs`` shuffled passes, or ``steps`` batches drawn
    from consecutive shuffled passes. Empty when n == 0."""
    if n == 0:
        return []
    batches: list[torch.Tensor] = []
    passes = train.epochs if not train.steps else None
    while (passes is None and len(batches) < train.steps) or (passes is not None and passes > 0):
        batches += list(torch.randperm(n, generator=generator).split(train.batch_size))
        passes = None if passes is None else passes - 1
    return batches[: train.steps] if train.steps else batches


def make_loss(name: str) -> Loss:
    """``cross_entropy`` or ``pkg.mod:fn`` (a loss function, or a loss class built with no args)."""
    if name == "cross_entropy":
        return nn.functional.cross_entropy
    obj = import_factory(name, "train.loss", ["cross_entropy"])
    return obj() if isinstance(obj, type) else obj


def data_on(data: AgentData, device: torch.device) -> AgentData:
    """``data`` with every split on ``device`` (``data`` itself when it is there already)."""
    if data.train_x.device == device:
        return data
    fields = dataclasses.fields(data)
    return dataclasses.replace(data, **{f.name: getattr(data, f.name).to(device) for f in fields})


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )


class OwnBounds(NamedTuple):
    """A receiver's own view that payloads are validated against."""

    specs: dict[str, TensorSpec]  # the shared (floating) entries
    norm: float  # ‖θ‖ of the receiver's state (the norm bound scales it)
    max_bytes: int  # :meth:`Agent.byte_limit`


class Agent:
    """Agent ``id``: ``model`` trained on ``data``; ``reference`` is the shared base its
    payloads are task vectors against, or None (payloads carry full weights). ``choco``:
    its CHOCO-Gossip state when payloads are compressed (``protocol.codec``). ``shared``
    names the entries it publishes (None: every floating entry; a LoRA agent: its adapter).

    ``device``: where its model, data, reference, optimizer state and merges live; what it
    publishes is on the CPU (:meth:`Payload.make`), and what it accepts is moved to
    ``device`` after validation (:meth:`arrive`), so nothing else changes device."""

    def __init__(
        self, id: int, model: nn.Module, data: AgentData, *, train: TrainConfig,
        validation: ValidationConfig, seed: int, reference: StateDict | None = None,
        loss: Loss = nn.functional.cross_entropy, choco: ChocoGossip | None = None,
        shared: set[str] | None = None, device: torch.device = CPU,
    ) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.id, self.model, self.data = id, model.to(self.device), data_on(data, self.device)
        self.choco = choco
        self.train_cfg, self.validation, self.loss = train, validation, loss
        self.reference = None if reference is None else to_device(reference, self.device)
        self.shared = shared
        self.generator = agent_generator(seed, id)
        self.rejected: list[str] = []  # reasons, "agent j: why", in arrival order
        self.last_round: dict[int, int] = {}  # sender → round of its last accepted payload

    @property
    def kind(self) -> str:
        return "full" if self.reference is None else "delta"

    def state(self) -> StateDict:
        return self.model.state_dict()

    def train(self) -> int:
        """One round of local training with a fresh optimizer; returns the number of steps."""
        batches = batch_plan(self.data.samples, self.train_cfg, self.generator)
        if not batches:
            return 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.train_cfg)
        self.model.train()
        for idx in batches:
            opt.zero_grad()
            out = self.model(self.data.train_x[idx])
            self.loss(out, self.data.train_y[idx]).backward()
            opt.step()
        return len(batches)

    def tensors(self) -> StateDict:
        """What this agent shares: τ = θ − θ_ref, or θ, over the floating (shared) entries."""
        state = self.state()
        ref, shared = self.reference, self.shared
        return {
            k: v - ref[k] if ref is not None else v
            for k, v in state.items()
            if is_mergeable(v) and (shared is None or k in shared)
        }

    def publish(self, round: int) -> Payload:
        """τ (or θ); with a codec, the packed encoding of q_i = C(x_i − x̂_i) (CHOCO)."""
        tensors = self.tensors()
        if self.choco is not None:
            tensors = pack_tensors(self.choco.publish(tensors, round)[0])
        return Payload.make(
            tensors, sender=self.id, round=round, samples=self.data.samples, kind=self.kind
        )

    def byte_limit(self) -> int:
        """The largest payload accepted, never unbounded: ``validation.max_bytes``, or (0)
        twice the size of this agent's own tensors."""
        own = self.tensors().values()
        return self.validation.max_bytes or 2 * sum(t.numel() * t.element_size() for t in own)

    def tensor_limit(self) -> int:
        """The most tensors a payload to this agent may carry: its own count."""
        return len(self.tensors())

    def own_bounds(self) -> OwnBounds:
        """What received payloads are checked against, computed once per :meth:`receive`."""
        return OwnBounds(specs_of(self.tensors()), global_norm(self.state()), self.byte_limit())

    def validate(self, delivery: Delivery, own: OwnBounds) -> Payload:
        """The usable payload of ``delivery`` (decoded, if a codec compressed it), or a
        :class:`ValidationError` naming the sender: it must decode within this agent's specs
        and byte bound and match its own tensors (:func:`validate_payload`). The hook a
        protocol with other payloads overrides."""
        payload = decode_payload(delivery.item, own.specs, own.max_bytes)
        validate_payload(
            payload, kind=self.kind, specs=own.specs, own_norm=own.norm,
            max_norm_ratio=self.validation.max_norm_ratio, max_bytes=own.max_bytes,
        )  # fmt: skip
        return payload

    def receive(
        self, deliveries: Sequence[Delivery], round: int | None = None
    ) -> list[tuple[Payload, float]]:
        """The (payload, π_ij) pairs that pass :meth:`validate`; the others are dropped,
        counted in :attr:`rejected` and logged with the sender and the reason. State is
        untouched. Of valid payloads, one per sender is kept, the newest, and only if newer
        than the last accepted from it (:attr:`last_round`; duplicates, stale and replayed
        ones are rejected). A negative round, or one after ``round`` (the current round, when
        given), is rejected first: a forged far-future round must not make its sender's real
        payloads look stale. Every payload must name the sender the transport says it came
        from (``source``)."""
        if not deliveries:  # nothing to check: no O(P) pass over its own model
            return []
        accepted, own = [], self.own_bounds()
        for d in deliveries:
            try:
                _check_origin(d)  # first: every later reason names the true sender
                _check_round(d.item, round)
                payload = self.validate(d, own)
            except ValidationError as exc:
                self.rejected.append(str(exc))
                log.warning("agent %d dropped a payload: %s", self.id, exc)
                continue
            accepted.append((self.arrive(payload), d.weight))
        accepted, stale = freshest(accepted, self.last_round)
        for reason in stale:
            self.rejected.append(reason)
            log.info("agent %d dropped a payload: %s", self.id, reason)
        self.last_round.update((p.sender, p.round) for p, _ in accepted)
        return accepted

    def arrive(self, payload: Payload) -> Payload:
        """A validated ``payload`` with its tensors on this agent's device (the one place
        received tensors change device; ``payload`` itself where they are there already)."""
        if all(t.device == self.device for t in payload.tensors.values()):
            return payload
        return dataclasses.replace(payload, tensors=to_device(payload.tensors, self.device))

    @property
    def experts(self) -> list[int] | None:
        """The origins of the experts this agent folded, in order (None: it folds none)."""
        return None

    def extra_state(self) -> tuple[StateDict, dict]:
        """(tensors, JSON-able meta) a subclass keeps besides its model, generator and
        freshness state; :mod:`~fedmerge.decentralized.persist` saves and restores them."""
        return {}, {}

    def load_extra_state(self, tensors: StateDict, meta: dict) -> None:
        """Restore what :meth:`extra_state` returned."""
        if tensors or meta:
            raise ValidationError(f"agent {self.id}: state file carries unexpected extra state")

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set the model from shared-form tensors (τ or θ); other entries stay as they are."""
        ref = self.reference
        state = self.state()
        for k, v in tensors.items():
            state[k].copy_(v + ref[k] if ref is not None else v)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Accuracy on (x, y); None when there is nothing to evaluate on."""
        if not len(y):
            return None
        self.model.eval()
        x, y = x.to(self.device), y.to(self.device)
        return float((self.model(x).argmax(1) == y).double().mean())


def _check_round(payload: Payload, now: int | None) -> None:
    """A payload's round must be ≥ 0 and, when the current round ``now`` is known, ≤ it."""
    if payload.round < 0 or (now is not None and payload.round > now):
        when = "is negative" if payload.round < 0 else f"is from the future ({now})"
        who = f"payload from agent {payload.sender} (round {payload.round})"
        raise ValidationError(f"{who}: the round {when}")


def _check_origin(delivery: Delivery) -> None:
    """The payload must name the sender the transport delivered it from (the message names
    the transport's sender: the forged name may be an honest victim's)."""
    payload = delivery.item
    if payload.sender != delivery.source:
        raise ValidationError(
            f"payload from agent {delivery.source} (round {payload.round}): "
            f"its header names sender {payload.sender}"
        )
