"""Registry of payload codecs and their declared, validated parameters.

A codec is three small functions over one tensor plus a list of
:class:`~fedmerge.registry.Param` s, registered in :data:`CODECS` (a
:class:`~fedmerge.registry.Registry`, the idiom of every pluggable part):

- ``encode(x, ctx, params) -> parts``: a floating tensor ``x`` (any shape) to named
  wire tensors (``parts``); ``ctx`` is the sender's :class:`KeyContext`;
- ``check(entries, spec, params)``: the parts' declared dtypes and shapes (from the
  safetensors header, before any data is read) against what ``spec`` allows;
- ``decode(parts, spec, params) -> tensor``: the parts back to a tensor of ``spec``,
  checking their values (index order, code ranges, finiteness).

``check`` and ``decode`` raise :class:`Malformed`; the wire layer turns it into one
:class:`~fedmerge.errors.ValidationError` naming the sender and the key.

>>> get_codec("quantize").resolve({"bits": "4"})["bits"]
4
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedmerge.checkpoint import DTYPE_NAMES
from fedmerge.registry import Entry, Registry

Params = dict[str, Any]
Encode = Callable[..., dict[str, torch.Tensor]]


class Malformed(ValueError):
    """Internal: why one key's encoded parts are unusable (wrapped with sender and key)."""


@dataclass
class KeyContext:
    """What the sender's encoder gives a codec for one key.

    ``generator``: a random stream seeded from the encoder's seed, the key and the call
    number (stochastic rounding, random init); ``threshold``: a global magnitude threshold
    from the codec's pre-pass (global top-k), else None; ``state``: this key's persistent
    sender state across calls (PowerSGD's warm-started Q).
    """

    key: str
    generator: torch.Generator
    threshold: float | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Codec(Entry):
    """A registered codec; its ``target`` is the encoder (see the module docstring)."""

    check: Callable[..., None] | None = None
    decode: Callable[..., torch.Tensor] | None = None
    reference: str = ""
    prepass: Callable[[Mapping[str, torch.Tensor], Params], float | None] | None = None

    @property
    def encode(self) -> Encode:
        return self.target


CODECS: Registry[Codec] = Registry("codec", field="protocol.codec", entry=Codec)
"""Every codec by name (filled by the codec modules of :mod:`fedmerge.codecs`)."""

register = CODECS.register
"""Decorator: ``@register(name, *params, check=..., decode=..., prepass=...)`` on an
encoder; the encoder's docstring (first paragraph) becomes the codec's documentation."""


def get_codec(name: str) -> Codec:
    """The registered codec ``name``; ConfigError listing the known ones otherwise."""
    return CODECS.lookup(name)


def expect(
    entries: Mapping[str, Any], names: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
) -> None:  # fmt: skip
    """Header check: exactly the parts ``names``; those in ``shapes``/``dtypes`` as declared.

    ``entries`` maps part name -> :class:`~fedmerge.stheader.Entry` (dtype name + shape).
    """
    if set(entries) != set(names):
        raise Malformed(f"parts {sorted(entries)}, expected {sorted(names)}")
    for name, dtype in dtypes.items():
        if entries[name].dtype != DTYPE_NAMES[dtype]:
            raise Malformed(
                f"part {name!r} is {entries[name].dtype}, expected {DTYPE_NAMES[dtype]}"
            )
    for name, shape in shapes.items():
        if tuple(entries[name].shape) != tuple(shape):
            raise Malformed(
                f"part {name!r} has shape {list(entries[name].shape)}, expected {list(shape)}"
            )


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales and factors travel in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite_part(t: torch.Tensor, name: str) -> None:
    """Reject NaN/Inf in a floating part."""
    if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
        raise Malformed(f"part {name!r} has non-finite values")
