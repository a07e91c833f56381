"""Configuration of the continual-merging experiment: YAML -> validated, frozen dataclass.

Every field has a default; an unknown key or a value of the wrong type is a
:class:`~fedmerge.errors.ConfigError` naming the field. ``--set a.b=c`` overrides
(the value is parsed as YAML, so ``--set orders=3`` is an int).

>>> cfg = config_from_mapping({"orders": 3, "finetune": {"lr": 0.01}})
>>> cfg.orders, cfg.finetune.lr, cfg.finetune.steps
(3, 0.01, 200)
>>> apply_overrides({"model": {"hidden": [8]}}, ["model.features=4"])
{'model': {'hidden': [8], 'features': 4}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmerge.continual import CONTINUAL_METHODS
from fedmerge.data.tasks import DEFAULT_TASKS
from fedmerge.errors import ConfigError
from fedmerge.experiments.multihead import TrainSpec

DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    "opcm": {"alpha": 0.5},
    "continual_task_arithmetic": {"scaling_factor": 0.3},
    "running_average": {},
    "continual_ties": {"scaling_factor": 0.5, "threshold": 20.0, "merge_func": "sum"},
    "magmax": {"scaling_factor": 0.5},
}


@dataclass(frozen=True)
class DataConfig:
    test_fraction: float = 0.3  # of the task pool, per task
    pretrain_fraction: float = 0.3  # of all digits, held out for pretraining


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (128, 128)
    features: int = 64
    layernorm: bool = True


@dataclass(frozen=True)
class FinetuneConfig(TrainSpec):
    lr: float = 3e-4
    train_head: bool = False  # False: the task's probe head stays frozen (the paper's setting)


@dataclass(frozen=True)
class ExperimentConfig:
    seed: int = 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    orders: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainSpec = field(default_factory=lambda: TrainSpec(steps=300, lr=3e-3))
    probe: TrainSpec = field(default_factory=lambda: TrainSpec(steps=300, lr=1e-2))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_METHODS))
    out: str = "runs/continual_digits"


def config_from_mapping(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a nested mapping (e.g. parsed YAML) into an :class:`ExperimentConfig`."""
    cfg = _build(ExperimentConfig, raw, prefix="")
    if cfg.orders < 1:
        raise ConfigError(f"orders: must be >= 1, got {cfg.orders}")
    if len(cfg.tasks) < 2:
        raise ConfigError(f"tasks: need at least 2 tasks, got {list(cfg.tasks)}")
    if not cfg.methods:
        raise ConfigError("methods: name at least one continual merge method")
    unknown = sorted(set(cfg.methods) - set(CONTINUAL_METHODS))
    if unknown:
        raise ConfigError(f"methods.{unknown[0]}: unknown method; known: {list(CONTINUAL_METHODS)}")
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read YAML ``path`` (or start from the defaults when None), apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_mapping(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. orders=3")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; known: {sorted(fields)}")
    hints = {name: f.type for name, f in fields.items()}
    values = {}
    for name, value in raw.items():
        nested = _NESTED.get(hints[name])
        values[name] = (
            _build(nested, value, f"{prefix}{name}.")
            if nested
            else _coerce(hints[name], value, f"{prefix}{name}")
        )
    return cls(**values)


_NESTED = {
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "TrainSpec": TrainSpec,
    "FinetuneConfig": FinetuneConfig,
}


def _coerce(hint: str, value: Any, name: str) -> Any:
    """Check ``value`` against the field's annotation (annotations are strings here)."""
    if hint == "float" and not isinstance(value, bool):
        try:  # PyYAML reads "1e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    simple = {"int": int, "bool": bool, "str": str}
    if (
        hint in simple
        and isinstance(value, simple[hint])
        and (hint == "bool") == isinstance(value, bool)
    ):
        return value
    if hint.startswith("tuple[") and isinstance(value, list):
        item = {"tuple[int, ...]": int, "tuple[str, ...]": str}[hint]
        if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return tuple(value)
    if (
        hint.startswith("dict[")
        and isinstance(value, Mapping)
        and all(isinstance(v, Mapping) or v is None for v in value.values())
    ):
        return {str(k): dict(v or {}) for k, v in value.items()}
    raise ConfigError(f"{name}: expected {hint}, got {value!r}")
