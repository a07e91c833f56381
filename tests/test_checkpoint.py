"""Safetensors reading/writing: round trips, sharding, metadata, bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge import (
    CheckpointError,
    CheckpointWriter,
    TensorSpec,
    ValidationError,
    load_state_dict,
    open_checkpoint,
    read_metadata,
    save_state_dict,
    state_hash,
)


def sample_state():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(5),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2),
    }


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k], b[k]), k


def test_roundtrip_single_file_readable_by_safetensors(tmp_path):
    state = sample_state()
    path = tmp_path / "m.safetensors"
    save_state_dict(state, path, {"sender": "3"})
    assert_same(load_state_dict(path), state)
    assert_same(load_file(str(path)), state)  # the reference reader agrees
    assert read_metadata(path) == {"sender": "3"}


def test_reads_files_written_by_safetensors(tmp_path):
    state = sample_state()
    save_file(state, str(tmp_path / "ref.safetensors"), metadata={"x": "y"})
    with open_checkpoint(tmp_path / "ref.safetensors") as ck:
        assert ck.metadata == {"x": "y"}
        assert ck.shape("a.weight") == (4, 3) and ck.dtype("a.bias") == torch.bfloat16
        assert_same(ck.load(), state)


def test_sharded_roundtrip_file_and_directory(tmp_path):
    state = sample_state()
    save_state_dict(state, tmp_path / "x.safetensors", {"m": "1"}, max_shard_bytes=40)
    index = json.loads((tmp_path / "x.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(name.startswith("x-0000") for name in shards)
    assert_same(load_state_dict(tmp_path / "x.safetensors"), state)
    assert_same(load_state_dict(tmp_path / "x.safetensors.index.json"), state)

    save_state_dict(state, tmp_path / "hf", max_shard_bytes=40)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert_same(load_state_dict(tmp_path / "hf"), state)
    assert state_hash(load_state_dict(tmp_path / "hf")) == state_hash(state)


def test_writer_any_order_and_rejects_bad_writes(tmp_path):
    specs = {"b": TensorSpec(torch.float32, (2,)), "a": TensorSpec(torch.float32, (3,))}
    with CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
        w.write("b", torch.tensor([1.0, 2.0]))
        w.write("a", torch.tensor([3.0, 4.0, 5.0]))
    out = load_file(str(tmp_path / "o.safetensors"))
    assert out["a"].tolist() == [3, 4, 5] and out["b"].tolist() == [1, 2]

    with pytest.raises(ValidationError, match="'a'"), CheckpointWriter(
        tmp_path / "p.safetensors", specs
    ) as w:
        w.write("a", torch.zeros(4))
    with pytest.raises(ValidationError, match="never written"), CheckpointWriter(
        tmp_path / "q.safetensors", specs
    ) as w:
        w.write("a", torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]  # nothing partial


def test_truncated_and_garbage_files_are_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_state_dict(sample_state(), path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 7])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01garbage")
    for name in ["cut.safetensors", "junk.safetensors", "missing.safetensors"]:
        with pytest.raises(CheckpointError, match=name):
            load_state_dict(tmp_path / name)


def test_bad_index_is_clear_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../evil"}}')
    with pytest.raises(CheckpointError, match="bad shard name"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("not json")
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(tmp_path)
