"""A strict, bounded parser for safetensors headers, run before any tensor is touched.

A safetensors blob is ``u64 little-endian N`` + ``N bytes of UTF-8 JSON`` + data. The JSON
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data section) and may hold ``"__metadata__"``: string → string. A forged
header must not make us read or allocate more than the blob holds, so everything is
checked from the 8-byte prefix on, with the length of what is really there:

- N ≤ ``max_header_bytes`` and 8 + N ≤ the blob's size (a lying length is caught before the
  header is read);
- parse cost bounded by the blob: before any JSON is parsed, the header's containers
  (``{`` and ``[``, counted in C) must fit ``max_tensors`` tensors (3 per tensor) plus
  :data:`MAX_METADATA` metadata entries, so a million zero-size tensors in a 65 MB blob are
  refused in milliseconds; after parsing, at most ``max_tensors`` tensors and
  :data:`MAX_METADATA` metadata entries. Peak memory stays a small multiple of N (the
  property test in ``tests/test_parse_cost.py`` holds it under 64 × the blob size);
- strict UTF-8, valid JSON, an object, no duplicate keys at any level;
- every dtype known, every shape a list of non-negative integers, every byte range inside
  the data section and exactly dtype size × Π shape long; the ranges tile the data section
  with no gap and no overlap (as the safetensors format requires).

Every failure is ``error(f"{source}: ...")`` (a :class:`~fedmerge.errors.FedmergeError`).

>>> import torch
>>> from safetensors.torch import save
>>> h = parse_header(save({"w": torch.ones(2, 3)}, metadata={"a": "b"}))
>>> h.tensors["w"], h.metadata, h.data_start
(Entry(dtype='F32', shape=(2, 3), begin=0, end=24), {'a': 'b'}, 96)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from fedmerge.errors import CheckpointError, FedmergeError, ValidationError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSORS = 50_000  # per file or payload; the largest HF shards hold a few thousand
MAX_METADATA = 4_096  # __metadata__ entries
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class Entry:
    """One tensor's declared dtype name, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked header: ``data_start`` = 8 + N; ``data_bytes`` = Σ tensor bytes."""

    tensors: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int
    data_bytes: int


class _Bad(Exception):
    """Internal: the reason a header is rejected (wrapped into the caller's error type)."""


def parse_header(
    blob: bytes | bytearray | memoryview, *, source: str = "safetensors blob",
    error: type[FedmergeError] = ValidationError, max_header_bytes: int = MAX_HEADER_BYTES,
    max_tensors: int = MAX_TENSORS,
) -> Header:  # fmt: skip
    """Check the header of an in-memory blob; the data must be exactly what it declares."""
    view = memoryview(blob)
    try:
        n = _length(bytes(view[:8]), len(view), max_header_bytes)
        header = _decode(bytes(view[8 : 8 + n]), 8 + n, len(view) - 8 - n, max_tensors)
    except _Bad as exc:
        raise error(f"{source}: {exc}") from None
    return header


def read_file_header(
    path: str | os.PathLike, *, error: type[FedmergeError] = CheckpointError,
    max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS,
) -> Header:  # fmt: skip
    """Check the header of a file on disk, reading only the header's bytes."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = _length(fh.read(8), size, max_header_bytes)
            header = _decode(fh.read(n), 8 + n, size - 8 - n, max_tensors)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a safetensors file") from None
    except _Bad as exc:
        raise error(f"{path}: not a readable safetensors file: {exc}") from None
    return header


def _length(prefix: bytes, size: int, limit: int) -> int:
    """The header length N, checked against the limit and the bytes really present."""
    if len(prefix) < 8 or size < 8:
        raise _Bad(f"truncated: {size} bytes, a safetensors file starts with 8 length bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n > limit:
        raise _Bad(f"header length {n} exceeds the {limit}-byte limit")
    if 8 + n > size:
        raise _Bad(f"header length {n} is more than the {size - 8} bytes that follow")
    if n < 2:
        raise _Bad(f"header length {n} is too short for a JSON object")
    return n


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Bad(f"duplicate key {key!r} in the header")
        seen[key] = value
    return seen


def _precount(raw: bytes, max_tensors: int) -> None:
    """Refuse before parsing when the containers alone exceed what the limits allow.

    Every tensor entry is one ``{`` and two ``[``; a ``{`` or ``[`` inside a string only
    over-counts, and no escape can hide a real one, so the count is a sound upper bound."""
    containers = raw.count(b"{") + raw.count(b"[")
    allowed = 3 * max_tensors + MAX_METADATA + 2
    if containers > allowed:
        raise _Bad(
            f"{containers} JSON objects/arrays in the header: more than the "
            f"{max_tensors}-tensor limit allows"
        )


def _decode(raw: bytes, data_start: int, data_len: int, max_tensors: int) -> Header:
    _precount(raw, max_tensors)
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise _Bad(f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"header must be a JSON object, got {type(obj).__name__}")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):  # fmt: skip
        raise _Bad("__metadata__ must map strings to strings")
    if len(metadata) > MAX_METADATA:
        raise _Bad(f"{len(metadata)} metadata entries: more than the {MAX_METADATA} allowed")
    if len(obj) > max_tensors:
        raise _Bad(f"{len(obj)} tensors: more than the {max_tensors}-tensor limit")
    tensors = {key: _entry(key, value, data_len) for key, value in obj.items()}
    _check_tiling(tensors, data_len)
    return Header(tensors, metadata, data_start, data_len)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(key: str, value: object, data_len: int) -> Entry:
    if not isinstance(value, dict) or set(value) != ENTRY_KEYS:
        raise _Bad(f"tensor {key!r}: entry must have exactly {sorted(ENTRY_KEYS)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise _Bad(f"tensor {key!r}: unsupported dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_int(s) for s in shape):
        raise _Bad(f"tensor {key!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)):
        raise _Bad(f"tensor {key!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise _Bad(f"tensor {key!r}: bytes [{begin}, {end}) outside the {data_len}-byte data")
    want = _nbytes(ITEM_BYTES[dtype], shape, data_len)
    if end - begin != want:
        raise _Bad(f"tensor {key!r}: {end - begin} bytes for {dtype} {shape} ({want} needed)")
    return Entry(dtype, tuple(shape), begin, end)


def _nbytes(item: int, shape: list[int], cap: int) -> int:
    """item × Π shape, stopping once past ``cap`` (a forged shape may have huge dimensions)."""
    if 0 in shape:
        return 0
    n = item
    for s in shape:
        n *= s
        if n > cap:
            return n
    return n


def _check_tiling(tensors: dict[str, Entry], data_len: int) -> None:
    """Byte ranges must tile [0, data_len): sorted, each starts where the previous ended."""
    pos = 0
    for key, e in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap at {pos}"
            raise _Bad(f"tensor {key!r} at byte {e.begin} {what}")
        pos = e.end
    if pos != data_len:
        raise _Bad(f"tensors cover {pos} of the {data_len} data bytes")
