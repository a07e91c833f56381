"""Continual merging: fold experts into a running merge one at a time, in constant memory.

Methods (:data:`CONTINUAL_METHODS`): ``opcm``, ``continual_task_arithmetic``,
``running_average``, ``continual_ties``, ``magmax``. In memory use
:func:`make_merger`; on disk, :class:`~fedmerge.continual.store.ContinualStore`.
"""

from fedmerge.continual.linear import (
    EMBEDDING_PATTERN,
    default_projectable,
    linear_keys_from_module,
)
from fedmerge.continual.merger import ContinualMerger, fold_step, make_merger
from fedmerge.continual.methods import (
    CONTINUAL_METHODS,
    ContinualMethod,
    orthogonal_projection,
    split_rank,
)
from fedmerge.continual.store import ContinualStore

__all__ = [
    "CONTINUAL_METHODS",
    "EMBEDDING_PATTERN",
    "ContinualMerger",
    "ContinualMethod",
    "ContinualStore",
    "default_projectable",
    "fold_step",
    "linear_keys_from_module",
    "make_merger",
    "orthogonal_projection",
    "split_rank",
]
