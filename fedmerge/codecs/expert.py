"""Compressed expert files: an expert's task vector encoded by a codec (ComPEFT ternary…).

``fedmerge compress`` writes τ̂ = C(θ_expert − θ_base) for every floating key as one
safetensors file whose header names the codec (:mod:`fedmerge.codecs.wire`);
integer and bool tensors are not stored (merges take them from the base). Such a
file opens, over the base it was compressed against, as an ordinary lazy
:class:`~fedmerge.checkpoint.Checkpoint` of θ = θ_base + decode(τ̂), one key at a
time, so ``fedmerge merge`` and ``fedmerge continual add`` take it like any expert
(they open experts with :func:`open_expert`). The header is
checked against the base's keys, shapes and dtypes before anything is decoded.

Compressing holds the encoded parts (a fraction of the model) plus one dense key;
``scope: global`` reads the expert and base twice more for its threshold.

>>> import torch, tempfile, os
>>> from fedmerge.checkpoint import save_state_dict
>>> d = tempfile.mkdtemp()
>>> base, expert = (os.path.join(d, n) for n in ("base.safetensors", "e.safetensors"))
>>> save_state_dict({"w": torch.zeros(4), "n": torch.tensor(3)}, base)
>>> save_state_dict({"w": torch.tensor([0.0, 2.0, -1.0, 0.5]), "n": torch.tensor(3)}, expert)
>>> out = os.path.join(d, "e.ternary.safetensors")
>>> _ = compress_checkpoint(expert, base, out, "ternary", {"density": 0.5})
>>> with open_expert(out, base=base) as ck:
...     ck.get("w").tolist(), int(ck.get("n"))
([0.0, 1.5, -1.5, 0.0], 3)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmerge.checkpoint import Checkpoint, open_checkpoint, save_state_dict
from fedmerge.codecs.wire import META_CODEC, SEP, decode_key, encode_state, read_layout
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.hf.adapter import AdapterCheckpoint, is_adapter_dir
from fedmerge.statedict import check_same_specs, is_mergeable
from fedmerge.stheader import read_file_header

FORMAT = "fedmerge-compressed-task-vector"


def open_expert(
    path: str | os.PathLike, base: Checkpoint | str | os.PathLike | None = None
) -> Checkpoint:
    """An expert checkpoint: a compressed file or a PEFT LoRA adapter directory, both read
    over ``base`` (θ = θ_base + decoded τ̂, or + ΔW:
    :class:`fedmerge.hf.adapter.AdapterCheckpoint`), or any plain checkpoint."""
    if is_compressed(path):
        return CompressedCheckpoint(path, base)
    if is_adapter_dir(path):
        return AdapterCheckpoint(path, base)
    return open_checkpoint(path)


def is_compressed(path: str | os.PathLike) -> bool:
    """True if ``path`` is a safetensors file whose header names a codec."""
    p = Path(path)
    return p.is_file() and p.suffix == ".safetensors" and META_CODEC in read_file_header(p).metadata


class _TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_expert − θ_base over the floating keys, computed when a key is read."""

    def __init__(self, expert: Checkpoint, base: Checkpoint):
        self.expert, self.base = expert, base
        self.keys_ = [k for k, spec in base.specs().items() if is_mergeable(spec)]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.expert.get(key) - self.base.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


@dataclass(frozen=True)
class CompressReport:
    """What ``compress`` wrote: the codec, its parameters, sizes in bytes."""

    codec: str
    params: dict[str, Any]
    path: Path
    dense_bytes: int  # the floating tensors of the expert, uncompressed
    file_bytes: int


def compress_checkpoint(
    expert_path: str | os.PathLike, base_path: str | os.PathLike, out: str | os.PathLike,
    codec: str = "ternary", params: Mapping[str, Any] | None = None, seed: int = 0,
) -> CompressReport:  # fmt: skip
    """Write ``C(θ_expert − θ_base)`` to ``out`` (atomic; see the module docstring)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: a compressed expert is one .safetensors file")
    if any(out.exists() and out.resolve() == Path(p).resolve() for p in (expert_path, base_path)):
        raise ConfigError(f"{out}: output would overwrite an input")
    with open_checkpoint(base_path) as base, open_checkpoint(expert_path) as expert:
        check_same_specs(base.specs(), expert.specs(), source=str(expert_path))
        encoded = encode_state(_TaskVector(expert, base), codec, params, seed=seed)
        meta = {"fedmerge.format": FORMAT, "fedmerge.expert": Path(expert_path).name,
                "fedmerge.base": Path(base_path).name, **encoded.metadata()}  # fmt: skip
    save_state_dict(encoded.parts, out, meta)
    dense = sum(s.nbytes for s in encoded.specs.values())
    return CompressReport(encoded.codec, encoded.params, out, dense, out.stat().st_size)


class CompressedCheckpoint(Checkpoint):
    """A compressed expert file read lazily as θ = θ_base + decode(τ̂) (keys of the base).

    ``base`` is an open :class:`Checkpoint` (kept open by the caller) or a path (opened
    here, closed by :meth:`close`).
    """

    def __init__(self, path: str | os.PathLike, base: Checkpoint | str | os.PathLike | None):
        self.path = Path(path)
        if base is None:
            raise ValidationError(
                f"{self.path}: a compressed expert opens only over the base it was compressed "
                "against (give --base)"
            )
        self._own_base = not isinstance(base, Checkpoint)
        self.base = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        header = read_file_header(self.path)
        floating = {k: s for k, s in self.base.specs().items() if is_mergeable(s)}
        self.layout = read_layout(header.metadata, header.tensors, source=str(self.path),
                                  expected=floating)  # fmt: skip
        self._files = dict.fromkeys(header.tensors, self.path)
        self._handles: dict[Path, object] = {}
        self._specs = self.base.specs()
        self.metadata = dict(header.metadata)
        self._decoded: tuple[str | None, torch.Tensor | None] = (None, None)

    def get(self, key: str) -> torch.Tensor:
        base = self.base.get(key)
        if key not in self.layout.specs:
            return base  # integer and bool tensors come from the base
        handle = self._handle(self.path)
        parts = {p: handle.get_tensor(f"{key}{SEP}{p}") for p in self.layout.entries[key]}
        layout = self.layout
        tau = decode_key(layout.codec, layout.params, layout.specs[key], parts, key, str(self.path))
        return base + tau

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the decoded ``key``: a compressed tensor decodes whole
        (indices and scales span it), so the last decoded tensor is kept for the next block."""
        if self._decoded[0] != key:
            self._decoded = (key, self.get(key))
        return self._decoded[1][start:stop]

    def close(self) -> None:
        self._handles.clear()
        self._decoded = (None, None)
        if self._own_base:
            self.base.close()

    def __repr__(self) -> str:
        return f"CompressedCheckpoint({str(self.path)!r}, codec {self.layout.codec.name!r})"
