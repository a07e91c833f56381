"""Direct (O_DIRECT) streaming writes: the same bytes as through the page cache whatever the
order and sizes of the writes, O_DIRECT really used where the file system takes it, every
refusal (the flag, an alignment, FEDMERGE_DIRECT_IO=0) falls back to the page cache, and
a disk error in the writer thread surfaces as a StorageError with nothing left behind."""

import errno
import fcntl
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge import directwrite
from fedmerge.atomic import TempFile
from fedmerge.checkpoint import load_state_dict, save_state_dict
from fedmerge.directwrite import DirectStream
from fedmerge.errors import StorageError

SMALL = 4 * directwrite.ALIGN  # a chunk of 16 KiB: many chunks in small tests


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(directwrite, "CHUNK", SMALL)
    monkeypatch.delenv(directwrite.ENV, raising=False)


def _direct_ok(path) -> bool:
    """Whether the file system under ``path`` takes O_DIRECT (tmpfs before Linux 6.6 does not)."""
    fd = os.open(path / ".probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return DirectStream.open(fd) is not None
    finally:
        os.close(fd)


def _write(path, writes, direct=True) -> bytes:
    tmp = TempFile(path, direct=direct)
    for offset, data in writes:
        tmp.write_at(data, offset)
    tmp.commit()
    return path.read_bytes()


def _expected(writes) -> bytes:
    out = bytearray()
    for offset, data in writes:
        out.extend(b"\0" * max(0, offset + len(data) - len(out)))
        out[offset : offset + len(data)] = data
    return bytes(out)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * SMALL), min_size=1, max_size=8),
    rewrite=st.one_of(st.none(), st.tuples(st.integers(0, 5 * SMALL), st.integers(1, 100))),
)
def test_any_sequence_of_writes_gives_the_same_bytes(tmp_path_factory, sizes, rewrite):
    """Appends of any length (across chunk borders, empty ones), then maybe one write out of
    order (as a header rewritten last): the file is what the writes say."""
    folder = tmp_path_factory.mktemp("w")
    writes, end = [], 0
    for i, n in enumerate(sizes):
        writes.append((end, bytes((i * 7 + j) % 251 for j in range(n))))
        end += n
    if rewrite:
        writes.append((rewrite[0], b"\xab" * rewrite[1]))
    assert _write(folder / "f", writes) == _expected(writes)


def test_odirect_is_used_where_the_file_system_takes_it(tmp_path, monkeypatch):
    if not _direct_ok(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    seen = []
    real = os.pwrite

    def spy(fd, data, offset):
        seen.append((bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT), len(data), offset))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    data = os.urandom(3 * SMALL + 100)
    assert _write(tmp_path / "f", [(0, data)]) == data
    # three full chunks with O_DIRECT at aligned offsets, the 100-byte tail through the cache
    assert seen == [(True, SMALL, 0), (True, SMALL, SMALL), (True, SMALL, 2 * SMALL),
                    (False, 100, 3 * SMALL)]  # fmt: skip


def _refused(fd, on):
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("how", ["flag refused", "env off", "alignment refused"])
def test_every_refusal_falls_back_to_the_page_cache(tmp_path, monkeypatch, how):
    data = os.urandom(5 * SMALL + 7)
    if how == "flag refused":
        monkeypatch.setattr(directwrite, "_set_direct", _refused)
    elif how == "env off":
        monkeypatch.setenv(directwrite.ENV, "0")
    else:  # O_DIRECT accepted, but every direct write fails as a misaligned one would
        real = os.pwrite

        def picky(fd, buf, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, buf, offset)

        monkeypatch.setattr(os, "pwrite", picky)
    assert _write(tmp_path / "f", [(0, data)]) == data
    if how != "alignment refused":
        fd = os.open(tmp_path / "g", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            assert DirectStream.open(fd) is None
        finally:
            os.close(fd)


def test_park_and_resume_continue_through_the_cache(tmp_path):
    tmp = TempFile(tmp_path / "f", direct=True)
    first, second = os.urandom(2 * SMALL + 10), os.urandom(SMALL + 3)
    tmp.write_at(first, 0)
    tmp.park()
    tmp.write_at(second, len(first))
    tmp.commit()
    assert (tmp_path / "f").read_bytes() == first + second


def test_disk_full_in_the_writer_thread_is_a_storage_error(tmp_path, monkeypatch):
    """ENOSPC on a chunk written by the thread: the checkpoint writer raises a StorageError
    naming the file, the old file stays, no temp file is left."""
    target = tmp_path / "m.safetensors"
    save_state_dict({"w": torch.zeros(4)}, target)

    def disk_full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(StorageError, match=r"m\.safetensors: cannot write \(No space left"):
        save_state_dict({"w": torch.arange(20 * SMALL, dtype=torch.float32)}, target)
    monkeypatch.undo()
    assert torch.equal(load_state_dict(target)["w"], torch.zeros(4))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_checkpoint_is_the_same_file_either_way(tmp_path, monkeypatch):
    state = {f"k{i}": torch.randn(3000 + 37 * i, dtype=torch.bfloat16) for i in range(12)}
    save_state_dict(state, tmp_path / "direct.safetensors")
    monkeypatch.setenv(directwrite.ENV, "0")
    save_state_dict(state, tmp_path / "cached.safetensors")
    direct = (tmp_path / "direct.safetensors").read_bytes()
    assert direct == (tmp_path / "cached.safetensors").read_bytes()
    assert len(direct) > 2 * SMALL
