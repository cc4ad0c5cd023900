"""The TUI over live workers (``imaptap -i IFACE --workers N`` on a terminal).

Each worker runs the one-process `Feed` on its own ring (`WorkerFeed`) and, instead of posting
its updates to an app, sends them to the parent in status frames (`LiveWorkers`' pipes).  The
parent's `WorkersFeed` is the app's feed: every flush interval it merges the newest update of
each worker into one `FeedUpdate`, with the one process's handshake kept per worker: a worker
sends its next batch of flows and messages only once the UI took its last (the parent says so
with a byte on the worker's control pipe), so what waits while the UI is paused or busy waits
in the workers, under the bounds it has in one process.

The summary view is the one process's too.  Ended flows: every worker sends their facts and
audits as they end (`ShippedEnds`), and the parent counts them in its own `ReportBuilder`.
Open flows and the activity: while the UI shows the summary, and once at the end, each worker
sends a `SummaryPart` (its open flows' facts and its `Activity`) every `SUMMARY_INTERVAL`; the
parent adds the newest part of each worker to a copy of its builder, drops from a part a flow
whose end came after it (so no flow counts twice), and adds the activities exactly
(`activity.merged`: every worker's activity starts at the same time).

Flow ids are the workers' (`FlowNumbers`): unique over the run, in start order within a worker.
"""

from __future__ import annotations

import dataclasses
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

from imaptap.activity import Activity, merged
from imaptap.capture.live.workers import ENDED_FRAME, LiveWorkerFailed, LiveWorkers, LiveWorkerSpec
from imaptap.facts import FlowFacts, flow_facts
from imaptap.output.metrics import WORKER_SOURCE_COUNTERS
from imaptap.pipeline import LiveSource, Sink, Source
from imaptap.report import ReportBuilder
from imaptap.tui.feed import FLUSH_INTERVAL, SUMMARY_INTERVAL, CaptureStatus, Feed, FeedUpdate, MessageBatch, Summary
from imaptap.workers import send_frame

if TYPE_CHECKING:
    from imaptap.capture.pcapwrite import MaskingWriter
    from imaptap.imap.audit import SessionAudit
    from imaptap.output.metrics import MetricsSink
    from imaptap.output.report import ReportSink

#: Status frame kinds a TUI worker sends besides `LiveWorkers`' own.
FEED_FRAME = "feed"
PART_FRAME = "part"
#: Control bytes, parent to worker: the UI took your batch; the UI shows the summary; it no longer does.
TAKEN = b"r"
SUMMARY_ON = b"S"
SUMMARY_OFF = b"s"
#: Control bytes read at once by a worker (a few a second arrive).
CONTROL_READ = 4096


@dataclass(frozen=True, slots=True)
class SummaryPart:
    """What a worker adds to the summary besides its ended flows."""

    open: dict[int, tuple[FlowFacts, SessionAudit]]
    """Its open flows now, by id: their facts so far and their session's audit."""
    activity: Activity


# --- a worker ------------------------------------------------------------------------------------


