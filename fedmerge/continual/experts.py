"""Experts for continual merging: a shared MLP body, one head and one expert per task.

This is the small offline analog of the OPCM paper's setting (a pretrained CLIP
vision encoder, one fine-tuned encoder per task, each task with its own
classification head; only the encoders are merged):

1. **Pretrain** the body on the pretraining pool (upright digits, disjoint from
   the tasks' data; optionally with randomly distorted copies, ``data.augment``)
   through a linear head — the analog of CLIP's pretraining.
2. **Heads** (``heads``): ``probe``, a linear probe per task fitted on the frozen
   pretrained body's features; or ``shared``, the pretraining head itself, frozen,
   for every task (like CLIP's one text-derived head: only the body can adapt, so a
   merge that stays near θ₀ cannot win on the heads alone). The pretrained body with
   these heads is the *lower* reference.
3. **Expert per task**: the body fine-tuned on the task from the pretrained
   weights, with the task's head frozen (as in task arithmetic / FusionBench's
   CLIP experts) or, with ``train_head=True``, fine-tuned together.

Everything is seeded and runs on CPU in well under a second per expert.
:func:`multitask_state` is the multi-task reference (one body trained on all tasks)
and :func:`task_vector_cosines` the pairwise cosines of the experts' task vectors.
:func:`prepare` builds the whole set from an :class:`ExpertsConfig` (the recipes in
``simulations/continual`` and ``simulations/dissemination`` share it) and
:func:`evaluate` scores body weights with every task's head.

>>> body = make_body(hidden=(16,), features=8)
>>> body(torch.zeros(5, 64)).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmerge.config import NON_NEGATIVE, POSITIVE, PeftConfig, option
from fedmerge.continual.linear import linear_keys_from_module
from fedmerge.data.tasks import DEFAULT_TASKS, TASK_NAMES, TaskFamily, make_task_family
from fedmerge.errors import ConfigError
from fedmerge.hf.lora import apply_lora
from fedmerge.statedict import StateDict

Tick = Callable[..., None]  # progress callback: tick(label) advances by one unit of work


@dataclass
class TrainSpec:
    """Adam on minibatches: ``steps`` updates of ``batch_size`` samples at learning rate ``lr``."""

    steps: int = option(200, "Adam updates", check=NON_NEGATIVE)
    lr: float = option(1e-3, "learning rate", check=POSITIVE)
    batch_size: int = option(64, "minibatch size", check=POSITIVE)
    weight_decay: float = option(0.0, "L2 weight decay", check=NON_NEGATIVE)


@dataclass
class PretrainSpec(TrainSpec):
    """Pretraining of the body through a throw-away head (the analog of CLIP's pretraining)."""

    steps: int = option(300, "Adam updates", check=NON_NEGATIVE)
    lr: float = option(3e-3, "learning rate", check=POSITIVE)


@dataclass
class ProbeSpec(TrainSpec):
    """The task heads: linear probes on the frozen pretrained body."""

    steps: int = option(300, "Adam updates", check=NON_NEGATIVE)
    lr: float = option(1e-2, "learning rate", check=POSITIVE)


@dataclass
class LoraSpec(PeftConfig):
    """The experts as ``peft`` LoRA adapters of the body (``lora_merge`` is unused here)."""

    r: int = option(0, "LoRA rank: each expert trains only a LoRA adapter of the body, merged "
                    "back into dense weights (0: full fine-tune)", check=NON_NEGATIVE)  # fmt: skip
    modules_to_save: list = option([], "layers trained in full next to the adapter")


@dataclass
class FinetuneSpec(TrainSpec):
    """The experts: the body fine-tuned per task from the pretrained weights."""

    lr: float = option(3e-4, "learning rate", check=POSITIVE)
    train_head: bool = option(False, "also fine-tune the task's head (false: the paper's setting)")
    lora: LoraSpec = field(default_factory=LoraSpec)


@dataclass
class TaskDataConfig:
    test_fraction: float = option(0.3, "of the task pool, per task (stratified)",
                                  check=(lambda v: 0 < v < 1, "must be in (0, 1)"))  # fmt: skip
    pretrain_fraction: float = option(0.3, "of all 1797 digits, held out to pretrain the body",
                                      check=(lambda v: 0 < v < 1, "must be in (0, 1)"))  # fmt: skip
    augment: int = option(0, "randomly distorted copies of the pretraining pool added to it "
                          "(data.tasks.augment)", check=NON_NEGATIVE)  # fmt: skip


@dataclass
class BodyConfig:
    hidden: list = option([128, 128], "hidden widths of the body (Linear + ReLU each)",
                          check=(lambda v: all(type(h) is int and h > 0 for h in v),
                                 "must be a list of positive integers"))  # fmt: skip
    features: int = option(64, "output width of the body (the heads' input)", check=POSITIVE)
    layernorm: bool = option(True, "a LayerNorm after the last Linear (a non-Linear parameter)")
    arch: str = option(
        "mlp",
        "mlp: the MLP above; vit: a transformers ViT on the 8×8 image "
        "(ViTBody; hidden, features and layernorm unused)",
        choices=("mlp", "vit"),
    )
    vit: dict = option({"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
                        "intermediate_size": 192, "patch_size": 4},
                       "transformers ViTConfig fields (arch: vit)")  # fmt: skip


@dataclass
class ExpertsConfig:
    """How the experts are built: tasks, body, and the three training phases."""

    seed: int = option(0, "one seed for the task split, the body and every expert")
    tasks: list = option(list(DEFAULT_TASKS), f"digits tasks, at least 2 ({', '.join(TASK_NAMES)})",
                         check=(lambda v: len(v) >= 2 and all(isinstance(t, str) for t in v),
                                "need at least 2 task names"))  # fmt: skip
    heads: str = option(
        "probe", "probe: one linear probe per task on the frozen pretrained body; shared: the "
        "pretraining head, frozen, for every task (CLIP-like: one head, the body must adapt)",
        choices=("probe", "shared"),
    )  # fmt: skip
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    model: BodyConfig = field(default_factory=BodyConfig)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)


