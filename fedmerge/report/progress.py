"""The one progress bar: rich on a terminal's stderr, advanced by a ``tick`` callback;
elsewhere (a log, a pipe) one line per tick that brings a ``line``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

Tick = Callable[..., None]
"""``tick(label=None, advance=1, line=None, **fields)``: advance the bar, optionally
relabel it; ``line`` is what a log shows for this step when there is no terminal."""


@contextlib.contextmanager
def progress(
    total: float,
    description: str,
    *,
    enabled: bool = True,
    status: bool = False,
    percent: bool = False,
) -> Iterator[Tick]:
    """A progress bar of ``total`` units on stderr; yields ``tick``.

    ``status`` adds a column showing the ``status`` field (``tick(status="acc 0.91")``);
    ``percent`` shows a percentage and the time left instead of done/total (for totals
    counted in elements, such as a merge).
    Without a terminal, a tick with a ``line`` prints ``[done/total] line`` to stderr
    instead. Disabled, ``tick`` does nothing, so callers never branch on it.
    """
    if not enabled:
        yield lambda *_, **__: None
        return
    if not sys.stderr.isatty():
        done = [0]

        def log(label: str | None = None, advance: float = 1, line: str | None = None,
                **_: str) -> None:  # fmt: skip
            done[0] += advance
            if line is not None:
                print(f"[{done[0]:g}/{total:g}] {line}", file=sys.stderr, flush=True)

        yield log
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    text = {"markup": False}  # labels are user text (run, cell, task names), never markup
    columns = [TextColumn("{task.description}", style="bold", **text), BarColumn()]
    if percent:
        columns += [TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn()]
    else:
        columns.append(MofNCompleteColumn())
    if status:
        columns.append(TextColumn("{task.fields[status]}", **text))
    if not percent:
        columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, status="")

        def tick(label: str | None = None, advance: float = 1, line: str | None = None,
                 **fields: str) -> None:  # fmt: skip
            if label is not None:
                fields["description"] = label
            bar.update(task, advance=advance, **fields)

        yield tick
