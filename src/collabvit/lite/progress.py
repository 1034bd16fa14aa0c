"""Progress on long work: a tqdm bar on a terminal, periodic one-line reports in logs and pipes.

A bar redrawn with carriage returns is unreadable in a log file, and printing
nothing for half an hour looks like a hang, so off a terminal the progress is
a plain line every `interval` seconds (and one at the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")

LOG_INTERVAL_SECONDS = 30.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def progress_line(description: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    """One line of progress, e.g. 'edge pass: 40/157 batch (25 %), 0:31 elapsed, ~1:32 left'."""
    if not total:
        return f"{description}: {done} {unit}, {_duration(elapsed)} elapsed"
    share = done / total
    left = f", ~{_duration(elapsed / share - elapsed)} left" if 0 < share < 1 else ""
    return (
        f"{description}: {done}/{total} {unit} ({100 * share:.0f} %), "
        f"{_duration(elapsed)} elapsed{left}"
    )


def _log_progress(
    items: Iterable[Item], description: str, total: int | None, unit: str, interval: float, stream
) -> Iterator[Item]:
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval:
            print(progress_line(description, done, total, now - started, unit), file=stream,
                  flush=True)  # fmt: skip
            last = now
    elapsed = time.monotonic() - started
    if elapsed >= interval:  # short work needs no closing line
        print(progress_line(description, done, total, elapsed, unit) + " (done)",
              file=stream, flush=True)  # fmt: skip


def progress_bar(
    items: Iterable[Item],
    description: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool | None = None,
    interval: float = LOG_INTERVAL_SECONDS,
    stream=None,
) -> Iterable[Item]:
    """`items`, reporting progress on stderr as it goes.

    Args:
        enabled: False shows nothing; None and True show a tqdm bar when `stream` is a
            terminal and otherwise a line every `interval` seconds.
        total: how many items there will be (len(items) when it has one).
    """
    stream = stream if stream is not None else sys.stderr
    if enabled is False:
        return items
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if stream.isatty():
        return tqdm(items, desc=description, total=total, unit=unit, file=stream)
    return _log_progress(items, description, total, unit, interval, stream)
