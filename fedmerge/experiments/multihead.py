"""A shared MLP body with one classification head per task, and how it is trained.

This is the small offline analog of the OPCM paper's setting (a pretrained CLIP
vision encoder, one fine-tuned encoder per task, each task with its own
classification head; only the encoders are merged):

1. **Pretrain** the body on the pretraining pool (upright digits, disjoint from
   the tasks' data) through a temporary head that is then thrown away — the
   analog of CLIP's pretraining.
2. **Head per task**: a linear probe fitted on the frozen pretrained body's
   features — the analog of CLIP's zero-shot head. The pretrained body with
   these heads is the *lower* reference.
3. **Expert per task**: the body fine-tuned on the task from the pretrained
   weights, with the task's head frozen (as in task arithmetic / FusionBench's
   CLIP experts) or, with ``train_head=True``, fine-tuned together.

Everything is seeded and runs on CPU in well under a second per expert.

>>> body = make_body(hidden=(16,), features=8)
>>> body(torch.zeros(5, 64)).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedmerge.statedict import StateDict


@dataclass(frozen=True)
class TrainSpec:
    """Adam on minibatches: ``steps`` updates of ``batch_size`` samples at learning rate ``lr``."""

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0


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
) -> None:
    """Train ``body`` (in place) through a throw-away linear head on ``(X, y)``."""
    torch.manual_seed(seed)
    head = nn.Linear(_out_features(body), int(y.max()) + 1)
    train_classifier(body, head, X, y, spec, [*body.parameters(), *head.parameters()], seed)


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
    """Fine-tune a copy of ``body`` (and of ``head`` if ``train_head``) on ``(X, y)``.

    Returns the expert body's state dict (detached clones) and its head; the inputs
    are left untouched.
    """
    expert, expert_head = copy.deepcopy(body), copy.deepcopy(head)
    params = [*expert.parameters(), *(expert_head.parameters() if train_head else [])]
    expert_head.requires_grad_(train_head)
    train_classifier(expert, expert_head, X, y, spec, params, seed)
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