class WorkerFeed(Feed):
    """A live worker's `Feed`: its updates and summary parts go to ``status_fd``; what the app
    wants (batches taken, the summary shown) comes on ``control_fd``; it stops when ``stopped()``."""

    def __init__(self, source: Source, status_fd: int, control_fd: int, stopped: Callable[[], bool],
                 activity_start: float, **options: Any) -> None:
        super().__init__(source, self._ship, **options)
        self.status_fd = status_fd
        self.control_fd = control_fd
        self.stopped = stopped
        self.activity = Activity(activity_start)
        self.parts_wanted = False
        self._next_part = 0.0

    def _ship(self, update: FeedUpdate) -> None:
        send_frame(self.status_fd, (FEED_FRAME, update))

    def run(self) -> None:
        """The pipeline until the parent stops it, then the last update and summary part, whole."""
        self._started = self._next_flush = self.clock()
        self._rate_mark = (self._started, 0)
        self.pipeline.run(stop=self.stopping.is_set, on_tick=self._tick)
        self.error = self.pipeline.error
        self.done = True
        self._send_part()
        self.ready.set()  # the parent holds it until the UI takes it, as it holds any batch
        self._flush(self.clock(), final=True)

    def _tick(self) -> None:
        if select.select([self.control_fd], [], [], 0)[0]:
            for byte in os.read(self.control_fd, CONTROL_READ):
                if byte == TAKEN[0]:
                    self.ready.set()
                elif byte == SUMMARY_ON[0]:
                    self.parts_wanted = True
                elif byte == SUMMARY_OFF[0]:
                    self.parts_wanted = False
        if self.stopped():
            self.stopping.set()
        super()._tick()
        if self.parts_wanted and self.clock() >= self._next_part:
            self._send_part()

    def _send_part(self) -> None:
        self._next_part = self.clock() + SUMMARY_INTERVAL
        open_flows = {flow.id: (flow_facts(flow), flow.session.audit) for flow in self.table.flows.values()}
        send_frame(self.status_fd, (PART_FRAME, SummaryPart(open_flows, self.activity)))

    def _status(self, now: float, final: bool = False) -> CaptureStatus:
        # the counters only this worker counts (its ring's records); the parent adds the kernel's
        status = super()._status(now, final)
        return dataclasses.replace(status, counters=self.source.totals())


# --- the parent ----------------------------------------------------------------------------------


def workers_feed(source: LiveSource, spec: LiveWorkerSpec, *, reopen: Sink | None = None,
                 metrics: MetricsSink | None = None, report: ReportSink | None = None,
                 pcap_writer: MaskingWriter | None = None) -> WorkersFeed:
    """The app's feed for ``spec`` (`LiveWorkerSpec.tui` set) over the attached ``source``."""
    return WorkersFeed(LiveWorkers(source, spec, None, reopen, metrics, report, pcap_writer))


