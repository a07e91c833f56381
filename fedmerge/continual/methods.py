"""Continual merge methods as per-key folds over a constant-size accumulator.

Every method keeps one tensor per floating key, the *accumulator* ``acc``, and
the merge after step t is ``θ^(t) = θ_0 + scale_t · acc_t``. Adding the t-th
expert (task vector ``τ_t = θ_t − θ_0``) is a fold applied key by key:

=============================  ===========================================  =====================
method                         acc_t (per key)                              scale_t
=============================  ===========================================  =====================
``opcm``                       S_t = S_{t−1} + Π_{S_{t−1}}(τ_t) (Linear)    mean_i‖τ_i‖ / ‖S_t‖
                               S_t = S_{t−1} + τ_t (every other key)
``continual_task_arithmetic``  Σ_i τ_i                                      s (0.3)
``running_average``            ((t−1)·acc_{t−1} + τ_t) / t                  1
``continual_ties``             acc_{t−1} + s·TIES(acc_{t−1}, τ_t); s·τ_1    1
``magmax``                     τ_t where |τ_t| ≥ |acc_{t−1}| else acc       s (0.5)
=============================  ===========================================  =====================

OPCM (Tang et al. 2025, FusionBench ``opcm_general.OPCM``) in this form is the
reference's loop with ``λ_{t−1}·D_{t−1} = S_{t−1}`` folded in: the reference
keeps the rescaled merge ``θ_0 + S·a/‖S‖`` and multiplies its delta back by
``λ_{t−1} = ‖S_{t−1}‖/a_{t−1}``; the projection is scale-invariant, so both give
the same numbers (to rounding) while ``S`` needs no global rescale pass.
Arithmetic stays in the accumulator's dtype (the base's); the SVD of half
precision tensors runs in float32 and is cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from fedmerge.registry import Entry, Param, Registry

TauGetter = Callable[[str], torch.Tensor]
AccGetter = Callable[[str], torch.Tensor]


# ----------------------------------------------------------------------------- OPCM projection


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """Number r of leading singular values whose cumulative share of Σs is ≤ α.

    Matches FusionBench: r is the first index at which the share exceeds α,
    and 0 when no index does (α ≥ 1, or an all-zero ``s`` whose share is NaN).
    ``s``: (k,) non-increasing.
    """
    above = torch.nonzero((s.cumsum(0) / s.sum()) > alpha)
    return int(above[0, 0]) if len(above) else 0


def orthogonal_projection(
    prev: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool = True
) -> torch.Tensor:
    """OPCM's Π_prev(τ) for one Linear weight; ``prev``, ``tau``: (m, n) -> (m, n).

    With the full SVD ``prev = U diag(s) Vᵀ``, ``P = Uᵀ τ V``; zero P's diagonal
    (unless ``zero_diagonal`` is false) and its top-left r×r block, r =
    :func:`split_rank`; return ``U P Vᵀ``: τ without its components along the
    directions that already carry the merge. Every zeroed entry has both
    indices < k = min(m, n), so this equals ``τ − U_k Z V_kᵀ`` with the *thin*
    SVD and Z the k×k matrix of removed entries, which is what is computed: the
    same numbers as the full-SVD formula, without the m×m / n×n factors
    (a 3072×768 weight: ~10× faster).
    """
    work = tau.dtype if tau.dtype in (torch.float32, torch.float64) else torch.float32
    u, s, vh = torch.linalg.svd(prev.to(work), full_matrices=False)  # (m,k) (k,) (k,n)
    r = split_rank(s, alpha)
    t = tau.to(work)
    p = u.T @ t @ vh.T  # (k, k): τ's coordinates on pairs of leading singular directions
    removed = torch.zeros_like(p)
    if zero_diagonal:
        removed.diagonal().copy_(p.diagonal())
    removed[:r, :r] = p[:r, :r]
    return (t - u @ removed @ vh).to(tau.dtype)


# ----------------------------------------------------------------------------- methods


CONTINUAL_METHODS: Registry[Entry] = Registry("continual method")
"""Every continual method by name; an entry's ``target`` is its :class:`ContinualMethod` class."""


class ContinualMethod:
    """One continual merge rule: declared parameters, a per-key fold and a scale.

    Subclasses set ``name``, register with :func:`continual_method` (declaring their
    parameters) and implement :meth:`fold`; :meth:`prepare` is the optional global
    first pass (needed by TIES' global top-k) and :meth:`scale` gives ``scale_t``
    from the step scalars.
    """

    name: ClassVar[str]

    def __init__(self, projectable: Iterable[str] = (), **params: Any):
        self.params = CONTINUAL_METHODS.resolve(self.name, params)
        self.projectable = frozenset(projectable)

    def prepare(self, keys: Sequence[str], step: int, acc: AccGetter, tau: TauGetter) -> None:
        """Global quantities for step ``step`` (1-based) before any :meth:`fold`."""

    def fold(
        self, key: str, step: int, acc: torch.Tensor | None, tau: torch.Tensor
    ) -> torch.Tensor:
        """acc_t for ``key`` from acc_{t−1} (None at step 1) and τ_t (same shape)."""
        raise NotImplementedError

    def scale(self, tau_norms: Sequence[float], acc_norm: float) -> float:
        """scale_t such that θ^(t) = θ_0 + scale_t·acc_t."""
        return 1.0


M = TypeVar("M", bound=type[ContinualMethod])


