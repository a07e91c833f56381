"""Robust aggregation: what a node does with its own tensors and its neighbours' when some
neighbours may be Byzantine (send anything that passes validation).

Every rule is a small function ``rule(own, others, **params) -> merged`` where ``own`` is
the receiver's (tensors, π_ii) and ``others`` its neighbours' (tensors, π_ij); tensors are
name → tensor, all with the same keys and shapes (validated before). Only floating entries
are aggregated; the others are copied from ``own``. Rules are shift-equivariant, so they
work on task vectors τ and on weights θ alike. With m = 1 + len(others) contributions and
P parameters:

- ``mean``: Σ π_j x_j / Σ π_j (plain gossip / DIMAT averaging).                 O(mP)
- ``clip``: self-centred clipping (ClippedGossip, He, Karimireddy & Jaggi 2022): each
  neighbour's difference d_j = x_j − x_i is scaled to norm ≤ c, then x_i + Σ π_j d_j' / Σ π.
  c = ``clip_bound`` if > 0, else ``clip_tau`` × the lower median of the ‖d_j‖ (the lower
  one, so that on a ring one Byzantine neighbour of two cannot set the radius; while the
  Byzantine neighbours are fewer than half, they cannot inflate it).   O(mP)
  With ``clip_screen`` κ > 0, a neighbour farther than κ·c is ignored (d_j' = 0: its
  weight stays with the node): a redescending influence, where plain clipping lets every
  far attacker (sign flip, noise, IPM) pull the node by π_j·c each round. An attacker
  within κ·c is clipped as before. This is the acceptance test of BALANCE (Fang et al.,
  "Byzantine-robust decentralized federated learning", CCS 2024: keep a neighbour only
  within γ·‖θ_i‖ of the own model) made shift-equivariant, the threshold taken from the
  neighbour distances instead of the own norm, so that it works on τ and θ alike.
- ``median``: coordinate-wise median over the closed neighbourhood (mean of the two middle
  values when m is even); ignores π.                                            O(mP log m)
- ``trimmed_mean``: per coordinate, drop the k = min(⌈β·m⌉, ⌊(m−1)/2⌋) smallest and largest
  values and average the rest (Yin et al. 2018); ignores π.                     O(mP log m)
- ``krum``: Multi-Krum (Blanchard et al. 2017): score each contribution by the summed
  squared distances to its m − f − 2 nearest others (at least 1), keep the m − f best
  scored, and take their π-weighted mean.                                       O(m²P)

>>> import torch
>>> own = ({"w": torch.tensor([0.0, 0.0])}, 1.0)
>>> others = [({"w": torch.tensor([1.0, 2.0])}, 1.0), ({"w": torch.tensor([100.0, -50.0])}, 1.0)]
>>> median(own, others)["w"].tolist(), trimmed_mean(own, others, beta=0.2)["w"].tolist()
([1.0, 0.0], [1.0, 0.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from fedmerge.registry import Entry, Param, Registry
from fedmerge.statedict import StateDict, is_mergeable

Tensors = Mapping[str, torch.Tensor]
Contribution = tuple[Tensors, float]  # (tensors, mixing weight π)


def _floating(own: Tensors) -> list[str]:
    return [k for k, v in own.items() if is_mergeable(v)]


def _finish(own: Tensors, merged: dict[str, torch.Tensor]) -> StateDict:
    """Merged floating entries cast back to each dtype; the other entries copied from own."""
    return {k: merged[k].to(v.dtype) if k in merged else v.clone() for k, v in own.items()}


def _weighted_mean(contribs: Sequence[Contribution], keys: list[str]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in contribs)
    return {k: sum(w * t[k].double() for t, w in contribs) / total for k in keys}


def mean(own: Contribution, others: Sequence[Contribution]) -> StateDict:
    """Σ π_j x_j / Σ π_j over the closed neighbourhood."""
    return _finish(own[0], _weighted_mean([own, *others], _floating(own[0])))


def _flat(tensors: Tensors, keys: list[str]) -> torch.Tensor:
    """(P,) float64: the floating entries concatenated in ``keys`` order."""
    return torch.cat([tensors[k].double().reshape(-1) for k in keys])


def lower_median(values: torch.Tensor) -> float:
    """The ⌈n/2⌉-th smallest of a non-empty 1-D tensor."""
    return float(values.sort().values[(len(values) - 1) // 2])


def clip(
    own: Contribution, others: Sequence[Contribution], *, tau: float = 1.0, bound: float = 0.0,
    screen: float = 0.0,
) -> StateDict:  # fmt: skip
    """x_i + Σ_j π_j · clip_c(x_j − x_i) / Σ π (π_i included in the denominator); with
    ``screen`` κ > 0, a neighbour farther than κ·c counts as x_i (d_j' = 0)."""
    tensors, keys = own[0], _floating(own[0])
    if not others:
        return _finish(tensors, {k: tensors[k].double() for k in keys})
    mine = _flat(tensors, keys)
    dist = torch.stack([(_flat(t, keys) - mine).norm() for t, _ in others])
    radius = bound if bound > 0 else tau * lower_median(dist)
    far = screen * radius if screen > 0 else math.inf
    total = own[1] + sum(w for _, w in others)
    coef = [w * min(1.0, radius / float(d)) / total if 0 < d <= far else 0.0 for (_, w), d in
            zip(others, dist, strict=True)]  # fmt: skip
    merged = {}
    for k in keys:
        x = tensors[k].double()
        merged[k] = x + sum(c * (t[k].double() - x) for (t, _), c in zip(others, coef, strict=True))
    return _finish(tensors, merged)


def _sorted_stack(contribs: Sequence[Contribution], key: str) -> torch.Tensor:
    """(m, *shape) float64: every contribution's ``key``, sorted along the first axis."""
    return torch.stack([t[key].double() for t, _ in contribs]).sort(dim=0).values


def median(own: Contribution, others: Sequence[Contribution]) -> StateDict:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    contribs, m = [own, *others], 1 + len(others)
    merged = {}
    for k in _floating(own[0]):
        s = _sorted_stack(contribs, k)
        merged[k] = (s[(m - 1) // 2] + s[m // 2]) / 2
    return _finish(own[0], merged)


def trimmed_mean(own: Contribution, others: Sequence[Contribution], *, beta: float) -> StateDict:
    """Per coordinate: drop the k smallest and k largest values, average the rest."""
    contribs, m = [own, *others], 1 + len(others)
    k = min(math.ceil(beta * m), (m - 1) // 2)
    merged = {key: _sorted_stack(contribs, key)[k : m - k].mean(dim=0) for key in _floating(own[0])}
    return _finish(own[0], merged)


def krum_scores(flat: torch.Tensor, f: int) -> torch.Tensor:
    """(m,) Krum scores of the rows of ``flat`` (m, P): the summed squared distances of each
    row to its max(1, m − f − 2) nearest other rows."""
    m = flat.shape[0]
    d2 = torch.cdist(flat, flat).pow(2)
    d2.fill_diagonal_(float("inf"))
    nearest = max(1, min(m - 1, m - f - 2))
    return d2.sort(dim=1).values[:, :nearest].sum(dim=1)


def krum(own: Contribution, others: Sequence[Contribution], *, f: int) -> StateDict:
    """Multi-Krum: the π-weighted mean of the m − f best-scored contributions."""
    contribs, keys = [own, *others], _floating(own[0])
    if len(contribs) < 2:
        return mean(own, others)
    scores = krum_scores(torch.stack([_flat(t, keys) for t, _ in contribs]), f)
    keep = scores.argsort()[: max(1, len(contribs) - f)].tolist()
    return _finish(own[0], _weighted_mean([contribs[i] for i in keep], keys))


Rule = Callable[[Contribution, Sequence[Contribution]], StateDict]


@dataclass(frozen=True)
class RuleEntry(Entry):
    """A registered aggregation rule; ``fields``: the ``protocol.*`` config field that sets
    each declared parameter, in order."""

    fields: tuple[str, ...] = ()


RULES: Registry[RuleEntry] = Registry(
    "aggregation rule", field="protocol.aggregation", entry=RuleEntry
)
# fmt: off
RULES.add("mean", mean)
RULES.add("clip", clip,
          Param("tau", float, 1.0, "radius = tau × lower median of neighbour distances",
                low=0.0, low_open=True),
          Param("bound", float, 0.0, "a fixed radius instead (0: use tau)", low=0.0),
          Param("screen", float, 0.0, "ignore neighbours farther than screen × radius "
                "(0: clip them all)", low=0.0),
          fields=("clip_tau", "clip_bound", "clip_screen"))
RULES.add("median", median)
RULES.add("trimmed_mean", trimmed_mean,
          Param("beta", float, 0.2, "share trimmed from each end", low=0.0, high=0.5),
          fields=("trim_beta",))
RULES.add("krum", krum, Param("f", int, 1, "Byzantine neighbours tolerated", low=0),
          fields=("krum_f",))
# fmt: on


def make_rule(cfg) -> Rule:
    """The rule named by ``cfg.aggregation`` (a ProtocolConfig) bound to its parameters,
    read from the config fields the rule declares."""
    entry = RULES.lookup(cfg.aggregation)
    given = {p.name: getattr(cfg, f) for p, f in zip(entry.params, entry.fields, strict=True)}
    return partial(entry.target, **entry.resolve(given))


def as_state_merge(rule: Rule) -> Callable[[Sequence[Tensors], Sequence[float]], StateDict]:
    """Adapt a rule to ``weighted_average``'s signature (states[0] is the receiver's own)."""

    def merge(states: Sequence[Tensors], weights: Sequence[float]) -> StateDict:
        contribs = list(zip(states, weights, strict=True))
        return rule(contribs[0], contribs[1:])

    return merge
