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
fedmerge.errors.ConfigError: train.lr: must be > 0 (and ≤ 1e12), got -1
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedmerge.errors import ConfigError
from fedmerge.registry import registry_at
from fedmerge.yamlio import parse_yaml, read_mapping

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
Check = tuple[Callable[[Any], bool], str]
LARGEST = 1e12  # the upper end of every otherwise open range
POSITIVE: Check = (lambda v: 0 < v <= LARGEST, "must be > 0 (and ≤ 1e12)")
NON_NEGATIVE: Check = (lambda v: 0 <= v <= LARGEST, "must be ≥ 0 (and ≤ 1e12)")
PROBABILITY: Check = (lambda v: 0 <= v < 1, "must be in [0, 1)")
MAX_AGENTS = 100_000
MAX_SAMPLES_PER_ROUND = 10**8  # train.steps × train.batch_size: one round's batch plan
RUN_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,1000}")
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d{1,4})?")  # resolved by fedmerge.device


def between(lo: float, hi: float) -> Check:
    """A range check ``lo ≤ v ≤ hi`` (every numeric field has one, so no value can make a
    run allocate or loop without bound; floats must also be finite, see ``_coerce``)."""
    return (lambda v: lo <= v <= hi), f"must be in [{lo:,}, {hi:,}]"


RUN_NAME_CHECK: Check = (lambda v: RUN_NAME.fullmatch(v) is not None,
                         "must be 1 to 1000 characters without control characters")  # fmt: skip
DEVICE_CHECK: Check = (lambda v: DEVICE_NAME.fullmatch(v) is not None,
                       "must be auto, cpu, cuda or cuda:N")  # fmt: skip


def option(
    default: Any,
    doc: str,
    *,
    choices: Iterable[str] | None = None,
    check: Check | None = None,
    registry: str | None = None,
    params: str | None = None,
    open_names: bool = False,
):
    """A config field with its default, one-line meaning, allowed values and range check.

    ``registry`` (``"module:NAME"``, imported when first needed) names the
    :class:`~fedmerge.registry.Registry` whose entries are the allowed values;
    ``params`` names the sibling field holding the chosen entry's parameters (validated
    against its declaration); ``open_names`` also allows a user's ``"pkg.mod:fn"``.
    """
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "check": check,
            "registry": registry, "params": params, "open": open_names}  # fmt: skip
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = option("digits", "dataset: a registered name or pkg.mod:fn returning (x, y) "
                       "(trusted code: FEDMERGE_TRUSTED_MODULES)",
                       registry="fedmerge.data.datasets:DATASETS", params="options",
                       open_names=True)  # fmt: skip
    options: dict = option({}, "parameters of the dataset (e.g. samples, seed)")
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
    name: str = option("mlp", "model: a registered name or pkg.mod:fn returning an nn.Module "
                       "(trusted code: FEDMERGE_TRUSTED_MODULES)",
                       registry="fedmerge.models:MODELS", params="options",
                       open_names=True)  # fmt: skip
    options: dict = option(
        {"hidden": [64]},
        "parameters of the model (hidden, channels, width …); the default is the mlp's: "
        "a config naming another model without options gets {}",
    )
    init: str = option(
        "same",
        "same: one shared init (payloads carry task vectors); different: a seed per agent "
        "(payloads carry full weights)",
        choices=("same", "different"),
    )


@dataclass
class PeftConfig:
    r: int = option(0, "LoRA rank; agents train and share only a LoRA adapter (0: full weights)",
                    check=NON_NEGATIVE)  # fmt: skip
    alpha: float = option(8.0, "LoRA alpha (scaling alpha / r)", check=POSITIVE)
    dropout: float = option(0.0, "LoRA dropout", check=PROBABILITY)
    target_modules: list = option(
        [], "layers that get LoRA (name suffixes; []: the attention query and value projections)"
    )
    modules_to_save: list = option(["classifier"], "layers trained and shared in full")
    lora_merge: str = option(
        "factors", "factors: average A and B separately; product: average B@A, then SVD to r",
        choices=("factors", "product"),
    )  # fmt: skip


