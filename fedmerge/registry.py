"""The one registry idiom for every pluggable part of fedmerge.

Merge methods, continual methods, protocols, aggregation rules, models, datasets,
runtimes and codecs all register the same way: a **name**, the registered object
(a kernel, a builder, a class), declared :class:`Param` s with defaults, ranges or
choices, and a one-line **doc** (by default the first paragraph of the object's
docstring). A :class:`Registry` parses parameter values (Python values or
``k=v`` strings from the command line), applies defaults and rejects unknown names
and out-of-range values with a :class:`~fedmerge.errors.ConfigError` naming the
kind, the entry and the parameter. Config validation, ``--list`` / ``--fields``
output and the generated reference tables in ``docs/reference/`` read the same
registries.

>>> SHAPES = Registry("shape")
>>> @SHAPES.register("square", Param("side", float, 1.0, "side length", low=0.0, low_open=True))
... def square(side: float) -> float:
...     '''A square; returns its area.'''
...     return side * side
>>> SHAPES.lookup("square").doc
'A square; returns its area.'
>>> SHAPES.build("square", {"side": "3"})
9.0
>>> SHAPES.build("square", {"side": -1})
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: shape 'square': parameter 'side' must be in (0, inf), got -1.0
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedmerge.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One declared parameter: its type, default, allowed range or choices, and meaning.

    ``type`` is ``float``, ``int``, ``bool``, ``str`` or ``tuple`` (a list whose items
    have type ``item`` and each obey the range). Bounds are inclusive unless
    ``low_open``.
    """

    name: str
    type: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    low_open: bool = False
    item: type = int  # element type when type is tuple

    def parse(self, value: Any, owner: str) -> Any:
        """Convert ``value`` (Python value or CLI string) and check it; raise ConfigError.

        ``owner`` names the entry in the message, e.g. ``"merge method 'ties'"``.
        """
        where = f"{owner}: parameter {self.name!r}"
        if self.type is tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ConfigError(f"{where} must be a list of {self.item.__name__}, got {value!r}")
            return tuple(self._scalar(v, self.item, where) for v in value)
        return self._scalar(value, self.type, where)

    def _scalar(self, value: Any, kind: type, where: str) -> Any:
        try:
            out = _convert(value, kind)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {kind.__name__}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{where} must be one of {list(self.choices)}, got {out!r}")
        if kind in (int, float):
            if not math.isfinite(out):
                raise ConfigError(f"{where} must be finite, got {out!r}")
            below = self.low is not None and (out <= self.low if self.low_open else out < self.low)
            if below or (self.high is not None and out > self.high):
                raise ConfigError(f"{where} must be in {self.range_text()}, got {out!r}")
        return out

    def range_text(self) -> str:
        """``[0, 1]``, ``(0, inf)``, ``a|b`` or ``""`` when unconstrained."""
        if self.choices:
            return "|".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        return f"{left}{lo}, {hi}{')' if self.high is None else ']'}"

    def type_text(self) -> str:
        """``float``, ``int``, ``list[int]`` …"""
        return f"list[{self.item.__name__}]" if self.type is tuple else self.type.__name__


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is dict:  # a nested mapping (e.g. a model's offline config), passed as is
        if not isinstance(value, Mapping):
            raise TypeError(value)
        return dict(value)
    return str(value)


@dataclass(frozen=True)
class Entry:
    """A registered object: ``name``, the ``target`` (function or class), its ``params``
    and a one-line ``doc``. ``kind`` ("merge method", "model" …) is set by the registry.

    Kinds that need more (a merge method's reference, flags) subclass it with
    defaulted fields and pass them to :meth:`Registry.register` as keywords.
    """

    name: str
    target: Any
    params: tuple[Param, ...] = ()
    doc: str = ""
    kind: str = "entry"
    options_field: str = ""

    @property
    def owner(self) -> str:
        """How errors name this entry: ``"merge method 'ties'"``, or with the config field
        holding its parameters, ``"model.options: model 'mlp'"``."""
        where = f"{self.options_field}: " if self.options_field else ""
        return f"{where}{self.kind} {self.name!r}"

    def resolve(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given`` (parsed and range-checked), in declared order."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise ConfigError(f"{self.owner} has no parameter {unknown[0]!r} (parameters: {names})")
        return {
            name: (p.parse(given[name], self.owner) if name in given else p.default)
            for name, p in known.items()
        }

    def defaults(self) -> dict[str, Any]:
        """Every parameter at its default."""
        return {p.name: p.default for p in self.params}


E = TypeVar("E", bound=Entry)


class Registry(Mapping[str, E], Generic[E]):
    """Named entries of one kind; a read-only mapping ``name -> entry`` in registration order.

    ``kind`` names the entries in messages; ``field`` (e.g. ``"model.name"``) is the
    config field that selects one, prefixed to the unknown-name error, and
    ``options_field`` (``"model.options"``) the one holding its parameters.
    """

    def __init__(
        self,
        kind: str,
        *,
        field: str = "",
        options_field: str = "",
        entry: type[E] = Entry,  # type: ignore[assignment]
    ) -> None:
        self.kind, self.field, self.options_field = kind, field, options_field
        self.entry_type = entry
        self._entries: dict[str, E] = {}

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def add(self, name: str, target: Any, *params: Param, doc: str = "", **fields: Any) -> E:
        """Register ``target`` as ``name``; ``doc`` defaults to its docstring's first paragraph."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind} {name!r}: a parameter is declared twice: {names}")
        entry = self.entry_type(
            name=name,
            target=target,
            params=tuple(params),
            doc=doc or first_paragraph(getattr(target, "__doc__", None)),
            kind=self.kind,
            options_field=self.options_field,
            **fields,
        )
        self._entries[name] = entry
        return entry

    def register(
        self, name: str, *params: Param, doc: str = "", **fields: Any
    ) -> Callable[[Any], Any]:
        """Decorator form of :meth:`add`; returns the decorated object unchanged."""

        def deco(target: Any) -> Any:
            self.add(name, target, *params, doc=doc, **fields)
            return target

        return deco

    def lookup(self, name: str) -> E:
        """The entry ``name``; a ConfigError listing the known names otherwise."""
        if name not in self._entries:
            where = f"{self.field}: " if self.field else ""
            raise ConfigError(
                f"{where}unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def resolve(self, name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validated parameters of entry ``name``: defaults overlaid with ``given``."""
        return self.lookup(name).resolve(given)

    def build(self, name: str, given: Mapping[str, Any] | None = None, /, *args: Any) -> Any:
        """Call entry ``name``'s target with ``*args`` and its resolved parameters."""
        entry = self.lookup(name)
        return entry.target(*args, **entry.resolve(given))


def registry_at(path: str) -> Mapping[str, Any] | Sequence[str]:
    """The registry named by ``"module:NAME"``, imported on first use.

    Config fields name the registry of their allowed values this way, so the
    foundation layer (config) never imports the layers that register entries.
    """
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring on one line (``""`` for none)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def parse_assignments(items: Sequence[str] | None, flag: str = "--param") -> dict[str, str]:
    """``["density=0.2", "lambda=1"]`` -> ``{"density": "0.2", "lambda": "1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out