class WorkersFeed:
    """The app's feed over live workers, with `Feed`'s face: ``source``, ``emit``, ``ready``,
    ``stopping``, ``summary_wanted``, ``run`` (on the app's capture thread), ``stop``."""

    ids_in_start_order = False
    """Each worker numbers its own flows (`FlowNumbers`): in start order within a worker only."""

    def __init__(self, runner: LiveWorkers, emit: Callable[[FeedUpdate], object] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wallclock: Callable[[], float] = time.time,
                 flush_interval: float = FLUSH_INTERVAL) -> None:
        assert runner.spec.tui is not None and runner.spec.report, \
            "the workers run the TUI's feed and send their ended flows"
        self.runner = runner
        runner.on_frame = self._frame
        self.source = runner.source
        self.emit = emit
        self.clock = clock
        self.wallclock = wallclock
        self.flush_interval = flush_interval
        self.ready = threading.Event()
        """Set by the UI when it takes batches, as `Feed.ready`."""
        self.ready.set()
        self.stopping = threading.Event()
        self.summary_wanted = threading.Event()
        self.error: str | None = None
        self.failure: str | None = None
        """A worker died or failed (`LiveWorkerFailed`): the run's exit status is 1."""
        self.done = False
        self.builder = ReportBuilder(runner.source.label)
        """Every flow the workers ended, for the summary."""
        workers = self.runner.workers
        self._status_of: list[CaptureStatus | None] = [None] * workers
        self._batch_of: list[FeedUpdate | None] = [None] * workers
        """Each worker's batch not yet given to the UI (a worker sends no other until told)."""
        self._part_of: list[SummaryPart | None] = [None] * workers
        self._asked = False
        """Whether the workers were told the summary is shown."""
        self._next_flush = 0.0
        self._next_summary = 0.0
        self._started = 0.0

    def stop(self) -> None:
        """Ask the capture to end (any thread)."""
        self.stopping.set()

    def run(self) -> None:
        """Attach, fork the workers and merge their updates until `stop`; then the final update."""
        self._started = self._next_flush = self.clock()
        try:
            self.runner.run(stop=self.stopping.is_set, on_tick=self._tick)
        except LiveWorkerFailed as exc:
            self.failure = str(exc)
        self.error = self.runner.error
        self.done = True
        now = self.clock()
        self._post(FeedUpdate(self._status(now, final=True)))
        while not self.stopping.is_set():
            if self.ready.wait(0.1):
                break
        self._flush(now, final=True)

    # --- what the workers send (the capture thread) ----------------------------------------

    def _frame(self, worker: int, kind: str, payload: Any) -> None:
        if kind == FEED_FRAME:
            update: FeedUpdate = payload
            self._status_of[worker] = update.status
            if update.batch:
                self._batch_of[worker] = update
        elif kind == PART_FRAME:
            self._part_of[worker] = payload
        elif kind == ENDED_FRAME:
            part = self._part_of[worker]
            for facts, audit in payload:
                self.builder.add(facts, audit)
                if part is not None:
                    part.open.pop(facts.flow, None)  # it ended after the part was made

    def _tick(self) -> None:
        wanted = self.summary_wanted.is_set()
        if wanted != self._asked:
            self._asked = wanted
            self.runner.tell(SUMMARY_ON if wanted else SUMMARY_OFF)
        now = self.clock()
        if now >= self._next_flush:
            self._next_flush = now + self.flush_interval
            self._flush(now)

    def _flush(self, now: float, final: bool = False) -> None:
        status = self._status(now, final)
        summary = None
        if final or (self._asked and now >= self._next_summary):
            self._next_summary = now + SUMMARY_INTERVAL
            summary = self.summary()
        batches = [(w, b) for w, b in enumerate(self._batch_of) if b is not None]
        if not batches or not self.ready.is_set():
            self._post(FeedUpdate(status, last=final and not batches, summary=summary))
            return
        self.ready.clear()
        flows = tuple(sorted(chain.from_iterable(b.flows for _, b in batches), key=lambda s: s.ref.id))
        messages: dict[int, MessageBatch] = {}
        for _, b in batches:
            messages.update(b.messages)
        gone = tuple(chain.from_iterable(b.gone for _, b in batches))
        for w, _ in batches:
            self._batch_of[w] = None
            self.runner.tell(TAKEN, w)
        self._post(FeedUpdate(status, flows, messages, gone, batch=True, last=final, summary=summary))

    def summary(self) -> Summary:
        """The ended flows' report with every worker's newest open flows counted in, and the
        workers' activity added up."""
        parts = [p for p in self._part_of if p is not None]
        report = self.builder.report_with(chain.from_iterable(p.open.values() for p in parts))
        return Summary(report, merged(p.activity for p in parts), sum(len(p.open) for p in parts))

    def _status(self, now: float, final: bool = False) -> CaptureStatus:
        statuses = [s for s in self._status_of if s is not None]
        counters = self.source.counters()
        if counters is not None:
            for name in WORKER_SOURCE_COUNTERS:
                counters[name] = sum((s.counters or {}).get(name, 0) for s in statuses)
        return CaptureStatus(
            source=self.source.label,
            live=True,
            segments=sum(s.segments for s in statuses),
            segments_per_s=0.0 if final else sum(s.segments_per_s for s in statuses),
            flows_open=sum(s.flows_open for s in statuses),
            flows_total=sum(s.flows_total for s in statuses),
            now=self.wallclock(),
            elapsed=now - self._started,
            counters=counters,
            done=final,
            error=self.error if final else None,
            totals=self.runner.stats() if final else None,
            notes=self.source.notes(),
            ended_dropped=sum(s.ended_dropped for s in statuses),
        )

    def _post(self, update: FeedUpdate) -> None:
        if self.emit is not None:
            self.emit(update)
