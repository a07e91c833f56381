"""Encoded tensors on the wire: one safetensors blob whose header names the codec.

Every key's parts travel as safetensors tensors named ``"{key}#{part}"`` (part names
never contain ``#``). The header metadata holds ``codec`` (its name), ``codec_params``
(its resolved parameters, JSON) and ``codec_specs`` (every decoded key's dtype and
shape, JSON), next to whatever metadata the caller adds (a payload's sender, round...).

A receiver reads the header first and checks, before allocating anything:
the codec is one it knows and its parameters are valid; the decoded keys, dtypes and
shapes are exactly what it expects and their total size within its bound; every
key has exactly its codec's parts, each of the declared dtype and a shape that fits.
Only then are the parts read and decoded key by key, with the value checks (index
order, code ranges, finiteness). Every failure is one :class:`ValidationError`
naming the source (the sender when known) and the key.

Transports that move named tensors rather than blobs (torch.distributed, a payload's
tensors) carry :func:`pack_tensors`: the parts plus the metadata as a uint8 tensor
named :data:`META_TENSOR`; :func:`unpack_tensors` runs the same checks.

>>> import torch
>>> from fedmerge.codecs.registry import get_codec
>>> x = {"w": torch.tensor([0.0, 3.0, -1.0, 0.5])}
>>> enc = encode_state(x, "topk", {"density": 0.5})
>>> sorted(enc.parts), enc.metadata()["codec"]
(['w#gaps', 'w#values'], 'topk')
>>> decode_blob(enc.to_bytes(), {"w": TensorSpec(torch.float32, (4,))})[0]["w"].tolist()
[0.0, 3.0, -1.0, 0.0]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmerge.checkpoint import DTYPE_NAMES, DTYPES, TensorSpec
from fedmerge.codecs.registry import Codec, KeyContext, Malformed, Params, get_codec
from fedmerge.errors import FedmergeError, ValidationError
from fedmerge.statedict import check_same_specs
from fedmerge.stheader import Entry, parse_header

SEP = "#"
META_CODEC, META_PARAMS, META_SPECS = "codec", "codec_params", "codec_specs"
META_TENSOR = "#codec"  # pack_tensors: the metadata as a tensor (no key part is named so)
MAX_DIMS = 16


@dataclass(frozen=True)
class Encoded:
    """A codec's output for a state dict: ``parts`` ``"{key}#{part}"`` -> tensor."""

    codec: str
    params: Params
    specs: dict[str, TensorSpec]
    parts: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of encoded tensor data (without the header)."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def metadata(self) -> dict[str, str]:
        specs = {k: [DTYPE_NAMES[s.dtype], list(s.shape)] for k, s in sorted(self.specs.items())}
        return {
            META_CODEC: self.codec,
            META_PARAMS: json.dumps(self.params, sort_keys=True),
            META_SPECS: json.dumps(specs, separators=(",", ":")),
        }

    def to_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """One safetensors blob; ``metadata`` (strings) travels next to the codec's."""
        return st_save(self.parts, metadata={**(metadata or {}), **self.metadata()})

    def decode(self, source: str = "encoded tensors") -> dict[str, torch.Tensor]:
        """The decoded state dict (the sender's own view of what receivers get)."""
        codec = get_codec(self.codec)
        return {
            key: decode_key(codec, self.params, spec, _parts_of(self.parts, key), key, source)
            for key, spec in self.specs.items()
        }


def _parts_of(parts: Mapping[str, Any], key: str) -> dict[str, Any]:
    prefix = key + SEP
    return {
        name[len(prefix) :]: v
        for name, v in parts.items()
        if name.startswith(prefix) and SEP not in name[len(prefix) :]
    }


