"""Alignment of models that compute the same function up to a permutation of hidden units.

- :mod:`~fedmerge.alignment.spec`: permutation specs (which axes share a permutation) for
  the reference models, and applying permutations to state dicts;
- :mod:`~fedmerge.alignment.activation`: activation (correlation) matching on data;
- :mod:`~fedmerge.alignment.weight`: weight matching (Git Re-Basin), data-free;
- :mod:`~fedmerge.alignment.batchnorm`: REPAIR-style BatchNorm statistics reset.
"""

from fedmerge.alignment.activation import activation_matching, correlations
from fedmerge.alignment.batchnorm import has_batchnorm, reset_bn_stats
from fedmerge.alignment.spec import (
    PermutationSpec,
    apply_permutation,
    invert,
    permutation_spec,
    random_perms,
    spec_from_axes,
)
from fedmerge.alignment.weight import weight_matching

__all__ = [
    "PermutationSpec",
    "activation_matching",
    "apply_permutation",
    "correlations",
    "has_batchnorm",
    "invert",
    "permutation_spec",
    "random_perms",
    "reset_bn_stats",
    "spec_from_axes",
    "weight_matching",
]
