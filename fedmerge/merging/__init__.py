"""One-shot merge methods: registered per-tensor kernels and a streaming engine.

>>> import torch
>>> from fedmerge.merging import merge
>>> base = {"w": torch.zeros(4)}
>>> experts = [{"w": torch.tensor([1.0, -1.0, 0.2, 0.0])}, {"w": torch.tensor([1.0, 1, 0, 0])}]
>>> merge("ties", base, experts, density=0.5)["w"].tolist()
[1.0, 1.0, 0.0, 0.0]
"""

from fedmerge.merging import methods as _methods  # noqa: F401  (registers the methods)
from fedmerge.merging.engine import (
    MergePlan,
    MergeReport,
    StateSource,
    merge,
    merge_checkpoints,
    plan_merge,
    run_plan,
)
from fedmerge.merging.methods import KeyContext
from fedmerge.merging.registry import METHODS, Method, Param, get_method, register

__all__ = [
    "METHODS",
    "KeyContext",
    "MergePlan",
    "MergeReport",
    "Method",
    "Param",
    "StateSource",
    "get_method",
    "merge",
    "merge_checkpoints",
    "plan_merge",
    "register",
    "run_plan",
]
