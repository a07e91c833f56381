"""Bit-level wire formats: sorted indices as varint gaps, bit and nibble packing.

Sorted indices ``i_0 < i_1 < …`` travel as gaps ``g_0 = i_0``, ``g_j = i_j − i_{j−1}``
(≥ 1), each gap as an unsigned LEB128 varint (7 bits per byte, high bit = "more
bytes follow"): a gap below 128 costs one byte, below 16384 two. At density 0.1 the
mean gap is 10, so an index costs about one byte instead of four or eight.
Everything is vectorized; decoding checks what a forged stream could get wrong
(unterminated or over-long varints, wrong count, gaps that go backwards or past the
end) and raises :class:`~fedmerge.codecs.registry.Malformed`.

>>> import torch
>>> b = encode_gaps(torch.tensor([3, 4, 300]))
>>> b.tolist(), decode_gaps(b, count=3, numel=301).tolist()
([3, 1, 168, 2], [3, 4, 300])
>>> unpack_bits(pack_bits(torch.tensor([True, False, True])), 3).tolist()
[True, False, True]
"""

from __future__ import annotations

import torch

from fedmerge.codecs.registry import Malformed

MAX_VARINT_BYTES = 9  # 9 × 7 = 63 bits: every int64 gap fits


def varint_len(count: int) -> tuple[int, int]:
    """Smallest and largest byte length of ``count`` varint gaps (for header checks)."""
    return count, MAX_VARINT_BYTES * count


def encode_gaps(indices: torch.Tensor) -> torch.Tensor:
    """Strictly increasing int64 ``indices`` ``(k,)`` -> varint gap bytes ``(b,)`` uint8."""
    gaps = torch.diff(indices, prepend=indices.new_zeros(1)) if indices.numel() else indices
    if gaps.numel() == 0 or int(gaps.max()) < 0x80:
        return gaps.to(torch.uint8)  # every gap fits one byte
    biggest, nbytes, width = int(gaps.max()), torch.ones_like(gaps), 1
    while biggest >> (7 * width):
        nbytes += gaps >> (7 * width) > 0
        width += 1
    starts = torch.cumsum(nbytes, 0) - nbytes
    out = torch.empty(int(starts[-1] + nbytes[-1]), dtype=torch.uint8)
    for j in range(width):  # byte j of every gap that has one (few gaps need j ≥ 1)
        sel = nbytes > j if j else slice(None)
        more = (nbytes[sel] - 1 > j).to(torch.uint8) << 7
        out[starts[sel] + j] = ((gaps[sel] >> (7 * j)) & 0x7F).to(torch.uint8) | more
    return out


def decode_gaps(data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Varint gap bytes -> ``count`` strictly increasing int64 indices in ``[0, numel)``."""
    if data.numel() == 0:
        if count:
            raise Malformed(f"no index bytes for {count} entries")
        return torch.zeros(0, dtype=torch.int64)
    b = data.to(torch.int64)
    ends = b < 0x80
    if not bool(ends[-1]):
        raise Malformed("index stream ends inside a varint")
    found = int(ends.sum())
    if found != count:
        raise Malformed(f"index stream holds {found} indices, expected {count}")
    gaps = b if found == b.numel() else _varints(b, ends, count)
    if int(gaps[0]) < 0 or (count > 1 and int(gaps[1:].min()) < 1):
        raise Malformed("indices are not strictly increasing from 0")
    if float(gaps.double().sum()) >= numel or int(gaps.max()) >= numel:
        raise Malformed(f"an index is past the tensor's {numel} entries")
    return torch.cumsum(gaps, 0)


def _varints(b: torch.Tensor, ends: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` values of a varint byte stream ``b`` (int64) whose last bytes are ``ends``."""
    group = torch.cumsum(ends, 0) - ends.long()  # which varint each byte belongs to
    last = torch.nonzero(ends).squeeze(1)
    starts = torch.cat([last.new_zeros(1), last[:-1] + 1])
    pos = torch.arange(b.numel()) - starts[group]
    if int(pos.max()) >= MAX_VARINT_BYTES:
        raise Malformed(f"a varint is longer than {MAX_VARINT_BYTES} bytes")
    return torch.zeros(count, dtype=torch.int64).index_add_(0, group, (b & 0x7F) << (7 * pos))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bools ``(k,)`` -> uint8 ``(ceil(k/8),)``, least significant bit first, zero padding."""
    pad = torch.zeros((-bits.numel()) % 8, dtype=torch.bool)
    rows = torch.cat([bits.reshape(-1), pad]).view(-1, 8).to(torch.int64)
    return (rows << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`; the padding bits must be zero."""
    if data.numel() != (count + 7) // 8:
        raise Malformed(f"{data.numel()} bit bytes for {count} entries")
    bits = ((data.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1).bool()
    if bool(bits[count:].any()):
        raise Malformed("nonzero padding bits")
    return bits[:count]


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Ints in ``[0, 16)`` ``(k,)`` -> uint8 ``(ceil(k/2),)``, low nibble first, zero padding."""
    flat = values.reshape(-1).to(torch.uint8)
    pairs = torch.cat([flat, flat.new_zeros(flat.numel() % 2)]).view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(data: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` -> uint8 ``(count,)``; the padding nibble must be zero."""
    if data.numel() != (count + 1) // 2:
        raise Malformed(f"{data.numel()} nibble bytes for {count} entries")
    b = data
    out = torch.stack([b & 0xF, b >> 4], 1).reshape(-1)
    if out.numel() > count and int(out[count]) != 0:
        raise Malformed("nonzero padding nibble")
    return out[:count]
