"""A continual merger in memory: start from a base, add experts one at a time.

>>> import torch
>>> base = {"fc.weight": torch.zeros(3, 2, dtype=torch.float64), "fc.bias": torch.zeros(3)}
>>> m = make_merger("continual_task_arithmetic", base)
>>> m.add({"fc.weight": torch.ones(3, 2, dtype=torch.float64), "fc.bias": torch.ones(3)})
>>> m.step, m.merged()["fc.bias"].tolist(), m.merged()["fc.weight"].dtype
(1, [0.30000001192092896, 0.30000001192092896, 0.30000001192092896], torch.float64)

The state is constant-size: one accumulator tensor per floating key plus a
few scalars (:mod:`fedmerge.continual.methods`). :func:`fold_step` is the one
step shared with the on-disk store; it reads the base, the previous
accumulator and the expert one key at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedmerge.checkpoint import Checkpoint, TensorSpec
from fedmerge.continual.linear import default_projectable
from fedmerge.continual.methods import CONTINUAL_METHODS, ContinualMethod
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.statedict import StateDict, check_finite, check_same_specs, is_mergeable, specs_of

Tensors = Mapping[str, torch.Tensor] | Checkpoint


@dataclass(frozen=True)
class Source:
    """Uniform, lazy access to a state dict in memory or a checkpoint on disk."""

    specs: dict[str, TensorSpec]
    get: Callable[[str], torch.Tensor]
    name: str

    @classmethod
    def of(cls, tensors: Tensors, name: str) -> Source:
        if isinstance(tensors, Checkpoint):
            return cls(tensors.specs(), tensors.get, name)
        return cls(specs_of(tensors), tensors.__getitem__, name)


@dataclass(frozen=True)
class StepResult:
    """Scalars of one step: ‖τ_t‖ and ‖acc_t‖ (float64 accumulations)."""

    tau_norm: float
    acc_norm: float


def mergeable_keys(specs: Mapping[str, TensorSpec]) -> list[str]:
    """Sorted floating keys: the ones that carry an accumulator."""
    return sorted(k for k, s in specs.items() if is_mergeable(s))


def fold_step(
    method: ContinualMethod,
    step: int,
    base: Source,
    acc: Callable[[str], torch.Tensor] | None,
    expert: Source,
    emit: Callable[[str, torch.Tensor], None],
) -> StepResult:
    """Fold expert number ``step`` (1-based) into the accumulator, key by key.

    ``acc`` reads acc_{step−1} (None at step 1); ``emit(key, acc_step[key])``
    receives the new accumulator in sorted key order. Validates the expert's
    keys, shapes and dtypes first and every tensor's finiteness as it is read, then
    that neither τ_t (a difference of finite half-precision tensors can overflow) nor
    the new accumulator overflows its dtype (:class:`ValidationError` naming
    ``expert.name`` and the key); the caller commits what ``emit`` received only if
    this returns.
    """
    check_same_specs(base.specs, expert.specs, source=expert.name)
    keys = mergeable_keys(base.specs)

    def tau(key: str) -> torch.Tensor:
        theta = expert.get(key)
        check_finite(theta, key, expert.name)
        return _no_overflow(theta - base.get(key), key, expert.name, "τ = θ − θ_0")

    method.prepare(keys, step, acc, tau)
    tau_sq = acc_sq = 0.0
    for key in keys:
        t = tau(key)
        new = method.fold(key, step, None if acc is None else acc(key), t)
        _no_overflow(new, key, expert.name, f"the {method.name} accumulator")
        tau_sq += float(t.double().pow(2).sum())
        acc_sq += float(new.double().pow(2).sum())
        emit(key, new)
    return StepResult(math.sqrt(tau_sq), math.sqrt(acc_sq))


def _no_overflow(tensor: torch.Tensor, key: str, source: str, what: str) -> torch.Tensor:
    """``tensor`` if finite, else a :class:`ValidationError` saying ``what`` overflowed."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValidationError(f"{source}: {key!r}: {what} overflows {tensor.dtype} ({bad} "
                              "non-finite value(s)); nothing changed")  # fmt: skip
    return tensor


