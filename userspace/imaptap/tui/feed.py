"""The capture side of the TUI: the one pipeline run in a worker thread, coalesced for the UI.

The `FlowTable` is not thread-safe, so only the worker touches it.  A few times a second
(`FLUSH_INTERVAL`) the worker hands the UI one `FeedUpdate`: a `FlowSnapshot` (the flow's
`FlowFacts`, which share nothing with the live flow) of every flow that changed since the
previous update, the message
events since then, and the capture's counters.  While the UI has not taken the previous batch
(busy redrawing, or paused by the user) the worker only sends the counters and keeps collecting:
open flows are compared when a batch is built, so what waits is only the ended flows and the
messages, both bounded.

No Textual here: the app gives `Feed` an ``emit`` callback, so this module is tested and
benchmarked without a terminal.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from imaptap.activity import Activity, ActivitySnapshot
from imaptap.facts import FlowFacts, flow_facts
from imaptap.flows import IDLE_TIMEOUT, MAX_FLOWS, Flow
from imaptap.imap.session import Message
from imaptap.pipeline import CHECK_EVERY, LiveSource, MemorySource, Pipeline, ReplaySource, Sink, Source
from imaptap.report import Report, ReportBuilder

__all__ = ["CHECK_EVERY", "LiveSource", "MemorySource", "ReplaySource", "Source"]

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
#: Seconds between two summaries while the UI shows one: it counts every open flow again.
SUMMARY_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class FlowRef:
    """What ``message_record`` needs of a flow; never changes for a flow."""

    id: int
    client: tuple[str, int]
    server: tuple[str, int]


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """One flow's facts at one moment, safe to read in another thread."""

    facts: FlowFacts
    """The same facts as the JSON output's flow record."""
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
class Summary:
    """The summary view's content: the report's rows (ended and open flows) and the activity."""

    report: Report
    activity: ActivitySnapshot
    open_flows: int


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
    summary: Summary | None = None
    """While the UI asks for one (`Feed.summary_wanted`), and in the final update."""


class FeedControl(Protocol):
    """What the app uses of its feed: `Feed`, or `imaptap.tui.workerfeed.WorkersFeed`."""

    emit: Callable[[FeedUpdate], object] | None
    ready: threading.Event
    """Set by the UI when it takes batches (it is not busy with the previous one, and not paused)."""
    summary_wanted: threading.Event
    """Set by the UI while it shows the summary."""
    ids_in_start_order: bool
    """Whether flow ids count up in the order flows start (one pipeline numbers them so; live
    workers number theirs each on its own): if not, the UI orders by start time itself."""

    @property
    def source(self) -> Source:
        """What is captured (its label, whether live, its progress)."""

    def run(self) -> None:
        """The capture, on the app's worker thread, until its input ends or `stop`."""

    def stop(self) -> None:
        """Ask the capture to end (any thread)."""


def snapshot(flow: Flow, facts: FlowFacts | None = None) -> FlowSnapshot:
    """The flow as it is now (with ``facts`` already taken of it, if given)."""
    s = flow.session
    ref = FlowRef(flow.id, flow.client, flow.server)
    facts = flow_facts(flow) if facts is None else facts
    if not s.is_imap:  # what another protocol sent is no command, as in the flow record
        return FlowSnapshot(facts, None, None, None, ref)
    return FlowSnapshot(facts, s.last_command, s.last_status, s.last_latency_ms, ref)


# --- the worker ----------------------------------------------------------------------------------


