"""Crash-safe file writes: write to a temp file beside the target, fsync, rename.

A reader (or a process restarted after SIGKILL) sees either the old file or the
new one, never a partial write. Temp files are named ``.NAME.<16 random hex>.tmp``
and created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a name planted in advance (a
symlink to a file elsewhere) can neither be guessed nor followed. A temp file is
reopened (``O_NOFOLLOW``, never ``O_CREAT``) only to resume writing, so a writer of
many files holds one descriptor at a time. Failures of the file system (disk full,
read-only, permission denied) are :class:`~fedmerge.errors.StorageError` naming the
file, and the temp file is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from fedmerge.directwrite import DirectStream, write_all
from fedmerge.errors import StorageError

TEMP_SUFFIX = ".tmp"
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RESUME = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` (ENOSPC, EROFS, EACCES, EMFILE ...) into a StorageError naming
    ``path``."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{path}: cannot write ({exc.strerror or exc})") from exc


class TempFile:
    """A new temp file beside ``target`` (mode 0666 & ~umask) that replaces it on :meth:`commit`.

    :meth:`write_at` opens it on demand, :meth:`park` flushes and closes it (so that many
    temp files need one descriptor at a time), :meth:`discard` removes it. ``direct``: a
    file written front to back from offset 0 goes to disk through a
    :class:`~fedmerge.directwrite.DirectStream` (``O_DIRECT``, not through the page cache)
    until the first write out of order or the first :meth:`park`; then through the cache.
    """

    def __init__(self, target: str | os.PathLike, direct: bool = False):
        self.target = Path(target)
        name = f".{self.target.name}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
        self.path = self.target.with_name(name)
        self._fd: int | None = os.open(self.path, _NEW, 0o666)
        self._stream = DirectStream.open(self._fd) if direct else None

    def write_at(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at byte ``offset`` (positional; no seek state)."""
        if self._fd is None:
            self._fd = os.open(self.path, _RESUME)
        view = memoryview(data).cast("B")
        if self._stream is not None and offset == self._stream.end:
            self._stream.append(view)
            return
        self._end_stream()
        write_all(self._fd, view, offset)

    def _end_stream(self, flush: bool = True) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close(flush)

    def park(self) -> None:
        """fsync and close (reopened by the next :meth:`write_at`)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._end_stream()
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self) -> None:
        """fsync, close and rename over the target (the directory is not fsynced here)."""
        self.park()
        os.replace(self.path, self.target)

    def discard(self) -> None:
        """Close without syncing and remove the temp file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._end_stream(flush=False)
            finally:
                os.close(fd)
        self.path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (StorageError on a file-system failure)."""
    target = Path(path)
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = TempFile(target)
        try:
            tmp.write_at(data, 0)
            tmp.commit()
        except BaseException:
            tmp.discard()
            raise
        fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
