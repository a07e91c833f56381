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


def _levels(params: Params) -> int:
    return 2 ** (params["bits"] - 1) - 1


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flatten and zero-pad ``x`` to ``(ceil(n / block), block)``."""
    flat = x.reshape(-1)
    pad = flat.new_zeros((-flat.numel()) % block)
    return torch.cat([flat, pad]).view(-1, block)


def check_quantize(entries: dict, spec: TensorSpec, params: Params) -> None:
    """``codes`` (U8, n or ceil(n/2) bytes) and ``scales`` ``(ceil(n / block),)``."""
    n = math.prod(spec.shape)
    width = n if params["bits"] > 4 else (n + 1) // 2
    shapes = {"codes": (width,), "scales": (-(-n // params["block"]),)}
    expect(entries, ("codes", "scales"), shapes,
           {"codes": torch.uint8, "scales": real_dtype(spec.dtype)})  # fmt: skip


def decode_quantize(
    parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params
) -> torch.Tensor:
    scales = parts["scales"]
    check_finite_part(scales, "scales")
    if scales.numel() and float(scales.min()) < 0:
        raise Malformed("part 'scales' has negative values")
    n, levels = math.prod(spec.shape), _levels(params)
    codes = parts["codes"]
    q = codes if params["bits"] > 4 else unpack_nibbles(codes, n)
    if q.numel() and int(q.max()) > 2 * levels:
        raise Malformed(f"code {int(q.max())} is above {2 * levels} for {params['bits']} bits")
    steps = _blocks(q.to(scales.dtype).sub_(levels), params["block"]).mul_(
        (scales / levels)[:, None]
    )
    return steps.reshape(-1)[:n].to(spec.dtype).view(spec.shape)


@register(
    "quantize",
    Param("bits", int, 8, "bits per code (≤ 4: two codes per byte)", low=2, high=8),
    Param("block", int, 64, "entries sharing one absmax scale", low=1, high=2**20),
    Param("stochastic", bool, False, "stochastic rounding (unbiased) from the seeded stream"),
    check=check_quantize, decode=decode_quantize,
)  # fmt: skip
def encode_quantize(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """Block-wise absmax quantization to 2–8 bits, deterministic or stochastic rounding."""
    levels = _levels(params)
    blocks = _blocks(x.detach().to(real_dtype(x.dtype)), params["block"])
    scales = blocks.abs().amax(1)
    y = blocks / torch.where(scales > 0, scales, 1)[:, None] * levels
    if params["stochastic"]:
        y = torch.floor(y + torch.rand(y.shape, generator=ctx.generator, dtype=y.dtype))
    q = y.round_().clamp_(-levels, levels).add_(levels).reshape(-1)[: x.numel()].to(torch.uint8)
    codes = q if params["bits"] > 4 else pack_nibbles(q)
    return {"codes": codes, "scales": scales}
