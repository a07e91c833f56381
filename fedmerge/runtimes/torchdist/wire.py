"""A payload on the wire as two tensors: a fixed-size header, then one flat byte buffer.

The header (``HEADER_LEN`` int64) says who sent what and how big the body is, so the
receiver can refuse an oversized payload before allocating anything. The body (uint8) is
a JSON table of the tensors (name, dtype, shape, offset) padded to 8 bytes, then every
tensor's bytes, each starting on an 8-byte boundary so the receiver takes typed *views*
of the buffer instead of copies. Nothing is ever unpickled.

>>> import torch
>>> from fedmerge.decentralized.payload import Payload
>>> p = Payload.make({"w": torch.ones(2, 3), "b": torch.zeros(3)}, sender=4, round=1,
...                  samples=10, kind="delta")
>>> header, body = pack(p)
>>> header.tolist()[2:6], header.tolist()[8], body.numel() % 8
([4, 1, 10, 0], 36, 0)
>>> q = unpack(header, body)
>>> (q.sender, q.kind, q.hash == p.hash, q.tensors["w"].shape)
(4, 'delta', True, torch.Size([2, 3]))
"""

from __future__ import annotations

import json
import math

import torch

from fedmerge.checkpoint import DTYPES
from fedmerge.decentralized.payload import KINDS, Payload
from fedmerge.errors import ValidationError

MAGIC, VERSION = 0x666D7764, 1  # "fmwd"
HEADER_LEN = 9  # [magic, version, sender, round, samples, kind, table, data, tensor bytes]
ALIGN = 8
WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in DTYPES.values()}  # "uint8" -> torch.uint8


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def empty_header() -> torch.Tensor:
    """(HEADER_LEN,) int64: a receive buffer for :func:`pack`'s header."""
    return torch.zeros(HEADER_LEN, dtype=torch.int64)


def pack(p: Payload, reuse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(header (HEADER_LEN,) int64, body (B,) uint8) for ``p``; B = table + data, 8-aligned.
    ``reuse``: a uint8 buffer to write the body into when it has exactly B bytes (a warm
    buffer from the previous round spares the page faults of a fresh one)."""
    entries, offset = [], 0
    for key, t in p.tensors.items():
        entries.append([key, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        offset = _aligned(offset + t.numel() * t.element_size())
    table = json.dumps({"hash": p.hash, "tensors": entries}).encode()
    start = _aligned(len(table))
    size = start + offset
    fits = reuse is not None and reuse.dtype == torch.uint8 and reuse.numel() == size
    body = reuse if fits else torch.empty(size, dtype=torch.uint8)
    body[: len(table)] = torch.frombuffer(bytearray(table), dtype=torch.uint8)
    end = len(table)
    for (_, _, _, off), t in zip(entries, p.tensors.values(), strict=True):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        body[end : start + off].zero_()  # padding: deterministic bytes on the wire
        body[start + off : start + off + raw.numel()] = raw
        end = start + off + raw.numel()
    body[end:].zero_()
    kind = KINDS.index(p.kind)
    header = [MAGIC, VERSION, p.sender, p.round, p.samples, kind, start, offset, p.nbytes]
    return torch.tensor(header, dtype=torch.int64), body


def body_size(header: torch.Tensor, sender: int) -> int:
    """Bytes of the body that ``header`` announces (checked: magic, version, sender, sizes)."""
    magic, version, who, _, _, kind, table, data, nbytes = header.tolist()
    where = f"payload from agent {sender}"
    if magic != MAGIC or version != VERSION:
        raise ValidationError(f"{where}: not a fedmerge wire header (magic/version mismatch)")
    if who != sender:
        raise ValidationError(f"{where}: header names sender {who}")
    bad_sizes = table <= 0 or not 0 <= nbytes <= data or table % ALIGN or data % ALIGN
    if not 0 <= kind < len(KINDS) or bad_sizes:
        raise ValidationError(f"{where}: malformed header {header.tolist()}")
    return table + data


def tensor_bytes(header: torch.Tensor) -> int:
    """Bytes of tensor data the header announces (:attr:`Payload.nbytes`, unpadded)."""
    return int(header[8])


def unpack(header: torch.Tensor, body: torch.Tensor) -> Payload:
    """The :class:`Payload` in (header, body); its tensors are views of ``body``.

    Checks the layout only (table, dtypes, offsets inside the buffer); keys, shapes, the
    content hash, finiteness and norm are the receiving agent's checks
    (:func:`fedmerge.decentralized.payload.validate_payload`), as in the simulator.
    """
    _, _, sender, round_, samples, kind, table_len, data_len, _ = header.tolist()
    where = f"payload from agent {sender} (round {round_})"
    if body.dtype != torch.uint8 or body.numel() != body_size(header, sender):
        raise ValidationError(f"{where}: body of {body.numel()} bytes, header says otherwise")
    try:
        table = json.loads(bytes(body[:table_len].numpy()).rstrip(b"\0"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, nesting too deep
        raise ValidationError(f"{where}: unreadable tensor table: {str(exc)[:100]}") from None
    if not (isinstance(table, dict) and isinstance(table.get("hash"), str)
            and isinstance(table.get("tensors"), list)):  # fmt: skip
        raise ValidationError(f"{where}: the tensor table must be {{hash: str, tensors: [...]}}")
    tensors = {}
    for item in table["tensors"]:
        key, dtype, shape, off = _entry(item, where)
        size = math.prod(shape) * dtype.itemsize
        if off % ALIGN or off + size > data_len:
            raise ValidationError(f"{where}: key {key!r} lies outside the buffer")
        raw = body[table_len + off : table_len + off + size]
        tensors[key] = raw.view(dtype).reshape(shape)
    return Payload(tensors, sender, round_, samples, KINDS[kind], table["hash"])


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(item: object, where: str) -> tuple[str, torch.dtype, list[int], int]:
    """One checked table entry ``[name, dtype name, shape, offset]`` (types, ≤ 8 dims)."""
    ok = isinstance(item, list) and len(item) == 4
    if ok:
        key, dtype_name, shape, off = item
        ok = isinstance(key, str) and isinstance(dtype_name, str) and _count(off)
        ok = ok and isinstance(shape, list) and len(shape) <= 8 and all(map(_count, shape))
    if not ok:
        raise ValidationError(f"{where}: a tensor table entry must be [name, dtype, shape, "
                              f"offset], got {str(item)[:80]}")  # fmt: skip
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:  # compressed payloads carry uint8 parts too
        raise ValidationError(f"{where}: key {key!r} has unknown dtype {dtype_name!r}")
    return key, dtype, shape, off
