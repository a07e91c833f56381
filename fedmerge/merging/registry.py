"""Registry of one-shot merge methods and their declared, validated parameters.

A method is a pure per-tensor kernel plus a list of :class:`Param` s. The
registry parses values (from Python or from ``--param k=v`` strings), applies
defaults, and rejects unknown names and out-of-range values with a
:class:`~fedmerge.errors.ConfigError` that names the method and the parameter.

>>> from fedmerge.merging import get_method
>>> get_method("ties").resolve({"density": "0.3"})["density"]
0.3
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmerge.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: its type, default, allowed range or choices, and what it means."""

    name: str
    type: type  # float | int | bool | str
    default: Any
    doc: str
    low: float | None = None  # bounds for numbers, inclusive unless low_open
    high: float | None = None
    choices: tuple[str, ...] = ()
    low_open: bool = False

    def parse(self, value: Any, method: str) -> Any:
        """Convert ``value`` (Python value or CLI string) and check it; raise ConfigError."""
        where = f"method {method!r}: parameter {self.name!r}"
        try:
            out = self._convert(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {self.type.__name__}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{where} must be one of {list(self.choices)}, got {out!r}")
        if self.type in (int, float):
            if not math.isfinite(out):
                raise ConfigError(f"{where} must be finite, got {out!r}")
            below = self.low is not None and (out <= self.low if self.low_open else out < self.low)
            if below or (self.high is not None and out > self.high):
                raise ConfigError(f"{where} must be in {self.range_text()}, got {out!r}")
        return out

    def _convert(self, value: Any) -> Any:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if self.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if self.type is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)

    def range_text(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        return f"{left}{lo}, {hi}{')' if self.high is None else ']'}"


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    ``kernel(base, tau, w, ctx, params)`` maps the reference tensor ``base``
    (shape ``(n,)``, float32/64), the stacked task vectors ``tau`` (``(K, n)``)
    and the per-expert weights ``w`` (``(K,)``) to the merged tensor ``(n,)``.
    ``ctx`` carries per-key extras (seeded generators, Fisher diagonals, global
    thresholds); ``params`` is the resolved parameter dict.
    """

    name: str
    kernel: Callable[..., Any]
    params: tuple[Param, ...]
    doc: str
    reference: str = ""
    needs_fisher: bool = False
    nonnegative_weights: bool = False
    prepass: Callable[[Mapping[str, Any], int], Any] | None = None  # (params, K) -> pass | None
    tensor_pass: Callable[..., Any] | None = None  # (params, ctx, K, dtype): see tensorpass.py

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given`` (parsed and range-checked)."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ConfigError(
                f"method {self.name!r} has no parameter {unknown[0]!r} (parameters: {names})"
            )
        return {
            name: (p.parse(given[name], self.name) if name in given else p.default)
            for name, p in known.items()
        }


METHODS: dict[str, Method] = {}


def register(
    name: str, *params: Param, reference: str = "", **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``kernel`` as method ``name`` with parameters ``params``.

    The kernel's docstring (first paragraph) becomes the method's documentation.
    """

    def deco(kernel: Callable[..., Any]) -> Callable[..., Any]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        doc = (kernel.__doc__ or "").strip().split("\n\n")[0]
        METHODS[name] = Method(name, kernel, params, " ".join(doc.split()), reference, **options)
        return kernel

    return deco


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError listing the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["density=0.2", "lambda=1"]`` -> ``{"density": "0.2", "lambda": "1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
