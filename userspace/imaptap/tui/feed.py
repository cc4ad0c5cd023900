"""The capture side of the TUI: the one pipeline run in a worker thread, coalesced for the UI.

The `FlowTable` is not thread-safe, so only the worker touches it.  A few times a second
(`FLUSH_INTERVAL`) the worker hands the UI one `FeedUpdate`: a `FlowSnapshot` (the JSON
``flow_record``, copied) of every flow that changed since the previous update, the message
events since then, and the capture's counters.  While the UI has not taken the previous batch
(busy redrawing, or paused by the user) the worker only sends the counters and keeps collecting:
open flows are compared when a batch is built, so what waits is only the ended flows and the
messages, both bounded.

No Textual here: the app gives `Feed` an ``emit`` callback, so this module is tested and
benchmarked without a terminal.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from imaptap.flows import IDLE_TIMEOUT, MAX_FLOWS, Flow, FlowTable
from imaptap.imap.session import Message
from imaptap.output.jsonl import flow_record
from imaptap.segment import DEFAULT_SNAPLEN, DEFAULT_TAILLEN, PayloadPolicy, Segment

#: Seconds between two updates to the UI: 4 Hz looks live and leaves the UI thread idle.
FLUSH_INTERVAL = 0.25
#: Messages kept per flow for the details timeline; older ones are counted as dropped.  An IDLE
#: session can run for days, and the timeline is for reading, not for archiving (--json is).
MAX_MESSAGES_PER_FLOW = 500
#: Messages waiting in the worker while the UI takes no batches (paused, or busy): beyond it
#: every new message pushes out the oldest waiting one of its flow, as the UI's own timeline
#: bound (store.MAX_HISTORY_MESSAGES) would.  Thousands of busy flows paused for an hour would
#: otherwise pile up millions.
MAX_PENDING_MESSAGES = 200_000
#: Ended flows the UI keeps on screen (and the worker holds while the UI is paused); beyond it
#: the oldest ended ones go.  Open flows are bounded by the flow table (--max-flows).
MAX_ENDED_FLOWS = 10_000
#: Seconds over which segments/s is counted: one flush interval is too short a sample.
RATE_WINDOW = 1.0
#: Segments handled between two looks at the clock and the stop flag.
CHECK_EVERY = 512
#: Milliseconds a live poll waits for the first segment: the stop flag is seen within this.
POLL_MS = 100


@dataclass(frozen=True, slots=True)
class FlowRef:
    """What ``message_record`` needs of a flow; never changes for a flow."""

    id: int
    client: tuple[str, int]
    server: tuple[str, int]


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """One flow's facts at one moment, safe to read in another thread."""

    record: dict[str, Any]
    """``flow_record(flow)`` with its lists and dicts copied: the same facts as the JSON output."""
    last_command: str | None
    last_status: str | None
    last_latency_ms: float | None
    ref: FlowRef

    @property
    def id(self) -> int:
        return self.ref.id


@dataclass(frozen=True, slots=True)
class MessageBatch:
    """A flow's message events since the last update, the newest `MAX_MESSAGES_PER_FLOW` of them."""

    messages: tuple[Message, ...]
    dropped: int
    """Messages of this interval not included (more than the bound arrived)."""


@dataclass(frozen=True, slots=True)
class CaptureStatus:
    """The capture's counters for the status bar."""

    source: str
    """The file replayed, or the interfaces captured on."""
    live: bool
    segments: int
    segments_per_s: float
    flows_open: int
    flows_total: int
    now: float
    """The capture clock: the last segment's time in a replay, the wall clock live."""
    elapsed: float
    bytes_read: int | None = None
    """Replay: bytes of packet records read so far."""
    size: int | None = None
    """Replay: the file's size."""
    counters: dict[str, int] | None = None
    """Live: `LiveCapture.counters()` (seen, matched, submitted, lost, ...)."""
    done: bool = False
    """The input is finished (replay read to the end, or the capture stopped)."""
    error: str | None = None
    totals: dict[str, Any] | None = None
    """When done: the same record as the JSON output's final ``stats`` line."""
    notes: tuple[str, ...] = ()
    """Things the user should know about how the capture runs (fallbacks taken)."""
    ended_dropped: int = 0
    """Ended flows the worker let go before the UI took them (over MAX_ENDED_FLOWS): under a
    flood, most flows end this way, and the status line must say so."""


