"""Lazy package exports (PEP 562): a package names its public API by module and each name is
imported on first use, so ``import fedmerge`` (and the CLI) loads neither torch nor scipy.

``exports`` maps a module to its exported names separated by spaces; ``alias=attr`` exports
``module.attr`` under another name.

>>> import sys, types
>>> sys.modules["demo"] = types.ModuleType("demo")
>>> names, getattr_, dir_ = lazy_exports("demo", {"json": "dumps jl=loads"})
>>> names, getattr_("jl")('{"a": 1}')
(['dumps', 'jl'], {'a': 1})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for the package ``package``: a name is
    imported from its module on first access and then kept in the package's namespace."""
    where = {
        alias: (module, attr or alias)
        for module, names in exports.items()
        for alias, _, attr in (n.partition("=") for n in names.split())
    }
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = where[name]
        value = getattr(importlib.import_module(module), attr)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return sorted(where), __getattr__, __dir__
