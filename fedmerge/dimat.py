"""DIMAT (Saadati et al., CVPR 2024): decentralized iterative merging-and-training.

One node's merge, :func:`dimat_merge`, is the paper's step: reset BatchNorm statistics of
its own and its neighbours' models on calibration data, align every neighbour j to itself
(activation matching, or weight matching for ``method="weight"``) giving P_j, set

    θ_i ← Σ_j π_ij · P_j(θ_j)        (j over the closed neighbourhood, P_i = identity)

and reset BatchNorm statistics again. Then the node trains E local epochs.

:func:`run_reference` runs that loop for K agents with a dense mixing matrix: the
executable definition the simulator's DIMAT protocol is checked against, and the
source of the README's comparison (``benchmarks/dimat_digits.py``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.alignment import (
    activation_matching,
    apply_permutation,
    has_batchnorm,
    permutation_spec,
    reset_bn_stats,
    weight_matching,
)
from fedmerge.alignment.batchnorm import Batch
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.statedict import StateDict, check_same_specs, is_mergeable, specs_of

METHODS = ("activation", "weight")
PROTOCOLS = {"dimat": "activation", "dimat_wm": "weight", "average": None, "local": None}
BROADCAST_ATOL = 1e-9
"""Mixing weights closer than this count as equal for the complete-graph broadcast
(Metropolis–Hastings rows differ in the last bit: 1 − 4·0.2 = 0.19999999999999996)."""


def broadcasts(mixing: torch.Tensor, atol: float = BROADCAST_ATOL) -> bool:
    """True when every row of the (K, K) mixing matrix π equals the first within ``atol``:
    every agent then merges the same models with the same weights, and the DIMAT code
    computes that merge once (aligned to agent 0) and sends it to every agent."""
    return bool(torch.allclose(mixing, mixing[0].expand_as(mixing), rtol=0.0, atol=atol))


def uniform_over(weights: Sequence[float], nodes: int, atol: float = BROADCAST_ATOL) -> bool:
    """True when a node's closed-neighbourhood ``weights`` cover all ``nodes`` of the round
    and are equal within ``atol``: its row of π is uniform over everyone, so (π being
    row-stochastic) every row is, and :func:`broadcasts` holds for the round."""
    return len(weights) == nodes > 1 and max(weights) - min(weights) <= atol


def dimat_merge(
    own: nn.Module,
    neighbours: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    self_weight: float,
    calib: Iterable[Batch],
    method: str = "activation",
    seed: int = 0,
    aggregate: Callable[[Sequence[StateDict], Sequence[float]], StateDict] | None = None,
) -> StateDict:
    """The merged state θ_i = Σ_j π_ij P_j(θ_j) of node ``own`` (which is left unchanged).

    ``neighbours`` are (state dict, π_ij) pairs, ``self_weight`` is π_ii; the weights are
    renormalized to sum to one (over the payloads actually received). ``calib`` is a
    re-iterable of input batches (tensors or (x, y) tuples): read once for activation
    matching, and once per model before and once after the merge where the model has BN.
    Integer entries (``num_batches_tracked``) come from ``own``. Neighbours send full
    weights θ_j (agents from different inits share no reference to take task vectors from).
    ``aggregate(aligned states, weights)`` replaces the weighted average (own state first),
    e.g. a robust rule from :mod:`fedmerge.decentralized.robust`.
    """
    if method not in METHODS:
        raise ConfigError(f"dimat: unknown method {method!r} (use one of {', '.join(METHODS)})")
    if iter(calib) is calib:
        raise ConfigError("dimat: calibration data must be re-iterable (a list or DataLoader)")
    weights = torch.tensor([self_weight] + [w for _, w in neighbours], dtype=torch.float64)
    if not bool(torch.isfinite(weights).all()) or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(f"dimat: mixing weights must be ≥ 0 with a positive sum, got {weights}")
    own_specs = specs_of(own.state_dict())
    models = [copy.deepcopy(own)]
    for j, (state, _) in enumerate(neighbours):
        check_same_specs(own_specs, specs_of(state), source=f"neighbour {j}")
        models.append(copy.deepcopy(own))
        models[-1].load_state_dict(state)
    bn = has_batchnorm(own)
    if bn:
        for m in models:
            reset_bn_stats(m, calib)
    spec = permutation_spec(own)
    states = [m.state_dict() for m in models]
    if method == "activation":
        perms = activation_matching(spec, models[0], models[1:], calib)
    else:
        perms = [weight_matching(spec, states[0], s, seed=seed) for s in states[1:]]
    aligned = [states[0]] + [
        apply_permutation(spec, p, s) for p, s in zip(perms, states[1:], strict=True)
    ]
    merged = (aggregate or weighted_average)(aligned, (weights / weights.sum()).tolist())
    models[0].load_state_dict(merged)
    if bn:
        reset_bn_stats(models[0], calib)
    return {k: v.detach().clone() for k, v in models[0].state_dict().items()}


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]):
    """Σ_j w_j θ_j for floating entries; other entries are copied from ``states[0]``."""
    first = states[0]
    return {
        k: sum(w * s[k] for w, s in zip(weights, states, strict=True)).to(v.dtype)
        if is_mergeable(v)
        else v.clone()
        for k, v in first.items()
    }


# --- the reference loop ----------------------------------------------------------------


@dataclass
class RoundRecord:
    """Global test accuracy of every agent after round ``round`` (after its merge)."""

    round: int
    accuracy: list[float]
    train_s: float
    merge_s: float
    mean: float = field(init=False)

    def __post_init__(self) -> None:
        self.mean = sum(self.accuracy) / len(self.accuracy)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None):
    order = torch.randperm(len(x), generator=generator) if generator else torch.arange(len(x))
    return [(x[idx], y[idx]) for idx in order.split(size)]


def train_epochs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
    batch_size: int, generator: torch.Generator, momentum: float = 0.0,
) -> None:  # fmt: skip
    """E epochs of SGD (fresh optimizer) with cross-entropy on (x, y), shuffled by ``generator``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    for _ in range(epochs):
        for xb, yb in _batches(x, y, batch_size, generator):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def run_reference(
    models: Sequence[nn.Module],
    mixing: torch.Tensor,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    rounds: int,
    epochs: int = 1,
    protocol: str = "dimat",
    lr: float = 0.1,
    momentum: float = 0.0,
    batch_size: int = 32,
    calib: Sequence[Batch] | None = None,
    seed: int = 0,
    broadcast: bool = True,
    progress: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Run ``rounds`` rounds of train-then-merge over K agents (models trained in place).

    ``mixing`` is the (K, K) row-stochastic matrix π (π_ij > 0: i hears j); ``data[i]`` is
    agent i's (x, y); ``protocol`` is ``dimat`` (activation matching), ``dimat_wm`` (weight
    matching), ``average`` (plain weighted averaging, the gossip / D-PSGD baseline) or
    ``local`` (no communication). Calibration for DIMAT is each agent's own training data
    in batches of 256, or the shared ``calib`` batches for every agent when given.
    ``broadcast``: when all rows of π are equal (:func:`broadcasts`), merge once at agent 0
    and give every agent that merge, as the DIMAT code does; False: every agent aligns the
    others to itself.
    """
    k = len(models)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r} (use one of {', '.join(PROTOCOLS)})")
    if mixing.shape != (k, k) or len(data) != k:
        raise ValidationError(f"mixing is {tuple(mixing.shape)} and data has {len(data)} agents")
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(k)]
    history = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        for model, (x, y), gen in zip(models, data, generators, strict=True):
            train_epochs(
                model, x, y, epochs=epochs, lr=lr, batch_size=batch_size, generator=gen,
                momentum=momentum,
            )  # fmt: skip
        mid = time.perf_counter()
        if protocol != "local":
            _merge_all(models, mixing, data, protocol, calib, seed + r, broadcast)
        end = time.perf_counter()
        record = RoundRecord(r, [accuracy(m, *test) for m in models], mid - start, end - mid)
        history.append(record)
        if progress:
            progress(record)
    return history


def _merge_all(models, mixing, data, protocol, calib, seed, broadcast) -> None:
    """Synchronous merge: every agent merges the states all agents had before this merge.

    When every row of π is the same within :data:`BROADCAST_ATOL` (a complete graph with
    uniform weights) and ``broadcast`` is set, all agents merge the same models with the
    same weights; as in the DIMAT reference code, the merge is then computed once, at
    agent 0, and every agent receives it.
    """
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    shared = broadcast and broadcasts(mixing)
    new = []
    for i, model in enumerate(models):
        if shared and i:
            new.append(new[0])
            continue
        peers = [j for j in range(len(models)) if j != i and mixing[i, j] > 0]
        if PROTOCOLS[protocol] is None:
            w = mixing[i, [i, *peers]].tolist()
            total = sum(w)
            new.append(weighted_average([states[j] for j in [i, *peers]], [v / total for v in w]))
            continue
        own_calib = calib if calib is not None else _batches(*data[i], 256, None)
        neighbours = [(states[j], float(mixing[i, j])) for j in peers]
        new.append(
            dimat_merge(
                model, neighbours, float(mixing[i, i]), own_calib, PROTOCOLS[protocol], seed
            )
        )
    for model, state in zip(models, new, strict=True):
        model.load_state_dict(state)
