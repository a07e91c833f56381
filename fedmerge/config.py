"""Simulation config: YAML → validated dataclasses; every field has a default.

An unknown key or a bad value raises :class:`ConfigError` naming the dotted field
(``train.lr: must be > 0, got -1``). ``overrides`` are ``"a.b=c"`` strings whose values
are parsed as YAML (``train.lr=0.05``, ``topology=torus-4x4``, ``model.options.hidden=[32]``).

>>> cfg = load_config(None, ["rounds=3", "train.lr=0.05"])
>>> cfg.rounds, cfg.train.lr, cfg.protocol.name
(3, 0.05, 'gossip')
>>> load_config(None, ["train.lr=-1"])
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: train.lr: must be > 0, got -1
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fedmerge.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
Check = tuple[Callable[[Any], bool], str]
POSITIVE: Check = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, "must be ≥ 0")
PROBABILITY: Check = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def option(default: Any, doc: str, *, choices: Iterable[str] | None = None, check=None):
    """A config field with its default, one-line meaning, allowed values and range check."""
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "check": check}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = option("digits", "dataset: digits, synthetic, torchvision, hf or pkg.mod:fn")
    options: dict = option({}, "keyword arguments of the dataset (e.g. samples, seed)")
    partition: str = option(
        "shards", "how data is split over agents", choices=("iid", "dirichlet", "shards")
    )
    alpha: float = option(0.5, "Dirichlet concentration (partition: dirichlet)", check=POSITIVE)
    test_fraction: float = option(0.2, "share held out as the global test set", check=PROBABILITY)
    local_test_fraction: float = option(
        0.2, "share of each agent's data kept as its local test split", check=PROBABILITY
    )


@dataclass
class ModelConfig:
    name: str = option("mlp", "model: mlp, cnn, resnet20 or pkg.mod:fn returning an nn.Module")
    options: dict = option(
        {"hidden": [64]},
        "keyword arguments of the model (hidden, channels, width …); the default is the mlp's: "
        "a config naming another model without options gets {}",
    )
    init: str = option(
        "same",
        "same: one shared init (payloads carry task vectors); different: a seed per agent "
        "(payloads carry full weights)",
        choices=("same", "different"),
    )


@dataclass
class TrainConfig:
    optimizer: str = option("sgd", "local optimizer (fresh every round)", choices=("sgd", "adam"))
    lr: float = option(0.5, "learning rate", check=POSITIVE)
    momentum: float = option(0.0, "SGD momentum", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = option(0.0, "L2 weight decay", check=NON_NEGATIVE)
    epochs: int = option(1, "local epochs per round (0: no training)", check=NON_NEGATIVE)
    steps: int = option(
        2, "if > 0: this many minibatch steps per round instead of epochs (a config that sets "
        "epochs but not steps gets 0)", check=NON_NEGATIVE,
    )  # fmt: skip
    batch_size: int = option(32, "minibatch size", check=POSITIVE)
    loss: str = option("cross_entropy", "cross_entropy or pkg.mod:fn (a loss or loss class)")


@dataclass
class PretrainConfig(TrainConfig):
    """The pre-training phase (:mod:`fedmerge.pretrain`): ``train``'s fields, no phase by
    default."""

    epochs: int = option(
        0, "pre-training epochs before round 1, each agent alone on its own data from its own "
        "init (0: no pre-training)", check=NON_NEGATIVE,
    )  # fmt: skip
    steps: int = option(0, "if > 0: this many pre-training minibatch steps instead of epochs",
                        check=NON_NEGATIVE)  # fmt: skip


@dataclass
class ProtocolConfig:
    name: str = option(
        "gossip", "gossip, local, centralized, single_global_merge, dimat or dimat_wm"
    )
    calibration: str = option(
        "local",
        "DIMAT calibration data: the agent's own training data, or shared (the union of all "
        "training data, as the DIMAT reference code)",
        choices=("local", "shared"),
    )
    calibration_batch: int = option(256, "DIMAT calibration batch size", check=POSITIVE)
    broadcast: bool = option(
        False,
        "DIMAT: in a round where every node hears every node with equal weights (within "
        "1e-9), align to the lowest-id node, as the DIMAT code merges once and broadcasts",
    )
    aggregation: str = option(
        "mean", "how a node combines itself and its neighbours (gossip, DIMAT): "
        "fedmerge.decentralized.robust",
        choices=("mean", "clip", "median", "trimmed_mean", "krum"),
    )  # fmt: skip
    clip_tau: float = option(
        1.0, "clip: radius = clip_tau × lower median of neighbour distances", check=POSITIVE
    )
    clip_bound: float = option(0.0, "clip: a fixed radius instead (0: use clip_tau)",
                               check=NON_NEGATIVE)  # fmt: skip
    trim_beta: float = option(0.2, "trimmed_mean: share trimmed from each end",
                              check=(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"))  # fmt: skip
    krum_f: int = option(1, "krum: Byzantine neighbours tolerated (keeps m − f)",
                         check=NON_NEGATIVE)  # fmt: skip


@dataclass
class ByzantineConfig:
    count: int = option(0, "number of Byzantine nodes (they send corrupted payloads)",
                        check=NON_NEGATIVE)  # fmt: skip
    placement: str = option(
        "random", "which nodes: random (seeded), hubs (highest degree first) or list (nodes)",
        choices=("random", "hubs", "list"),
    )  # fmt: skip
    nodes: list = option([], "the Byzantine node ids for placement: list")
    attack: str = option(
        "sign_flip", "sign_flip: −scale·x; noise: x + noise of norm scale·‖x‖; constant: all "
        "entries = scale", choices=("sign_flip", "noise", "constant"),
    )  # fmt: skip
    scale: float = option(1.0, "strength of the attack (see attack)")


@dataclass
class FaultsConfig:
    dropout: float = option(0.0, "per round, probability a node sits the round out",
                            check=PROBABILITY)  # fmt: skip
    message_loss: float = option(0.0, "probability a payload is lost in transit", check=PROBABILITY)
    straggler: float = option(0.0, "per round, probability a node skips training",
                              check=PROBABILITY)  # fmt: skip
    crash: float = option(0.0, "per round, probability a live node crashes", check=PROBABILITY)
    crash_rounds: int = option(2, "rounds a crashed node stays down before rejoining",
                               check=POSITIVE)  # fmt: skip
    rejoin: str = option(
        "memory", "state a crashed node rejoins with: memory (kept), persisted (its last file "
        "in state_dir) or initial (its initial model)", choices=("memory", "persisted", "initial"),
    )  # fmt: skip
    state_dir: str = option("", "if set, every active node saves its state here each round "
                                "(atomic safetensors, agent-NNNN.safetensors)")  # fmt: skip
    duplicate: float = option(0.0, "probability a delivered payload arrives twice",
                              check=PROBABILITY)  # fmt: skip
    reorder: float = option(0.0, "probability a payload is delayed one round (arrives after "
                                 "the next round's payloads)", check=PROBABILITY)  # fmt: skip
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)


@dataclass
class ValidationConfig:
    max_norm_ratio: float = option(
        10.0, "reject a payload whose norm exceeds this × the receiver's model norm",
        check=POSITIVE,
    )  # fmt: skip
    max_bytes: int = option(0, "reject payloads larger than this (0: 2 × the receiver's own)",
                            check=NON_NEGATIVE)  # fmt: skip


@dataclass
class DistributedConfig:
    backend: str = option(
        "auto", "torchdist backend (auto: nccl with CUDA and LOCAL_RANK, else gloo)",
        choices=("auto", "gloo", "nccl"),
    )  # fmt: skip
    timeout_s: float = option(120.0, "torchdist: seconds to wait for a peer at any step",
                              check=POSITIVE)  # fmt: skip
    on_peer_failure: str = option(
        "abort", "torchdist: when a rank stops answering, stop every rank, or go on merging "
        "with the neighbours that answer", choices=("abort", "continue"),
    )  # fmt: skip
    agents_per_rank: int = option(0, "torchdist: agents hosted per rank (0: ceil(agents/ranks))",
                                  check=NON_NEGATIVE)  # fmt: skip


@dataclass
class MetricsConfig:
    aligned_consensus: str = option(
        "auto", "consensus_aligned: ‖θ_i − θ̄‖ after weight-matching every agent to agent 0 "
        "(auto: with model.init: different)", choices=("auto", "always", "never"),
    )  # fmt: skip
    disagreement: bool = option(
        True, "disagreement: share of global-test predictions that differ between agents"
    )


@dataclass
class FlowerConfig:
    connect_timeout_s: float = option(
        0.0, "flower: seconds to wait for every SuperNode to connect (0: 30 + 2 per node)",
        check=NON_NEGATIVE,
    )  # fmt: skip

    def connect_timeout(self, nodes: int) -> float:
        """The connect timeout for ``nodes`` SuperNodes (the default scales with them)."""
        return self.connect_timeout_s or 30.0 + 2.0 * nodes


@dataclass
class SimConfig:
    name: str = option("default", "run name (shown in tables and plots)")
    seed: int = option(0, "one seed for data split, inits, batch orders, faults, schedules")
    rounds: int = option(50, "communication rounds", check=POSITIVE)
    agents: int = option(0, "number of agents (0: the topology's node count)", check=NON_NEGATIVE)
    topology: Union[str, dict] = option(  # noqa: UP007 - get_type_hints needs it on 3.10
        "ring-8", "topology spec: preset, generator, YAML file or mapping (fedmerge topology)"
    )
    runtime: str = option(
        "local",
        "where agents run (fedmerge simulate --runtime)",
        choices=("local", "flower", "torchdist"),
    )
    vectorize: str = option(
        "auto", "stacked-parameter path for same-architecture gossip/local",
        choices=("auto", "always", "never"),
    )  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    overrides: Iterable[str] | None = None,
    schema: type = SimConfig,
) -> Any:
    """Read a YAML file or mapping (None: all defaults), apply ``a.b=c`` overrides, validate
    into ``schema`` (a dataclass whose fields are made with :func:`option`; default SimConfig)."""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:  # bad UTF-8, depth
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping of fields")
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use key=value, e.g. train.lr=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # too deep, too many digits
            raise ConfigError(f"--set {item!r}: cannot parse the value: {exc}") from exc
        _set_dotted(data, key.strip().split("."), value, key.strip())
    if schema is SimConfig:
        _derived_defaults(data)
    return _build(schema, data, "")


def _derived_defaults(data: dict[str, Any]) -> None:
    """The two defaults that depend on what a config says: a config that counts epochs and
    not steps trains by epochs (``train.steps`` 0), and one naming a model other than the
    mlp without options gets none (the default options are the mlp's)."""
    train, model = data.get("train"), data.get("model")
    if isinstance(train, dict) and "epochs" in train and "steps" not in train:
        train["steps"] = 0
    if isinstance(model, dict) and model.get("name", "mlp") != "mlp" and "options" not in model:
        model["options"] = {}


def dump_config(cfg: SimConfig) -> str:
    """The resolved config as YAML (every field, loadable by :func:`load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _set_dotted(data: dict, parts: list[str], value: Any, full: str) -> None:
    head, *rest = parts
    if not rest:
        data[head] = value
        return
    node = data.setdefault(head, {})
    if not isinstance(node, dict):
        raise ConfigError(f"--set {full}: {head!r} is not a mapping")
    _set_dotted(node, rest, value, full)


def _build(cls: type, data: Any, prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown field (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kind, dotted = hints[name], prefix + name
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, data[name], dotted + ".")
        else:
            values[name] = _check_value(dotted, data[name], kind, f.metadata)
    return cls(**values)


def _check_value(dotted: str, value: Any, kind: Any, meta: Mapping[str, Any]) -> Any:
    allowed = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or (typing.get_origin(kind) is Union)
        else (kind,)
    )
    raw, value = value, _coerce(dotted, value, allowed)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{dotted}: must be one of {', '.join(choices)}, got {raw!r}")
    check = meta.get("check")
    if check and not check[0](value):
        raise ConfigError(f"{dotted}: {check[1]}, got {raw!r}")
    return value


def _coerce(dotted: str, value: Any, allowed: tuple[type, ...]) -> Any:
    is_bool = isinstance(value, bool)
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not is_bool:
            return float(value)
        if t is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if t is int and isinstance(value, int) and not is_bool:
            return value
        if t in (str, dict, bool, list) and isinstance(value, t):
            return value
    names = " or ".join(
        {"str": "a string", "dict": "a mapping", "int": "an integer", "float": "a number",
         "bool": "true/false", "list": "a list"}[t.__name__] for t in allowed
    )  # fmt: skip
    raise ConfigError(f"{dotted}: must be {names}, got {value!r}")


def field_docs(cls: type = SimConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted field, default, meaning) for every leaf field: the README's config reference."""
    out = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out += field_docs(kind, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata["doc"]
            if f.metadata.get("choices"):
                doc += f" ({' | '.join(f.metadata['choices'])})"
            out.append((prefix + f.name, default, doc))
    return out


def default_config(overrides: Iterable[str] | None = None) -> SimConfig:
    """The run ``fedmerge simulate`` makes without a config (every field at its default: 8 agents
    on a ring, non-IID digits, one shared init, 50 rounds of D-PSGD-style gossip with 2 SGD
    steps each; ``simulations/default.yaml`` spells it out), with ``a.b=c`` overrides."""
    return load_config(None, overrides)