@dataclass
class TrainConfig:
    optimizer: str = option("sgd", "local optimizer (fresh every round)", choices=("sgd", "adam"))
    lr: float = option(0.5, "learning rate", check=POSITIVE)
    momentum: float = option(0.0, "SGD momentum", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = option(0.0, "L2 weight decay", check=NON_NEGATIVE)
    epochs: int = option(1, "local epochs per round (0: no training)", check=between(0, 10_000))
    steps: int = option(
        2, "if > 0: this many minibatch steps per round instead of epochs (a config that sets "
        "epochs but not steps gets 0)", check=between(0, 10**7),
    )  # fmt: skip
    batch_size: int = option(32, "minibatch size", check=between(1, 10**6))
    loss: str = option("cross_entropy", "cross_entropy or pkg.mod:fn (a loss or loss class; "
                       "trusted code: FEDMERGE_TRUSTED_MODULES)")  # fmt: skip


@dataclass
class PretrainConfig(TrainConfig):
    """The pre-training phase (:mod:`fedmerge.decentralized.pretrain`): ``train``'s fields,
    no phase by default."""

    optimizer: str = option("sgd", "pre-training optimizer (one for the whole phase)",
                            choices=("sgd", "adam"))  # fmt: skip
    epochs: int = option(
        0, "pre-training epochs before round 1, each agent alone on its own data from its own "
        "init (0: no pre-training)", check=between(0, 10_000),
    )  # fmt: skip
    steps: int = option(0, "if > 0: this many pre-training minibatch steps instead of epochs",
                        check=between(0, 10**7))  # fmt: skip


@dataclass
class ProtocolConfig:
    name: str = option(
        "gossip", "how each agent combines its model with its neighbours' every round",
        registry="fedmerge.decentralized.protocols:PROTOCOLS",
    )  # fmt: skip
    calibration: str = option(
        "local",
        "DIMAT calibration data: the agent's own training data, or shared (the union of all "
        "training data, as the DIMAT reference code)",
        choices=("local", "shared"),
    )
    calibration_batch: int = option(256, "DIMAT calibration batch size", check=between(1, 10**6))
    broadcast: bool = option(
        False,
        "DIMAT: in a round where every node hears every node with equal weights (within "
        "1e-9), align to the lowest-id node, as the DIMAT code merges once and broadcasts",
    )
    aggregation: str = option(
        "mean", "how a node combines itself and its neighbours (gossip, DIMAT): "
        "fedmerge.decentralized.robust",
        registry="fedmerge.decentralized.robust:RULES",
    )  # fmt: skip
    clip_tau: float = option(
        1.0, "clip: radius = clip_tau × lower median of neighbour distances", check=POSITIVE
    )
    clip_bound: float = option(0.0, "clip: a fixed radius instead (0: use clip_tau)",
                               check=NON_NEGATIVE)  # fmt: skip
    clip_screen: float = option(0.0, "clip: ignore neighbours farther than clip_screen × the "
                                "radius (0: clip them all)", check=NON_NEGATIVE)  # fmt: skip
    trim_beta: float = option(0.2, "trimmed_mean: share trimmed from each end",
                              check=(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"))  # fmt: skip
    krum_f: int = option(1, "krum: Byzantine neighbours tolerated (keeps m − f)",
                         check=between(0, MAX_AGENTS))  # fmt: skip
    continual: str = option(
        "opcm", "disseminate: the continual merge every node runs",
        registry="fedmerge.continual.methods:CONTINUAL_METHODS",
    )  # fmt: skip
    forward: str = option(
        "once", "disseminate: forward each expert once (the round after it is first held) or "
        "always", choices=("once", "always"),
    )  # fmt: skip
    codec: str = option(
        "none", "payload codec; any other than none makes gossip CHOCO-Gossip on compressed "
        "differences (disseminate: each expert is encoded once)",
        registry="fedmerge.codecs.registry:CODECS", params="codec_params",
    )  # fmt: skip
    codec_params: dict = option({}, "the codec's parameters (see fedmerge compress --list)")
    consensus_step: float = option(
        1.0, "CHOCO-Gossip step γ when a codec is on (smaller for stronger compression)",
        check=(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )  # fmt: skip
    choco_resync: int = option(
        0, "CHOCO-Gossip key frames: every K rounds each payload is an 8-bit snapshot of x_i "
        "that resets every holder's copy (copies a lost message left behind catch up); "
        "0: never", check=between(0, 10**9),
    )  # fmt: skip


@dataclass
class ByzantineConfig:
    count: int = option(0, "number of Byzantine nodes (they send corrupted payloads)",
                        check=between(0, MAX_AGENTS))  # fmt: skip
    placement: str = option(
        "random", "which nodes: random (seeded), hubs (highest degree first) or list (nodes)",
        choices=("random", "hubs", "list"),
    )  # fmt: skip
    nodes: list = option([], "the Byzantine node ids for placement: list")
    attack: str = option(
        "sign_flip", "sign_flip: −scale·x; noise: x + noise of norm scale·‖x‖; constant: all "
        "entries = scale; ipm: −scale·mean of its honest neighbours' x; alie: their mean − "
        "scale·std per entry; silent: nothing (cut off, the reference for robust rules)",
        choices=("sign_flip", "noise", "constant", "ipm", "alie", "silent"),
    )  # fmt: skip
    scale: float = option(1.0, "strength of the attack (see attack)", check=between(-1e6, 1e6))


@dataclass
class FaultsConfig:
    dropout: float = option(0.0, "per round, probability a node sits the round out",
                            check=PROBABILITY)  # fmt: skip
    message_loss: float = option(0.0, "probability a payload is lost in transit", check=PROBABILITY)
    straggler: float = option(0.0, "per round, probability a node skips training",
                              check=PROBABILITY)  # fmt: skip
    crash: float = option(0.0, "per round, probability a live node crashes", check=PROBABILITY)
    crash_rounds: int = option(2, "rounds a crashed node stays down before rejoining",
                               check=between(1, 10**6))  # fmt: skip
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
                            check=between(0, 2**40))  # fmt: skip


@dataclass
class DistributedConfig:
    backend: str = option(
        "auto", "torchdist backend (auto: nccl with CUDA and LOCAL_RANK, else gloo)",
        choices=("auto", "gloo", "nccl"),
    )  # fmt: skip
    timeout_s: float = option(120.0, "torchdist: seconds to wait for a peer at any step",
                              check=between(1e-3, 7 * 86400))  # fmt: skip
    on_peer_failure: str = option(
        "abort", "torchdist: when a rank stops answering, stop every rank, or go on merging "
        "with the neighbours that answer", choices=("abort", "continue"),
    )  # fmt: skip
    agents_per_rank: int = option(0, "torchdist: agents hosted per rank (0: ceil(agents/ranks))",
                                  check=between(0, MAX_AGENTS))  # fmt: skip


@dataclass
class MetricsConfig:
    aligned_consensus: str = option(
        "auto", "consensus_aligned: ‖θ_i − θ̄‖ after weight-matching every agent to agent 0 "
        "(auto: with model.init: different)", choices=("auto", "always", "never"),
    )  # fmt: skip
    disagreement: bool = option(
        True, "disagreement: share of global-test predictions that differ between agents"
    )
    eval_every: int = option(
        1, "local runtime: evaluate accuracies and disagreement every k rounds and on the last "
        "(other rounds' rows carry None for them)", check=between(1, 10**6),
    )  # fmt: skip


@dataclass
class FlowerConfig:
    connect_timeout_s: float = option(
        0.0, "flower: seconds to wait for every SuperNode to connect (0: 120 + 5 per node)",
        check=between(0, 7 * 86400),
    )  # fmt: skip

    def connect_timeout(self, nodes: int) -> float:
        """The connect timeout for ``nodes`` SuperNodes (the default scales with them)."""
        return self.connect_timeout_s or 120.0 + 5.0 * nodes


@dataclass
class SimConfig:
    name: str = option("default", "run name (shown in tables and plots; its folder under runs/ "
                       "is a slug of it, so any name stays inside runs/)",
                       check=RUN_NAME_CHECK)  # fmt: skip
    seed: int = option(0, "one seed for data split, inits, batch orders, faults, schedules",
                       check=between(0, 2**32 - 1))  # fmt: skip
    rounds: int = option(50, "communication rounds", check=between(1, 10**6))
    agents: int = option(0, "number of agents (0: the topology's node count)",
                         check=between(0, MAX_AGENTS))  # fmt: skip
    topology: str | dict = option(
        "ring-8", "topology spec: preset, generator, YAML file or mapping (fedmerge topology)"
    )
    runtime: str = option(
        "local",
        "where agents run (fedmerge simulate --runtime)",
        registry="fedmerge.runtimes:RUNTIMES",
    )
    vectorize: str = option(
        "auto", "stacked-parameter path for same-architecture gossip/local (CPU only: with a "
        "GPU device the per-agent path)",
        choices=("auto", "always", "never"),
    )  # fmt: skip
    threads: int = option(
        1, "local runtime: torch threads for the run (0: the physical cores this process may "
        "run on), recorded in summary.json", check=between(0, 4096),
    )  # fmt: skip
    device: str = option(
        "cpu", "where agents train, merge and evaluate: cpu (reproducible bit for bit), auto "
        "(cuda when a GPU is there, else cpu), cuda or cuda:N; under torchrun auto and cuda "
        "mean cuda:LOCAL_RANK (payloads travel and are stored from the CPU either way)",
        check=DEVICE_CHECK,
    )  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
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
        data = read_mapping(source, "config")
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use key=value, e.g. train.lr=0.05")
        value = parse_yaml(raw, f"--set {item!r}") if raw.strip() else None
        if key.count(".") > 8:
            raise ConfigError(f"--set {item[:80]!r}: no config field is nested that deep")
        _set_dotted(data, key.strip().split("."), value, key.strip())
    if schema is SimConfig:
        _derived_defaults(data)
    cfg = _build(schema, data, "")
    samples = cfg.train.steps * cfg.train.batch_size if isinstance(cfg, SimConfig) else 0
    if samples > MAX_SAMPLES_PER_ROUND:
        raise ConfigError(f"train.steps × train.batch_size: must be ≤ {MAX_SAMPLES_PER_ROUND:,} "
                          "samples per agent and round (the round's batch plan is held in "
                          f"memory), got {cfg.train.steps} × {cfg.train.batch_size}")  # fmt: skip
    return cfg


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
    out = cls(**values)
    for f in fields.values():
        if f.metadata.get("params") and getattr(out, f.name) in _registered(f.metadata):
            registry = registry_at(f.metadata["registry"])
            try:
                registry.resolve(getattr(out, f.name), getattr(out, f.metadata["params"]))
            except ConfigError as exc:
                raise ConfigError(f"{prefix}{f.metadata['params']}: {exc}") from None
    return out


def _registered(meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The allowed names of a field: its ``choices``, or its registry's names."""
    if meta.get("registry"):
        return tuple(registry_at(meta["registry"]))
    return meta.get("choices") or ()


def _check_value(dotted: str, value: Any, kind: Any, meta: Mapping[str, Any]) -> Any:
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    raw, value = value, _coerce(dotted, value, allowed)
    choices = _registered(meta)
    user_factory = meta.get("open") and ":" in str(value)
    if choices and value not in choices and not user_factory:
        if not meta.get("registry"):
            raise ConfigError(f"{dotted}: must be one of {', '.join(choices)}, got {raw!r}")
        names = ", ".join(choices) + (" or pkg.module:function" if meta.get("open") else "")
        kind = registry_at(meta["registry"]).kind
        raise ConfigError(f"{dotted}: unknown {kind} {raw!r}; use one of {names}")
    check = meta.get("check")
    if check and not check[0](value):
        raise ConfigError(f"{dotted}: {check[1]}, got {raw!r}")
    return value


def _coerce(dotted: str, value: Any, allowed: tuple[type, ...]) -> Any:
    is_bool = isinstance(value, bool)
    for t in allowed:
        number = isinstance(value, (int, float)) and not is_bool
        if t is float and (number or isinstance(value, str) and _FLOAT.fullmatch(value.strip())):
            return _finite(dotted, value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if t is int and isinstance(value, int) and not is_bool:
            return value
        if t in (str, dict, bool, list) and isinstance(value, t):
            return value
    names = " or ".join(
        {"str": "a string", "dict": "a mapping", "int": "an integer", "float": "a number",
         "bool": "true/false", "list": "a list"}[t.__name__] for t in allowed
    )  # fmt: skip
    raise ConfigError(f"{dotted}: must be {names}, got {value!r}")


def _finite(dotted: str, value: Any) -> float:
    """``float(value)``, refused when it overflows or is ±inf/NaN (.inf, 1e999, 10**400)."""
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{dotted}: must be a finite number, got {str(value)[:40]}")
    return out


def field_docs(cls: type = SimConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted field, default, meaning) for every leaf field: the README's config reference."""
    out = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out += field_docs(kind, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc, choices = f.metadata["doc"], _registered(f.metadata)
            if choices:
                doc += f" ({' | '.join(choices)})"
            out.append((prefix + f.name, default, doc))
    return out


def default_config(overrides: Iterable[str] | None = None) -> SimConfig:
    """The run ``fedmerge simulate`` makes without a config (every field at its default: 8 agents
    on a ring, non-IID digits, one shared init, 50 rounds of D-PSGD-style gossip with 2 SGD
    steps each; ``simulations/default.yaml`` spells it out), with ``a.b=c`` overrides."""
    return load_config(None, overrides)
