"""``"package.module:function"`` references: how a config names the user's own model, data
set or loss.

>>> import_factory("math:sqrt", "model.name", ["mlp"])(4.0)
2.0
>>> import_factory("resnet", "model.name", ["mlp"])
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: model.name: unknown 'resnet'; use one of mlp or 'pkg.module:function'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from fedmerge.errors import ConfigError


def import_factory(name: str, field: str, known: Iterable[str]) -> Callable[..., Any]:
    """Import ``"package.module:function"``; a :class:`ConfigError` naming ``field`` otherwise."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{field}: unknown {name!r}; use one of {', '.join(known)} or 'pkg.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{field}: {module_name!r} has no callable {attr!r}")
    return factory
