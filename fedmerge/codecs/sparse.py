"""Sparse codecs: ``topk`` (the largest-magnitude entries with their values) and
``ternary`` (ComPEFT: the same entries as sign × one scale per tensor).

Both select the entries with ``|x| ≥ t`` (and ``x ≠ 0``): per tensor, ``t`` is the
k-th largest ``|x|`` with ``k = ceil(density · n)``; with ``scope: global`` one ``t``
for the whole payload, the exact TIES global threshold (``kthvalue(|τ|, N −
int(N·density))``, :mod:`fedmerge.merging.globalk`). Ties at ``t`` are all kept.
Indices travel as varint gaps (:mod:`fedmerge.codecs.bits`). Top-k's kept values
travel exact (``bits: 32``, the tensor's own dtype) or as 16-, 8- or 4-bit signed codes with
one absmax scale per ``block`` kept values (:func:`fedmerge.codecs.quantize.absmax_encode`,
deterministic rounding: error ≤ scale / (2L), L = 2^(b−1) − 1), so a kept entry costs
about 2 bytes instead of 5 at 8 bits.

Ternary (Yadav et al., ComPEFT, 2023) sends one sign bit per kept entry and one scale:
``scale: mean`` (default) uses the mean kept magnitude, the least-squares scale for
those signs; ``scale: std`` uses ``alpha · std(x)`` as the paper does (α tuned there on
validation data).

>>> import torch
>>> from fedmerge.codecs.registry import KeyContext
>>> x = torch.tensor([0.1, -3.0, 2.0, 0.5])
>>> parts = encode_ternary(x, KeyContext("w", torch.Generator()),
...                        {"density": 0.5, "scope": "tensor", "scale": "mean", "alpha": 1.0})
>>> decode_ternary(parts, TensorSpec(torch.float32, (4,)), {}).tolist()
[0.0, -2.5, 2.5, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs.bits import (
    MAX_VARINT_BYTES,
    decode_gaps,
    encode_gaps,
    pack_bits,
    unpack_bits,
)
from fedmerge.codecs.quantize import (
    absmax_decode,
    absmax_encode,
    code_dtype,
    code_width,
    pack_codes,
    unpack_codes,
)
from fedmerge.codecs.registry import (
    KeyContext,
    Malformed,
    Params,
    check_finite_part,
    expect,
    real_dtype,
    register,
)
from fedmerge.merging.globalk import GlobalThreshold
from fedmerge.merging.sparsify import kth_smallest
from fedmerge.registry import Param

_DENSITY = Param(
    "density", float, 0.1, "fraction of entries kept", low=0.0, high=1.0, low_open=True
)
_SCOPE = Param(
    "scope", str, "tensor",
    "tensor: the top density·n of every tensor; global: one threshold over the payload",
    choices=("tensor", "global"),
)  # fmt: skip


def global_threshold(tensors: Mapping[str, torch.Tensor], params: Params) -> float | None:
    """Pre-pass for ``scope: global``: the exact TIES threshold over all entries."""
    if params["scope"] != "global" or not any(t.numel() for t in tensors.values()):
        return None  # no entries: nothing to select (``select`` keeps none of an empty tensor)
    g = GlobalThreshold(params["density"], n_experts=1)
    for p in range(g.passes):
        for t in tensors.values():
            if t.numel():
                g.observe(p, t.detach().reshape(1, -1))
        g.end_pass(p)
    return float(g.thresholds[0])


def select(x: torch.Tensor, ctx: KeyContext, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted int64 indices ``(k,)`` into ``x.reshape(-1)`` of the kept entries; their values."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64), flat
    mag = flat.abs().to(real_dtype(flat.dtype))
    threshold = ctx.threshold
    if threshold is None:
        k = min(n, max(1, math.ceil(params["density"] * n)))
        threshold = kth_smallest(mag[None], n - k + 1)[0]
    else:
        mag = mag.float()  # the global threshold is a float32 value (merging.globalk)
    idx = torch.nonzero((mag >= threshold) & (flat != 0)).squeeze(1)
    return idx, flat[idx]


def _check_gaps(entries: dict, count_max: int, count_min: int) -> None:
    shape = entries["gaps"].shape
    if entries["gaps"].dtype != "U8" or len(shape) != 1:
        raise Malformed("part 'gaps' must be a 1-D U8 tensor")
    if not count_min <= shape[0] <= MAX_VARINT_BYTES * count_max:
        raise Malformed(f"{shape[0]} index bytes cannot hold {count_min}..{count_max} indices")


def _quantized(params: Params) -> bool:
    return params["bits"] != 32


def check_topk(entries: dict, spec: TensorSpec, params: Params) -> None:
    """``gaps`` (U8, varint) and either ``values`` ``(k,)`` in the tensor's dtype
    (``bits: 32``) or ``codes`` (:func:`~fedmerge.codecs.quantize.code_width` of k) with
    ``scales`` ``(ceil(k / block),)``; k ≤ numel."""
    n, bits = math.prod(spec.shape), params["bits"]
    if not _quantized(params):
        expect(entries, ("gaps", "values"), {}, {"values": spec.dtype})
        vshape = entries["values"].shape
        if len(vshape) != 1 or vshape[0] > n:
            raise Malformed(f"part 'values' has shape {list(vshape)}; at most {n}")
        _check_gaps(entries, vshape[0], vshape[0])
        return
    names = ("gaps", "codes", "scales")
    expect(entries, names, {}, {"codes": code_dtype(bits), "scales": real_dtype(spec.dtype)})
    width = entries["codes"].shape
    most = code_width(bits, n)
    if len(width) != 1 or width[0] > most:
        raise Malformed(f"part 'codes' has shape {list(width)}; at most {most}")
    fewest, k = (max(0, 2 * width[0] - 1), 2 * width[0]) if bits <= 4 else (width[0],) * 2
    scales, block = entries["scales"].shape, params["block"]
    if len(scales) != 1 or not -(-fewest // block) <= scales[0] <= -(-k // block):
        raise Malformed(f"part 'scales' has shape {list(scales)} for {fewest}..{k} codes")
    _check_gaps(entries, min(k, n), fewest)


def decode_topk(parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params) -> torch.Tensor:
    n = math.prod(spec.shape)
    if _quantized(params):
        count = int((parts["gaps"] < 0x80).sum())  # one terminating byte per index
        q = unpack_codes(parts["codes"], params["bits"], count)
        if q.numel() != count:
            raise Malformed(f"{q.numel()} codes for {count} indices")
        values = absmax_decode(q, parts["scales"], params)
    else:
        values = parts["values"]
        check_finite_part(values, "values")
        count = values.numel()
    idx = decode_gaps(parts["gaps"], count, n)
    out = torch.zeros(n, dtype=spec.dtype).index_put_((idx,), values.to(spec.dtype))
    return out.view(spec.shape)


@register(
    "topk", _DENSITY, _SCOPE,
    Param("bits", int, 32, "32: kept values in the tensor's dtype (exact); 16, 8 or 4: "
          "signed codes with one absmax scale per block of kept values (deterministic "
          "rounding)", choices=(32, 16, 8, 4)),
    Param("block", int, 64, "kept values sharing one scale when bits < 32", low=1, high=2**20),
    check=check_topk, decode=decode_topk, prepass=global_threshold,
)  # fmt: skip
def encode_topk(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """Top-k sparsification: the largest-magnitude entries (per tensor or global) with
    their values (exact, or 16/8/4-bit codes with block absmax scales); indices as
    varint gaps."""
    idx, values = select(x, ctx, params)
    if not _quantized(params):
        return {"gaps": encode_gaps(idx), "values": values.contiguous()}
    q, scales = absmax_encode(values, params)
    return {"gaps": encode_gaps(idx), "codes": pack_codes(q, params["bits"]), "scales": scales}


def check_ternary(entries: dict, spec: TensorSpec, params: Params) -> None:
    """``gaps`` (U8 varint), ``signs`` (one bit per kept entry) and a scalar ``scale``."""
    expect(entries, ("gaps", "signs", "scale"), {"scale": ()},
           {"signs": torch.uint8, "scale": real_dtype(spec.dtype)})  # fmt: skip
    sshape = entries["signs"].shape
    n = math.prod(spec.shape)
    fewest = max(0, 8 * sshape[0] - 7) if len(sshape) == 1 else n + 1
    if fewest > n:
        raise Malformed(f"part 'signs' has shape {list(sshape)} for {n} entries")
    _check_gaps(entries, min(n, 8 * sshape[0]), fewest)


def decode_ternary(
    parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params
) -> torch.Tensor:
    scale = parts["scale"]
    if not bool(torch.isfinite(scale)) or float(scale) < 0:
        raise Malformed(f"scale {float(scale)!r} must be finite and ≥ 0")
    gaps = parts["gaps"]
    count = int((gaps < 0x80).sum())
    negative = unpack_bits(parts["signs"], count)
    n = math.prod(spec.shape)
    idx = decode_gaps(gaps, count, n)
    values = torch.where(negative, -scale, scale).to(spec.dtype)
    return torch.zeros(n, dtype=spec.dtype).index_put_((idx,), values).view(spec.shape)


@register(
    "ternary", _DENSITY, _SCOPE,
    Param("scale", str, "mean", "mean: mean kept |x| (least squares); std: alpha·std(x) "
          "(ComPEFT)", choices=("mean", "std")),
    Param("alpha", float, 1.0, "ComPEFT's multiplier of std(x) when scale is std", low=0.0,
          low_open=True),
    check=check_ternary, decode=decode_ternary, prepass=global_threshold,
    reference="Yadav et al., ComPEFT (2023), arXiv:2311.13171",
)  # fmt: skip
def encode_ternary(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """ComPEFT ternary: the top-k entries as sign × one scale per tensor (1 bit + a
    varint gap each)."""
    idx, values = select(x, ctx, params)
    work = real_dtype(x.dtype)
    if params["scale"] == "std":
        scale = (
            params["alpha"] * x.detach().to(work).std()
            if x.numel() > 1
            else torch.zeros((), dtype=work)
        )
    else:
        scale = values.to(work).abs().mean() if values.numel() else torch.zeros((), dtype=work)
    return {"gaps": encode_gaps(idx), "signs": pack_bits(values < 0), "scale": scale.reshape(())}
