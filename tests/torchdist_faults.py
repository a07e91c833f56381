"""Fault injection for the torch.distributed tests: a loss that ends or freezes its process.

``train.loss: tests.torchdist_faults:dying_cross_entropy`` behaves as cross-entropy, except
that in the rank named by ``FEDMERGE_TEST_KILL_RANK`` at training step
``FEDMERGE_TEST_KILL_STEP`` (1-based, counted over the run) it calls ``os._exit`` (no
clean-up, as a crash), or with ``FEDMERGE_TEST_HANG=1`` sleeps for an hour (a hung rank).
"""

import os
import time

from torch import nn

_steps = 0


def dying_cross_entropy(logits, target):
    global _steps
    _steps += 1
    if os.environ.get("RANK") == os.environ.get("FEDMERGE_TEST_KILL_RANK") and _steps >= int(
        os.environ.get("FEDMERGE_TEST_KILL_STEP", "0")
    ):
        if os.environ.get("FEDMERGE_TEST_HANG") == "1":
            time.sleep(3600)
        os._exit(17)
    return nn.functional.cross_entropy(logits, target)