@dataclass(frozen=True, slots=True)
class FeedUpdate:
    """What the worker posts to the UI: counters always, a batch of flows and messages sometimes."""

    status: CaptureStatus
    flows: tuple[FlowSnapshot, ...] = ()
    """Changed flows, by id."""
    messages: dict[int, MessageBatch] = field(default_factory=dict)
    gone: tuple[int, ...] = ()
    """Flows that ended and were dropped while the UI was not taking batches (over MAX_ENDED_FLOWS)."""
    batch: bool = False
    """Carries flows or messages: the worker sends the next batch only after `Feed.ready` is set again."""
    last: bool = False
    """The worker's final update: everything it will ever report is in this one or before."""


def snapshot(flow: Flow) -> FlowSnapshot:
    """The flow's record, detached from the live session (which goes on changing in the worker)."""
    rec = flow_record(flow)
    for key, value in rec.items():
        if isinstance(value, (list, dict)):
            rec[key] = value.copy()
    s = flow.session
    return FlowSnapshot(rec, s.last_command, s.last_status, s.last_latency_ms, FlowRef(flow.id, flow.client, flow.server))


# --- sources -------------------------------------------------------------------------------------


class Source:
    """Where segments come from: `segments` yields them one by one, None when there is nothing yet.

    One at a time, never read ahead: the analyzer changes what the capture copies of a flow
    (nothing after STARTTLS, whole payloads after COMPRESS) from the very next segment on.
    """

    label = ""
    live = False
    ports: frozenset[int] = frozenset()
    policy: PayloadPolicy | None = None
    close_at_end = True
    """End every flow when the input ends, as the JSON output does for a replay."""

    def segments(self) -> Iterator[Segment | None]:
        raise NotImplementedError

    def progress(self) -> tuple[int | None, int | None]:
        """(bytes read, total bytes) when known."""
        return None, None

    def counters(self) -> dict[str, int] | None:
        return None

    def totals(self) -> dict[str, Any]:
        """Source counters for the final stats record."""
        return {}

    def notes(self) -> tuple[str, ...]:
        return ()

    def close(self) -> None:
        pass


class ReplaySource(Source):
    """A pcap or pcapng file, read as fast as it goes; opened here so a bad file fails before the UI starts."""

    def __init__(self, path: str, ports: Iterable[int], snaplen: int = DEFAULT_SNAPLEN,
                 taillen: int = DEFAULT_TAILLEN, label: str | None = None) -> None:
        from imaptap.capture.replay import ReplayStats, open_capture

        self.label = path if label is None else label
        self.ports = frozenset(ports)
        self.policy = PayloadPolicy(snaplen, taillen)
        self.reader = open_capture(path)  # CaptureFileError: the caller says so and exits
        try:
            self.size = os.path.getsize(path)
        except OSError:
            self.size = None
        self.stats = ReplayStats()

    def segments(self) -> Iterator[Segment | None]:
        # CaptureFileError (a cut or corrupt file) comes after the last good segment.
        return self.reader.segments(set(self.ports), self.policy, self.stats, ticks=True)

    def progress(self) -> tuple[int | None, int | None]:
        return self.stats.position, self.size

    def totals(self) -> dict[str, Any]:
        return dataclasses.asdict(self.stats)

    def close(self) -> None:
        self.reader.close()


