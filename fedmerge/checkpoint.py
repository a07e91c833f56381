"""Safetensors checkpoints on disk: lazy reading and streaming, atomic writing.

A checkpoint is a single ``.safetensors`` file or a Hugging Face sharded
checkpoint (``model.safetensors.index.json`` + shards). Reading is lazy: the
files are memory-mapped and a tensor is materialized only when asked for, so a
merge holds one key of every input at a time. Writing streams key by key into
pre-planned files (header first, then each tensor at its offset), so the
output never has to fit in memory either; files appear atomically.

Never pickle: only the safetensors format is read or written here.

>>> import torch, tempfile, os
>>> d = tempfile.mkdtemp()
>>> save_state_dict({"w": torch.ones(2, 3)}, os.path.join(d, "m.safetensors"), {"who": "me"})
>>> with open_checkpoint(os.path.join(d, "m.safetensors")) as ck:
...     ck.shape("w"), ck.metadata["who"], float(ck.get("w").sum())
((2, 3), 'me', 6.0)
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fedmerge.atomic import TempFile, atomic_write_text, fsync_dir, storage_errors
from fedmerge.errors import CheckpointError, ConfigError, ValidationError
from fedmerge.stheader import MAX_HEADER_BYTES, read_file_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 1024**3  # like Hugging Face's default max_shard_size ("5GB" is close)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


def dtype_from_name(name: str) -> torch.dtype:
    """Parse ``float32`` / ``bfloat16`` / ``F32`` ... into a torch dtype."""
    aliases = {
        "float64": "F64", "double": "F64", "fp64": "F64",
        "float32": "F32", "float": "F32", "fp32": "F32",
        "float16": "F16", "half": "F16", "fp16": "F16",
        "bfloat16": "BF16", "bf16": "BF16",
    }  # fmt: skip
    key = aliases.get(name.lower(), name.upper())
    if key not in DTYPES:
        raise ValidationError(f"unknown dtype {name!r}; expected one of {sorted(aliases)}")
    return DTYPES[key]


# ----------------------------------------------------------------------------- reading


class Checkpoint:
    """Read-only, lazy view of a safetensors checkpoint (single file or sharded).

    ``get(key)`` returns a fresh tensor of shape ``shape(key)``; nothing else is
    loaded. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._files = resolve_files(self.path)  # key -> shard file
        self._handles: dict[Path, object] = {}
        self._rows: tuple[str | None, torch.Tensor | None] = (None, None)  # get_rows' last key
        self._specs: dict[str, TensorSpec] = {}
        meta: dict[str, str] = {}
        for file in dict.fromkeys(self._files.values()):
            handle = self._handle(file)
            meta.update(handle.metadata() or {})
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                if self._files.get(key) == file:
                    sl = handle.get_slice(key)
                    self._specs[key] = TensorSpec(
                        _parse_dtype(sl.get_dtype(), file, key), tuple(sl.get_shape())
                    )
        missing = [k for k in self._files if k not in self._specs]
        if missing:
            raise CheckpointError(f"{self.path}: index lists {missing[0]!r} but its shard lacks it")
        self.metadata: dict[str, str] = meta

    def _handle(self, file: Path):
        if file not in self._handles:
            read_file_header(file)  # bounded, strict checks before safetensors maps the file
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: no such file") from None
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._specs[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._specs[key].dtype

    def get(self, key: str) -> torch.Tensor:
        if key not in self._specs:
            raise ValidationError(f"{self.path}: no tensor named {key!r}")
        file = self._files[key]
        try:
            return self._handle(file).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({exc})") from None

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``key`` along dim 0, reading only their bytes."""
        if key not in self._specs:
            raise ValidationError(f"{self.path}: no tensor named {key!r}")
        if not self._specs[key].shape:
            raise ValidationError(f"{self.path}: {key!r} is 0-D and has no rows")
        if self._rows[0] != key:  # the key's mapped view, sliced per block: no copy, and
            self._rows = (key, self.get(key))  # 2 µs a block instead of safetensors' 20
        return self._rows[1][start:stop]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)

    def load(self) -> dict[str, torch.Tensor]:
        """Materialize every tensor (small models only)."""
        return dict(self.items())

    def close(self) -> None:
        self._handles.clear()
        self._rows = (None, None)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


def _parse_dtype(name: str, file: Path, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {name}")
    return DTYPES[name]


def resolve_files(path: Path) -> dict[str, Path]:
    """Map every key of the checkpoint at ``path`` to the file that holds it.

    ``path`` may be a ``.safetensors`` file, an ``*.index.json`` file, a file
    name whose ``.index.json`` sibling exists, or a directory holding either.
    """
    if path.is_dir():
        for name in (INDEX_NAME, SINGLE_NAME):
            if (path / name).exists():
                return resolve_files(path / name)
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path}: directory has no {INDEX_NAME} and {len(found)} .safetensors files"
            )
        return resolve_files(found[0])
    if path.name.endswith(".json"):
        return _read_index(path)
    if not path.exists() and Path(f"{path}.index.json").exists():
        return _read_index(Path(f"{path}.index.json"))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    return dict.fromkeys(read_file_header(path).tensors, path)


def _read_index(index: Path) -> dict[str, Path]:
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{index}: larger than {MAX_HEADER_BYTES} bytes")
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"{index}: no such file") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object")
    files = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise CheckpointError(f"{index}: bad shard name {name!r} for {key!r}")
        files[key] = index.parent / name
    return files


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily (see :class:`Checkpoint`). Experts that open over a base
    (LoRA adapters, compressed files) go through :func:`fedmerge.codecs.expert.open_expert`."""
    return Checkpoint(path)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory."""
    with open_checkpoint(path) as ck:
        return ck.load()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings stored in a checkpoint's header(s)."""
    with open_checkpoint(path) as ck:
        return dict(ck.metadata)


# ----------------------------------------------------------------------------- writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``tensor`` in row-major order (no copy if contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict]:
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValidationError(f"metadata values must be strings; {bad[0]!r} is not")
        header["__metadata__"] = dict(metadata)
    offsets, pos = {}, 0
    for key in sorted(specs):
        spec = specs[key]
        header[key] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + spec.nbytes],
        }
        offsets[key] = pos
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Split keys (sorted) into consecutive groups of at most ``max_shard_bytes`` each."""
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(specs):
        n = specs[key].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def output_layout(path: str | os.PathLike) -> tuple[Path, re.Pattern[str]]:
    """(folder, pattern of the file names a checkpoint written to ``path`` owns there).

    ``x.safetensors`` owns ``x.safetensors``, ``x.safetensors.index.json`` and
    ``x-NNNNN-of-NNNNN.safetensors``; a directory owns the same names with stem ``model``."""
    path = Path(path)
    folder, stem = (path.parent, path.stem) if path.suffix == ".safetensors" else (path, "model")
    return folder, re.compile(
        rf"{re.escape(stem)}(\.safetensors(\.index\.json)?|-\d{{5}}-of-\d{{5}}\.safetensors)"
    )


def check_output(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> None:
    """Refuse (:class:`ConfigError`) an output that is, lies inside, or would overwrite or
    clean away one of ``inputs`` (name -> file or directory), symlinks resolved."""
    folder, owned = output_layout(out)
    target, folder = Path(out).resolve(), folder.resolve()
    for what, path in inputs.items():
        source = Path(path).resolve()
        if target == source or source in target.parents:
            raise ConfigError(
                f"{out}: output would overwrite an input (it is or lies inside the {what} {path})"
            )
        files = sorted(source.iterdir()) if source.is_dir() else [source]
        hit = [f for f in files if f.parent == folder and owned.fullmatch(f.name)]
        if hit:
            raise ConfigError(
                f"{out}: output would overwrite an input ({hit[0]}, part of the {what} {path})"
            )


class CheckpointWriter:
    """Write a checkpoint key by key, in any order, in bounded memory.

    The keys, dtypes and shapes are declared up front so that every header and
    offset is known; :meth:`write` puts one tensor in place. On a clean exit
    from the ``with`` block all files appear at once (temp + fsync + rename,
    index last); on an error nothing is left behind.

    ``path`` ending in ``.safetensors`` is a file (split into
    ``stem-0000i-of-0000n.safetensors`` + ``path.index.json`` when larger than
    ``max_shard_bytes``); any other path is a Hugging Face style directory.

    One shard file is open at a time (writing keys in sorted order opens each once), so
    thousands of shards need one descriptor; written in sorted order, a shard streams to
    disk past the page cache (:mod:`fedmerge.directwrite`). Files the previous checkpoint
    at ``path`` owned (:func:`output_layout`) and the new one does not are removed on commit: a
    reader sees the old checkpoint, the new one, or (while an old index is replaced) a
    clear error, never a mix of the two.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.path = Path(path)
        self.specs = dict(specs)
        self.metadata = dict(metadata or {})
        groups = plan_shards(self.specs, max_shard_bytes)
        self.files = self._file_names(len(groups))
        self._where: dict[str, tuple[int, int]] = {}  # key -> (shard, absolute offset)
        self._headers: list[bytes] = []
        for i, group in enumerate(groups):
            head, offsets = _header({k: self.specs[k] for k in group}, self.metadata)
            self._headers.append(head)
            for key in group:
                self._where[key] = (i, len(head) + offsets[key])
        self._written: set[str] = set()
        self._tmp: list[TempFile | None] = [None] * len(self.files)
        self._open: int | None = None  # the one shard whose descriptor is open

    def _file_names(self, n: int) -> list[Path]:
        is_file = self.path.suffix == ".safetensors"
        folder, stem = (self.path.parent, self.path.stem) if is_file else (self.path, "model")
        if n == 1:
            return [self.path if is_file else folder / SINGLE_NAME]
        return [folder / f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def index_path(self) -> Path | None:
        if len(self.files) == 1:
            return None
        if self.path.suffix == ".safetensors":
            return Path(f"{self.path}.index.json")
        return self.path / INDEX_NAME

    def __enter__(self) -> CheckpointWriter:
        if self.path.suffix == ".safetensors" and self.path.is_dir():
            raise ConfigError(f"{self.path}: is a directory; give a file name or a directory")
        with storage_errors(self.files[0].parent):
            self.files[0].parent.mkdir(parents=True, exist_ok=True)
        return self

    def _shard(self, i: int) -> TempFile:
        """Shard ``i``'s temp file, the only one open (created with its header on first use)."""
        if self._open is not None and self._open != i:
            self._tmp[self._open].park()
        self._open = i
        if self._tmp[i] is None:
            self._tmp[i] = TempFile(self.files[i], direct=True)
            self._tmp[i].write_at(self._headers[i], 0)
        return self._tmp[i]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` (must match the declared spec) at its place."""
        spec = self.specs.get(key)
        if spec is None:
            raise ValidationError(f"{self.path}: key {key!r} was not declared")
        if TensorSpec.of(tensor) != spec:
            raise ValidationError(
                f"{self.path}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"declared {spec.dtype} {spec.shape}"
            )
        shard, offset = self._where[key]
        with storage_errors(self.files[shard]):
            self._shard(shard).write_at(tensor_bytes(tensor), offset)
        self._written.add(key)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                missing = sorted(set(self.specs) - self._written)
                if missing:
                    raise ValidationError(f"{self.path}: {missing[0]!r} was never written")
                with storage_errors(self.path):
                    self._commit()
        finally:
            for tmp in self._tmp:
                if tmp is not None:
                    tmp.discard()  # after a commit: already renamed, nothing to remove

    def _commit(self) -> None:
        """Rename the shards in, write the index, then remove what the old checkpoint owned."""
        folder, owned = output_layout(self.path)
        old = {p for p in folder.iterdir() if owned.fullmatch(p.name)}
        new = {*self.files, *([self.index_path] if self.index_path else [])}
        if self.index_path is not None and self.index_path in old:
            self.index_path.unlink()  # its shards are about to be replaced: no reader mixes
        for tmp in self._tmp:
            tmp.commit()
        self._open = None
        if self.index_path is not None:
            total = sum(s.nbytes for s in self.specs.values())
            weight_map = {k: self.files[self._where[k][0]].name for k in sorted(self.specs)}
            index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
            atomic_write_text(self.index_path, json.dumps(index, indent=2))
        for stale in sorted(old - new, key=lambda p: not p.name.endswith(".json")):
            stale.unlink(missing_ok=True)  # the old index first, then the files it named
        fsync_dir(folder)


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write ``state`` atomically as a safetensors checkpoint (see :class:`CheckpointWriter`)."""
    specs = {k: TensorSpec.of(v) for k, v in state.items()}
    with CheckpointWriter(path, specs, metadata, max_shard_bytes) as writer:
        for key in sorted(state):  # the file's order: written front to back
            writer.write(key, state[key])
