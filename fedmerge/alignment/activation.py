"""Activation matching: permute neighbours so their hidden units correlate with ours.

For every group of a :class:`PermutationSpec`, forward hooks read the features at the
group's points (module outputs, channel axis 1; every spatial position counts as a
sample) of the reference model and of each other model on the same calibration batches.
Only sufficient statistics are kept, in float64: per point and model pair the sample count,
the sums Σa, Σb, Σa², Σb² (C each) and the cross products Σ a bᵀ (C×C), so memory is
O(C²) per point whatever the size of the calibration set. Then

    corr[i, j] = (E[a_i b_j] − E[a_i] E[b_j]) / (σ(a_i) σ(b_j))

summed over the group's points (a residual stream has one point per block), and the
Hungarian algorithm (``linear_sum_assignment(maximize=True)``) gives ``perm[i]`` = the
other model's unit that plays our unit ``i``. This follows the correlation matching of
Git Re-Basin / REPAIR / ZipIt!'s permute mode as used by DIMAT; models are read in eval mode,
so reset BatchNorm statistics first (:func:`fedmerge.alignment.reset_bn_stats`). Units that
are constant on the calibration data (dead ReLUs) correlate with nothing, so any assignment
among them scores the same: calibrate on data that exercises the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import ExitStack, contextmanager

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from fedmerge.alignment.batchnorm import Batch, batch_inputs
from fedmerge.alignment.spec import Perms, PermutationSpec
from fedmerge.errors import ConfigError, ValidationError


class CrossStats:
    """Running sums for the correlation of features a (N, C) and b (N, C), kept on the
    features' ``device``."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        self.n = 0
        self.sum_a, self.sum_b = zeros.clone(), zeros.clone()
        self.sq_a, self.sq_b = zeros.clone(), zeros.clone()
        self.cross = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """(C, C) Pearson correlation of a's units (rows) with b's units (columns)."""
        mean_a, mean_b = self.sum_a / self.n, self.sum_b / self.n
        cov = self.cross / self.n - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / self.n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / self.n - mean_b**2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + eps)


def _as_samples(features: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) → (B·spatial, C)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


@contextmanager
def _capture(model: nn.Module, names: Sequence[str]):
    """Yield a dict that each forward fills with ``name → output`` of the named modules."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"permutation spec: model has no module {missing[0]!r}")
    store: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out))
        for n in names
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(*models: nn.Module):
    modes = [m.training for m in models]
    try:
        yield [m.eval() for m in models]
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def correlations(
    spec: PermutationSpec, model: nn.Module, others: Sequence[nn.Module], batches: Iterable[Batch]
) -> list[dict[str, torch.Tensor]]:
    """Per other model, per group: the summed (C, C) correlation over the group's points."""
    for group in spec.perm_to_axes:
        if not spec.points.get(group):
            raise ConfigError(f"permutation spec: group {group!r} has no activation points")
    names = sorted({n for pts in spec.points.values() for n in pts})
    stats: list[dict[str, CrossStats]] = [{} for _ in others]
    seen = 0
    with torch.no_grad(), ExitStack() as stack:
        stack.enter_context(_eval_mode(model, *others))
        feats_a = stack.enter_context(_capture(model, names))
        stores = [stack.enter_context(_capture(o, names)) for o in others]
        for batch in batches:
            x = batch_inputs(batch)
            model(x)
            for other, feats_b, acc in zip(others, stores, stats, strict=True):
                other(x)
                for n in names:
                    a, b = _as_samples(feats_a[n]), _as_samples(feats_b[n])
                    acc.setdefault(n, CrossStats(a.shape[1], a.device)).update(a, b)
            seen += 1
    if not seen:
        raise ValidationError("activation matching: the calibration data yielded no batch")
    return [
        {g: sum(acc[n].correlation() for n in pts) for g, pts in spec.points.items()}
        for acc in stats
    ]


def assign(score: torch.Tensor) -> torch.Tensor:
    """Hungarian assignment maximizing Σ_i score[i, perm[i]]; returns perm (C,) int64 on
    ``score``'s device (scipy solves it on the CPU)."""
    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    return perm.to(score.device)


def activation_matching(
    spec: PermutationSpec, model: nn.Module, others: Sequence[nn.Module], batches: Iterable[Batch]
) -> list[Perms]:
    """Permutations aligning each of ``others`` to ``model`` (apply them to the others'
    state dicts with :func:`~fedmerge.alignment.apply_permutation`)."""
    return [
        {g: assign(corr) for g, corr in per_group.items()}
        for per_group in correlations(spec, model, others, batches)
    ]