@dataclass
class Setup:
    """The pretrained body, every task's head and expert body (task order = ``family.tasks``)."""

    family: TaskFamily
    body: nn.Module  # evaluation scaffold; its weights are overwritten per evaluation
    base: StateDict
    experts: list[StateDict]
    heads: list[nn.Module]
    projectable: set[str]  # the body's nn.Linear weights (OPCM projects these)


def prepare(cfg: ExpertsConfig, tick: Tick = lambda *_: None) -> Setup:
    """Build the tasks, pretrain the body, fit each task's head and fine-tune its expert."""
    family = make_task_family(
        cfg.tasks, cfg.seed, cfg.data.test_fraction, cfg.data.pretrain_fraction
    )
    torch.manual_seed(cfg.seed)
    body = (
        ViTBody(cfg.model.vit)
        if cfg.model.arch == "vit"
        else make_body(64, cfg.model.hidden, cfg.model.features, cfg.model.layernorm)
    )
    X, y = family.pretraining_data(cfg.data.augment, cfg.seed)
    shared = pretrain_body(body, X, y, cfg.pretrain, cfg.seed).requires_grad_(False)
    tick("pretrained body")
    experts, heads = [], []
    for task in family.tasks:
        seed = cfg.seed * 1000 + TASK_NAMES.index(task.name) + 1  # same expert in any task list
        head = shared if cfg.heads == "shared" else fit_probe(
            body, task.X_train, task.y_train, cfg.probe, seed
        )  # fmt: skip
        expert, head = finetune_expert(
            body, head, task.X_train, task.y_train, cfg.finetune, seed, cfg.finetune.train_head
        )
        experts.append(expert)
        heads.append(head)
        tick(f"expert {task.name}")
    return Setup(family, body, clone_state(body), experts, heads, linear_keys_from_module(body))


def evaluate(setup: Setup, state: StateDict) -> np.ndarray:
    """``(T,)`` test accuracy of body weights ``state`` with each task's own head."""
    setup.body.load_state_dict(state)
    return np.array(
        [
            accuracy(setup.body, head, task.X_test, task.y_test)
            for task, head in zip(setup.family.tasks, setup.heads, strict=True)
        ]
    )


