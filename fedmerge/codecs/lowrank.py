"""The ``lowrank`` codec: PowerSGD rank-r factors for every matrix, a warm-started subspace.

For a 2-D tensor ``M`` ``(m, n)`` with ``r = min(rank, m, n)`` (Vogels et al., PowerSGD,
2019, one power iteration per call): ``P = orth(M Q)`` ``(m, r)``, ``Q ← Mᵀ P`` ``(n, r)``,
sent as ``P`` and ``Q``, decoded as ``P Qᵀ``. The sender keeps ``Q`` and starts the next
call from it (warm start), so with error feedback the subspace keeps improving; the
first ``Q`` is Gaussian from the sender's seeded stream. Tensors that are not
matrices (biases, norms, conv kernels, empty ones) travel dense. At ``r = min(m, n)``
the decoding is exact up to rounding.

>>> import torch
>>> from fedmerge.codecs.registry import KeyContext
>>> m = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, -1.0]))
>>> parts = encode_lowrank(m, KeyContext("w", torch.Generator().manual_seed(0)), {"rank": 1})
>>> torch.allclose(decode_lowrank(parts, TensorSpec(torch.float32, (2, 3)), {"rank": 1}), m)
True
"""

from __future__ import annotations

import torch

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs.dense import check_dense, decode_dense
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


def _is_matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0


def check_lowrank(entries: dict, spec: TensorSpec, params: Params) -> None:
    """Matrices: ``p`` ``(m, r)`` and ``q`` ``(n, r)`` with 1 ≤ r ≤ min(rank, m, n); else dense."""
    if not _is_matrix(spec.shape):
        return check_dense(entries, spec, params)
    work = real_dtype(spec.dtype)
    expect(entries, ("p", "q"), {}, {"p": work, "q": work})
    (m, n), p, q = spec.shape, entries["p"].shape, entries["q"].shape
    r = p[1] if len(p) == 2 else -1
    if not (len(q) == 2 and tuple(p) == (m, r) and tuple(q) == (n, r)):
        raise Malformed(f"factors {list(p)} and {list(q)} do not fit a {m}×{n} matrix")
    if not 1 <= r <= min(params["rank"], m, n):
        raise Malformed(f"rank {r} outside [1, {min(params['rank'], m, n)}]")


def decode_lowrank(
    parts: dict[str, torch.Tensor], spec: TensorSpec, params: Params
) -> torch.Tensor:
    if not _is_matrix(spec.shape):
        return decode_dense(parts, spec, params)
    for name in ("p", "q"):
        check_finite_part(parts[name], name)
    return (parts["p"] @ parts["q"].T).to(spec.dtype)


@register(
    "lowrank",
    Param("rank", int, 4, "rank r of the factors of every matrix", low=1),
    check=check_lowrank, decode=decode_lowrank,
    reference="Vogels et al., PowerSGD (NeurIPS 2019)",
)  # fmt: skip
def encode_lowrank(x: torch.Tensor, ctx: KeyContext, params: Params) -> dict[str, torch.Tensor]:
    """PowerSGD low rank: rank-r factors P, Q per matrix (one power iteration from the
    sender's warm-started Q); other tensors dense."""
    if not _is_matrix(tuple(x.shape)):
        return {"value": x.contiguous()}
    m = x.detach().to(real_dtype(x.dtype))
    r = min(params["rank"], *m.shape)
    q = ctx.state.get("q")
    if q is None or q.shape != (m.shape[1], r):
        q = torch.randn(m.shape[1], r, generator=ctx.generator, dtype=m.dtype)
    p = torch.linalg.qr(m @ q).Q
    q = m.T @ p
    ctx.state["q"] = q
    return {"p": p.contiguous(), "q": q.contiguous()}