class LiveSource(Source):
    """A `LiveCapture`: attached when the worker starts, detached when `segments` is closed."""

    live = True
    close_at_end = False

    def __init__(self, capture: Any, writer: Any = None) -> None:
        self.capture = capture
        self.writer = writer
        """A `MaskingWriter` for ``-w``, or None."""
        self.label = ",".join(capture.interfaces)
        self.ports = frozenset(capture.ports)
        self.policy = capture.policy
        self._entered = False

    def segments(self) -> Iterator[Segment | None]:
        # The generator is suspended inside the with block: closing it (the worker always
        # does, in a finally) leaves the block and detaches the kernel programs.
        writer = self.writer
        try:
            with self.capture:
                self._entered = True
                poll = self.capture.poll
                while True:
                    segs = poll(POLL_MS)
                    if writer is not None:
                        for seg in segs:
                            writer.write(seg)  # each just before the table has it (MaskingWriter)
                            yield seg
                    else:
                        yield from segs
                    yield None
        finally:
            if writer is not None:
                writer.close()

    def bind(self, table: Any) -> None:
        if self.writer is not None:
            self.writer.bind(table)

    def counters(self) -> dict[str, int] | None:
        return self.capture.counters() if self._entered else None

    def totals(self) -> dict[str, Any]:
        return dict(self.counters() or {})

    def notes(self) -> tuple[str, ...]:
        return tuple(self.capture.notes)


class SegmentsSource(Source):
    """Segments from memory (tests, benchmarks), cut to the snap length as a replay would."""

    def __init__(self, segments: Iterable[Segment], ports: Iterable[int] = (143,), label: str = "segments",
                 snaplen: int = DEFAULT_SNAPLEN, taillen: int = DEFAULT_TAILLEN, close_at_end: bool = True) -> None:
        self.given = segments
        self.label = label
        self.ports = frozenset(ports)
        self.policy = PayloadPolicy(snaplen, taillen)
        self.close_at_end = close_at_end

    def segments(self) -> Iterator[Segment | None]:
        from imaptap.testing import replay_cut

        return replay_cut(self.given, self.policy)


# --- the worker ----------------------------------------------------------------------------------