def continual_method(*params: Param) -> Callable[[M], M]:
    """Class decorator: register a :class:`ContinualMethod` under its ``name`` with ``params``."""

    def deco(cls: M) -> M:
        CONTINUAL_METHODS.add(cls.name, cls, *params)
        return cls

    return deco


def _scaling(default: float) -> Param:
    return Param("scaling_factor", float, default, "s: the merge is θ_0 + s·acc")


@continual_method(
    Param("alpha", float, 0.5, "share of Σs whose singular directions τ is kept out of", low=0.0),
    Param("zero_diagonal", bool, True, "also drop τ along every (u_i, v_i) pair (false: the "
          "paper's first code release)"),
)  # fmt: skip
class OPCM(ContinualMethod):
    """Orthogonal-projection continual merging (Tang et al. 2025): fold τ_t with its parts
    along the merge's leading singular directions removed, then rescale the merge's
    distance from θ_0 to the mean ‖τ_i‖.

    See the module docstring for the algorithm."""

    name = "opcm"

    def fold(self, key, step, acc, tau):
        if acc is None:
            return tau.clone()
        if key in self.projectable:
            tau = orthogonal_projection(
                acc, tau, self.params["alpha"], self.params["zero_diagonal"]
            )
        return acc + tau

    def scale(self, tau_norms, acc_norm):
        mean = sum(tau_norms) / len(tau_norms) if tau_norms else 0.0
        return mean / acc_norm if acc_norm > 0 else 1.0


@continual_method(_scaling(0.3))
class ContinualTaskArithmetic(ContinualMethod):
    """θ_0 + s·Σ_i τ_i (FusionBench ``ContinualTaskArithmeticForCLIP``)."""

    name = "continual_task_arithmetic"

    def fold(self, key, step, acc, tau):
        return tau.clone() if acc is None else acc + tau

    def scale(self, tau_norms, acc_norm):
        return self.params["scaling_factor"]


@continual_method()
class RunningAverage(ContinualMethod):
    """Running weight average ((t−1)·θ^(t−1) + θ_t)/t (FusionBench ``ContinualWeightAverage``)."""

    name = "running_average"

    def fold(self, key, step, acc, tau):
        return tau.clone() if acc is None else (acc * (step - 1) + tau) / step


@continual_method(
    _scaling(0.5),
    Param("threshold", float, 20.0, "percent of each row's entries kept, by magnitude",
          low=0.0, high=100.0, low_open=True),
    Param("merge_func", str, "sum", "how agreeing entries combine", choices=("sum", "mean", "max")),
)  # fmt: skip
class ContinualTies(ContinualMethod):
    """TIES between the running merge and each new τ (FusionBench's
    ``ContinualTiesMergingForCLIP``).

    Step 1: acc = s·τ_1. Step t: TIES over the two rows (acc_{t−1}, τ_t): each
    row keeps its global top ``threshold``% entries by magnitude (ties at the
    cut kept), the elected sign per entry is the sign of the trimmed sum (zero
    signs take the majority of all elected signs), and the agreeing entries
    are combined by ``merge_func`` (sum | mean | max); acc_t = acc_{t−1} +
    s·that. The global top-k needs one flat buffer of all |values| of a row
    during :meth:`prepare` (the one place this method holds a model-sized buffer).
    """

    name = "continual_ties"

    def prepare(self, keys, step, acc, tau):
        if step == 1:
            return
        self._cut = (_kth_magnitude(keys, acc, self.params["threshold"]),
                     _kth_magnitude(keys, tau, self.params["threshold"]))  # fmt: skip
        votes = 0.0
        for key in keys:
            votes += float(self._elect(acc(key), tau(key))[0].sum())
        self._majority = math.copysign(1.0, votes) if votes else 0.0

    def _elect(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sign per entry before zero resolution, trimmed rows stacked (2, *shape))."""
        rows = torch.stack([a * (a.abs() >= self._cut[0]), b * (b.abs() >= self._cut[1])])
        return torch.sign(rows.sum(0)), rows

    def fold(self, key, step, acc, tau):
        s = self.params["scaling_factor"]
        if acc is None:
            return s * tau
        sign, rows = self._elect(acc, tau)
        sign = torch.where(sign == 0, torch.full_like(sign, self._majority), sign)
        chosen = rows * torch.where(sign > 0, rows > 0, rows < 0)
        func = self.params["merge_func"]
        if func == "sum":
            merged = chosen.sum(0)
        elif func == "mean":
            merged = chosen.sum(0) / (chosen != 0).sum(0).clamp(min=1).to(chosen.dtype)
        else:
            merged = chosen.abs().amax(0) * sign
        return acc + s * merged


@continual_method(_scaling(0.5))
class MagMax(ContinualMethod):
    """θ_0 + s·τ_max, τ_max the elementwise max-|τ| (a later expert wins ties, as in MagMax)."""

    name = "magmax"

    def fold(self, key, step, acc, tau):
        return tau.clone() if acc is None else torch.where(tau.abs() >= acc.abs(), tau, acc)

    def scale(self, tau_norms, acc_norm):
        return self.params["scaling_factor"]


def _kth_magnitude(keys: Sequence[str], get: AccGetter, threshold: float) -> float:
    """The magnitude at the cut that keeps the top ``threshold``% of all entries of a row.

    FusionBench's rule: d entries, k = d − int(d·K) with K = threshold/100; the
    k-th smallest |value| (1-based).
    """
    flat = torch.cat([get(k).abs().reshape(-1) for k in keys])
    d = flat.numel()
    k = d - int(d * (threshold / 100 if threshold > 1 else threshold))
    return float(flat.kthvalue(max(k, 1)).values)
