"""Where agents compute (``device`` in the config) and the one helper that moves tensors.

``device`` is ``cpu`` (the default: runs reproduce bit for bit on any machine), ``auto``
(CUDA when this process sees a GPU, else the CPU), ``cuda`` (a GPU, or a clear error) or
``cuda:N``. Under ``torchrun`` (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean the rank's
own GPU, ``cuda:LOCAL_RANK`` (round-robin when a host has fewer GPUs than ranks), which is
also the GPU NCCL sends from. :func:`resolve_device` turns the setting into a
``torch.device``; :func:`to_device` is the only way tensors change device in the round kit:
payloads leave an agent on the CPU and reach an agent on its device through it.

>>> resolve_device("cpu")
device(type='cpu')
>>> x = {"w": torch.ones(2)}
>>> to_device(x, "cpu")["w"] is x["w"]  # already there: no copy
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from fedmerge.config import DEVICE_CHECK
from fedmerge.errors import ConfigError

CPU = torch.device("cpu")


def resolve_device(name: str, env: Mapping[str, str] | None = None) -> torch.device:
    """The device a ``device`` setting means in this process (``env``: the environment,
    ``LOCAL_RANK`` under torchrun). A GPU asked for and not there is a ConfigError naming
    ``device``; ``auto`` falls back to the CPU."""
    env = os.environ if env is None else env
    if not DEVICE_CHECK[0](name):
        raise ConfigError(f"device: {DEVICE_CHECK[1]}, got {name!r}")
    if name == "cpu":
        return CPU
    available = torch.cuda.is_available()
    if not available:
        if name == "auto":
            return CPU
        raise ConfigError(f"device: {name!r} asks for CUDA, but torch sees no GPU here "
                          f"(torch {torch.__version__}; use device: auto or cpu)")  # fmt: skip
    count = torch.cuda.device_count()
    if name.startswith("cuda:"):
        index = int(name.removeprefix("cuda:"))
        if index >= count:
            raise ConfigError(f"device: {name!r}, but this host has {count} GPU(s)")
        return torch.device("cuda", index)
    local = env.get("LOCAL_RANK")
    return torch.device("cuda", int(local) % count if local is not None else 0)


def to_device(
    tensors: Mapping[str, torch.Tensor], device: torch.device | str, copy: bool = False
) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device`` (the same tensors where they already are, unless ``copy``):
    the device boundary of payloads, checkpoints and codecs."""
    return {k: v.to(device, copy=copy) for k, v in tensors.items()}
