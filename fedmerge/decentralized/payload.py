"""What an agent sends its neighbours: tensors plus who, when, how much and a content hash.

``kind`` says what the tensors are: ``"delta"`` (task vector τ = θ − θ_ref against a shared
reference) or ``"full"`` (the weights θ themselves, when agents share no reference, as in
DIMAT). Only floating entries travel; integer buffers stay with each agent. ``expert`` names
the expert a payload carries when it is one (continual dissemination); None otherwise.

A compressed payload (``protocol.codec``) carries the codec's packed tensors
(:func:`fedmerge.codecs.pack_tensors`: the encoded parts plus the codec metadata), so every
transport moves it unchanged and :attr:`Payload.nbytes` counts the encoded bytes; the
receiver turns it back into tensors with :func:`decode_payload` before validating it.

On the wire (Flower, torch.distributed) a payload is one safetensors blob with the metadata
in its header, so nothing is ever unpickled:

>>> import torch
>>> p = Payload.make({"w": torch.ones(2, 3)}, sender=4, round=1, samples=10, kind="delta")
>>> q = Payload.from_bytes(p.to_bytes())
>>> (q.sender, q.round, q.samples, q.kind, q.hash == p.hash, p.nbytes)
(4, 1, 10, 'delta', True, 24)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs import is_packed, unpack_tensors
from fedmerge.device import CPU, to_device
from fedmerge.errors import ValidationError
from fedmerge.statedict import check_finite, check_same_specs, global_norm, specs_of, state_hash
from fedmerge.stheader import parse_header

KINDS = ("delta", "full")
META_KEYS = ("sender", "round", "samples", "kind", "hash")


@dataclass(frozen=True)
class Payload:
    """``tensors``: name → tensor (τ or θ); ``hash``: :func:`state_hash` of the tensors."""

    tensors: dict[str, torch.Tensor]
    sender: int
    round: int
    samples: int
    kind: str
    hash: str
    expert: str | None = None

    @classmethod
    def make(
        cls, tensors: Mapping[str, torch.Tensor], *, sender: int, round: int, samples: int,
        kind: str, expert: str | None = None,
    ) -> Payload:  # fmt: skip
        """Snapshot ``tensors`` (detached CPU copies: a payload leaves its agent's device
        here, whatever runtime moves it) and hash them."""
        if kind not in KINDS:
            raise ValidationError(f"payload kind must be one of {KINDS}, got {kind!r}")
        detached = {k: v.detach() for k, v in tensors.items()}
        owned = {k: v.contiguous() for k, v in to_device(detached, CPU, copy=True).items()}
        hash_ = state_hash(owned)
        return cls(owned, int(sender), int(round), int(samples), kind, hash_, expert)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what the traffic counters report)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        """One safetensors blob; the metadata travels as strings in its header."""
        meta = {k: str(getattr(self, k)) for k in META_KEYS}
        if self.expert is not None:
            meta["expert"] = self.expert
        return st_save(self.tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int | None = None) -> Payload:
        """Parse a blob from :meth:`to_bytes`; the hash must match the tensors.

        The header is checked first (:func:`~fedmerge.stheader.parse_header`: bounded
        length, offsets inside the blob, known dtypes, no duplicate keys), so a forged
        blob costs at most its own size; every failure is a :class:`ValidationError`."""
        if max_bytes is not None and len(data) > max_bytes:
            raise ValidationError(f"payload of {len(data)} bytes exceeds the {max_bytes} limit")
        header = parse_header(data, source="unreadable payload")
        meta = header.metadata
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValidationError(f"unreadable payload: header metadata lacks {missing[0]!r}")
        try:
            sender, round, samples = (int(meta[k]) for k in ("sender", "round", "samples"))
            tensors = st_load(bytes(data))
        except (SafetensorError, ValueError) as exc:
            raise ValidationError(f"unreadable payload: {str(exc)[:200]}") from None
        p = cls(tensors, sender, round, samples, meta["kind"], meta["hash"], meta.get("expert"))
        if state_hash(p.tensors) != p.hash:
            raise ValidationError(f"payload from agent {p.sender}: content hash mismatch")
        return p


def decode_payload(p: Payload, specs: Mapping[str, TensorSpec], max_bytes: int) -> Payload:
    """``p`` with its compressed tensors decoded (``p`` itself when it is not compressed).

    Checks the encoded size and content hash first, then decodes with every check of
    :func:`fedmerge.codecs.unpack_tensors` (decoded specs against ``specs`` before any
    allocation); a :class:`ValidationError` names the sender. The decoded payload's hash
    is that of the decoded tensors."""
    if not is_packed(p.tensors):
        return p
    who = f"payload from agent {p.sender} (round {p.round})"
    if p.nbytes > max_bytes:
        raise ValidationError(f"{who}: {p.nbytes} bytes exceeds the {max_bytes} limit")
    if state_hash(p.tensors) != p.hash:
        raise ValidationError(f"{who}: content hash mismatch")
    limit = sum(s.nbytes for s in specs.values())
    tensors = unpack_tensors(p.tensors, specs, source=who, max_decoded_bytes=limit)
    return replace(p, tensors=tensors, hash=state_hash(tensors))


def validate_payload(
    p: Payload, *, kind: str, specs: Mapping[str, TensorSpec], own_norm: float,
    max_norm_ratio: float, max_bytes: int,
) -> None:  # fmt: skip
    """Raise :class:`ValidationError` naming the sender and the reason if ``p`` is unusable.

    Checks, in order: kind, size, keys/shapes/dtypes against ``specs``, content hash,
    finiteness, and ‖tensors‖ ≤ ``max_norm_ratio`` · ``own_norm`` (the receiver's ‖θ‖).
    """
    who = f"payload from agent {p.sender} (round {p.round})"
    if p.kind != kind:
        raise ValidationError(f"{who}: kind {p.kind!r}, expected {kind!r}")
    if p.nbytes > max_bytes:
        raise ValidationError(f"{who}: {p.nbytes} bytes exceeds the {max_bytes} limit")
    check_same_specs(specs, specs_of(p.tensors), source=who)
    if state_hash(p.tensors) != p.hash:
        raise ValidationError(f"{who}: content hash mismatch")
    for key, t in p.tensors.items():
        check_finite(t, key, who)
    norm = global_norm(p.tensors)
    if not math.isfinite(norm) or norm > max_norm_ratio * own_norm:
        raise ValidationError(
            f"{who}: norm {norm:.3g} exceeds {max_norm_ratio:g} × own norm {own_norm:.3g}"
        )
