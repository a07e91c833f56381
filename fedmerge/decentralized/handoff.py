"""The file contract between an external trainer and a merge sidecar, and the sidecar's agent.

One directory, shared by the trainer and its sidecar on the same host:

- the trainer writes ``ckpt-<step>.safetensors`` (``step``: its global step, increasing),
  each one complete before it appears: written to a temporary name, then renamed (a name
  not matching ``ckpt-<digits>.safetensors``, e.g. ``.ckpt-7.tmp``, is never read);
- after round r the sidecar writes ``merged-<r>.safetensors`` (atomically), then
  ``merged.json`` = ``{"round": r, "file": "merged-<r>.safetensors", "source": ...}``
  (atomically); ``source`` names what the node's model was before the merge. The trainer
  resumes from the file ``merged.json`` names when its round is newer than the one it last
  loaded.

Each round the sidecar takes the newest checkpoint whose step is above the last one it
took; older ones are skipped (the trainer is faster than the round). If there is none (the
trainer is slower), the node's model is its last merge — the state the trainer resumes
from — so the round gossips that again. The sidecar never deletes files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedmerge.atomic import atomic_write_text
from fedmerge.checkpoint import load_state_dict, save_state_dict
from fedmerge.decentralized.agent import Agent
from fedmerge.errors import CheckpointError, ValidationError
from fedmerge.statedict import StateDict

CKPT = re.compile(r"ckpt-(\d{1,18})\.safetensors")
POINTER = "merged.json"


def newest_checkpoint(folder: Path, after: int) -> tuple[int, Path] | None:
    """(step, path) of the newest ``ckpt-<step>.safetensors`` in ``folder`` with step >
    ``after``, or None (also while ``folder`` does not exist yet)."""
    if not folder.is_dir():
        return None
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := CKPT.fullmatch(p.name))]
    found = [(step, p) for step, p in found if step > after]
    return max(found) if found else None


def merged_file(folder: Path, round: int) -> Path:
    return folder / f"merged-{round}.safetensors"


def write_merged(folder: Path, round: int, state: StateDict, source: str) -> Path:
    """Write the merge after ``round`` (1-based), then point ``merged.json`` at it."""
    path = merged_file(folder, round)
    save_state_dict(state, path, {"round": str(round), "source": source})
    pointer = {"round": round, "file": path.name, "source": source}
    atomic_write_text(folder / POINTER, json.dumps(pointer))
    return path


def read_pointer(folder: Path) -> dict | None:
    """``merged.json`` of ``folder`` ({"round", "file", "source"}), or None if absent."""
    path = folder / POINTER
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text())
        round, name = int(pointer["round"]), str(pointer["file"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a merge pointer ({exc})") from None
    if name != merged_file(folder, round).name:
        raise CheckpointError(f"{path}: names {name!r} for round {round}")
    return pointer


def write_checkpoint(folder: Path, step: int, state: StateDict) -> Path:
    """The trainer's side: ``ckpt-<step>.safetensors`` of ``state``, written atomically."""
    path = folder / f"ckpt-{step}.safetensors"
    save_state_dict({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
    return path


def newer_merge(folder: Path, after: int) -> tuple[int, StateDict] | None:
    """The trainer's side: (round, state) of the merge ``merged.json`` names, if its round
    is above ``after``; else None."""
    pointer = read_pointer(folder)
    if pointer is None or pointer["round"] <= after:
        return None
    return pointer["round"], load_state_dict(folder / pointer["file"])


class CheckpointModel(nn.Module):
    """A trainer's checkpoint held as a model: ``state_dict()`` is its tensors (any keys,
    shapes, dtypes), ``load_state_dict`` copies into them in place. The sidecar never runs it."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.tensors = {k: v.detach().clone() for k, v in state.items()}

    def state_dict(self, *args, **kwargs) -> StateDict:  # type: ignore[override]
        return dict(self.tensors)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True,
                        assign: bool = False):  # type: ignore[override]  # fmt: skip
        """Copy ``state`` in; a missing or extra key, or another shape or dtype, is an error."""
        got = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
        want = {k: (v.dtype, tuple(v.shape)) for k, v in self.tensors.items()}
        if got != want:
            diff = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
            raise ValidationError(f"checkpoint differs from the node's model at {diff[:3]}")
        for k, v in state.items():
            self.tensors[k].copy_(v)
        return nn.modules.module._IncompatibleKeys([], [])


class SidecarAgent(Agent):
    """A node's agent over its trainer's checkpoints: :meth:`take` adopts a checkpoint as
    the node's model; ``step`` (the last step taken) is saved with its state."""

    step: int = -1

    def take(self, step: int, path: Path) -> None:
        try:
            self.model.load_state_dict(load_state_dict(path))
        except ValidationError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        self.step = step

    def extra_state(self) -> tuple[StateDict, dict]:
        return {}, {"step": self.step}

    def load_extra_state(self, tensors: StateDict, meta: dict) -> None:
        if tensors or not isinstance(meta.get("step"), int):
            raise ValidationError(f"agent {self.id}: not a sidecar's state (no 'step')")
        self.step = meta["step"]
