"""Output files that logrotate can move away: appending, and reopening on request.

logrotate renames ``imaptap.jsonl`` to ``imaptap.jsonl.1`` and tells imaptap (SIGUSR1, as
nginx does; SIGHUP already means "stop"), which then goes on in a new file of the old name.
The signal handler only counts the request: `ReopenSink` does the reopening on the pipeline's
next tick, between two records, so every record lands whole in exactly one file.  A file that
cannot be opened anew leaves the old one in use, and the user is told in one line.

`open_for_append` also serves ``--append`` (a service that restarts keeps what it wrote): a
last line cut short by a killed run is cut off first, so the file stays valid JSON Lines.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Protocol

from imaptap.pipeline import Sink

if TYPE_CHECKING:
    from imaptap.pipeline import Pipeline

#: Bytes of a JSON Lines file buffered before a write: records go out in few system calls.
OUTPUT_BUFFER = 1 << 16
#: Bytes read at a time, from the end backwards, looking for the last whole line.
SCAN_BLOCK = 1 << 16


def whole_lines_end(fd: int, size: int) -> int:
    """The offset after the last newline of the ``size`` bytes open at ``fd`` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - SCAN_BLOCK)
        block = os.pread(fd, end - start, start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def open_for_append(path: str) -> IO[str]:
    """``path`` open for appending JSON Lines (created if missing), a last partial line cut off."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            keep = whole_lines_end(fd, size)
            if keep < size:
                os.ftruncate(fd, keep)
        return os.fdopen(fd, "a", encoding="utf-8", buffering=OUTPUT_BUFFER)
    except BaseException:
        os.close(fd)
        raise


class NotAppendable(Exception):
    """A file to append to holds something imaptap would not write there: one line."""


class Reopenable(Protocol):
    """An output file that can go on at its path anew (`JsonlWriter`, the ``-w`` writer)."""

    @property
    def name(self) -> str: ...

    def reopen(self) -> None: ...


class ReopenSink(Sink):
    """Reopens the output files between records whenever ``requested()`` has grown (it counts
    the signals received); the ``-w`` writer is the pipeline's own.  ``warn`` takes the line
    for a file that could not be opened anew."""

    def __init__(self, requested: Callable[[], int], files: Sequence[Reopenable],
                 warn: Callable[[str], None]) -> None:
        self.requested = requested
        self.files = list(files)
        self.warn = warn
        self.handled = requested()

    def tick(self, pipeline: Pipeline) -> None:
        asked = self.requested()
        if asked == self.handled:
            return
        self.handled = asked
        files: list[Reopenable] = list(self.files)
        if pipeline.pcap_writer is not None:
            files.append(pipeline.pcap_writer)
        for f in files:
            try:
                f.reopen()
            except OSError as exc:
                self.warn(f"cannot reopen {f.name}: {exc.strerror or exc}; still writing to the file it had open")
            except NotAppendable as exc:  # its message names the file
                self.warn(f"{exc}; still writing to the file it had open")
