"""A continual merge store on disk: add experts as they arrive, export the merge any time.

A store is a directory::

    STORE/
      manifest.json             what the store is and where its state lies (the commit point)
      base.safetensors          a copy of the base θ_0, written once at init
      state-000007.safetensors  accumulator of generation 7 (one tensor per floating key)
      .lock                     flock(2) target that serializes writers

``manifest.json`` holds the method, its parameters, the projected keys, the
step count, ‖τ_i‖ of every expert, ‖acc‖, the scale and OPCM's λ, and one
record per expert (id, SHA-256 content hash, timestamp, norms). It never holds
tensors, and the state never holds the experts: its size is constant.

Nothing in a store is trusted blindly: the manifest is checked against its schema
(:mod:`fedmerge.continual.manifest`: fields, types, file names confined to the store)
on every read and before every write, and the SHA-256 of the base and of the
accumulator it records are verified before they are used (one extra read), so a
bit flip is an error rather than a silent wrong merge. Readers open the lock file
read-only and never create anything, so a read-only store (or a copy without
``.lock``) can be read; a path that is not a store is an error, never created.
Exports that are or lie inside the store are refused.

Every change is crash-safe. ``add`` writes the new accumulator under a new
generation name (temp file + fsync + rename), then atomically replaces the
manifest that names it, then deletes the old generation. A crash at any
instant leaves a manifest that names a complete state file: the old one or
the new one. Leftovers (temp files, an unreferenced generation) are removed by
the next writer. Writers hold an exclusive lock, readers a shared one, so two
concurrent ``add`` calls both land, one after the other.

>>> import torch, tempfile, os
>>> d = tempfile.mkdtemp()
>>> base = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
>>> store = ContinualStore.init(os.path.join(d, "s"), base, "continual_task_arithmetic")
>>> record = store.add({"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, "task-a")
>>> store.manifest()["step"], record["id"], store.merged()["fc.bias"].tolist()
(1, 'task-a', [0.30000001192092896, 0.30000001192092896])
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fedmerge.atomic import atomic_write_text, fsync_dir, storage_errors
from fedmerge.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    check_output,
    open_checkpoint,
)
from fedmerge.codecs.expert import open_expert
from fedmerge.continual.linear import default_projectable
from fedmerge.continual.manifest import (
    BASE_FILE,
    FORMAT,
    VERSION,
    dump_manifest,
    parse_manifest,
    state_name,
)
from fedmerge.continual.merger import Source, Tensors, fold_step, make_merger, mergeable_keys
from fedmerge.continual.methods import CONTINUAL_METHODS
from fedmerge.errors import CheckpointError, ConfigError, ValidationError
from fedmerge.hf.modeldir import copy_model_files, is_model_dir, writes_directory
from fedmerge.hf.refactor import AdapterReport, write_adapter
from fedmerge.statedict import StateDict, check_same_specs, content_hash, update_hash

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
HF_DIR = "hf"  # config/tokenizer files of a Hugging Face base, carried into exports


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _open(tensors: Tensors | str | os.PathLike, base: Path | None = None) -> Iterator[Tensors]:
    """A path is opened lazily (and closed after); a mapping/checkpoint is used as is.

    A compressed expert file or a LoRA adapter directory opens over ``base``
    (see :func:`open_expert`).
    """
    if isinstance(tensors, (str, os.PathLike)):
        with open_expert(tensors, base) as ck:
            yield ck
    else:
        yield tensors


def _hash_of(tensors: Tensors) -> str:
    """Layout-independent SHA-256 of every tensor, read one key at a time."""
    source = Source.of(tensors, "")
    return content_hash((k, source.get(k)) for k in sorted(source.specs))


class ContinualStore:
    """Handle on a store directory (see the module docstring); cheap to create."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ------------------------------------------------------------------ locking and manifest

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """flock(2) on ``.lock``: writers create it read-write, readers open it read-only
        (and go without when a read-only copy lacks it); neither creates the store."""
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a continual store (no such directory); "
                                  "create one with 'fedmerge continual init'")  # fmt: skip
        try:
            if exclusive:
                with storage_errors(self.path / LOCK_FILE):
                    fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                                 0o644)  # fmt: skip
            else:
                fd = os.open(self.path / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock (so does the process dying)

    def _read_manifest(self) -> dict[str, Any]:
        file = self.path / MANIFEST
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.path}: not a continual store (no {MANIFEST}); "
                "create one with 'fedmerge continual init'"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: unreadable manifest ({exc})") from None
        return parse_manifest(text, file)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.path / MANIFEST, dump_manifest(manifest, self.path / MANIFEST))

    def _verify(self, manifest: Mapping[str, Any], base: Checkpoint, acc: Checkpoint | None):
        """The base and the accumulator must hash to what the manifest recorded."""
        pairs = [(base, self.path / BASE_FILE, manifest["base"]["hash"])]
        if acc is not None:
            pairs.append((acc, self.path / manifest["state_file"], manifest["state_hash"]))
        for ck, file, recorded in pairs:
            if _hash_of(ck) != recorded:
                raise CheckpointError(
                    f"{file}: content hash does not match the manifest's sha256 "
                    f"{recorded[:12]} (the file was modified or corrupted)"
                )

    def manifest(self) -> dict[str, Any]:
        """The current manifest (read under a shared lock)."""
        with self._lock(exclusive=False):
            return self._read_manifest()

    def _cleanup(self, manifest: Mapping[str, Any]) -> None:
        """Remove what an interrupted writer left: temp files, unreferenced generations."""
        keep = {MANIFEST, BASE_FILE, LOCK_FILE, manifest.get("state_file")}
        for entry in self.path.iterdir():
            stale_state = entry.name.startswith("state-") and entry.name.endswith(".safetensors")
            if entry.name not in keep and (stale_state or entry.name.endswith(".tmp")):
                entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ init

    @classmethod
    def init(
        cls,
        path: str | os.PathLike,
        base: Tensors | str | os.PathLike,
        method: str = "opcm",
        params: Mapping[str, Any] | None = None,
        project: str | None = None,
        no_project: str | None = None,
    ) -> ContinualStore:
        """Create a store over ``base`` (path or tensors); refuses an existing store."""
        store = cls(path)
        if store.path.exists() and not store.path.is_dir():
            raise ConfigError(f"{store.path}: exists and is not a directory")
        if (store.path / MANIFEST).exists():
            raise ConfigError(f"{store.path}: a continual store already exists here")
        if isinstance(base, (str, os.PathLike)):
            check_output(store.path, {"base": base})
        with storage_errors(store.path):
            store.path.mkdir(parents=True, exist_ok=True)
        with _open(base) as tensors:
            source = Source.of(tensors, "base")
            projectable = default_projectable(source.specs, project, no_project)
            merger = make_merger(method, tensors, projectable, **dict(params or {}))
            with store._lock(exclusive=True):
                store._write_base(source, merger, base, project, no_project)
        return store

    def _write_base(self, source, merger, base, project, no_project) -> None:
        """Copy the base in (hashing it on the way), then commit with the first manifest."""
        if (self.path / MANIFEST).exists():
            raise ConfigError(f"{self.path}: a continual store already exists here")
        if isinstance(base, (str, os.PathLike)) and is_model_dir(base):
            copy_model_files(base, self.path / HF_DIR)
        h = hashlib.sha256()
        with CheckpointWriter(self.path / BASE_FILE, source.specs, {"format": FORMAT}) as w:
            for key in sorted(source.specs):
                tensor = source.get(key)
                update_hash(h, key, tensor)
                w.write(key, tensor)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "method": merger.method.name, "params": merger.method.params,
            "project": project, "no_project": no_project,
            "projectable": sorted(merger.method.projectable),
            "base": {"file": BASE_FILE, "hash": h.hexdigest(),
                     "source": str(base) if isinstance(base, (str, os.PathLike)) else None},
            "generation": 0, "state_file": None, "state_hash": None,
            "step": 0, "tau_norms": [], "acc_norm": 0.0, "scale": merger.scale,
            "merged_norm": 0.0, "lambda": None, "experts": [],
            "created_at": _now(), "updated_at": _now(),
        }  # fmt: skip
        self._write_manifest(manifest)

    # ------------------------------------------------------------------ add

    def add(self, expert: Tensors | str | os.PathLike, expert_id: str | None = None) -> dict:
        """Fold one expert (path or tensors) in; returns its manifest record.

        Refused with :class:`ValidationError`, the store unchanged, when the
        expert's content is already in the store, its id is taken, or its
        keys/shapes/dtypes/values do not fit the base.
        """
        with (
            self._lock(exclusive=True),
            _open(expert, self.path / BASE_FILE) as tensors,
            self._opened() as opened,
        ):
            manifest, base, prev = opened
            self._cleanup(manifest)
            name = str(expert) if isinstance(expert, (str, os.PathLike)) else "expert"
            check_same_specs(base.specs(), Source.of(tensors, name).specs, source=name)
            digest = _hash_of(tensors)
            expert_id = self._new_id(manifest, expert, expert_id, digest, name)
            result, state_hash, state_file = self._fold(manifest, base, prev, tensors, name)
            tau_norms = [*manifest["tau_norms"], result.tau_norm]
            method = CONTINUAL_METHODS[manifest["method"]].target((), **manifest["params"])
            scale = method.scale(tau_norms, result.acc_norm)
            if not all(map(math.isfinite, (result.tau_norm, result.acc_norm, scale))):
                (self.path / state_file).unlink(missing_ok=True)
                raise ValidationError(f"{name}: ‖τ‖ = {result.tau_norm:g}, ‖acc‖ = "
                                      f"{result.acc_norm:g}, scale {scale:g} are not all "
                                      "finite (an overflow); nothing changed")  # fmt: skip
            record = {
                "id": expert_id, "hash": digest, "added_at": _now(),
                "step": len(tau_norms), "tau_norm": result.tau_norm,
                "merged_norm": scale * result.acc_norm,
                "lambda": _lambda(manifest["method"], scale),
                "source": name if isinstance(expert, (str, os.PathLike)) else None,
            }  # fmt: skip
            old_file = manifest["state_file"]
            manifest.update(
                generation=manifest["generation"] + 1, state_file=state_file,
                state_hash=state_hash, step=len(tau_norms), tau_norms=tau_norms,
                acc_norm=result.acc_norm, scale=scale, merged_norm=record["merged_norm"],
                experts=[*manifest["experts"], record], updated_at=record["added_at"],
            )  # fmt: skip
            manifest["lambda"] = record["lambda"]
            try:
                self._write_manifest(manifest)
            except CheckpointError:
                (self.path / state_file).unlink(missing_ok=True)
                raise
            if old_file:
                (self.path / old_file).unlink(missing_ok=True)
                fsync_dir(self.path)
            return record

    def _new_id(self, manifest, expert, expert_id, digest, name) -> str:
        for rec in manifest["experts"]:
            if rec["hash"] == digest:
                raise ValidationError(
                    f"{name}: already in the store as {rec['id']!r} (step {rec['step']}, "
                    f"sha256 {digest[:12]}); nothing changed"
                )
        taken = {rec["id"] for rec in manifest["experts"]}
        if expert_id is not None:
            if expert_id in taken:
                raise ValidationError(f"{name}: id {expert_id!r} is already used in the store")
            return expert_id
        if isinstance(expert, (str, os.PathLike)):
            stem = Path(expert).name.removesuffix(".safetensors") or "expert"
        else:
            stem = f"expert-{manifest['step'] + 1}"
        return stem if stem not in taken else f"{stem}-{digest[:8]}"

    def _fold(self, manifest, base: Checkpoint, prev: Checkpoint | None, expert: Tensors,
              name: str):  # fmt: skip
        """Write the next generation's accumulator; returns (StepResult, its hash, file name)."""
        merger = make_merger(
            manifest["method"], base, manifest["projectable"], **manifest["params"]
        )
        specs = {k: base.spec(k) for k in mergeable_keys(base.specs())}
        state_file = state_name(manifest["generation"] + 1)
        meta = {"format": FORMAT, "step": str(manifest["step"] + 1)}
        h = hashlib.sha256()
        with CheckpointWriter(self.path / state_file, specs, meta) as writer:

            def emit(key: str, tensor: torch.Tensor) -> None:
                update_hash(h, key, tensor)
                writer.write(key, tensor)

            result = fold_step(merger.method, manifest["step"] + 1, Source.of(base, "base"),
                               None if prev is None else prev.get, Source.of(expert, name),
                               emit)  # fmt: skip
        return result, h.hexdigest(), state_file

    # ------------------------------------------------------------------ reading the merge

    @contextlib.contextmanager
    def _opened(self) -> Iterator[tuple[dict, Checkpoint, Checkpoint | None]]:
        """(manifest, base, accumulator or None), both verified against the manifest's hashes;
        the caller holds the lock."""
        manifest = self._read_manifest()
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(open_checkpoint(self.path / BASE_FILE))
            acc = None
            if manifest["state_file"]:
                acc = stack.enter_context(open_checkpoint(self.path / manifest["state_file"]))
            self._verify(manifest, base, acc)
            yield manifest, base, acc

    @contextlib.contextmanager
    def _merged_items(self) -> Iterator[tuple[dict, dict[str, TensorSpec], Iterator]]:
        """(manifest, specs, iterator of (key, θ^(t)[key])) under a shared lock, key by key."""
        with self._lock(exclusive=False), self._opened() as (manifest, base, acc):
            scale = manifest["scale"]

            def items():
                for key in sorted(base.specs()):
                    theta0 = base.get(key)
                    has_acc = acc is not None and key in acc
                    yield key, theta0 + scale * acc.get(key) if has_acc else theta0

            yield manifest, base.specs(), items()

    def merged(self) -> StateDict:
        """θ^(t) in memory, in the base's dtypes."""
        with self._merged_items() as (_, _, items):
            return dict(items)

    def export(
        self, out: str | os.PathLike, dtype: torch.dtype | None = None,
        max_shard_bytes: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Write θ^(t) to ``out`` (streaming, atomic); floating keys cast to ``dtype`` if given."""
        check_output(out, {"continual store": self.path})
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        with self._merged_items() as (manifest, specs, items):
            meta = {"format": "pt", "fedmerge.format": "fedmerge-continual-merge",
                    "method": manifest["method"],
                    "step": str(manifest["step"]),
                    "experts": ",".join(r["id"] for r in manifest["experts"])}  # fmt: skip
            if dtype is not None:
                specs = {k: TensorSpec(dtype, s.shape) if s.dtype.is_floating_point else s
                         for k, s in specs.items()}  # fmt: skip
            with CheckpointWriter(out, specs, meta, **kwargs) as writer:
                for key, tensor in items:
                    writer.write(key, tensor.to(specs[key].dtype))
        if (self.path / HF_DIR).is_dir() and writes_directory(out):  # transformers loads it
            copy_model_files(self.path / HF_DIR, out)
        return manifest

    def export_adapter(
        self, out: str | os.PathLike, rank: int, svd: str = "exact"
    ) -> AdapterReport:
        """Write θ^(t) − θ_0 as a PEFT LoRA adapter of rank ≤ ``rank`` (Hugging Face bases)."""
        check_output(out, {"continual store": self.path})
        if not (self.path / HF_DIR).is_dir():
            raise ConfigError(
                f"{self.path}: an adapter needs a store made over an HF model directory"
            )
        with (
            self._merged_items() as (manifest, _, items),
            open_checkpoint(self.path / BASE_FILE) as base,
        ):
            meta = {
                "fedmerge.method": manifest["method"],
                "fedmerge.step": str(manifest["step"]),
            }
            source = manifest["base"]["source"]
            return write_adapter(out, base, items, self.path / HF_DIR, rank, svd, source, meta)


def _lambda(method: str, scale: float) -> float | None:
    """OPCM's λ_t = ‖S_t‖/mean‖τ_i‖ = 1/scale; other methods have no λ."""
    return (1.0 / scale if scale else None) if method == "opcm" else None
