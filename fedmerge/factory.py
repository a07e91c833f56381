"""``"package.module:function"`` references: how a config names the user's own model, data
set or loss.

A config that names code runs it, so such a reference is **trusted code**: it is imported
only when its module is fedmerge's own or is listed (as a module or a package prefix) in
the environment variable ``FEDMERGE_TRUSTED_MODULES`` (comma-separated), which only the
person launching the run can set; a config file cannot opt itself in. ``os:system`` in a
downloaded config is refused before anything is imported.

>>> import_factory("fedmerge.errors:ConfigError", "model.name", ["mlp"]).__name__
'ConfigError'
>>> import_factory("os:system", "model.name", ["mlp"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: model.name: 'os:system' names code in module 'os', which is not...
>>> import_factory("resnet", "model.name", ["mlp"])
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: model.name: unknown 'resnet'; use one of mlp or 'pkg.module:function'
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from fedmerge.errors import ConfigError

TRUST_ENV = "FEDMERGE_TRUSTED_MODULES"
ALWAYS_TRUSTED = ("fedmerge",)
_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def trusted_modules() -> tuple[str, ...]:
    """fedmerge's own package and the prefixes listed in ``FEDMERGE_TRUSTED_MODULES``."""
    listed = (m.strip() for m in os.environ.get(TRUST_ENV, "").split(","))
    return (*ALWAYS_TRUSTED, *(m for m in listed if m))


def is_trusted(module: str) -> bool:
    """True if ``module`` is, or lies inside, a trusted module or package."""
    return any(module == t or module.startswith(f"{t}.") for t in trusted_modules())


def import_factory(name: str, field: str, known: Iterable[str]) -> Callable[..., Any]:
    """Import ``"package.module:function"``; a :class:`ConfigError` naming ``field`` otherwise."""
    if not _REFERENCE.fullmatch(name):
        raise ConfigError(
            f"{field}: unknown {name!r}; use one of {', '.join(known)} or 'pkg.module:function'"
        )
    module_name, _, attr = name.partition(":")
    if not is_trusted(module_name):
        raise ConfigError(
            f"{field}: {name!r} names code in module {module_name!r}, which is not trusted; a "
            f"config may run only code from modules listed in {TRUST_ENV} "
            f"(e.g. {TRUST_ENV}={module_name.split('.')[0]})"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ConfigError(f"{field}: cannot import {module_name!r} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{field}: {module_name!r} has no callable {attr!r}")
    return factory
