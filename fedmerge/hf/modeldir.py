"""Hugging Face model directories: recognise one, carry its non-weight files, know its layers.

A model directory holds ``config.json`` and the weights (``model.safetensors`` or
shards + ``model.safetensors.index.json``), usually with tokenizer, processor and
generation files. A merge written as a directory next to a copy of those files
is what ``transformers.AutoModel*.from_pretrained(DIR)`` loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmerge.atomic import atomic_write_bytes
from fedmerge.errors import ConfigError

CONFIG = "config.json"
# weights (any format) and indexes are never copied: the merge writes its own
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx", ".index.json")  # fmt: skip
MAX_FILE_BYTES = 1 << 30


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory with a ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def writes_directory(out: str | os.PathLike) -> bool:
    """True if a checkpoint written to ``out`` is a directory (not a ``.safetensors`` file)."""
    return Path(out).suffix != ".safetensors"


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The top-level files of ``folder`` to carry into an output: config, tokenizer, processor,
    generation config, chat template, README...; not weights, indexes, adapters or hidden files."""
    out = []
    for f in sorted(Path(folder).iterdir()):
        name = f.name
        if name.startswith(".") or name.startswith("adapter_") or not f.is_file():
            continue
        if not name.endswith(WEIGHT_SUFFIXES):
            out.append(f)
    return out


def copy_model_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy :func:`model_files` of ``src`` into ``dst``, each atomically; returns the copies."""
    copied = []
    for f in model_files(src):
        if f.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{f}: larger than {MAX_FILE_BYTES} bytes; not a config file")
        target = Path(dst) / f.name
        atomic_write_bytes(target, f.read_bytes())
        copied.append(target)
    return copied


def module_kinds(model_dir: str | os.PathLike) -> dict[str, str]:
    """Module name -> ``linear`` | ``conv1d`` | ``embedding`` | ``other`` of the model class
    named in ``config.json`` (built on the meta device: no memory, no weights read)."""
    import torch
    import transformers as tf
    from transformers.pytorch_utils import Conv1D

    try:
        config = tf.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir}: cannot read the model config ({exc})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    with torch.device("meta"):
        model = cls._from_config(config) if cls is not None else tf.AutoModel.from_config(config)
    kinds = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(m, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(m, torch.nn.Embedding):
            kinds[name] = "embedding"
        else:
            kinds[name] = "other"
    return kinds