def multitask_state(setup: Setup, spec: TrainSpec, seed: int) -> StateDict:
    """The multi-task reference: the pretrained body fine-tuned on every task's training
    data at once (``spec.steps`` × T Adam steps, each sample through its own task's frozen
    head), the upper line a merge of the experts aims at."""
    X, y, task = setup.family.multitask_data()
    body = copy.deepcopy(setup.body)
    body.load_state_dict(setup.base)
    heads = nn.ModuleList(setup.heads).requires_grad_(False)

    def routed(features: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([h(features) for h in heads])  # (T, B, classes)
        return logits[which, torch.arange(len(which))]

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(body.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    body.train()
    for _ in range(spec.steps * len(heads)):
        idx = torch.randint(len(y), (min(spec.batch_size, len(y)),), generator=gen)
        loss = nn.functional.cross_entropy(routed(body(X[idx]), task[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clone_state(body)


def task_vector_cosines(setup: Setup) -> np.ndarray:
    """(T, T) cosine similarity of the experts' task vectors τ_t = θ_t − θ_0 (whole body)."""
    taus = torch.stack([
        torch.cat([(e[k] - setup.base[k]).double().flatten() for k in setup.base])
        for e in setup.experts
    ])  # fmt: skip
    unit = taus / taus.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).numpy()


def make_body(
    in_features: int = 64,
    hidden: Sequence[int] = (128, 128),
    features: int = 64,
    layernorm: bool = True,
) -> nn.Sequential:
    """MLP ``(N, in_features) -> (N, features)``: Linear+ReLU per hidden width, a last Linear,
    then an optional LayerNorm (so the body has Linear weights, biases and a non-Linear layer)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, features))
    if layernorm:
        layers.append(nn.LayerNorm(features))
    return nn.Sequential(*layers)


class ViTBody(nn.Module):
    """``(N, 64)`` flattened 8×8 digits → ``(N, hidden_size)``: the final [CLS] token of a
    ``transformers`` ViT (no pooler) built offline from ``ViTConfig(**fields)``."""

    def __init__(self, fields: dict) -> None:
        import transformers as tf

        super().__init__()
        try:
            config = tf.ViTConfig(image_size=8, num_channels=1, **fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.vit: {exc}") from None
        self.vit = tf.ViTModel(config, add_pooling_layer=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x.reshape(-1, 1, 8, 8)).last_hidden_state[:, 0]


def train_classifier(
    body: nn.Module,
    head: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    params: Iterable[nn.Parameter],
    seed: int,
) -> None:
    """Minimise cross-entropy of ``head(body(X))`` over ``params`` only (in place).

    ``X``: ``(N, in_features)`` float32, ``y``: ``(N,)`` int64. Minibatches are drawn
    with a generator seeded by ``seed``, so a run is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(list(params), lr=spec.lr, weight_decay=spec.weight_decay)
    body.train()
    head.train()
    for _ in range(spec.steps):
        idx = torch.randint(len(y), (min(spec.batch_size, len(y)),), generator=gen)
        loss = nn.functional.cross_entropy(head(body(X[idx])), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def pretrain_body(
    body: nn.Module, X: torch.Tensor, y: torch.Tensor, spec: TrainSpec, seed: int
) -> nn.Linear:
    """Train ``body`` (in place) through a new linear head on ``(X, y)``; return the head
    (thrown away with probe heads, every task's frozen head with ``heads: shared``)."""
    torch.manual_seed(seed)
    head = nn.Linear(_out_features(body), int(y.max()) + 1)
    train_classifier(body, head, X, y, spec, [*body.parameters(), *head.parameters()], seed)
    return head.eval()


def fit_probe(
    body: nn.Module, X: torch.Tensor, y: torch.Tensor, spec: TrainSpec, seed: int, classes: int = 10
) -> nn.Linear:
    """A linear head trained on the frozen ``body``'s features (the task's zero-shot analog)."""
    torch.manual_seed(seed)
    head = nn.Linear(_out_features(body), classes)
    with torch.no_grad():
        feats = body.eval()(X)
    train_classifier(nn.Identity(), head, feats, y, spec, head.parameters(), seed)
    return head.eval()


def finetune_expert(
    body: nn.Module,
    head: nn.Linear,
    X: torch.Tensor,
    y: torch.Tensor,
    spec: TrainSpec,
    seed: int,
    train_head: bool = False,
) -> tuple[StateDict, nn.Linear]:
    """Fine-tune a copy of ``body`` (and of ``head`` if ``train_head``) on ``(X, y)``; with
    ``spec.lora.r > 0`` only a ``peft`` LoRA adapter of the body trains, and the expert is
    its dense merge (``merge_and_unload``: W + (alpha/r)·B @ A per targeted layer).

    Returns the expert body's state dict (detached clones, the keys of ``body``) and its
    head; the inputs are left untouched.
    """
    expert, expert_head = copy.deepcopy(body), copy.deepcopy(head)
    if spec.lora.r:
        expert = apply_lora(expert.requires_grad_(False), spec.lora, seed)
    params = [p for p in expert.parameters() if p.requires_grad]
    params += list(expert_head.parameters()) if train_head else []
    expert_head.requires_grad_(train_head)
    train_classifier(expert, expert_head, X, y, spec, params, seed)
    if spec.lora.r:
        expert = expert.merge_and_unload()
    return clone_state(expert), expert_head.eval()


@torch.no_grad()
def accuracy(body: nn.Module, head: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``X`` ``(N, in_features)`` that ``head(body(X))`` labels as ``y`` ``(N,)``."""
    body.eval()
    head.eval()
    return float((head(body(X)).argmax(dim=1) == y).float().mean())


def clone_state(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _out_features(body: nn.Module) -> int:
    return [m for m in body.modules() if isinstance(m, nn.Linear)][-1].out_features