class Feed:
    """Runs a `Source` through a `FlowTable` (in `run`, on a worker thread) and emits `FeedUpdate`s."""

    def __init__(
        self,
        source: Source,
        emit: Callable[[FeedUpdate], object] | None = None,
        *,
        max_flows: int = MAX_FLOWS,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self.source = source
        self.emit = emit
        self.clock = clock
        """Measures rates and elapsed time; tests freeze it."""
        self.wallclock = wallclock
        """The capture clock of a live capture (ages, idle expiry)."""
        self.flush_interval = flush_interval
        self.table = FlowTable(source.ports, source.policy, self._on_message, self._on_end,
                               max_flows=max_flows, idle_timeout=idle_timeout)
        bind = getattr(source, "bind", None)
        if bind is not None:
            bind(self.table)  # a -w writer follows the table
        self.ready = threading.Event()
        """Set by the UI when it takes batches (it is not busy with the previous one, and not paused)."""
        self.ready.set()
        self.stopping = threading.Event()
        """Set by the UI to end the capture; the worker sees it within a chunk or a poll."""
        self.error: str | None = None
        self.done = False
        self._seen: dict[int, tuple[float, int]] = {}
        # Open flows already sent, with (last_ts, packets) as sent: anything newer gets a snapshot.
        self._ended: dict[int, tuple[Flow, bool]] = {}
        self._messages: dict[int, list] = {}  # flow id -> [deque of Message, count]
        self._pending = 0  # messages in those deques
        self._gone: list[int] = []
        self.ended_dropped = 0
        """Ended flows let go in the worker (see `CaptureStatus.ended_dropped`)."""
        self._started = 0.0
        self._rate_mark = (0.0, 0)
        self._rate = 0.0

    # --- table callbacks (worker thread) -------------------------------------------------------

    def _on_message(self, flow: Flow, msg: Message) -> None:
        entry = self._messages.get(flow.id)
        if entry is None:
            entry = self._messages[flow.id] = [deque(maxlen=MAX_MESSAGES_PER_FLOW), 0]
        q = entry[0]
        if len(q) == MAX_MESSAGES_PER_FLOW:
            pass  # the deque pushes its oldest out
        elif self._pending < MAX_PENDING_MESSAGES:
            self._pending += 1
        elif q:
            q.popleft()
        else:
            self._pending += 1  # at least one per flow: over by at most the number of flows
        q.append(msg)
        entry[1] += 1

    def _on_end(self, flow: Flow) -> None:
        shown = self._seen.pop(flow.id, None) is not None
        ended = self._ended
        ended[flow.id] = (flow, shown)
        if len(ended) > MAX_ENDED_FLOWS:
            old_id = next(iter(ended))
            _, old_shown = ended.pop(old_id)
            self.ended_dropped += 1
            dropped = self._messages.pop(old_id, None)
            if dropped is not None:
                self._pending -= len(dropped[0])
            if old_shown:
                self._gone.append(old_id)

    # --- the loop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to end (any thread)."""
        self.stopping.set()

    def run(self) -> None:
        """The worker's body: read until the input ends or `stop`, then send the final update."""
        from imaptap.capture.replay import CaptureFileError

        source = self.source
        table = self.table
        add = table.add
        clock = self.clock
        live = source.live
        live_errors: tuple[type[BaseException], ...] = ()
        if live:
            from imaptap.capture.live import LiveError

            live_errors = (LiveError,)
        self._started = clock()
        self._rate_mark = (self._started, 0)
        next_flush = self._started
        segments = source.segments()
        pending = 0
        try:
            for seg in segments:
                if seg is not None:
                    add(seg)
                    pending += 1
                    if pending < CHECK_EVERY:
                        continue
                pending = 0
                if live:
                    table.expire(self.wallclock())
                if self.stopping.is_set():
                    break
                now = clock()
                if now >= next_flush:
                    next_flush = now + self.flush_interval
                    self._flush(now)
        except (CaptureFileError, *live_errors) as exc:
            self.error = str(exc)
        finally:
            if hasattr(segments, "close"):
                segments.close()  # live: leaves the capture's with block, detaching the programs
            source.close()
        if source.close_at_end and not self.stopping.is_set():
            table.close_all("end")
        self.done = True
        now = clock()
        # Tell the UI the input is over even if it is paused, then wait for it to take the rest.
        self._post(FeedUpdate(self._status(now, final=True)))
        while not self.stopping.is_set():
            if self.ready.wait(0.1):
                self._flush(now, final=True)
                return

    def _flush(self, now: float, final: bool = False) -> None:
        status = self._status(now, final)
        if not self.ready.is_set():
            self._post(FeedUpdate(status))
            return
        flows, messages, gone = self._collect()
        if flows or messages or gone:
            self.ready.clear()
            self._post(FeedUpdate(status, flows, messages, gone, batch=True, last=final))
        else:
            self._post(FeedUpdate(status, last=final))

    def _post(self, update: FeedUpdate) -> None:
        if self.emit is not None:
            self.emit(update)

    def _collect(self) -> tuple[tuple[FlowSnapshot, ...], dict[int, MessageBatch], tuple[int, ...]]:
        seen = self._seen
        snaps = []
        for flow in self.table.flows.values():
            mark = (flow.last_ts, flow.packets)
            if seen.get(flow.id) != mark:
                seen[flow.id] = mark
                snaps.append(snapshot(flow))
        for flow, _ in self._ended.values():
            snaps.append(snapshot(flow))
        snaps.sort(key=lambda s: s.ref.id)
        messages = {fid: MessageBatch(tuple(q), n - len(q)) for fid, (q, n) in self._messages.items()}
        gone = tuple(self._gone)
        self._ended = {}
        self._messages = {}
        self._pending = 0
        self._gone = []
        return tuple(snaps), messages, gone

    def _status(self, now: float, final: bool = False) -> CaptureStatus:
        source = self.source
        table = self.table
        segments = table.stats.segments
        t0, n0 = self._rate_mark
        if now - t0 >= RATE_WINDOW:
            self._rate = (segments - n0) / (now - t0)
            self._rate_mark = (now, segments)
        bytes_read, size = source.progress()
        totals = None
        if final:
            totals = {"source": source.label, **source.totals(), **dataclasses.asdict(table.stats),
                      "seconds": round(now - self._started, 3)}
            if self.error:
                totals["error"] = self.error
        return CaptureStatus(
            source=source.label,
            live=source.live,
            segments=segments,
            segments_per_s=0.0 if final else self._rate,
            flows_open=len(table.flows),
            flows_total=table.stats.flows,
            now=self.wallclock() if source.live else table.now,
            elapsed=now - self._started,
            bytes_read=bytes_read,
            size=size,
            counters=source.counters(),
            done=final,
            error=self.error,
            totals=totals,
            notes=source.notes(),
            ended_dropped=self.ended_dropped,
        )
