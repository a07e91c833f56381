"""A ``transformers.TrainerCallback``: a ``Trainer`` run as the trainer half of the merge
sidecar's file contract (:mod:`fedmerge.decentralized.handoff`, docs/deployment.md).

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[SidecarCallback("/data/ckpts", every=50)])

Every ``every`` optimizer steps it writes ``ckpt-<global step>.safetensors`` of the model's
state dict (atomically), and after every step it loads the merge ``merged.json`` names
into the model, in place, when its round is newer than the last one loaded (the optimizer
state is kept). A sidecar (``clients/merge_sidecar.py``) beside it does the exchange.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from fedmerge.decentralized.handoff import newer_merge, write_checkpoint


class SidecarCallback(TrainerCallback):
    """Write checkpoints for the sidecar in ``folder``; adopt its merges.
    ``loaded``: the rounds of the merges loaded so far, in order."""

    def __init__(self, folder: str | os.PathLike, every: int = 50) -> None:
        if every < 1:
            raise ValueError(f"every: a positive number of steps, got {every}")
        self.folder, self.every = Path(folder), every
        self.folder.mkdir(parents=True, exist_ok=True)
        self.loaded: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if state.global_step % self.every == 0:
            write_checkpoint(self.folder, state.global_step, model.state_dict())
        got = newer_merge(self.folder, self.loaded[-1] if self.loaded else 0)
        if got is not None:
            model.load_state_dict(got[1])
            self.loaded.append(got[0])
        return control
