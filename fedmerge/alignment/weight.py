"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): data-free alignment.

Maximize Σ_keys ⟨W_a, P(W_b)⟩ over one permutation per group by coordinate descent: visit
the groups in a seeded random order; for group g, with all other groups fixed, the
objective is linear in P_g with score matrix S = Σ_{(key, axis) ∈ g} A_key · B_keyᵀ (A, B
the tensors moved to put ``axis`` first and flattened), solved exactly by the Hungarian
algorithm. Stop when a full sweep improves nothing (or after ``max_iter`` sweeps).
BatchNorm running statistics (``spec.stats``) follow the permutation but are not matched.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedmerge.alignment.activation import assign
from fedmerge.alignment.spec import Perms, PermutationSpec, identity_perms


def _permuted_except(
    spec: PermutationSpec, perms: Perms, key: str, tensor: torch.Tensor, skip: int
) -> torch.Tensor:
    for axis, group in enumerate(spec.axes_to_perm[key]):
        if group is not None and axis != skip:
            tensor = tensor.index_select(axis, perms[group])
    return tensor


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    seed: int = 0,
    max_iter: int = 100,
) -> Perms:
    """Permutations aligning ``state_b`` to ``state_a`` (apply them to ``state_b``)."""
    perms = identity_perms(spec, state_a)  # on state_a's device, as every score below
    rng = np.random.default_rng(seed)
    groups = list(perms)
    for _ in range(max_iter):
        improved = False
        for g in rng.permutation(groups):
            n = perms[g].numel()
            score = torch.zeros(n, n, dtype=torch.float64, device=perms[g].device)
            for key, axis in spec.perm_to_axes[g]:
                if key in spec.stats:
                    continue
                w_a = state_a[key].double().movedim(axis, 0).reshape(n, -1)
                w_b = _permuted_except(spec, perms, key, state_b[key].double(), axis)
                score += w_a @ w_b.movedim(axis, 0).reshape(n, -1).T
            new = assign(score)
            rows = torch.arange(n, device=score.device)
            old_value, new_value = score[rows, perms[g]].sum(), score[rows, new].sum()
            improved |= bool(new_value > old_value + 1e-12 * max(1.0, float(old_value.abs())))
            perms[g] = new
        if not improved:
            break
    return perms
