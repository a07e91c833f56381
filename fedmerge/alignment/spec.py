"""Permutation specs: which axes of which tensors share one permutation of hidden units.

A spec is declared from ``axes_to_perm`` (as in Git Re-Basin): for every permuted key, one
entry per axis naming the permutation group acting on it, or ``None``. Hidden units of a
layer permute the output axis of its weight and bias, the BatchNorm that follows it
(weight, bias, running_mean, running_var) and the input axis of the next layer; a residual
stream shares one group across all the blocks that add into it; the classifier head is
permuted on its input axis only. ``points`` names, per group, the modules whose outputs
carry those units (channel axis 1); activation matching hooks them.

A permutation ``perm[g]`` is an index tensor: the permuted tensor's unit ``i`` is the old
unit ``perm[g][i]`` (``index_select`` along each axis of the group).

>>> spec = spec_from_axes({"a.weight": ("P", None), "a.bias": ("P",), "b.weight": (None, "P")})
>>> spec.perm_to_axes["P"]
(('a.weight', 0), ('a.bias', 0), ('b.weight', 1))
>>> state = {"a.weight": torch.eye(2), "a.bias": torch.tensor([1.0, 2.0]),
...          "b.weight": torch.tensor([[3.0, 4.0]])}
>>> apply_permutation(spec, {"P": torch.tensor([1, 0])}, state)["b.weight"].tolist()
[[4.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.errors import ConfigError, ValidationError
from fedmerge.models import CNN, MLP, ResNet20
from fedmerge.statedict import StateDict

Axes = tuple[str | None, ...]
Perms = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """``axes_to_perm[key][axis]`` = group or None; ``perm_to_axes[group]`` = ((key, axis), …);
    ``points[group]`` = module names whose outputs carry the group's units; ``stats`` = keys
    that follow the permutation but are statistics, not weights (ignored by weight matching)."""

    axes_to_perm: Mapping[str, Axes]
    perm_to_axes: Mapping[str, tuple[tuple[str, int], ...]]
    points: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    stats: frozenset[str] = frozenset()


def spec_from_axes(
    axes_to_perm: Mapping[str, Axes],
    points: Mapping[str, Sequence[str]] | None = None,
    stats: Sequence[str] = (),
) -> PermutationSpec:
    """Build a :class:`PermutationSpec`, deriving ``perm_to_axes`` from ``axes_to_perm``."""
    perm_to_axes: dict[str, list[tuple[str, int]]] = {}
    for key, axes in axes_to_perm.items():
        for axis, group in enumerate(axes):
            if group is not None:
                perm_to_axes.setdefault(group, []).append((key, axis))
    points = {g: tuple(names) for g, names in (points or {}).items()}
    unknown = sorted(set(points) - set(perm_to_axes))
    if unknown:
        raise ConfigError(f"permutation spec: activation points for unknown group {unknown[0]!r}")
    return PermutationSpec(
        axes_to_perm=dict(axes_to_perm),
        perm_to_axes={g: tuple(a) for g, a in perm_to_axes.items()},
        points=points,
        stats=frozenset(stats),
    )


def perm_sizes(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Size of every group, checking that all its axes agree (ValidationError names the key)."""
    sizes: dict[str, int] = {}
    for group, axes in spec.perm_to_axes.items():
        for key, axis in axes:
            if key not in state:
                raise ValidationError(f"permutation spec: state has no key {key!r}")
            n = state[key].shape[axis]
            if sizes.setdefault(group, n) != n:
                raise ValidationError(
                    f"permutation spec: {key!r} axis {axis} has {n} units, group {group!r} has "
                    f"{sizes[group]}"
                )
    return sizes


def apply_permutation(spec: PermutationSpec, perms: Perms, state: StateDict) -> StateDict:
    """Permute every key of ``state`` named in ``spec``; other keys are returned unchanged."""
    out = dict(state)
    for key, axes in spec.axes_to_perm.items():
        tensor = state[key]
        for axis, group in enumerate(axes):
            if group is not None:
                tensor = tensor.index_select(axis, perms[group].to(tensor.device))
        out[key] = tensor
    return out


