"""The one-shot merge methods: one small pure kernel each, registered with its parameters.

Every kernel maps the reference tensor ``base`` ``(n,)``, the stacked task
vectors ``tau`` ``(K, n)`` (τ_k = θ_k − θ_ref, float32 or float64; kernels may
modify ``tau`` in place) and the per-expert weights ``w`` ``(K,)`` to the
merged tensor ``(n,)``; n may be one block of a bigger tensor (then a
``tensor_pass`` supplies what the kernel needs of the whole, see
:mod:`fedmerge.merging.tensorpass`). Names and definitions follow mergekit; defaults follow
the papers where mergekit has none (see the README's method table).

>>> import torch
>>> base, tau, w = torch.zeros(2), torch.tensor([[2.0, -2.0], [4.0, 2.0]]), torch.ones(2)
>>> task_arithmetic(base, tau, w, None, {"lambda": 0.5, "normalize": False}).tolist()
[3.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedmerge.merging.globalk import GlobalThreshold
from fedmerge.merging.registry import Param, register
from fedmerge.merging.sparsify import (
    Kth,
    drop_random,
    elect_and_combine,
    keep_by_threshold,
    magnitude_rank,
    outlier_ranks,
    trim_magnitude,
    trim_outliers,
)
from fedmerge.merging.tensorpass import DropNorms, KthMagnitudes

Params = dict[str, Any]


@dataclass
class KeyContext:
    """Per-key extras a kernel may need.

    ``stream_keys[k]``: expert k's DARE stream key for this key (from the
    ``seed`` parameter, the key name and k, so results do not depend on key
    order; see :mod:`fedmerge.merging.dropmask`); ``start``: the index of the
    block's first element in the flattened tensor; ``fisher``:
    ``(K, n)`` Fisher diagonals of the block; ``thresholds``: ``(K,)`` global
    magnitude thresholds from a pre-pass. When the kernel sees a block of the
    key, ``numel`` is the whole tensor's element count and a tensor pass (see
    :mod:`fedmerge.merging.tensorpass`) has filled ``kth`` (rank -> ``(K,)``
    k-th smallest |τ_k|) or ``norms`` (L1 norms before/after DARE's drop).
    """

    key: str
    stream_keys: list[int] = field(default_factory=list)
    start: int = 0
    fisher: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None
    numel: int | None = None
    kth: Kth | None = None
    norms: tuple[torch.Tensor, torch.Tensor] | None = None


def _lam(p: Params) -> Param:
    return Param("lambda", float, p, "scale of the merged task vector: θ_ref + λ·τ_merged")


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the (contributing) weights")


def _density(default: float, what: str) -> Param:
    return Param("density", float, default, what, low=0.0, high=1.0, low_open=True)


_SEED = Param("seed", int, 0, "random seed; each key and expert gets its own stream", low=0)
_RESCALE = Param(
    "rescale",
    str,
    "inverse",
    "after dropping: inverse = ×1/density (DARE paper), l1 = restore the L1 norm "
    "(mergekit's rescale: true), none",
    choices=("inverse", "l1", "none"),
)


def _mix(tau: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_k w_k τ_k, divided by Σ_k w_k when ``normalize`` (mergekit: unless |Σw| < 1e-8)."""
    merged = w.to(tau.dtype) @ tau
    total = float(w.sum())
    return merged.div_(total) if normalize and abs(total) >= 1e-8 else merged


def _weigh(tau: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w_k·τ_k in place (skipped when every weight is 1)."""
    return tau if bool((w == 1).all()) else tau.mul_(w.to(tau.dtype)[:, None])


def _apply(base: torch.Tensor, lam: float, merged: torch.Tensor) -> torch.Tensor:
    """θ_ref + λ·τ_merged, reusing ``merged``'s memory."""
    return merged.mul_(lam).add_(base)


@register(
    "average",
    _normalize(True),
    reference="https://arxiv.org/abs/2203.05482",
    nonnegative_weights=True,
)
def average(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """Weighted average Σ w_k θ_k / Σ w_k (mergekit's linear); without
    normalize the plain weighted sum Σ w_k θ_k."""
    scale = 1.0 if p["normalize"] else float(w.sum())
    return _mix(tau, w, p["normalize"]).add_(base, alpha=scale)


@register(
    "task_arithmetic",
    _lam(0.3),
    _normalize(False),
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """Task arithmetic θ_ref + λ·Σ w_k τ_k (default λ = 0.3 as in FusionBench;
    mergekit's default is 1)."""
    return _apply(base, p["lambda"], _mix(tau, w, p["normalize"]))


def _ties_prepass(p: Params, n_experts: int) -> GlobalThreshold | None:
    if p["scope"] == "global" and p["density"] < 1:
        return GlobalThreshold(p["density"], n_experts)
    return None


def _ties_tensor_pass(p: Params, ctx: KeyContext, n_experts: int, dtype: torch.dtype):
    rank = magnitude_rank(ctx.numel, p["density"])
    if p["scope"] == "global" or not rank:
        return None
    return KthMagnitudes([rank], n_experts, dtype, ctx)


@register(
    "ties",
    _density(0.2, "fraction of each task vector kept, by magnitude (TIES paper: top 20%)"),
    _lam(1.0),
    _normalize(True),
    Param(
        "scope",
        str,
        "tensor",
        "where the top-density magnitudes are chosen: tensor = per tensor (mergekit), "
        "global = one threshold per expert over the whole model (official TIES code)",
        choices=("tensor", "global"),
    ),
    reference="https://arxiv.org/abs/2306.01708",
    prepass=_ties_prepass,
    tensor_pass=_ties_tensor_pass,
)
def ties(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """TIES-merging: trim each τ_k to its top-density magnitudes, elect the sign
    of Σ w_k τ_k per entry, average the agreeing entries (disjoint mean), scale by λ."""
    if ctx.thresholds is not None:
        keep_by_threshold(tau, ctx.thresholds.to(tau.dtype))
    else:
        trim_magnitude(tau, p["density"], ctx.numel, ctx.kth)
    merged = elect_and_combine(_weigh(tau, w), w, p["normalize"])
    return _apply(base, p["lambda"], merged)


_DARE_PARAMS = (
    _density(0.1, "keep probability 1 − p of each entry (DARE paper: p = 0.9)"),
    _RESCALE,
    _SEED,
    _lam(1.0),
)


def _dare_tensor_pass(p: Params, ctx: KeyContext, n_experts: int, dtype: torch.dtype):
    return DropNorms(p["density"], ctx) if p["rescale"] == "l1" and p["density"] < 1 else None


@register(
    "dare_linear",
    *_DARE_PARAMS,
    _normalize(False),
    reference="https://arxiv.org/abs/2311.03099",
    tensor_pass=_dare_tensor_pass,
)
def dare_linear(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 − density (seeded),
    rescale the survivors, then task arithmetic θ_ref + λ·Σ w_k τ'_k."""
    drop_random(tau, p["density"], ctx.stream_keys, ctx.start, p["rescale"], ctx.norms)
    return _apply(base, p["lambda"], _mix(tau, w, p["normalize"]))


@register(
    "dare_ties",
    *_DARE_PARAMS,
    _normalize(False),
    reference="https://arxiv.org/abs/2311.03099",
    tensor_pass=_dare_tensor_pass,
)
def dare_ties(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """DARE dropping followed by TIES sign election and disjoint sum (mean with
    normalize; mergekit's default is the sum)."""
    drop_random(tau, p["density"], ctx.stream_keys, ctx.start, p["rescale"], ctx.norms)
    merged = elect_and_combine(_weigh(tau, w), w, p["normalize"])
    return _apply(base, p["lambda"], merged)


_BREADCRUMBS_PARAMS = (
    _density(0.9, "fraction of each task vector kept after dropping both tails"),
    Param("gamma", float, 0.01, "fraction of the largest magnitudes dropped", low=0.0, high=1.0),
    _lam(1.0),
)


def _breadcrumbs_tensor_pass(p: Params, ctx: KeyContext, n_experts: int, dtype: torch.dtype):
    ranks = [r for r in outlier_ranks(ctx.numel, p["density"], p["gamma"]) or () if r > 0]
    return KthMagnitudes(ranks, n_experts, dtype, ctx) if ranks else None


@register(
    "breadcrumbs",
    *_BREADCRUMBS_PARAMS,
    _normalize(False),
    reference="https://arxiv.org/abs/2312.06795",
    tensor_pass=_breadcrumbs_tensor_pass,
)
def breadcrumbs(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """Model Breadcrumbs: drop the top gamma fraction and the smallest entries
    of each τ_k so that density remains, then θ_ref + λ·Σ w_k τ'_k."""
    trim_outliers(tau, p["density"], p["gamma"], ctx.numel, ctx.kth)
    return _apply(base, p["lambda"], _mix(tau, w, p["normalize"]))


@register(
    "breadcrumbs_ties",
    *_BREADCRUMBS_PARAMS,
    _normalize(False),
    reference="https://arxiv.org/abs/2312.06795",
    tensor_pass=_breadcrumbs_tensor_pass,
)
def breadcrumbs_ties(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """Breadcrumbs trimming followed by TIES sign election and disjoint sum."""
    trim_outliers(tau, p["density"], p["gamma"], ctx.numel, ctx.kth)
    merged = elect_and_combine(_weigh(tau, w), w, p["normalize"])
    return _apply(base, p["lambda"], merged)


@register(
    "magmax",
    _lam(0.5),
    reference="https://arxiv.org/abs/2407.06322",
)
def magmax(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """MagMax: per entry, the weighted task vector w_k τ_k of largest magnitude
    (first expert on ties), θ_ref + λ·τ_max (λ = 0.5 as in FusionBench)."""
    weighted = _weigh(tau, w)
    pick = weighted.abs().argmax(dim=0, keepdim=True)
    return _apply(base, p["lambda"], weighted.gather(0, pick).squeeze(0))


@register(
    "fisher",
    Param(
        "epsilon",
        float,
        1e-6,
        "added to every Fisher value (FusionBench's minimal weight)",
        low=0.0,
    ),
    reference="https://arxiv.org/abs/2111.09832",
    needs_fisher=True,
    nonnegative_weights=True,
)
def fisher(base, tau, w, ctx, p: Params) -> torch.Tensor:
    """Fisher merging: θ = Σ w_k (F_k + ε) θ_k / Σ w_k (F_k + ε), with F_k the
    diagonal Fisher of expert k (given as safetensors with the model's keys)."""
    coef = ctx.fisher.to(tau.dtype).add_(p["epsilon"]).mul_(w.to(tau.dtype)[:, None])
    total = coef.sum(dim=0)
    return coef.mul_(tau).sum(dim=0).div_(total.masked_fill_(total == 0, 1.0)).add_(base)
