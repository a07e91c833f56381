"""The ``quantize`` codec: b-bit codes with one absmax scale per block of entries.

The flattened tensor is cut into blocks of ``block`` entries; block j keeps
``s_j = max |x|`` and every entry becomes ``q = round(x / s_j · L)`` with
``L = 2^(b−1) − 1`` (symmetric, so 0 stays 0), decoded as ``q · s_j / L``. With
deterministic rounding the error is at most ``s_j / (2L)`` per entry; with
``stochastic: true`` ``q = floor(x / s_j · L + u)``, ``u ~ U[0, 1)`` from the sender's
seeded stream, unbiased with error below ``s_j / L``. Codes travel as ``q + L``: two per
byte for b ≤ 4, one per byte for 5 ≤ b ≤ 8; scales in float32 (float64 for float64
tensors).

>>> import torch
>>> from fedmerge.codecs.registry import KeyContext
>>> p = {"bits": 8, "block": 4, "stochastic": False}
>>> x = torch.tensor([1.0, -0.5, 0.25, 0.0])
>>> parts = encode_quantize(x, KeyContext("w", torch.Generator()), p)
>>> decode_quantize(parts, TensorSpec(torch.float32, (4,)), p).tolist()
[1.0, -0.5039370059967041, 0.25196850299835205, 0.0]
"""

from __future__ import annotations

import math

import torch

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs.bits import pack_nibbles, unpack_nibbles
from fedmerge.codecs.registry import (
    KeyContext,
    Malformed,
    Params,
    check_finite_part,
    expect,
    real_dtype,
    register,
)
from fedmerge.registry import Param


def levels_of(bits: int) -> int:
    """``L = 2^(b−1) − 1``: codes are the integers in ``[−L, L]`` (symmetric, 0 exact)."""
    return 2 ** (bits - 1) - 1


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten and zero-pad ``x`` to ``(ceil(n / block), block)``."""
    flat = x.reshape(-1)
    pad = flat.new_zeros((-flat.numel()) % block)
    return torch.cat([flat, pad]).view(-1, block)


def code_width(bits: int, n: int) -> int:
    """Length of the ``codes`` part for ``n`` codes: two per byte for b ≤ 4, one byte
    each for 5–8, one int16 each for 9–16."""
    return (n + 1) // 2 if bits <= 4 else n


def code_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits > 8 else torch.uint8


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``(n,)`` in ``[−L, L]`` to the ``codes`` part: ``q + L`` as nibbles or
    bytes for b ≤ 8, ``q`` itself as int16 above."""
    if bits > 8:
        return q.to(torch.int16)
    u = (q + levels_of(bits)).to(torch.uint8)
    return pack_nibbles(u) if bits <= 4 else u


def unpack_codes(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes` -> int64 ``(n,)`` (range checked by absmax_decode)."""
    if bits > 8:
        return codes.to(torch.int64)
    u = unpack_nibbles(codes, n) if bits <= 4 else codes
    return u.to(torch.int64) - levels_of(bits)


def check_quantize(entries: dict, spec: TensorSpec, params: Params) -> None:
    """``codes`` (U8, n or ceil(n/2) bytes) and ``scales`` ``(ceil(n / block),)``."""
    n = math.prod(spec.shape)
    shapes = {"codes": (code_width(params["bits"], n),), "scales": (-(-n // params["block"]),)}
    expect(entries, ("codes", "scales"), shapes,
           {"codes": code_dtype(params["bits"]), "scales": real_dtype(spec.dtype)})  # fmt: skip


def decode_quantize(
    parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params
) -> torch.Tensor:
    q = unpack_codes(parts["codes"], params["bits"], math.prod(spec.shape))
    return absmax_decode(q, parts["scales"], params).to(spec.dtype).view(spec.shape)


def absmax_encode(
    flat: torch.Tensor, params: Params, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flat`` ``(n,)`` to signed int64 codes ``(n,)`` in ``[−L, L]`` and float scales
    ``(ceil(n / block),)`` (``params``: ``bits``, ``block``); rounding is deterministic
    unless a ``generator`` is given (stochastic, unbiased)."""
    levels = levels_of(params["bits"])
    blocks = _blocks(flat.detach().to(real_dtype(flat.dtype)), params["block"])
    scales = blocks.abs().amax(1)
    y = blocks / torch.where(scales > 0, scales, 1)[:, None] * levels
    if generator is not None:
        y = torch.floor(y + torch.rand(y.shape, generator=generator, dtype=y.dtype))
    q = y.round_().clamp_(-levels, levels).reshape(-1)[: flat.numel()]
    return q.to(torch.int64), scales


def absmax_decode(q: torch.Tensor, scales: torch.Tensor, params: Params) -> torch.Tensor:
    """Signed codes ``(n,)`` and ``scales`` back to values ``(n,)`` in the scales' dtype;
    Malformed for a code outside ``[−L, L]`` or a non-finite or negative scale."""
    check_finite_part(scales, "scales")
    if scales.numel() and float(scales.min()) < 0:
        raise Malformed("part 'scales' has negative values")
    if scales.numel() != -(-q.numel() // params["block"]):
        raise Malformed(f"part 'scales' has {scales.numel()} entries for {q.numel()} codes")
    levels = levels_of(params["bits"])
    if q.numel() and int(q.abs().max()) > levels:
        code = int(q[q.abs().argmax()])
        raise Malformed(f"code {code} is outside [-{levels}, {levels}] for {params['bits']} bits")
    steps = _blocks(q.to(scales.dtype), params["block"]).mul_((scales / levels)[:, None])
    return steps.reshape(-1)[: q.numel()]


@register(
    "quantize",
    Param("bits", int, 8, "bits per code (≤ 4: two codes per byte)", low=2, high=8),
    Param("block", int, 64, "entries sharing one absmax scale", low=1, high=2**20),
    Param("stochastic", bool, False, "stochastic rounding (unbiased) from the seeded stream"),
    check=check_quantize, decode=decode_quantize,
)  # fmt: skip
def encode_quantize(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """Block-wise absmax quantization to 2–8 bits, deterministic or stochastic rounding."""
    generator = ctx.generator if params["stochastic"] else None
    q, scales = absmax_encode(x.reshape(-1), params, generator)
    return {"codes": pack_codes(q, params["bits"]), "scales": scales}