def identity_perms(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Perms:
    """The identity per group, on the device of ``state``'s tensors."""
    device = next(iter(state.values())).device if state else None
    return {g: torch.arange(n, device=device) for g, n in perm_sizes(spec, state).items()}


def random_perms(
    spec: PermutationSpec, state: Mapping[str, torch.Tensor], generator: torch.Generator
) -> Perms:
    """One uniformly random permutation per group (for tests and demonstrations)."""
    return {g: torch.randperm(n, generator=generator) for g, n in perm_sizes(spec, state).items()}


def invert(perms: Perms) -> Perms:
    """The permutations that undo ``perms``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


# --- specs of the reference models -------------------------------------------------------


def _linear(name: str, p_in: str | None, p_out: str | None) -> dict[str, Axes]:
    return {f"{name}.weight": (p_out, p_in), f"{name}.bias": (p_out,)}


def _conv(name: str, p_in: str | None, p_out: str | None) -> dict[str, Axes]:
    return {f"{name}.weight": (p_out, p_in, None, None)}  # (out, in, kh, kw), no bias


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _bn(name: str, p: str) -> dict[str, Axes]:
    return {f"{name}.{k}": (p,) for k in _BN_KEYS}


def _bn_stats(axes: Mapping[str, Axes]) -> list[str]:
    return [k for k in axes if k.endswith((".running_mean", ".running_var"))]


def mlp_spec(model: MLP) -> PermutationSpec:
    """Group ``P{i}``: the units of hidden layer ``fc{i}`` (read after ``act{i}``)."""
    n = len(model.hidden)
    axes: dict[str, Axes] = {}
    for i in range(n):
        axes.update(_linear(f"fc{i}", f"P{i - 1}" if i else None, f"P{i}"))
    axes.update(_linear("head", f"P{n - 1}" if n else None, None))
    return spec_from_axes(axes, points={f"P{i}": [f"act{i}"] for i in range(n)})


def cnn_spec(model: CNN) -> PermutationSpec:
    """Group ``P{i}``: the channels of ``conv{i}``/``bn{i}`` (read after ``relu{i}``)."""
    n = len(model.channels)
    axes: dict[str, Axes] = {}
    for i in range(n):
        axes.update(_conv(f"conv{i}", f"P{i - 1}" if i else None, f"P{i}"))
        axes.update(_bn(f"bn{i}", f"P{i}"))
    axes.update(_linear("head", f"P{n - 1}", None))
    return spec_from_axes(axes, {f"P{i}": [f"relu{i}"] for i in range(n)}, _bn_stats(axes))


def resnet20_spec(model: ResNet20) -> PermutationSpec:
    """Group ``S{s}``: the residual stream of stage ``s`` (stem and every block output of the
    stage share it); ``layer{s}.{b}.inner``: the hidden channels of one block."""
    axes: dict[str, Axes] = {**_conv("conv1", None, "S1"), **_bn("bn1", "S1")}
    points: dict[str, list[str]] = {"S1": ["relu"]}
    p_in = "S1"
    for s in (1, 2, 3):
        stream = f"S{s}"
        for b in range(model.blocks):
            name, inner = f"layer{s}.{b}", f"layer{s}.{b}.inner"
            axes.update(_conv(f"{name}.conv1", p_in, inner))
            axes.update(_bn(f"{name}.bn1", inner))
            axes.update(_conv(f"{name}.conv2", inner, stream))
            axes.update(_bn(f"{name}.bn2", stream))
            if len(getattr(model, f"layer{s}")[b].shortcut):
                axes.update(_conv(f"{name}.shortcut.0", p_in, stream))
                axes.update(_bn(f"{name}.shortcut.1", stream))
            points[inner] = [f"{name}.relu1"]
            points.setdefault(stream, []).append(name)
            p_in = stream
    axes.update(_linear("head", "S3", None))
    return spec_from_axes(axes, points, _bn_stats(axes))


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The spec of a reference model, or ``model.permutation_spec()`` for a user model."""
    own = getattr(model, "permutation_spec", None)
    if callable(own):
        return own()
    for cls, build in ((MLP, mlp_spec), (CNN, cnn_spec), (ResNet20, resnet20_spec)):
        if isinstance(model, cls):
            return build(model)
    raise ConfigError(
        f"no permutation spec for {type(model).__name__}: alignment supports mlp, cnn and "
        "resnet20, or a model with a permutation_spec() method returning a PermutationSpec"
    )
