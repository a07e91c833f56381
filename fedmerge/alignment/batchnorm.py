"""REPAIR-style BatchNorm statistics reset on calibration data.

After permuting, averaging or training, BatchNorm's running statistics no longer describe
the activations the layer sees. ``reset_bn_stats`` recomputes them from scratch: every BN
layer forgets its statistics, switches to a cumulative average (``momentum=None``) and the
model runs the calibration batches in train mode under ``no_grad``. With one batch the
running mean is that batch's mean and the running variance its unbiased variance; with
several, each is the average over batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedmerge.errors import ValidationError

Batch = torch.Tensor | tuple | list


def batch_inputs(batch: Batch) -> torch.Tensor:
    """The model input of a calibration batch: the tensor itself or the first item of (x, y)."""
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable[Batch]) -> nn.Module:
    """Recompute every BatchNorm's running mean/var on ``batches`` (in place; returns model).

    The model's train/eval mode and each layer's momentum are restored afterwards.
    Models without BatchNorm are returned untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training, momenta = model.training, [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    seen = 0
    try:
        for batch in batches:
            model(batch_inputs(batch))
            seen += 1
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    if not seen:
        raise ValidationError("BatchNorm reset: the calibration data yielded no batch")
    return model
