"""The ``none`` codec: the tensor itself, bit for bit (the dense baseline).

>>> import torch
>>> from fedmerge.codecs.registry import KeyContext
>>> x = torch.tensor([1.5, -2.0])
>>> encode_none(x, KeyContext("w", torch.Generator()), {})["value"].tolist()
[1.5, -2.0]
"""

from __future__ import annotations

import torch

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs.registry import KeyContext, Params, check_finite_part, expect, register


def check_dense(entries: dict, spec: TensorSpec, params: Params) -> None:
    """One part ``value`` of exactly the tensor's dtype and shape."""
    expect(entries, ("value",), {"value": spec.shape}, {"value": spec.dtype})


def decode_dense(parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params) -> torch.Tensor:
    check_finite_part(parts["value"], "value")
    return parts["value"]


@register("none", check=check_dense, decode=decode_dense)
def encode_none(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """No compression: every entry in its own dtype (decoding is exact)."""
    return {"value": x.contiguous()}
