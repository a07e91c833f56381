"""Lazy package exports: a package names its public API in a table and each name is imported
on first use, so ``import fedmerge`` (and the CLI) loads neither torch nor scipy.

>>> getattr_, dir_ = lazy_exports("pkg", {"dumps": ("json",), "jl": ("json", "loads")})
>>> getattr_("jl")('{"a": 1}'), "dumps" in dir_()
({'a': 1}, True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``exports``: public name -> (module,) or
    (module, attribute) when the attribute's name differs from the public one."""
    module_globals: dict[str, Any] = {}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name not in module_globals:
            module, *attr = exports[name]
            module_globals[name] = getattr(
                importlib.import_module(module), attr[0] if attr else name
            )
        return module_globals[name]

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