class Feed(Sink):
    """Runs a `Source` through the pipeline (in `run`, on a worker thread) and emits `FeedUpdate`s."""

    ids_in_start_order = True

    def __init__(
        self,
        source: Source,
        emit: Callable[[FeedUpdate], object] | None = None,
        *,
        pcap_writer: Any = None,
        max_flows: int = MAX_FLOWS,
        idle_timeout: float = IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
        sinks: Iterable[Sink] = (),
        before: Iterable[Sink] = (),
        password_fingerprint: Callable[[bytes], str] | None = None,
    ) -> None:
        self.source = source
        self.emit = emit
        self.clock = clock
        """Measures rates and elapsed time; tests freeze it."""
        self.wallclock = wallclock
        """The capture clock of a live capture (ages, idle expiry)."""
        self.flush_interval = flush_interval
        # ``before``: sinks that see each flow before the feed does (a live worker's numbering)
        self.pipeline = Pipeline(source, [*before, self, *sinks], pcap_writer=pcap_writer, max_flows=max_flows,
                                 idle_timeout=idle_timeout, wallclock=wallclock, clock=clock,
                                 password_fingerprint=password_fingerprint)
        self.table = self.pipeline.table
        self.ready = threading.Event()
        """Set by the UI when it takes batches (it is not busy with the previous one, and not paused)."""
        self.ready.set()
        self.stopping = threading.Event()
        """Set by the UI to end the capture; the worker sees it within a chunk or a poll."""
        self.error: str | None = None
        self.done = False
        self.report = ReportBuilder(source.label)
        """Every ended flow, for the summary view."""
        self.activity = Activity()
        self.summary_wanted = threading.Event()
        """Set by the UI while it shows the summary."""
        self._next_summary = 0.0
        self._seen: dict[int, tuple[float, int]] = {}
        # Open flows already sent, with (last_ts, packets) as sent: anything newer gets a snapshot.
        self._ended: dict[int, tuple[FlowSnapshot, bool]] = {}
        self._messages: dict[int, list] = {}  # flow id -> [deque of Message, count]
        self._pending = 0  # messages in those deques
        self._gone: list[int] = []
        self.ended_dropped = 0
        """Ended flows let go in the worker (see `CaptureStatus.ended_dropped`)."""
        self._started = 0.0
        self._next_flush = 0.0
        self._rate_mark = (0.0, 0)
        self._rate = 0.0

    # --- the pipeline's events (worker thread) -------------------------------------------------

    def flow_started(self, flow: Flow) -> Callable[[Message], None]:
        return partial(self._on_message, flow.id)

    def _on_message(self, flow_id: int, msg: Message) -> None:
        self.activity.message(msg)
        entry = self._messages.get(flow_id)
        if entry is None:
            entry = self._messages[flow_id] = [deque(maxlen=MAX_MESSAGES_PER_FLOW), 0]
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

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.report.add(facts, flow.session.audit)
        shown = self._seen.pop(flow.id, None) is not None
        ended = self._ended
        ended[flow.id] = (snapshot(flow, facts), shown)
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
        """The worker's body: run the pipeline until the input ends or `stop`, then send the final update."""
        clock = self.clock
        self._started = self._next_flush = clock()
        self._rate_mark = (self._started, 0)
        self.pipeline.run(stop=self.stopping.is_set, on_tick=self._tick)
        self.error = self.pipeline.error
        self.done = True
        now = clock()
        # Tell the UI the input is over even if it is paused, then wait for it to take the rest.
        self._post(FeedUpdate(self._status(now, final=True)))
        while not self.stopping.is_set():
            if self.ready.wait(0.1):
                self._flush(now, final=True)
                return

    def _tick(self) -> None:
        now = self.clock()
        if now >= self._next_flush:
            self._next_flush = now + self.flush_interval
            self._flush(now)

    def _flush(self, now: float, final: bool = False) -> None:
        status = self._status(now, final)
        summary = None
        if final or (self.summary_wanted.is_set() and now >= self._next_summary):
            self._next_summary = now + SUMMARY_INTERVAL
            summary = self.summary()
        if not self.ready.is_set():
            self._post(FeedUpdate(status, summary=summary))
            return
        flows, messages, gone = self._collect()
        if flows or messages or gone:
            self.ready.clear()
            self._post(FeedUpdate(status, flows, messages, gone, batch=True, last=final, summary=summary))
        else:
            self._post(FeedUpdate(status, last=final, summary=summary))

    def summary(self) -> Summary:
        """The summary now: the ended flows' report with the open flows counted in (worker thread)."""
        open_flows = list(self.table.flows.values())
        report = self.report.report_with((flow_facts(flow), flow.session.audit) for flow in open_flows)
        return Summary(report, self.activity.snapshot(), len(open_flows))

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
        for snap, _ in self._ended.values():
            snaps.append(snap)
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
            totals = self.pipeline.stats()
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
