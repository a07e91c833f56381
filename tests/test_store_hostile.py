"""The continual store against hostile inputs and conditions (issue 19 defects 6, 7, 9, 12):
overflowing task vectors, outputs aimed at the store, tampered manifests, read-only and
full disks, typos. Every refusal is a clear FedmergeError and leaves the store unchanged."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from fedmerge.checkpoint import save_state_dict
from fedmerge.cli import main
from fedmerge.continual import CONTINUAL_METHODS, make_merger
from fedmerge.continual.store import ContinualStore
from fedmerge.errors import CheckpointError, ConfigError, StorageError, ValidationError


def model(value: float, dtype=torch.float16) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((3, 2), value, dtype=dtype),
            "fc.bias": torch.full((3,), value, dtype=dtype)}  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}


def store_with_one(tmp_path: Path, method: str = "opcm") -> ContinualStore:
    base = model(0.0, torch.float32)
    base["fc.weight"] = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    store = ContinualStore.init(tmp_path / "s", base, method)
    store.add({k: v + 0.1 for k, v in base.items()}, "a")
    return store


# ----------------------------------------------------------------------------- defect 6


@pytest.mark.parametrize("method", sorted(CONTINUAL_METHODS))
def test_overflowing_task_vector_is_refused_store_untouched(tmp_path, method):
    """fp16 base −60000, expert +60000: both finite, τ = 120000 overflows fp16 to inf."""
    store = ContinualStore.init(tmp_path / "s", model(-60000.0), method)
    before = snapshot(tmp_path / "s")
    with pytest.raises(ValidationError, match=r"expert: 'fc\.\w+'.*overflow"):
        store.add(model(60000.0))
    assert snapshot(tmp_path / "s") == before
    merger = make_merger(method, model(-60000.0))
    with pytest.raises(ValidationError, match="overflow"):
        merger.add(model(60000.0))
    assert merger.step == 0 and merger.acc == {}


def test_accumulator_overflow_is_refused_on_the_step_that_overflows(tmp_path):
    """Task arithmetic sums τ in fp16: both τ fit, their sum does not (at step 2)."""
    store = ContinualStore.init(tmp_path / "s", model(0.0), "continual_task_arithmetic")
    store.add(model(40000.0), "a")
    before = snapshot(tmp_path / "s")
    with pytest.raises(ValidationError, match="overflow"):
        store.add(model(30000.0), "b")  # 40000 + 30000 > 65504
    assert snapshot(tmp_path / "s") == before
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["step"] == 1 and all(map(float.__eq__, manifest["tau_norms"],
                                             manifest["tau_norms"]))  # fmt: skip


# ----------------------------------------------------------------------------- defect 7


@pytest.mark.parametrize(
    "target",
    [
        "s/base.safetensors",
        "s",
        "s/sub/x.safetensors",
        "s/manifest.json",
        "s/state-000001.safetensors",
    ],
)
def test_export_into_the_store_is_refused(tmp_path, target):
    store_with_one(tmp_path)
    before = snapshot(tmp_path / "s")
    with pytest.raises(ConfigError, match="inside the continual store"):
        ContinualStore(tmp_path / "s").export(tmp_path / target)
    assert snapshot(tmp_path / "s") == before


def test_export_beside_the_store_still_works(tmp_path):
    store = store_with_one(tmp_path)
    store.export(tmp_path / "s-merged.safetensors")  # a prefix of the store name is not inside
    assert (tmp_path / "s-merged.safetensors").exists()


def test_export_through_a_symlink_into_the_store_is_refused(tmp_path):
    store_with_one(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "s")
    with pytest.raises(ConfigError, match="inside the continual store"):
        ContinualStore(tmp_path / "s").export(tmp_path / "link" / "base.safetensors")


def test_init_refuses_a_store_inside_or_over_its_base(tmp_path):
    base_dir = tmp_path / "base"
    save_state_dict(model(0.0), base_dir / "model.safetensors")
    for store in (base_dir, base_dir / "store", base_dir / "model.safetensors"):
        with pytest.raises(ConfigError, match="base"):
            ContinualStore.init(store, base_dir)
    assert sorted(os.listdir(base_dir)) == ["model.safetensors"]


# ----------------------------------------------------------------------------- defect 9


def tamper(tmp_path: Path, **changes) -> None:
    file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    file.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "state_file",
    [
        "../../elsewhere/x.safetensors",
        "/etc/passwd",
        "sub/state-000001.safetensors",
        "manifest.json",
    ],
)
def test_manifest_paths_are_confined_to_the_store(tmp_path, state_file):
    store = store_with_one(tmp_path)
    victim = tmp_path / "elsewhere" / "x.safetensors"
    save_state_dict(model(1.0, torch.float32), victim)
    tamper(tmp_path, state_file=state_file)
    for action in (store.manifest, store.merged, lambda: store.add(model(0.3, torch.float32))):
        with pytest.raises(CheckpointError, match="state_file"):
            action()
    assert victim.exists()


@pytest.mark.parametrize("field", ["step", "experts", "state_file", "scale", "method", "base"])
def test_missing_manifest_fields_are_clear_errors(tmp_path, field):
    store = store_with_one(tmp_path)
    tamper(tmp_path, **{field: None})
    with pytest.raises(CheckpointError, match=f"manifest.json: .*{field}"):
        store.manifest()


@pytest.mark.parametrize(
    "field,value",
    [
        ("step", "3"),
        ("scale", "NaN"),
        ("tau_norms", [1, "x"]),
        ("experts", [{"id": 1}]),
        ("generation", -1),
    ],
)
def test_wrongly_typed_manifest_fields_are_clear_errors(tmp_path, field, value):
    store = store_with_one(tmp_path)
    tamper(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        store.manifest()


@pytest.mark.parametrize("name", ["base.safetensors", "state-000001.safetensors"])
def test_bit_flips_in_base_or_state_are_detected_on_read(tmp_path, name):
    store = store_with_one(tmp_path)
    file = tmp_path / "s" / name
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}.*hash"):
        store.merged()
    with pytest.raises(CheckpointError, match="hash"):
        store.export(tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(CheckpointError, match="hash"):
        store.add(model(0.3, torch.float32))


# ----------------------------------------------------------------------------- defect 12


def test_a_read_only_store_can_be_read(tmp_path, monkeypatch):
    """Every open for writing inside the store fails as on a read-only mount (EROFS)."""
    store = store_with_one(tmp_path)
    expected = store.merged()
    real_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path / "s" and flags & writing:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert store.manifest()["step"] == 1
    assert all(torch.equal(expected[k], v) for k, v in store.merged().items())
    store.export(tmp_path / "out.safetensors")
    with pytest.raises(StorageError, match="Read-only file system"):
        store.add(model(0.3, torch.float32))


def test_read_lock_never_creates_anything(tmp_path, monkeypatch):
    store = store_with_one(tmp_path)
    (tmp_path / "s" / ".lock").unlink()
    flags_seen = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    store.merged()
    assert flags_seen and not any(f & os.O_CREAT for f in flags_seen)
    assert not (tmp_path / "s" / ".lock").exists()


def test_status_on_a_typo_creates_nothing(tmp_path, capsys):
    assert main(["continual", "status", str(tmp_path / "typo")]) == 2
    assert "not a continual store" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    for action in (
        ["export", str(tmp_path / "typo"), "-o", str(tmp_path / "o.safetensors")],
        ["add", str(tmp_path / "typo"), str(tmp_path / "e.safetensors")],
    ):
        assert main(["continual", *action]) == 2
    assert not (tmp_path / "typo").exists()


def test_init_on_a_file_is_a_clear_error(tmp_path, capsys):
    save_state_dict(model(0.0), tmp_path / "b.safetensors")
    (tmp_path / "afile").write_text("x")
    assert main(["continual", "init", str(tmp_path / "afile"),
                 "--base", str(tmp_path / "b.safetensors")]) == 2  # fmt: skip
    assert "afile: exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


def test_disk_full_during_add_is_a_clear_error_store_untouched(tmp_path, monkeypatch, capsys):
    store = store_with_one(tmp_path)
    expert = tmp_path / "e.safetensors"
    save_state_dict({k: v + 0.2 for k, v in store.merged().items()}, expert)
    before = snapshot(tmp_path / "s")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    rc = main(["continual", "add", str(tmp_path / "s"), str(expert)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "Traceback" not in err
    assert snapshot(tmp_path / "s") == before
