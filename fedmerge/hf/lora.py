"""LoRA agents: a Hugging Face image classifier wrapped with peft, and merging LoRA factors.

An agent with ``peft.r > 0`` trains only its adapter (A, B of every targeted layer, plus
the ``modules_to_save`` copies such as the classifier) and shares only those tensors.
Merging them needs care: averaging A and B separately is not averaging B @ A. Two rules:

- ``factors``: average A_j and B_j separately (what most federated LoRA code does);
- ``product``: average the products, P = Σ_j π_j B_j A_j / Σ_j π_j, then re-factorize P
  to rank r by truncated SVD (FedEx-LoRA / FLoRA-style; exact when rank(P) ≤ r).

>>> import torch
>>> a = {"m.lora_A.default.weight": torch.tensor([[1.0, 0.0]]),
...      "m.lora_B.default.weight": torch.tensor([[1.0], [0.0]])}
>>> b = {"m.lora_A.default.weight": torch.tensor([[0.0, 1.0]]),
...      "m.lora_B.default.weight": torch.tensor([[0.0], [1.0]])}
>>> out = product_average([(a, 1.0), (b, 1.0)], rank=2)
>>> (out["m.lora_B.default.weight"] @ out["m.lora_A.default.weight"]).round(decimals=6).tolist()
[[0.5, 0.0], [0.0, 0.5]]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmerge.errors import ConfigError
from fedmerge.hf.refactor import factorize

TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "patch_size": 2}  # fmt: skip
QUERY_VALUE = ("q_proj", "v_proj", "query", "value")  # transformers ≥ 5 and 4.x names
_A = re.compile(r"(.+)\.lora_A\.([^.]+)\.weight")


class HFClassifier(nn.Module):
    """``(N, C, H, W)`` images → ``(N, classes)`` logits of a Hugging Face image classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_hf(
    *, in_shape: tuple[int, ...], num_classes: int, path: str = "", config: dict | None = None
) -> nn.Module:
    """An HF image classifier: a local model directory ``path``, or built offline from
    ``config`` (``model_type`` + fields; default a tiny ViT, :data:`TINY_VIT`)."""
    import transformers as tf

    if len(in_shape) != 3:
        raise ConfigError(f"model 'hf' needs image inputs (C, H, W), got {tuple(in_shape)}")
    if path:
        model = tf.AutoModelForImageClassification.from_pretrained(
            path, num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True
        )
    else:
        fields = {**TINY_VIT, **(config or {})}
        kind = fields.pop("model_type", "vit")
        try:
            cfg = tf.AutoConfig.for_model(kind, image_size=in_shape[-1], num_channels=in_shape[0],
                                          num_labels=num_classes, **fields)  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model.options.config: {exc}") from None
        model = tf.AutoModelForImageClassification.from_config(cfg)
    return HFClassifier(model)


def apply_lora(model: nn.Module, peft_cfg: Any, seed: int) -> nn.Module:
    """``model`` with a LoRA adapter (``peft_cfg``: r, alpha, dropout, target_modules,
    modules_to_save); only the adapter is trainable. A and B are seeded by ``seed``."""
    import peft

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(peft_cfg.target_modules) or [n for n in QUERY_VALUE if n in names]
    config = peft.LoraConfig(
        r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        modules_to_save=list(peft_cfg.modules_to_save) or None,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(f"peft.target_modules: {exc}") from None


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict names of the parameters that train (the adapter, for a peft model)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def product_average(
    states: Sequence[tuple[Mapping[str, torch.Tensor], float]], rank: int
) -> dict[str, torch.Tensor]:
    """Weighted average of LoRA states (θ: A ``(r, in)``, B ``(out, r)`` per module, and any
    other tensor): every pair's product B @ A is averaged and re-factorized to ``rank``;
    the other tensors are averaged as they are."""
    total = sum(w for _, w in states)
    first = states[0][0]
    out = {k: sum(w * s[k] for s, w in states) / total for k in first}
    for a_key in first:
        m = _A.fullmatch(a_key)
        if m is None:
            continue
        b_key = f"{m.group(1)}.lora_B.{m.group(2)}.weight"
        product = sum(w * (s[b_key].double() @ s[a_key].double()) for s, w in states) / total
        b, a, _ = factorize(product, rank)
        out[a_key], out[b_key] = a.to(first[a_key].dtype), b.to(first[b_key].dtype)
    return out


def product_gossip(
    own: Mapping[str, torch.Tensor], received: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    self_weight: float, reference: Mapping[str, torch.Tensor] | None, rank: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """:func:`product_average` over an agent and its neighbours, in shared form (τ against
    ``reference``, or θ when None): τ → θ, average, θ → τ."""

    def theta(t: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v + reference[k] if reference is not None else v for k, v in t.items()}

    merged = product_average([(theta(own), self_weight), *((theta(t), w) for t, w in received)],
                             rank)  # fmt: skip
    return {k: v - reference[k] if reference is not None else v for k, v in merged.items()}
