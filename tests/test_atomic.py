"""Atomic writes: all or nothing, ordinary file mode, unpredictable temp names that are never
followed through a planted symlink, file-system failures as clear errors."""

import errno
import os
import stat

import pytest

from fedmerge import atomic
from fedmerge.atomic import TempFile, atomic_write_text
from fedmerge.errors import StorageError


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(StorageError, match=r"state\.json: cannot write \(No space left on device"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_temp_names_are_unpredictable(tmp_path):
    names = {TempFile(tmp_path / "f").path.name for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(".f.") and n.endswith(".tmp") and str(os.getpid()) not in n
               for n in names)  # fmt: skip


def test_a_planted_symlink_is_never_followed(tmp_path, monkeypatch):
    """Even a guessed name is opened O_EXCL|O_NOFOLLOW: the victim is never written."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".f.guessed.tmp").symlink_to(victim)
    with pytest.raises(StorageError, match="File exists"):
        atomic_write_text(tmp_path / "f", "attack")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "f").exists()
