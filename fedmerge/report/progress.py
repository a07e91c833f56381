"""The one progress bar: rich, on stderr, advanced by a ``tick`` callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Tick = Callable[..., None]
"""``tick(label=None, advance=1, **fields)``: advance the bar, optionally relabel it."""


@contextlib.contextmanager
def progress(
    total: float, description: str, *, enabled: bool = True, status: bool = False
) -> Iterator[Tick]:
    """A rich progress bar of ``total`` units on stderr; yields ``tick``.

    ``status`` adds a column showing the ``status`` field (``tick(status="acc 0.91")``).
    Disabled, ``tick`` does nothing, so callers never branch on it.
    """
    if not enabled:
        yield lambda *_, **__: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if status:
        columns.append(TextColumn("{task.fields[status]}"))
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total, status="")

        def tick(label: str | None = None, advance: float = 1, **fields: str) -> None:
            if label is not None:
                fields["description"] = label  # type: ignore[assignment]
            bar.update(task, advance=advance, **fields)

        yield tick
