"""Progress of a long replay on stderr, when stderr is a terminal: one line, redrawn in place.

A replay that ends within `PROGRESS_DELAY` prints nothing, so the common short run stays quiet;
after that the line (bytes read, of how many where the size is known, flows, segments) is
redrawn every `PROGRESS_EVERY` seconds on the pipeline's ticks and erased when the run ends, so
what follows (a report, an error) starts on a clean line.  The command line adds this sink only
when stderr is a terminal and nothing else writes to that terminal meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from imaptap.pipeline import Sink

if TYPE_CHECKING:
    from imaptap.pipeline import Pipeline

#: Seconds of replay before the first progress line: shorter runs print nothing.
PROGRESS_DELAY = 1.0
#: Seconds between two redraws: often enough to look alive, rarely enough to cost nothing.
PROGRESS_EVERY = 0.25
#: Erase the rest of the line (ECMA-48 EL), after a carriage return.
_ERASE = "\r\x1b[K"


def size_text(n: int) -> str:
    """``812 B``, ``12.3 MB``: bytes for a person."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


class StderrProgress(Sink):
    """The progress line of a replay on a terminal."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic,
                 delay: float = PROGRESS_DELAY) -> None:
        self.stream = stream
        self.clock = clock
        self.delay = delay
        self.started = clock()
        self.next = self.started + delay
        self.shown = False
        """A line is on the terminal (and will be erased)."""

    def tick(self, pipeline: Pipeline) -> None:
        now = self.clock()
        if now < self.next:
            return
        self.next = now + PROGRESS_EVERY
        read, total = pipeline.source.progress()
        stats = pipeline.table.stats
        where = size_text(read or 0)
        if total:
            where += f" of {size_text(total)} ({min(100, 100 * (read or 0) // total)}%)"
        line = f"imaptap: {pipeline.source.label}: {where}, {stats.flows:,} flows, {stats.segments:,} segments"
        self._write(_ERASE + line)
        self.shown = True

    def finished(self, pipeline: Pipeline) -> None:
        if self.shown:
            self._write(_ERASE)
            self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            pass  # a terminal gone away: progress is not worth failing the run for
