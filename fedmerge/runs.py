"""Run names and run folders: every run gets a folder of its own, named after what it ran, and
``runs/latest`` points at the newest one. Nothing is ever overwritten.

>>> run_name("default", ["protocol.name=local", "seed=3"])
'default protocol.name=local seed=3'
>>> run_name("default", ["name=mine", "seed=3"])     # an explicit name wins
'mine'
>>> slug("default protocol.name=local model.options={hidden: [32]}")
'default_protocol.name-local_model.options_hidden_32'
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

RUNS = Path("runs")
LATEST = "latest"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def run_name(base: str, overrides: Sequence[str]) -> str:
    """The name a run is shown and saved under: the config's name followed by the overrides
    given on the command line (an override of ``name`` itself replaces everything)."""
    named = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "name"]
    if named:
        return named[-1]
    return " ".join([base, *overrides])


def slug(name: str, limit: int = 80) -> str:
    """``name`` as a file name: ``=`` becomes ``-``, other unsafe runs of characters ``_``."""
    text = _UNSAFE.sub("_", name.replace("=", "-")).strip("._-")
    text = re.sub(r"[_-]*_[_-]*", "_", text)
    return text[:limit].rstrip("._-") or "run"


def new_run_dir(name: str, root: Path = RUNS, now: float | None = None) -> Path:
    """Create and return ``root/<slug>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when a run of
    the same name started in the same second); then point ``root/latest`` at it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(name)}-{stamp}"
    for i in range(1, 10_000):
        path = root / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        point_latest(path)
        return path
    raise FileExistsError(f"{root}: no free folder name for {stem}")


def point_latest(path: Path) -> None:
    """Make ``path.parent/latest`` a relative symlink to ``path``, replacing the old link in one
    step. Where there is a real ``latest`` file or folder, or no symlinks, it is left alone."""
    link = path.parent / LATEST
    if link.exists() and not link.is_symlink():
        return
    tmp = path.parent / f".{LATEST}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        tmp.symlink_to(path.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # no symlinks here (some Windows set-ups): the folder name is printed anyway
        with contextlib.suppress(OSError):
            tmp.unlink()
