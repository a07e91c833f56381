"""Fault injection for the torch.distributed tests: a loss that ends or freezes its process,
and one that turns its rank into a hostile peer.

``train.loss: tests.torchdist_faults:dying_cross_entropy`` behaves as cross-entropy, except
that in the rank named by ``FEDMERGE_TEST_KILL_RANK`` at training step
``FEDMERGE_TEST_KILL_STEP`` (1-based, counted over the run) it calls ``os._exit`` (no
clean-up, as a crash), or with ``FEDMERGE_TEST_HANG=1`` sleeps for an hour (a hung rank).

``train.loss: tests.torchdist_faults:sigkill_cross_entropy`` behaves as cross-entropy, except
that once per test (the marker file ``FEDMERGE_TEST_KILL_MARK`` does not exist yet) the rank
named by ``FEDMERGE_TEST_KILL_RANK`` SIGKILLs itself at training step
``FEDMERGE_TEST_KILL_STEP``, or with ``FEDMERGE_TEST_KILL_IN_SAVE=1`` in the next save of
its agent state after that step: the temp file written, not yet renamed (a kill mid-write).
It first writes the marker: {"time": time.time(), "temp": the temp file or null}.

``train.loss: tests.torchdist_faults:hostile_cross_entropy`` behaves as cross-entropy; in
the rank named by ``FEDMERGE_TEST_EVIL_RANK`` it also replaces that process's
:func:`fedmerge.runtimes.torchdist.wire.pack` with :func:`forge_pack`, so every payload the
rank sends is malformed, one attack of :data:`ATTACKS` per round (by the payload's round).
"""

import dataclasses
import json
import os
import signal
import time

import torch
from torch import nn

from fedmerge import atomic
from fedmerge.decentralized.payload import Payload
from fedmerge.runtimes.torchdist import wire

ATTACKS = ("forged_sender", "deep_table", "non_finite", "forged_round")
DEPTH = 3000  # JSON nesting of the deep table: past Python's recursion limit
_steps = 0
_honest_pack = wire.pack


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


def sigkill_cross_entropy(logits, target):
    global _steps
    _steps += 1
    mark = os.environ.get("FEDMERGE_TEST_KILL_MARK", "")
    chosen = os.environ.get("RANK") == os.environ.get("FEDMERGE_TEST_KILL_RANK")
    at_step = _steps == int(os.environ.get("FEDMERGE_TEST_KILL_STEP", "0"))
    if chosen and at_step and mark and not os.path.exists(mark):
        if os.environ.get("FEDMERGE_TEST_KILL_IN_SAVE") == "1":
            atomic.TempFile.commit = _killing_commit
        else:
            _sigkill(mark, None)
    return nn.functional.cross_entropy(logits, target)


_honest_commit = atomic.TempFile.commit


def _killing_commit(self) -> None:
    if self.target.name.startswith("agent-"):
        self.park()  # the temp file is complete on disk, the rename never happens
        _sigkill(os.environ["FEDMERGE_TEST_KILL_MARK"], str(self.path))
    _honest_commit(self)


def _sigkill(mark: str, temp: str | None) -> None:
    with open(mark, "w") as f:
        f.write(json.dumps({"time": time.time(), "temp": temp}))
    os.kill(os.getpid(), signal.SIGKILL)


def hostile_cross_entropy(logits, target):
    if os.environ.get("RANK") == os.environ.get("FEDMERGE_TEST_EVIL_RANK"):
        wire.pack = forge_pack
    return nn.functional.cross_entropy(logits, target)


def forge_pack(p: Payload, reuse: torch.Tensor | None = None):
    """(header, body) of ``p`` with ``ATTACKS[p.round % 4]`` applied: a header naming
    another sender; a tensor table nested ``DEPTH`` deep (under the table size bound); a
    NaN in the first tensor (hash recomputed, so only finiteness fails); round 10⁹."""
    attack = ATTACKS[p.round % len(ATTACKS)]
    if attack == "non_finite":
        tensors = {k: v.clone() for k, v in p.tensors.items()}
        next(iter(tensors.values())).view(-1)[0] = float("nan")
        p = Payload.make(tensors, sender=p.sender, round=p.round, samples=p.samples,
                         kind=p.kind)  # fmt: skip
    elif attack == "forged_round":
        p = dataclasses.replace(p, round=10**9)
    header, body = _honest_pack(p)
    if attack == "forged_sender":
        header[2] = p.sender + 1
    elif attack == "deep_table":
        table = b"[" * DEPTH + b"]" * DEPTH  # 6000 bytes, 8-aligned
        data = body[int(header[6]) :]
        body = torch.cat([torch.frombuffer(bytearray(table), dtype=torch.uint8), data])
        header[6] = len(table)
    return header, body
