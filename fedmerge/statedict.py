"""State dicts and task vectors: the currency of fedmerge.

A state dict is ``dict[str, torch.Tensor]``. A task vector is the difference
τ = θ − θ_ref of the floating-point entries; integer and bool entries (step
counters, BatchNorm's ``num_batches_tracked``, masks) are not differentiable
parameters and are *passed through from the reference* by every merge.

>>> import torch
>>> ref = {"w": torch.zeros(2), "n": torch.tensor(3)}
>>> tau = task_vector({"w": torch.ones(2), "n": torch.tensor(7)}, ref)
>>> sorted(tau), add_task_vector(ref, tau, 0.5)["w"].tolist()
(['w'], [0.5, 0.5])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from fedmerge.checkpoint import DTYPE_NAMES, TensorSpec, tensor_bytes
from fedmerge.errors import ValidationError

StateDict = dict[str, torch.Tensor]


def is_mergeable(tensor: torch.Tensor | TensorSpec) -> bool:
    """Floating tensors are merged; integer/bool tensors pass through from the reference."""
    return tensor.dtype.is_floating_point


def task_vector(theta: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> StateDict:
    """τ = θ − θ_ref for every floating entry (same keys as ``ref`` required)."""
    check_same_specs(specs_of(ref), specs_of(theta), source="model")
    return {k: theta[k] - ref[k] for k in ref if is_mergeable(ref[k])}


def add_task_vector(
    ref: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor], scale: float = 1.0
) -> StateDict:
    """θ = θ_ref + scale·τ; entries missing from ``tau`` are copied from ``ref``."""
    out = {}
    for key, base in ref.items():
        delta = tau.get(key)
        out[key] = base.clone() if delta is None else base + scale * delta.to(base.dtype)
    return out


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec.of(v) for k, v in state.items()}


def check_same_specs(
    expected: Mapping[str, TensorSpec],
    got: Mapping[str, TensorSpec],
    source: str,
    check_dtype: bool = True,
) -> None:
    """Raise :class:`ValidationError` naming ``source`` and the first bad key."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValidationError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValidationError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} extra)")
    for key in sorted(expected):
        want, have = expected[key], got[key]
        if want.shape != have.shape:
            raise ValidationError(
                f"{source}: {key!r} has shape {list(have.shape)}, expected {list(want.shape)}"
            )
        if check_dtype and want.dtype != have.dtype:
            raise ValidationError(
                f"{source}: {key!r} has dtype {have.dtype}, expected {want.dtype}"
            )


def check_finite(tensor: torch.Tensor, key: str, source: str) -> None:
    """Reject NaN/Inf in a floating tensor, naming ``source`` and ``key``."""
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValidationError(f"{source}: {key!r} has {bad} non-finite value(s)")


def global_norm(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> float:
    """‖state‖₂ over all floating entries (or ``keys``), accumulated in float64."""
    total = 0.0
    for key in keys if keys is not None else state:
        t = state[key]
        if t.dtype.is_floating_point:
            total += float(t.double().pow(2).sum())
    return math.sqrt(total)


def update_hash(h: hashlib._Hash, key: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) into a running hash."""
    h.update(f"{key}\0{DTYPE_NAMES[tensor.dtype]}\0{list(tensor.shape)}\0".encode())
    h.update(tensor_bytes(tensor))


def content_hash(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors, independent of file layout (single vs sharded).

    ``items`` must come in sorted key order (``Checkpoint.items()`` does that);
    only one tensor is held at a time.
    """
    h = hashlib.sha256()
    for key, tensor in items:
        update_hash(h, key, tensor)
    return h.hexdigest()


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`content_hash` of an in-memory state dict."""
    return content_hash((k, state[k]) for k in sorted(state))
