"""Fault injection for the torch.distributed tests: a loss that ends its own process.

``train.loss: tests.torchdist_faults:dying_cross_entropy`` behaves as cross-entropy, except
that in the rank named by ``FEDMERGE_TEST_KILL_RANK`` it calls ``os._exit`` (no clean-up, as
a crash) at training step ``FEDMERGE_TEST_KILL_STEP`` (1-based, counted over the run).
"""

import os

from torch import nn

_steps = 0


def dying_cross_entropy(logits, target):
    global _steps
    _steps += 1
    if os.environ.get("RANK") == os.environ.get("FEDMERGE_TEST_KILL_RANK") and _steps >= int(
        os.environ.get("FEDMERGE_TEST_KILL_STEP", "0")
    ):
        os._exit(17)
    return nn.functional.cross_entropy(logits, target)
