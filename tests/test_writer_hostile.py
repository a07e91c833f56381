"""Checkpoint outputs against their own arguments and the file system (issue 19 defects 7,
10, 12): outputs inside inputs are refused, stale shards never outlive a rewrite, thousands
of shards need one descriptor, and a failure leaves no temp file."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest
import torch

from fedmerge.checkpoint import (
    INDEX_NAME,
    CheckpointWriter,
    TensorSpec,
    check_output,
    load_state_dict,
    save_state_dict,
)
from fedmerge.cli import main
from fedmerge.errors import ConfigError, StorageError


def state(n: int, value: float = 1.0) -> dict[str, torch.Tensor]:
    return {f"k{i:04d}": torch.full((2,), value + i) for i in range(n)}


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- defect 10


def test_many_shards_need_one_descriptor(tmp_path):
    open_now = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else 32
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 12, hard))
    try:
        save_state_dict(state(400), tmp_path / "m", max_shard_bytes=1)  # 400 shards
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(names(tmp_path / "m")) == 401 and same(load_state_dict(tmp_path / "m"), state(400))


def test_out_of_order_writes_reopen_shards(tmp_path):
    sd = state(7)
    specs = {k: TensorSpec.of(v) for k, v in sd.items()}
    with CheckpointWriter(tmp_path / "m", specs, max_shard_bytes=16) as w:
        for key in reversed(sorted(sd)):
            w.write(key, sd[key])
    assert same(load_state_dict(tmp_path / "m"), sd)


def test_a_failure_midway_leaves_no_temp_file(tmp_path):
    sd = state(300)
    specs = {k: TensorSpec.of(v) for k, v in sd.items()}
    writer = CheckpointWriter(tmp_path / "m", specs, max_shard_bytes=1)
    with pytest.raises(RuntimeError), writer as w:
        for i, key in enumerate(sorted(sd)):
            if i == 150:
                raise RuntimeError("crash")
            w.write(key, sd[key])
    assert names(tmp_path / "m") == []


def test_disk_full_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    save_state_dict(state(3, 5.0), tmp_path / "m", max_shard_bytes=8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    calls = []

    def fill_up(fd, data, offset):
        calls.append(offset)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", fill_up)
    with pytest.raises(StorageError, match="No space left on device"):
        save_state_dict(state(40), tmp_path / "m", max_shard_bytes=8)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


# ----------------------------------------------------------------------------- defect 7


@pytest.mark.parametrize("first,second", [(1, 10**9), (8, 10**9), (24, 8), (10**9, 8), (8, 8)])
def test_rewriting_a_directory_leaves_exactly_the_new_checkpoint(tmp_path, first, second):
    save_state_dict(state(6, 1.0), tmp_path / "m", max_shard_bytes=first)
    new = state(3, 9.0)
    save_state_dict(new, tmp_path / "m", max_shard_bytes=second)
    assert same(load_state_dict(tmp_path / "m"), new)
    expected = (
        ["model.safetensors"]
        if second > 100
        else [INDEX_NAME, *[f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]]
    )
    assert names(tmp_path / "m") == sorted(expected)


def test_rewriting_a_sharded_file_name_removes_its_old_shards(tmp_path):
    out = tmp_path / "x.safetensors"
    save_state_dict(state(6), out, max_shard_bytes=8)
    (tmp_path / "keep.safetensors").write_bytes(b"not ours")
    save_state_dict(state(2, 7.0), out)
    assert names(tmp_path) == ["keep.safetensors", "x.safetensors"]
    save_state_dict(state(4, 3.0), out, max_shard_bytes=8)  # single -> sharded: no stale single
    assert same(load_state_dict(out), state(4, 3.0))
    assert "x.safetensors" not in names(tmp_path)


@pytest.mark.parametrize("out", ["DIR/model.safetensors", "DIR", "DIR/sub/m.safetensors"])
def test_merge_into_its_base_directory_is_refused(tmp_path, capsys, out):
    base, expert = tmp_path / "DIR", tmp_path / "e.safetensors"
    save_state_dict(state(3), base / "model.safetensors")
    save_state_dict(state(3, 2.0), expert)
    before = (base / "model.safetensors").read_bytes()
    rc = main(["merge", "average", "--base", str(base), str(expert), "-o", str(tmp_path / out)])
    assert rc == 2 and "inside the base" in capsys.readouterr().err
    assert (base / "model.safetensors").read_bytes() == before
    assert names(base) == ["model.safetensors"]


def test_outputs_that_would_replace_an_input_are_refused(tmp_path):
    (tmp_path / "o").mkdir()
    save_state_dict(state(2), tmp_path / "o" / "model.safetensors")
    shard = tmp_path / "x-00001-of-00002.safetensors"
    save_state_dict(state(2), shard)
    with pytest.raises(
        ConfigError, match=r"overwrite an input \(.*model.safetensors, part of the expert"
    ):
        check_output(tmp_path / "o", {"expert": tmp_path / "o" / "model.safetensors"})
    with pytest.raises(ConfigError, match="part of the base"):
        check_output(tmp_path / "x.safetensors", {"base": shard})
    check_output(tmp_path / "o2", {"base": tmp_path / "o"})  # a sibling is fine
    check_output(tmp_path / "o" / "sub", {"base": shard})
