"""What the TUI's summary draws besides the report's rows: commands per second over time, and
how long each command took to complete, as counts in fixed latency buckets.

`Activity` takes the message events the TUI's worker already receives (one call per message,
a few operations each) and keeps a bounded amount whatever the run's length: `TIME_BUCKETS`
buckets of commands over the capture's time, each twice as wide once the run outgrows them,
and `LATENCY_EDGES_MS` buckets per command name for at most `MAX_COMMANDS` names.
`Activity.snapshot` returns an immutable copy for the UI thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

from imaptap.imap.session import Kind, Message

#: Buckets of the commands-per-second series: the width of a sparkline on a wide terminal.
TIME_BUCKETS = 120
#: Seconds the first buckets cover: a short replay shows second by second.
FIRST_BUCKET_SECONDS = 1.0
#: Upper edges of the latency buckets, in milliseconds (the last bucket is everything slower):
#: a 1-2.5-5 series from a tenth of a millisecond (a loopback NOOP) to seconds (a big FETCH).
LATENCY_EDGES_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
#: Command names with their own latency row; the rest are counted under OTHER.
MAX_COMMANDS = 32
OTHER = "OTHER"

_REQUEST = Kind.REQUEST
_RESPONSE = Kind.RESPONSE


@dataclass(frozen=True, slots=True)
class LatencyRow:
    command: str
    counts: tuple[int, ...]
    """Per bucket of `LATENCY_EDGES_MS`, and one more for slower."""
    total: int
    median_ms: float | None
    """The upper edge of the bucket holding the median (None: nothing counted)."""


@dataclass(frozen=True, slots=True)
class ActivitySnapshot:
    start: float | None
    """Capture time of the first bucket's start."""
    bucket_seconds: float
    commands: tuple[int, ...]
    """Commands sent in each bucket, oldest first, up to the last one used."""
    latencies: tuple[LatencyRow, ...]
    """Most completions first."""

    def per_second(self) -> tuple[float, ...]:
        """The series as commands per second."""
        return tuple(n / self.bucket_seconds for n in self.commands)


class Activity:
    """Commands over time and latencies per command, fed message by message."""

    def __init__(self, start: float | None = None) -> None:
        self.start = start
        """The first bucket's start: the first command's time, unless given (live workers share
        one, so that their buckets line up and `merged` adds them exactly)."""
        self.bucket_seconds = FIRST_BUCKET_SECONDS
        self.buckets = [0] * TIME_BUCKETS
        self.last = -1
        """The last bucket used."""
        self.latency: dict[str, list[int]] = {}

    def message(self, msg: Message) -> None:
        """Count one message: a command by its time, a completion by its latency."""
        kind = msg.kind
        if kind is _REQUEST:
            self._command(msg.ts)
        elif kind is _RESPONSE and msg.latency_ms is not None and msg.command is not None:
            name = msg.command
            row = self.latency.get(name)
            if row is None:
                if len(self.latency) >= MAX_COMMANDS:
                    name = OTHER
                row = self.latency.setdefault(name, [0] * (len(LATENCY_EDGES_MS) + 1))
            row[bisect_left(LATENCY_EDGES_MS, msg.latency_ms)] += 1

    def _command(self, ts: float) -> None:
        if self.start is None:
            self.start = ts
        index = int((ts - self.start) / self.bucket_seconds) if ts >= self.start else 0
        while index >= TIME_BUCKETS:
            self._widen()
            index = int((ts - self.start) / self.bucket_seconds)
        self.buckets[index] += 1
        if index > self.last:
            self.last = index

    def _widen(self) -> None:
        """Twice the time per bucket: neighbours merged, the second half free."""
        b = self.buckets
        merged = [b[i] + b[i + 1] for i in range(0, TIME_BUCKETS, 2)]
        self.buckets = merged + [0] * (TIME_BUCKETS - len(merged))
        self.bucket_seconds *= 2
        self.last //= 2

    def snapshot(self) -> ActivitySnapshot:
        """An immutable copy, for another thread."""
        rows = []
        for name, counts in self.latency.items():
            total = sum(counts)
            median = None
            if total:
                seen = 0
                for i, n in enumerate(counts):
                    seen += n
                    if 2 * seen >= total:
                        median = LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else float("inf")
                        break
            rows.append(LatencyRow(name, tuple(counts), total, median))
        rows.sort(key=lambda r: (-r.total, r.command))
        return ActivitySnapshot(self.start, self.bucket_seconds, tuple(self.buckets[: self.last + 1]), tuple(rows))


def merged(parts: Iterable[Activity]) -> ActivitySnapshot:
    """One snapshot of activities that began at the same ``start`` (live workers' each own
    flows): widths are powers of two of `FIRST_BUCKET_SECONDS`, so a narrower part's buckets
    fall whole into the widest part's, and the sum is what one `Activity` fed every message
    would hold.  Command names past `MAX_COMMANDS` over all parts are counted under OTHER."""
    parts = list(parts)
    starts = {p.start for p in parts if p.start is not None}
    if len(starts) > 1:
        raise ValueError("activities that began at different times cannot be added")
    whole = Activity(next(iter(starts), None))
    whole.bucket_seconds = max((p.bucket_seconds for p in parts), default=FIRST_BUCKET_SECONDS)
    for part in parts:
        fold = round(whole.bucket_seconds / part.bucket_seconds)
        for index in range(part.last + 1):
            count = part.buckets[index]
            if count:
                whole.buckets[index // fold] += count
                whole.last = max(whole.last, index // fold)
        for name, counts in part.latency.items():
            row = whole.latency.get(name)
            if row is None:
                if len(whole.latency) >= MAX_COMMANDS:
                    name = OTHER
                row = whole.latency.setdefault(name, [0] * (len(LATENCY_EDGES_MS) + 1))
            for i, n in enumerate(counts):
                row[i] += n
    return whole.snapshot()
