"""Reference models, built deterministically from a seed, and user model factories.

``build_model(name, in_shape=..., num_classes=..., seed=...)`` returns an ``nn.Module``:

- ``"mlp"``: Flatten → [Linear → ReLU]×len(hidden) → Linear. Takes (B, C, H, W) or (B, D).
- ``"cnn"``: [Conv3×3 → BatchNorm → ReLU (→ MaxPool2)]×len(channels) → global average pool →
  Linear. Sized for 8×8 digits by default; works for any H, W ≥ 2^(len(channels)−1).
- ``"resnet20"``: the CIFAR ResNet-20 of He et al. (3 stages × 3 basic blocks, widths
  16·w, 32·w, 64·w, BatchNorm, 1×1 conv + BN shortcut where the shape changes).
- ``"package.module:function"``: any importable factory; it is called with the same keyword
  arguments (``in_shape``, ``num_classes``, ``seed`` and the extra ones) and must return an
  ``nn.Module``.

Parameter names are stable (``fc0.weight``, ``conv0.weight``, ``layer2.1.bn1.running_mean``…)
because :mod:`fedmerge.alignment` declares permutation specs over them.

>>> model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=0, hidden=(32,))
>>> model(torch.zeros(5, 1, 8, 8)).shape
torch.Size([5, 10])
>>> sorted(MODELS)
['cnn', 'hf', 'mlp', 'resnet20']
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fedmerge.errors import ConfigError
from fedmerge.factory import import_factory
from fedmerge.registry import Entry, Param, Registry


class MLP(nn.Sequential):
    """Flatten → hidden Linear+ReLU layers (``fc0``, ``fc1``, …) → ``head``."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int]) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, h in enumerate(hidden):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"act{i}"] = nn.ReLU()
            width = h
        layers["head"] = nn.Linear(width, num_classes)
        super().__init__(layers)
        self.hidden = tuple(hidden)


class CNN(nn.Sequential):
    """``conv{i}`` (3×3, no bias) → ``bn{i}`` → ReLU, max-pool between blocks, GAP → ``head``."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int]) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels
        for i, c in enumerate(channels):
            layers[f"conv{i}"] = nn.Conv2d(width, c, 3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
            layers[f"relu{i}"] = nn.ReLU()
            if i < len(channels) - 1:
                layers[f"pool{i}"] = nn.MaxPool2d(2)
            width = c
        layers["gap"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten()
        layers["head"] = nn.Linear(width, num_classes)
        super().__init__(layers)
        self.channels = tuple(channels)


class BasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut is 1×1 conv+BN or id."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: stem ``conv1``/``bn1``/``relu``, ``layer1..3`` (3 blocks each), GAP,
    ``head``. Every ReLU is its own module so hooks can read post-activation features."""

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks: int = 3) -> None:
        super().__init__()
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c_in = widths[0]
        for s, c in enumerate(widths):
            stage = [
                BasicBlock(c_in if b == 0 else c, c, 2 if s and b == 0 else 1)
                for b in range(blocks)
            ]
            self.add_module(f"layer{s + 1}", nn.Sequential(*stage))
            c_in = c
        self.head = nn.Linear(c_in, num_classes)
        self.width, self.blocks = width, blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → logits (B, num_classes)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(out.mean(dim=(2, 3)))


MODELS: Registry[Entry] = Registry("model", field="model.name", options_field="model.options")
"""Built-in model builders by name (parameters: the config's ``model.options``);
:func:`build_model` also accepts ``"package.module:function"``."""


@MODELS.register(
    "mlp", Param("hidden", tuple, (128, 64), "hidden layer widths ([]: a linear model)", low=1)
)
def _mlp(*, in_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int]) -> nn.Module:
    """Flatten → [Linear → ReLU] per hidden width → Linear head; any input shape."""
    return MLP(math.prod(in_shape), num_classes, hidden)


@MODELS.register(
    "cnn", Param("channels", tuple, (32, 64), "output channels of each conv block", low=1)
)
def _cnn(*, in_shape: tuple[int, ...], num_classes: int, channels: Sequence[int]) -> nn.Module:
    """[Conv3×3 → BatchNorm → ReLU (→ MaxPool2)] per block → global average pool → Linear;
    inputs (C, H, W) with H, W ≥ 2^(blocks−1)."""
    if len(in_shape) != 3:
        raise ConfigError(f"model 'cnn' needs in_shape (C, H, W), got {tuple(in_shape)}")
    if not channels:
        raise ConfigError("model 'cnn': parameter 'channels' must list at least one block")
    return CNN(in_shape[0], num_classes, channels)


@MODELS.register("resnet20", Param("width", int, 1, "width multiplier (16·w, 32·w, 64·w)", low=1))
def _resnet20(*, in_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """CIFAR ResNet-20 (He et al.): 3 stages × 3 BatchNorm basic blocks; inputs (C, H, W)."""
    if len(in_shape) != 3:
        raise ConfigError(f"model 'resnet20' needs in_shape (C, H, W), got {tuple(in_shape)}")
    return ResNet20(in_shape[0], num_classes, width)


@MODELS.register(
    "hf",
    Param("path", str, "", "a local Hugging Face image-classifier directory ('': from config)"),
    Param("config", dict, {}, "offline config: model_type + fields (default a tiny ViT)"),
)
def _hf(*, in_shape: tuple[int, ...], num_classes: int, path: str, config: dict) -> nn.Module:
    """A Hugging Face image classifier (transformers), e.g. for LoRA agents (peft)."""
    from fedmerge.hf.lora import build_hf

    return build_hf(in_shape=in_shape, num_classes=num_classes, path=path, config=config)


def build_model(
    name: str, *, in_shape: tuple[int, ...], num_classes: int, seed: int, **kwargs
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``in_shape`` (no batch axis), seeded.

    The same arguments always give identical weights; the global RNG is left untouched.
    Raises :class:`ConfigError` for an unknown name, a bad keyword or a broken factory.
    """
    in_shape = tuple(int(d) for d in in_shape)
    if not in_shape or min(in_shape) < 1 or int(num_classes) < 1:
        raise ConfigError(f"model {name!r}: bad in_shape {in_shape} or num_classes {num_classes}")
    shape = {"in_shape": in_shape, "num_classes": int(num_classes)}
    if name in MODELS:
        builder, args = MODELS[name].target, {**shape, **MODELS[name].resolve(kwargs)}
    else:
        builder = import_factory(name, "model.name", sorted(MODELS))
        args = {**shape, **kwargs, "seed": seed}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(**args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not nn.Module")
    return model