class ContinualMerger:
    """Running continual merge over a fixed base (see :func:`make_merger`).

    Holds the base (a state dict or a lazy checkpoint), one accumulator tensor
    per floating key and the scalars ``step``, ``tau_norms`` (‖τ_i‖ of each
    expert) and ``acc_norm``; never the experts.
    """

    def __init__(self, method: ContinualMethod, base: Tensors):
        self.method = method
        self._base = Source.of(base, "base")
        self.acc: StateDict = {}
        self.tau_norms: list[float] = []
        self.acc_norm = 0.0

    @property
    def step(self) -> int:
        """Number of experts added so far."""
        return len(self.tau_norms)

    @property
    def scale(self) -> float:
        """θ^(t) = θ_0 + scale·acc_t."""
        return self.method.scale(self.tau_norms, self.acc_norm)

    @property
    def lambda_t(self) -> float | None:
        """OPCM's λ_t = ‖S_t‖ / mean‖τ_i‖ = 1/scale (1 before any expert); None for others."""
        if self.method.name != "opcm":
            return None
        return 1.0 / self.scale if self.scale else math.inf

    def add(self, expert: Tensors, name: str = "expert") -> None:
        """Fold one expert in; on any :class:`ValidationError` the state is unchanged."""
        new: StateDict = {}
        previous = self.acc.__getitem__ if self.step else None
        result = fold_step(self.method, self.step + 1, self._base, previous,
                           Source.of(expert, name), new.__setitem__)  # fmt: skip
        self.acc = new
        self.tau_norms.append(result.tau_norm)
        self.acc_norm = result.acc_norm

    def merged(self) -> StateDict:
        """θ^(t) in the base's dtypes (the base itself before any expert)."""
        out = {}
        for key in self._base.specs:
            base = self._base.get(key)
            out[key] = base + self.scale * self.acc[key] if key in self.acc else base.clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": acc, "meta": {...}}``: everything but the base, constant-size."""
        meta = {"method": self.method.name, "params": dict(self.method.params),
                "projectable": sorted(self.method.projectable), "step": self.step,
                "tau_norms": list(self.tau_norms), "acc_norm": self.acc_norm}  # fmt: skip
        return {"tensors": dict(self.acc), "meta": meta}

    @classmethod
    def from_state(cls, base: Tensors, state: Mapping[str, Any]) -> ContinualMerger:
        """Rebuild a merger from :meth:`state_dict` and the same base."""
        meta = state["meta"]
        merger = make_merger(meta["method"], base, meta["projectable"], **meta["params"])
        tensors = dict(state["tensors"])
        if meta["step"]:
            want = {k: merger._base.specs[k] for k in mergeable_keys(merger._base.specs)}
            check_same_specs(want, specs_of(tensors), source="continual state")
        elif tensors:
            raise ValidationError("continual state: step 0 must have no tensors")
        merger.acc = tensors
        merger.tau_norms = [float(x) for x in meta["tau_norms"]]
        merger.acc_norm = float(meta["acc_norm"])
        if len(merger.tau_norms) != meta["step"]:
            raise ValidationError("continual state: 'tau_norms' must have one entry per step")
        return merger


def make_merger(
    method: str, base: Tensors, projectable: Iterable[str] | None = None, **params: Any
) -> ContinualMerger:
    """A :class:`ContinualMerger` for ``method`` in :data:`CONTINUAL_METHODS`.

    ``projectable``: the keys OPCM projects (Linear weights); None ->
    :func:`~fedmerge.continual.linear.default_projectable` of the base.
    ``params`` override the method's defaults (e.g. ``alpha=0.5``).
    """
    cls = CONTINUAL_METHODS.lookup(method).target
    source = Source.of(base, "base")
    keys = default_projectable(source.specs) if projectable is None else set(projectable)
    missing = sorted(k for k in keys if k not in source.specs or len(source.specs[k].shape) != 2)
    if missing:
        raise ConfigError(f"projectable key {missing[0]!r} is not a 2-D tensor of the base")
    return ContinualMerger(cls(keys, **params), base)