def key_seed(seed: int, key: str, call: int) -> int:
    """A 63-bit seed for one key's random stream on one call (independent of key order)."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{call}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def encode_state(
    tensors: Mapping[str, torch.Tensor], codec: str, params: Mapping[str, Any] | None = None,
    *, seed: int = 0, call: int = 0, state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Encoded:  # fmt: skip
    """Encode every tensor of ``tensors`` (floating) with ``codec``, one key at a time.

    ``state`` (key -> the codec's per-key sender state) persists across calls when given;
    ``tensors`` may be a lazy mapping: each key is read once (plus the codec's pre-pass).
    """
    c = get_codec(codec)
    resolved = c.resolve(params)
    threshold = c.prepass(tensors, resolved) if c.prepass else None
    parts: dict[str, torch.Tensor] = {}
    specs: dict[str, TensorSpec] = {}
    for key in sorted(tensors):
        x = tensors[key]  # read once: ``tensors`` may compute it (a lazy task vector)
        specs[key] = TensorSpec.of(x)
        gen = torch.Generator().manual_seed(key_seed(seed, key, call))
        key_state = state.setdefault(key, {}) if state is not None else {}
        for name, t in c.encode(x, KeyContext(key, gen, threshold, key_state), resolved).items():
            parts[f"{key}{SEP}{name}"] = t.contiguous()
    return Encoded(c.name, resolved, specs, parts)


def decode_key(
    codec: Codec, params: Params, spec: TensorSpec, parts: dict[str, torch.Tensor], key: str,
    source: str,
) -> torch.Tensor:  # fmt: skip
    """Decode one key's parts; a :class:`Malformed` becomes a ValidationError naming ``key``."""
    try:
        out = codec.decode(parts, spec, params)
    except Malformed as exc:
        raise ValidationError(f"{source}: {key!r}: {exc}") from None
    if TensorSpec.of(out) != spec:  # a codec bug, never a sender's fault
        raise AssertionError(f"codec {codec.name} decoded {key!r} to the wrong spec")
    return out


@dataclass(frozen=True)
class Layout:
    """What a checked header promises: codec, parameters, decoded specs, parts per key."""

    codec: Codec
    params: Params
    specs: dict[str, TensorSpec]
    entries: dict[str, dict[str, Entry]]

    @property
    def decoded_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())


def read_layout(
    meta: Mapping[str, str], tensors: Mapping[str, Entry], *, source: str,
    expected: Mapping[str, TensorSpec] | None = None, max_decoded_bytes: int | None = None,
) -> Layout:  # fmt: skip
    """Check an encoding's metadata and declared parts (a safetensors header's, or
    :func:`entries_of` in-memory tensors) before any data is read; ValidationError otherwise
    (see the module docstring)."""
    if META_CODEC not in meta:
        raise ValidationError(f"{source}: header names no codec")
    try:
        codec = get_codec(meta[META_CODEC])
        params = codec.resolve(_json(meta.get(META_PARAMS, "{}"), dict, "codec_params"))
        specs = _specs(_json(meta.get(META_SPECS), dict, "codec_specs"))
    except FedmergeError as exc:
        raise ValidationError(f"{source}: {exc}") from None
    if expected is not None:
        check_same_specs(expected, specs, source=source)
    decoded = sum(s.nbytes for s in specs.values())
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise ValidationError(
            f"{source}: decodes to {decoded} bytes, over the {max_decoded_bytes} limit"
        )
    owners = {name.rpartition(SEP)[0] for name in tensors}
    stray = sorted(owners - set(specs))
    if stray:
        raise ValidationError(f"{source}: parts for unknown key {stray[0]!r}")
    entries = {}
    for key, spec in specs.items():
        entries[key] = _parts_of(tensors, key)
        try:
            codec.check(entries[key], spec, params)
        except Malformed as exc:
            raise ValidationError(f"{source}: {key!r}: {exc}") from None
    return Layout(codec, params, specs, entries)


def _json(text: str | None, kind: type, field: str) -> Any:
    try:
        value = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, kind):
        raise ValidationError(f"header field {field!r} must be a JSON {kind.__name__}")
    return value


def _specs(raw: dict) -> dict[str, TensorSpec]:
    specs = {}
    for key, value in raw.items():
        ok = (
            isinstance(value, list) and len(value) == 2 and value[0] in DTYPES
            and DTYPES[value[0]].is_floating_point and isinstance(value[1], list)
            and len(value[1]) <= MAX_DIMS
            and all(type(d) is int and 0 <= d < 2**62 for d in value[1])
        )  # fmt: skip
        if not ok:
            raise ValidationError(f"codec_specs: bad entry for {key!r} (want [float dtype, shape])")
        specs[key] = TensorSpec(DTYPES[value[0]], tuple(value[1]))
    return specs


def decode_blob(
    data: bytes, expected: Mapping[str, TensorSpec] | None = None, *, source: str = "encoded blob",
    max_bytes: int | None = None, max_decoded_bytes: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """Check and decode a blob from :meth:`Encoded.to_bytes` -> (tensors, header metadata)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValidationError(f"{source}: {len(data)} bytes exceeds the {max_bytes} limit")
    header = parse_header(data, source=source)
    layout = read_layout(header.metadata, header.tensors, source=source, expected=expected,
                         max_decoded_bytes=max_decoded_bytes)  # fmt: skip
    try:
        parts = st_load(bytes(data))
    except SafetensorError as exc:
        raise ValidationError(f"{source}: {str(exc)[:200]}") from None
    tensors = {
        key: decode_key(layout.codec, layout.params, spec, _parts_of(parts, key), key, source)
        for key, spec in layout.specs.items()
    }
    return tensors, header.metadata


def entries_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, Entry]:
    """In-memory tensors described like safetensors header entries (dtype name, shape)."""
    return {k: Entry(DTYPE_NAMES[t.dtype], tuple(t.shape), 0, 0) for k, t in tensors.items()}


def pack_tensors(encoded: Encoded) -> dict[str, torch.Tensor]:
    """The encoding as plain named tensors for any transport: the parts, plus the codec
    metadata as UTF-8 JSON in a uint8 tensor named :data:`META_TENSOR`."""
    meta = json.dumps(encoded.metadata(), separators=(",", ":")).encode()
    return {**encoded.parts, META_TENSOR: torch.frombuffer(bytearray(meta), dtype=torch.uint8)}


def is_packed(tensors: Mapping[str, torch.Tensor]) -> bool:
    return META_TENSOR in tensors


def unpack_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec] | None = None, *,
    source: str, max_decoded_bytes: int | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Check and decode :func:`pack_tensors` output (received from anyone): the same checks,
    in the same order, as :func:`decode_blob`."""
    raw = tensors.get(META_TENSOR)
    if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValidationError(f"{source}: no codec metadata ({META_TENSOR!r}, 1-D uint8)")
    try:
        meta = _json(bytes(raw.numpy()).decode("utf-8", errors="replace"), dict, META_TENSOR)
    except ValidationError as exc:
        raise ValidationError(f"{source}: {exc}") from None
    if not all(isinstance(v, str) for v in meta.values()):
        raise ValidationError(f"{source}: {META_TENSOR!r} must map strings to strings")
    parts = {k: v for k, v in tensors.items() if k != META_TENSOR}
    layout = read_layout(meta, entries_of(parts), source=source, expected=expected,
                         max_decoded_bytes=max_decoded_bytes)  # fmt: skip
    return {
        key: decode_key(layout.codec, layout.params, spec, _parts_of(parts, key), key, source)
        for key, spec in layout.specs.items()
    }
