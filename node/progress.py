"""Rich progress bars for long CLI work, shown only on a terminal (never in pipes, logs or tests)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Advance(Protocol):
    def __call__(self, steps: int = 1) -> None: ...


def interactive() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Advance]:
    """A bar on stderr while the block runs; yields `advance(steps=1)`. A no-op when not on a terminal."""
    if not interactive():
        yield lambda steps=1: None
        return
    from rich.console import Console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps=1: bar.advance(task, steps)
