"""Registry of payload codecs and their declared, validated parameters.

A codec is three small functions over one tensor plus a list of
:class:`~fedmerge.merging.registry.Param` s (the same idiom as merge methods):

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
from fedmerge.errors import ConfigError
from fedmerge.merging.registry import Param

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
class Codec:
    """A registered codec (see the module docstring for the three functions)."""

    name: str
    encode: Callable[..., dict[str, torch.Tensor]]
    check: Callable[..., None]
    decode: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    doc: str
    reference: str = ""
    prepass: Callable[[Mapping[str, torch.Tensor], Params], float | None] | None = None

    def resolve(self, given: Mapping[str, Any] | None = None) -> Params:
        """Defaults overlaid with ``given`` (parsed and range-checked); ConfigError otherwise."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ConfigError(
                f"codec {self.name!r} has no parameter {unknown[0]!r} (parameters: {names})"
            )
        return {
            name: (p.parse(given[name], f"codec {self.name}") if name in given else p.default)
            for name, p in known.items()
        }


CODECS: dict[str, Codec] = {}


def register(
    name: str, *params: Param, check: Callable[..., None], decode: Callable[..., torch.Tensor],
    **options: Any,
) -> Callable[[Encode], Encode]:  # fmt: skip
    """Decorator on the ``encode`` function: register codec ``name``.

    The encoder's docstring (first paragraph) becomes the codec's documentation.
    """

    def deco(encode: Encode) -> Encode:
        if name in CODECS:
            raise ValueError(f"codec {name!r} registered twice")
        doc = " ".join((encode.__doc__ or "").strip().split("\n\n")[0].split())
        CODECS[name] = Codec(name, encode, check, decode, params, doc, **options)
        return encode

    return deco


def get_codec(name: str) -> Codec:
    """The registered codec ``name``; ConfigError listing the known ones otherwise."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}")
    return CODECS[name]


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
