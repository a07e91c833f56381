"""Registry of one-shot merge methods and their declared, validated parameters.

A method is a pure per-tensor kernel plus a list of :class:`~fedmerge.registry.Param` s,
registered in :data:`METHODS` (a :class:`~fedmerge.registry.Registry`). The registry
parses values (from Python or from ``--param k=v`` strings), applies defaults, and
rejects unknown names and out-of-range values with a :class:`~fedmerge.errors.ConfigError`
that names the method and the parameter.

>>> from fedmerge.merging import get_method
>>> get_method("ties").resolve({"density": "0.3"})["density"]
0.3
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmerge.registry import Entry, Param, Registry

__all__ = ["METHODS", "Method", "Param", "get_method", "register"]


@dataclass(frozen=True)
class Method(Entry):
    """A registered merge method; its ``target`` is the kernel.

    ``kernel(base, tau, w, ctx, params)`` maps the reference tensor ``base``
    (shape ``(n,)``, float32/64), the stacked task vectors ``tau`` (``(K, n)``)
    and the per-expert weights ``w`` (``(K,)``) to the merged tensor ``(n,)``.
    ``ctx`` carries per-key extras (DARE stream keys, Fisher diagonals, global
    thresholds); ``params`` is the resolved parameter dict. ``fused``: the same
    method as one loop per element over CPU blocks, bit-identical (see
    :mod:`fedmerge.merging.fused`), which the engine prefers where it applies.
    """

    reference: str = ""
    needs_fisher: bool = False
    nonnegative_weights: bool = False
    prepass: Callable[[Mapping[str, Any], int], Any] | None = None  # (params, K) -> pass | None
    tensor_pass: Callable[..., Any] | None = None  # (params, ctx, K, dtype): see tensorpass.py
    fused: Callable[..., Any] | None = None  # (FusedCall) -> None | block index | NotImplemented

    @property
    def kernel(self) -> Callable[..., Any]:
        return self.target


METHODS: Registry[Method] = Registry("merge method", entry=Method)
"""Every one-shot merge method by name (filled by :mod:`fedmerge.merging.methods`)."""

register = METHODS.register
"""Decorator: ``@register(name, *params, reference=..., needs_fisher=...)`` on a kernel;
the kernel's docstring (first paragraph) becomes the method's documentation."""


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError listing the known ones otherwise."""
    return METHODS.lookup(name)
