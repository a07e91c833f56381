"""Topology specs: presets, YAML files, dicts and ``--set k=v`` overrides → one plain dict.

A spec names a graph and how to mix over it::

    graph: watts_strogatz        # generator (ours or any networkx one), or "file"
    n: 64
    k: 4                         # any other key is a keyword of the generator
    p: 0.1
    seed: 0                      # random graphs and random schedules
    mixing: metropolis_hastings  # | uniform | max_degree | edge_weights
    stochastic: doubly           # what W must be (default: what the rule guarantees)
    schedule: {kind: random_matching}
    allow_disconnected: false

Presets are ``<name>.yaml`` files found, in order, in the directories of
``$FEDMERGE_TOPOLOGY_PATH`` (``os.pathsep``-separated), ``./topologies``, the
repository's ``topologies/`` next to the ``fedmerge`` package (a source checkout
or ``pip install -e .``) and ``<prefix>/share/fedmerge/topologies`` (where a
wheel install puts them). ``topologies/`` at the repository root is the single
copy in git.
"""

from __future__ import annotations

import copy
import os
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import ConfigError
from fedmerge.topology.graphs import GENERATORS, GRAPH_FILE_SUFFIXES, generator
from fedmerge.yamlio import parse_yaml, read_yaml

SPEC_FIELDS = (
    "name",
    "description",
    "graph",
    "n",
    "seed",
    "mixing",
    "stochastic",
    "schedule",
    "allow_disconnected",
    "params",
)
PRESET_ENV = "FEDMERGE_TOPOLOGY_PATH"
REPO_PRESETS = Path(__file__).resolve().parents[2] / "topologies"
INSTALLED_PRESETS = Path(sysconfig.get_path("data")) / "share" / "fedmerge" / "topologies"


def preset_dirs() -> list[Path]:
    """Directories searched for presets, first match wins."""
    env = [Path(p) for p in os.environ.get(PRESET_ENV, "").split(os.pathsep) if p]
    dirs = [*env, Path.cwd() / "topologies", REPO_PRESETS, INSTALLED_PRESETS]
    seen, out = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def list_presets() -> list[str]:
    """Names of every preset on the search path (``ring-8``, ``torus-4x4`` …), sorted."""
    names = {p.stem for d in preset_dirs() for p in d.iterdir() if p.suffix in (".yaml", ".yml")}
    return sorted(names)


def preset_path(name: str) -> Path | None:
    """The file of preset ``name``, or None."""
    for d in preset_dirs():
        for suffix in (".yaml", ".yml"):
            p = d / f"{name}{suffix}"
            if p.is_file():
                return p
    return None


def load_yaml_spec(path: Path) -> dict[str, Any]:
    """Read a spec file; a relative graph ``path`` inside it is taken relative to the file."""
    data = read_yaml(path, "topology spec")
    if not isinstance(data, dict):
        raise ConfigError(f"topology spec {path} must be a mapping of fields, got {type(data)}")
    if isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        data["path"] = str(path.parent / data["path"])
    data.setdefault("name", path.stem)
    return data


def resolve_spec(
    spec: str | os.PathLike[str] | Mapping[str, Any],
    *,
    n: int | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Any accepted spec form → a dict with every field of :data:`SPEC_FIELDS` filled.

    Generator keywords end up in ``params``. ``n`` and ``overrides`` (a mapping of
    dotted keys, or ``"key=value"`` strings parsed as YAML) win over the spec.
    """
    data = _spec_dict(spec)
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(data, key, value)
    if n is not None:
        data["n"] = n
    return _normalize(data)


def _spec_dict(spec: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return copy.deepcopy(dict(spec))
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"a topology spec is a name, a file or a mapping, got {spec!r}")
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"topology spec file not found: {path}")
        return load_yaml_spec(path)
    if path.suffix.lower() in GRAPH_FILE_SUFFIXES and path.is_file():
        return {"graph": "file", "path": text, "name": path.stem}
    preset = preset_path(text)
    if preset is not None:
        return load_yaml_spec(preset)
    if text in GENERATORS:
        return {"graph": text, "name": text}
    try:
        generator(text)
    except ConfigError:
        presets = ", ".join(list_presets()) or "none found"
        raise ConfigError(
            f"unknown topology {text!r}: not a preset ({presets}), a spec file, a graph file, "
            f"or a graph generator ({', '.join(GENERATORS)}, or a networkx generator name)"
        ) from None
    return {"graph": text, "name": text}


def _parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. n=16)")
        out[key.strip()] = parse_yaml(raw, f"override {item!r}") if raw.strip() else None
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``schedule.p=0.2`` sets data['schedule']['p']; a schedule given by name becomes a dict."""
    head, *rest = key.split(".")
    if not rest:
        data[head] = value
        return
    node = data.get(head)
    if head == "schedule" and isinstance(node, str):
        node = {"kind": node}
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"cannot set {key!r}: field {head!r} is not a mapping")
    data[head] = node
    _set_dotted(node, ".".join(rest), value)


def _normalize(data: dict[str, Any]) -> dict[str, Any]:
    params = data.pop("params", None) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'params' must be a mapping, got {params!r}")
    extra = {k: data.pop(k) for k in list(data) if k not in SPEC_FIELDS}
    out = {
        "name": data.get("name"),
        "description": data.get("description"),
        "graph": data.get("graph"),
        "n": data.get("n"),
        "seed": data.get("seed", 0),
        "mixing": data.get("mixing") or "metropolis_hastings",
        "stochastic": data.get("stochastic"),
        "schedule": data.get("schedule") or "static",
        "allow_disconnected": data.get("allow_disconnected", False),
        "params": {**params, **extra},
    }
    if not isinstance(out["graph"], str) or not out["graph"]:
        raise ConfigError("field 'graph' is required: a generator name such as 'ring', or 'file'")
    n = out["n"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"field 'n' must be a positive integer, got {n!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise ConfigError(f"field 'seed' must be an integer, got {out['seed']!r}")
    if not isinstance(out["allow_disconnected"], bool):
        raise ConfigError(
            f"field 'allow_disconnected' must be true or false, got {out['allow_disconnected']!r}"
        )
    if not isinstance(out["mixing"], str):
        raise ConfigError(f"field 'mixing' must be a rule name, got {out['mixing']!r}")
    return out
