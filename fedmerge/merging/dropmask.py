"""DARE's keep masks from a counter-based generator: keep(k, i) is a pure function of
(stream key k, element index i), so a mask is the same whole, in blocks, in any order,
on any device, and every entry can be computed independently (vectorized, in parallel).

The generator is SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014; Vigna's reference ``splitmix64.c``, the generator
that seeds xoshiro): state ``s_j = key + j·γ`` (mod 2⁶⁴, γ = 0x9E3779B97F4A7C15),
output ``mix(s_j)`` with Stafford's "Mix13" finalizer::

    z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) · 0x94D049BB133111EB
    z =  z ^ (z >> 31)                              (all mod 2⁶⁴, logical shifts)

Entry i of stream ``key`` uses ``h = mix(key + (i+1)·γ)``: exactly the (i+1)-th
output of ``splitmix64`` seeded with ``key`` (tested against its published outputs
for seed 0). SplitMix64 passes BigCrush and PractRand as a sequence; it is a 64-bit
counter, so tensors of more than 2³² entries are fine. Each (seed, expert, key)
gets its key from sha256 (:func:`stream_key`): two experts' streams are windows of
the same Weyl sequence at pseudorandom offsets and overlap within n entries with
probability ≈ 2n/2⁶⁴.

The entry is kept iff ``(h >> 11) < limit`` with ``limit = ceil(density·2⁵³)``
(:func:`keep_limit`), i.e. iff the standard 53-bit uniform double
``u = (h >> 11)·2⁻⁵³`` is < density: the keep probability is ``limit/2⁵³``, equal
to ``density`` within 2⁻⁵³ (exactly, for densities on the 2⁻⁵³ grid).

Two implementations give identical bits (tested): the C loops' ``keep_step`` (``loops.c``,
inlined into the fused kernels and behind :func:`fedmerge.merging.native.keep_mask`)
and :func:`keep_mask_torch` (int64 torch arithmetic, any device); :func:`keep_mask`
picks the fast one for the device.

>>> keep_mask([0], 0, 4, 0.5).tolist()  # u = 0.883, 0.431, 0.026, 0.971
[[False, True, True, False]]
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment: odd, 2⁶⁴/φ
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
UNIFORM_BITS = 53  # the top 53 bits of a hash make one uniform double in [0, 1)
_U64 = (1 << 64) - 1


def stream_key(seed: int, expert: int, key: str) -> int:
    """The 64-bit stream key of (seed, expert index, tensor key): the first 8 bytes of
    sha256, so a merge does not depend on the order keys are visited."""
    digest = hashlib.sha256(f"{seed}\0{expert}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def keep_limit(density: float) -> int:
    """``ceil(density·2⁵³)`` clamped to [0, 2⁵³]: the number of 53-bit values v with
    ``v·2⁻⁵³ < density`` (the scaling by 2⁵³ is exact in floating point)."""
    return min(1 << UNIFORM_BITS, max(0, math.ceil(density * 2.0**UNIFORM_BITS)))


def _signed(x: int) -> int:
    """A uint64 value as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _xorshift(z: torch.Tensor, s: int, tmp: torch.Tensor) -> torch.Tensor:
    """``z ^= z >> s`` with a logical shift, in place: torch shifts int64 arithmetically,
    so the copies of the sign bit are cleared."""
    torch.bitwise_right_shift(z, s, out=tmp)
    return z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - s)) - 1))


def keep_mask_torch(
    stream_keys: Sequence[int] | torch.Tensor,
    start: int,
    m: int,
    density: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Masks ``(K, m)`` of entries start..start+m−1 in int64 torch arithmetic (any device).

    int64 addition and multiplication wrap mod 2⁶⁴, the same bits as uint64;
    right shifts are made logical by masking (:func:`_xorshift`). ``stream_keys``
    as ints in [0, 2⁶⁴) or an int64 tensor of their bits.
    """
    if isinstance(stream_keys, torch.Tensor):
        keys = stream_keys.to(device=device, dtype=torch.int64)
    else:
        keys = torch.tensor([_signed(k) for k in stream_keys], dtype=torch.int64, device=device)
    steps = torch.arange(start + 1, start + m + 1, dtype=torch.int64, device=keys.device)
    z = steps.mul_(_signed(GAMMA)) + keys[:, None]
    tmp = torch.empty_like(z)
    _xorshift(z, 30, tmp).mul_(_signed(MIX1))
    _xorshift(z, 27, tmp).mul_(_signed(MIX2))
    _xorshift(z, 31, tmp)
    torch.bitwise_right_shift(z, 64 - UNIFORM_BITS, out=tmp)
    return tmp.bitwise_and_((1 << UNIFORM_BITS) - 1) < keep_limit(density)  # top 53 bits


def keep_mask(
    stream_keys: Sequence[int], start: int, m: int, density: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:  # fmt: skip
    """DARE's keep masks ``(K, m)`` (bool) of entries start..start+m−1 of the flattened
    tensor, row k for stream key ``stream_keys[k]``; entry i kept with probability density.

    On CPU by the C loop (:func:`fedmerge.merging.native.keep_mask`, vectorized:
    ``benchmarks/dropmask_speed.py``), elsewhere (or where the loops are not built) by
    :func:`keep_mask_torch`.
    """
    from fedmerge.merging import native

    if torch.device(device).type != "cpu" or native.library() is None:
        return keep_mask_torch(stream_keys, start, m, density, device)
    keys = np.array([k & _U64 for k in stream_keys], dtype=np.uint64)
    return torch.from_numpy(native.keep_mask(keys, start, m, keep_limit(density)))
