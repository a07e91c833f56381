"""Node-local sources: one node's own data, starting checkpoint and state directory.

In a real deployment a node holds data no other node has. It is started with the run
config (the shared settings: topology, protocol, codec, rounds, seed, model architecture)
and a **node file** naming what is its own::

    node: 1                            # its node id in the topology
    data: data.safetensors             # train_x (n, *in_shape), train_y (n,) int64
    checkpoint: start.safetensors      # optional: its model at round 0
    eval: public-test.safetensors      # optional: a public test set (test_x, test_y)
    state_dir: state                   # optional: where its agent state is saved
    device: cuda:1                     # optional: where it computes (overrides the run's device)

Relative paths are resolved against the node file's directory. A samples file holds the
tensor pairs ``train_x``/``train_y`` and/or ``test_x``/``test_y`` (``x``: (n, *in_shape)
float, ``y``: (n,) int64) and the header metadata ``num_classes``. Such a node opens only
the files its node file names; :func:`~fedmerge.decentralized.nodedirs.export_split` writes
one directory per node from a simulated split (to check a deployment against the simulator).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmerge.checkpoint import open_checkpoint, save_state_dict
from fedmerge.config import DEVICE_CHECK
from fedmerge.data.partition import AgentData, FederatedData
from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.statedict import StateDict
from fedmerge.yamlio import read_mapping

NODE_FILE_ENV = "FEDMERGE_NODE_FILE"
"""The node file of a torch.distributed worker; ``{rank}`` and ``{local_rank}`` are filled in."""
_PATHS = ("data", "checkpoint", "eval", "state_dir")


@dataclass(frozen=True)
class NodeSources:
    """What one node owns: its id, its samples file, and optionally its starting checkpoint,
    a public evaluation set and its state directory (absolute paths)."""

    node: int
    data: Path
    checkpoint: Path | None = None
    eval: Path | None = None
    state_dir: Path | None = None
    device: str | None = None  # the node's own ``device`` setting (e.g. its GPU on a shared host)


def read_node_file(path: str | os.PathLike) -> NodeSources:
    """The :class:`NodeSources` in node file ``path`` (ConfigError naming the file and field)."""
    raw = read_mapping(path, "node file")
    unknown = set(raw) - {"node", "device", *_PATHS}
    if unknown:
        raise ConfigError(f"node file {path}: unknown field(s) {sorted(unknown)}; "
                          f"expected node, device, {', '.join(_PATHS)}")  # fmt: skip
    node = raw.get("node")
    if not isinstance(node, int) or isinstance(node, bool) or node < 0:
        raise ConfigError(f"node file {path}: 'node' must be a node id ≥ 0, got {node!r}")
    if not isinstance(raw.get("data"), str):
        raise ConfigError(f"node file {path}: 'data' (the node's samples file) is required")
    base = Path(path).resolve().parent
    paths = {}
    for key in _PATHS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"node file {path}: {key!r} must be a path, got {value!r}")
        paths[key] = None if value is None else base / value
    device = raw.get("device")
    if device is not None and not (isinstance(device, str) and DEVICE_CHECK[0](device)):
        raise ConfigError(f"node file {path}: 'device': {DEVICE_CHECK[1]}, got {device!r}")
    return NodeSources(node, **paths, device=device)


def node_file_for(template: str, rank: int, local_rank: int) -> str:
    """``template`` with ``{rank}`` and ``{local_rank}`` filled in (one file per worker)."""
    try:
        return template.format(rank=rank, local_rank=local_rank)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"node file {template!r}: only {{rank}} and {{local_rank}} may be "
                          f"filled in ({exc})") from None  # fmt: skip


def load_samples(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x (n, *in_shape) float32, y (n,) int64, num_classes) of ``split`` (train or test)
    in samples file ``path``; CheckpointError naming the file and key otherwise."""
    with open_checkpoint(path) as ck:
        keys, meta = set(ck.keys()), dict(ck.metadata)
        if not {f"{split}_x", f"{split}_y"} <= keys:
            raise CheckpointError(f"{path}: needs tensors {split}_x and {split}_y")
        x, y = ck.get(f"{split}_x"), ck.get(f"{split}_y")
    try:
        classes = int(meta["num_classes"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: header metadata 'num_classes' missing or bad") from None
    if y.dtype != torch.int64 or y.dim() != 1 or x.dim() < 2 or len(x) != len(y):
        raise CheckpointError(f"{path}: {split}_y must be int64 (n,) beside {split}_x (n, ...), "
                              f"got {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")  # fmt: skip
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise CheckpointError(f"{path}: {split}_x must be finite floats")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise CheckpointError(f"{path}: {split}_y has labels outside 0..{classes - 1}")
    return x.float(), y, classes


def node_data(node: NodeSources, n: int) -> FederatedData:
    """A federation as node ``node.node`` sees it: its own samples at its index, nothing at
    the other nodes' indices, and the public evaluation set (if any) as the global test."""
    train_x, train_y, classes = load_samples(node.data, "train")
    empty_x, empty_y = train_x[:0], train_y[:0]
    with open_checkpoint(node.data) as ck:
        has_test = "test_x" in set(ck.keys())
    test_x, test_y, _ = load_samples(node.data, "test") if has_test else (empty_x, empty_y, 0)
    own = AgentData(train_x, train_y, test_x, test_y)
    if not 0 <= node.node < n:
        raise ConfigError(f"node file: node {node.node} is not a node of this {n}-node topology")
    gx, gy = empty_x, empty_y
    if node.eval is not None:
        gx, gy, eval_classes = load_samples(node.eval, "test")
        if eval_classes != classes or gx.shape[1:] != train_x.shape[1:]:
            raise CheckpointError(f"{node.eval}: classes or sample shape differ from {node.data}")
    nobody = AgentData(empty_x, empty_y, empty_x, empty_y)
    agents = [own if i == node.node else nobody for i in range(n)]
    return FederatedData(agents, gx, gy, classes, tuple(train_x.shape[1:]))


def load_start(path: Path, own: StateDict) -> StateDict:
    """The starting checkpoint ``path``, checked against the model's keys, shapes, dtypes."""
    with open_checkpoint(path) as ck:
        state = ck.load()
    want = {k: (v.dtype, tuple(v.shape)) for k, v in own.items()}
    got = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    if got != want:
        diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise CheckpointError(f"{path}: does not fit the configured model (first: {diff[:3]})")
    return state


def write_samples(path: Path, data: AgentData, num_classes: int, splits=("train", "test")) -> None:
    """Write ``splits`` of ``data`` as a samples file (atomically)."""
    tensors = {f"{s}_{v}": getattr(data, f"{s}_{v}").contiguous() for s in splits for v in "xy"}
    save_state_dict(tensors, path, {"num_classes": str(num_classes)})
