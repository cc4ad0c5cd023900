"""``imaptap -i IFACE --workers N``: a live capture's flows analysed by N forked processes.

The kernel program, built with ``IMAPTAP_WORKERS=N``, writes each record into ring buffer
``share_of(flow_hash, N)`` (`imaptap.flowshare`, the replay workers' share), so every segment of
a flow, both directions, reaches one ring.  The parent loads and attaches the programs once
(`LiveCapture`, privileges dropped as with one process), then forks one worker per ring.  Each
worker polls its own ring and runs the one `Pipeline` on it; the per-flow payload map is one map,
its descriptor inherited, and each worker writes the modes of its own flows.  The parent reads
no ring: it follows the interfaces (link events), reads the kernel's counters, and writes the
workers' JSON lines to the one output.

Pipes, per worker: its JSON lines (whole lines, in the order it wrote them, so a flow's records
stay in order), and a status pipe: one byte once its ring is open, then frames
(`imaptap.workers.send_frame`: a length, a pickle): with ``--metrics``, its metrics snapshot
after each refresh; with ``--report`` or ``--fail-on``, the facts and audits of the flows it
ended since its last tick (the parent's `ReportSink` adds them as they come, so its memory
stays the builder's bound however long the run); with the TUI, its feed's updates
(`imaptap.tui.workerfeed`); and its last word (its stats, or why it failed) before it ends.
With ``-w``, a third pipe: its pcap records, masked by its pipeline (`PipeSegmentWriter`),
which the parent writes whole into the one file.  With the TUI, a control pipe the other way:
a byte when the screen took its batch, or shows the summary or no longer does.  One pipe
shared by all, held open by the parent, tells them to stop: its end of file (the parent closes
it after detaching the programs, so what each ring still holds is the last of it) or the
parent's death (with the TUI, the death of the parent's capture thread, which forked them).

Flow ids: worker ``i`` of ``N`` numbers its flows ``i + 1``, ``i + 1 + N``, ``i + 1 + 2N``, ...:
unique over the run without the workers talking to each other, and ``(id - 1) % N`` names the
worker that analysed the flow.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imaptap.capture.live import LiveCapture, LiveError
from imaptap.capture.live.abi import ring_map
from imaptap.capture.live.ring import RecordReader
from imaptap.facts import FlowFacts
from imaptap.flows import Flow, FlowStats
from imaptap.output.jsonl import LIVE_FLUSH_INTERVAL, JsonlSink, JsonlWriter
from imaptap.output.metrics import WORKER_SOURCE_COUNTERS
from imaptap.pipeline import POLL_MS, LiveSource, Pipeline, Sink, Source, SourceError
from imaptap.segment import Segment
from imaptap.workers import WorkerFailed, send_frame, take_frames

if TYPE_CHECKING:
    from imaptap.capture.pcapwrite import MaskingWriter
    from imaptap.imap.audit import SessionAudit
    from imaptap.output.metrics import MetricsSink
    from imaptap.output.report import ReportSink

#: Bytes read from a worker's pipe at once: a pipe's default buffer.
READ_BYTES = 1 << 16
#: Seconds the parent waits on the workers' pipes before it looks at the stop flag, the links
#: and the clock again: a stop is seen within this, as with one process (`pipeline.POLL_MS`).
PARENT_POLL = POLL_MS / 1000
#: Seconds the parent waits for every worker to open its ring before it gives up (they only
#: fork, map a ring and start polling: well under a second on a loaded machine).
READY_TIMEOUT = 30.0
#: Seconds the parent waits, once it told the workers to stop, for the last of their output: a
#: worker then reads what its ring still holds (at most a few megabytes) and ends its open flows
#: (32,768 at most by default, a second or two); one that has not ended by then (stopped by a
#: signal, hung) is killed and named, so that a stop always ends the run.
STOP_TIMEOUT = 15.0
#: The status byte a worker sends once its ring is open and it polls.
READY = b"R"
#: The kinds of status frame after the ready byte (each a `send_frame` of (kind, payload)).
METRICS_FRAME = "metrics"
ENDED_FRAME = "ended"
LAST_FRAME = "last"
#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
_FLOW_STATS = tuple(f.name for f in dataclasses.fields(FlowStats))


class LiveWorkerFailed(WorkerFailed):
    """A live worker died or failed inside: one line; the CLI's exit status 1, as for replay's."""


@dataclass(frozen=True, slots=True)
class LiveWorkerSpec:
    """What each worker builds its pipeline from (the command line's choices)."""

    json: bool
    """JSON Lines are written."""
    messages: bool
    """Message records as well as flow records (not --flows-only)."""
    pipeline: dict[str, Any]
    """Pipeline's keyword arguments: max_flows (the whole run's, shared out), idle_timeout,
    flow_interval, password_fingerprint."""
    metrics_server_label: bool | None = None
    """With --metrics: whether --metrics-label server is given; None without --metrics."""
    ecs: bool = False
    """--json-format ecs: the worker formats its lines as ECS documents (`EcsSink`)."""
    report: bool = False
    """--report or --fail-on: each ended flow's facts and audit go to the parent's report."""
    pcap_ports: frozenset[int] | None = None
    """With -w: the ports the worker's `MaskingWriter` takes for IMAP; None without -w."""
    tui: float | None = None
    """On a terminal: the worker runs the TUI's `Feed` and ships its updates to the parent's
    app (`imaptap.tui.workerfeed`); the value is the time every worker's `Activity` starts at,
    so that the parent adds their buckets exactly.  None: JSON Lines and the other outputs only."""


class FlowNumbers(Sink):
    """The first sink of worker ``index`` of ``workers``: renumbers each new flow into the
    worker's own residue class of ids, before any other sink sees the flow."""

    def __init__(self, index: int, workers: int) -> None:
        self.index = index
        self.workers = workers

    def flow_started(self, flow: Flow) -> None:
        flow.id = (flow.id - 1) * self.workers + self.index + 1
        return None


class WorkerRingSource(Source):
    """One worker's ring of an attached `LiveCapture` (the parent's, inherited by fork): polled
    like the one-process capture, drained once more at the end; the parent attaches and detaches."""

    live = True

    def __init__(self, capture: LiveCapture, index: int, ready_fd: int) -> None:
        self.capture = capture
        self.index = index
        self.label = ",".join(capture.interfaces)
        self.ports = frozenset(capture.ports)
        self.policy = capture.policy
        self.reader = RecordReader()
        self.ready_fd = ready_fd

    def open(self) -> None:
        bpf = self.capture._bpf
        assert bpf is not None, "the parent attached before it forked"
        self.reader.refresh_clock()
        self.reader.open(bpf, True, ring_map(self.index))
        os.write(self.ready_fd, READY)

    def segments(self) -> Generator[Segment | None, None, None]:
        poll = self.reader.poll
        while True:
            yield from poll(POLL_MS)
            yield None

    def close(self) -> Iterable[Segment]:
        self.reader.close()  # the programs are off: what the ring holds is the last of it
        return self.reader.poll(0)

    def totals(self) -> dict[str, Any]:
        return {"received": self.reader.received, "malformed": self.reader.malformed,
                "policy_errors": self.capture.policy.kernel_errors}


class ParentLiveSource(LiveSource):
    """The parent's view of the capture: its notes and counters, and a readiness line that says
    how many workers read it."""

    def __init__(self, capture: LiveCapture) -> None:
        super().__init__(capture)
        self.workers = capture.workers

    def listening(self) -> str | None:
        line = super().listening()
        return None if line is None else f"{line}, {self.workers} worker processes"


def _shipping_metrics(server_label: bool, fd: int) -> Sink:
    """A worker's `MetricsSink`, serving nothing: each snapshot it takes goes to the parent."""
    from imaptap.output.metrics import MetricsSink

    class ShippedMetrics(MetricsSink):
        def refresh(self, pipeline: Pipeline) -> None:
            super().refresh(pipeline)
            send_frame(fd, (METRICS_FRAME, self.snapshot))

    return ShippedMetrics(server_label=server_label)


class ShippedEnds(Sink):
    """A worker's side of --report and --fail-on: each ended flow's facts and session audit
    (what `ReportSink` adds to its builder) go to the parent in a status frame at each tick,
    as the replay workers' `WorkerOutput` carries them; the parent's `ReportSink` adds them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ended: list[tuple[FlowFacts, SessionAudit]] = []

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.ended.append((facts, flow.session.audit))

    def tick(self, pipeline: Pipeline) -> None:
        self.send()

    def finished(self, pipeline: Pipeline) -> None:
        self.send()  # the flows the stop ended, before the worker's last word

    def send(self) -> None:
        """The flows ended since the last frame, in the order they ended."""
        if self.ended:
            send_frame(self.fd, (ENDED_FRAME, self.ended))
            self.ended = []


class PcapFlush(Sink):
    """With -w: a worker's records go to the parent at each tick, not only when a buffer fills."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.flush = flush

    def tick(self, pipeline: Pipeline) -> None:
        self.flush()


def _stop_requested(fd: int) -> Callable[[], bool]:
    """Whether the parent's stop pipe has ended (closed by it, or by its death)."""

    def stopped() -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    return stopped


def _close_links() -> None:
    """Close the inherited BPF link descriptors: only the parent may keep the programs attached,
    so that its death, however it dies, takes them off (the kernel detaches a link whose last
    descriptor is closed)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:bpf_link":
                os.close(int(name))
        except OSError:
            continue


def run_worker(capture: LiveCapture, index: int, spec: LiveWorkerSpec, out_fd: int, status_fd: int,
               stop_fd: int, pcap_fd: int | None = None, control_fd: int | None = None) -> None:
    """The body of worker ``index``: its ring through the one pipeline, its lines to ``out_fd``,
    readiness and its last word to ``status_fd``, until ``stop_fd`` ends (with the TUI, what
    the app asks for on ``control_fd``)."""
    workers = capture.workers
    writer = JsonlWriter(os.fdopen(out_fd, "w", encoding="utf-8", buffering=READ_BYTES), "the worker's pipe")
    numbers = FlowNumbers(index, workers)
    sinks: list[Sink] = []
    if spec.json and spec.ecs:
        from imaptap.output.ecs import EcsSink

        sinks.append(EcsSink(writer, spec.messages))
    elif spec.json:
        sinks.append(JsonlSink(writer, spec.messages))
    if spec.report:
        sinks.append(ShippedEnds(status_fd))
    if spec.metrics_server_label is not None:
        sinks.append(_shipping_metrics(spec.metrics_server_label, status_fd))
    options = dict(spec.pipeline)
    options["max_flows"] = -(-options["max_flows"] // workers)  # its share of the bound
    masking = None
    if pcap_fd is not None:
        from imaptap.capture.pcapwrite import MaskingWriter, PipeSegmentWriter

        assert spec.pcap_ports is not None
        records = PipeSegmentWriter(pcap_fd, READ_BYTES)
        # the one pipeline masks the worker's flows as one process masks them; the parent writes
        masking = MaskingWriter(records.path, spec.pcap_ports, out=records)
        sinks.append(PcapFlush(records.flush))
    source = WorkerRingSource(capture, index, status_fd)
    if spec.tui is not None:
        from imaptap.tui.workerfeed import WorkerFeed

        assert control_fd is not None
        del options["flow_interval"]  # flow updates are JSON records: the TUI shows flows as they are
        feed = WorkerFeed(source, status_fd, control_fd, _stop_requested(stop_fd), spec.tui, before=[numbers],
                          sinks=sinks, pcap_writer=masking, **options)
        feed.run()
        pipeline = feed.pipeline
    else:
        pipeline = Pipeline(source, [numbers, *sinks], pcap_writer=masking, **options)
        pipeline.run(stop=_stop_requested(stop_fd))
    writer.flush()
    send_frame(status_fd, (LAST_FRAME, {"stats": pipeline.stats(), "error": pipeline.error}))


class LiveWorkers:
    """A live capture analysed by worker processes, with the one-process `Pipeline`'s `run`,
    `error`, `stopped`, `stats` and `source` as the command line uses them."""

    def __init__(self, source: LiveSource, spec: LiveWorkerSpec, writer: JsonlWriter | None,
                 reopen: Sink | None = None, metrics: MetricsSink | None = None,
                 report: ReportSink | None = None, pcap_writer: MaskingWriter | None = None,
                 on_frame: Callable[[int, str, Any], None] | None = None) -> None:
        self.capture: LiveCapture = source.capture
        self.workers = self.capture.workers
        self.source = ParentLiveSource(self.capture)
        self.spec = spec
        self.writer = writer
        self.reopen = reopen
        """The CLI's `ReopenSink` (SIGUSR1), ticked by the parent's loop."""
        self.error: str | None = None
        self.stopped = False
        self.pcap_writer = pcap_writer
        """-w: the one file, opened by the command line; it writes the records the workers
        masked and sent (`_read`), and `ReopenSink` reopens it."""
        self.finals: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.failure: str | None = None
        """Why a worker ended before it was told to, as one line."""
        self.metrics = metrics
        """The CLI's --metrics sink: it serves the workers' snapshots merged (`_publish`)."""
        self.report = report
        """The CLI's --report/--fail-on sink: it adds the flows the workers ended (`ENDED_FRAME`)
        as they come, and makes the report once every worker has ended."""
        self.on_frame = on_frame
        """With the TUI (`LiveWorkerSpec.tui`): called with (worker, kind, payload) for every
        status frame but the last word (`imaptap.tui.workerfeed.WorkersFeed` merges them)."""
        self._controls: list[int] = []
        """With the TUI: the write end of each worker's control pipe (`tell`)."""
        self._snapshots: list[Any] = []
        """Each worker's newest metrics snapshot (None before its first)."""
        self._next_publish = 0.0
        self._pids: list[int] = []

    # --- a worker ---------------------------------------------------------------------------

    def _fork(self, index: int, out_fd: int, status_fd: int, stop_fd: int, pcap_fd: int | None,
              control_fd: int | None, others: list[int]) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        status = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # it died before the line above
                os._exit(1)
            # A stop is the parent's to decide: it detaches first, then closes the stop pipe.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(s, signal.SIG_IGN)
            for fd in others:
                os.close(fd)
            if self.metrics is not None and self.metrics.httpd is not None:
                self.metrics.httpd.socket.close()  # the parent's to answer on, and to close
            _close_links()
            from imaptap.privileges import keep_map_access

            keep_map_access()
            run_worker(self.capture, index, self.spec, out_fd, status_fd, stop_fd, pcap_fd, control_fd)
            status = 0
        except BaseException as exc:  # anything: the parent says it in one line
            try:
                line = traceback.format_exception_only(type(exc), exc)[-1].strip()
                send_frame(status_fd, (LAST_FRAME, {"failed": line}))
            except BaseException:
                pass
        finally:
            os._exit(status)

    # --- the parent -------------------------------------------------------------------------

    def run(self, stop: Callable[[], object] = lambda: False, on_tick: Callable[[], None] | None = None,
            on_open: Callable[[Source], None] | None = None) -> None:
        """Attach, fork the workers, write their lines until ``stop()``, then detach and collect
        the rest; LiveWorkerFailed where a worker died."""
        self.started = time.monotonic()
        try:
            self.source.open()
        except SourceError as exc:
            self.error = str(exc)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        stop_r, stop_w = os.pipe()
        outs = [os.pipe() for _ in range(self.workers)]
        statuses = [os.pipe() for _ in range(self.workers)]
        pcaps = [os.pipe() for _ in range(self.workers)] if self.pcap_writer is not None else []
        controls = [os.pipe() for _ in range(self.workers)] if self.spec.tui is not None else []
        every = [stop_r, stop_w] + [fd for pair in outs + statuses + pcaps + controls for fd in pair]
        try:
            for index in range(self.workers):
                pcap_w = pcaps[index][1] if pcaps else None
                control_r = controls[index][0] if controls else None
                theirs = {outs[index][1], statuses[index][1], stop_r, pcap_w, control_r}
                others = [fd for fd in every if fd not in theirs]
                self._pids.append(self._fork(index, outs[index][1], statuses[index][1], stop_r, pcap_w, control_r,
                                             others))
        finally:
            for fd in [stop_r] + [w for _r, w in outs + statuses + pcaps] + [r for r, _w in controls]:
                os.close(fd)
        self._controls = [w for _r, w in controls]
        for fd in self._controls:
            os.set_blocking(fd, False)  # a worker that does not read never holds up the app
        self._outs = {r: i for i, (r, _w) in enumerate(outs)}
        self._statuses = {r: i for i, (r, _w) in enumerate(statuses)}
        self._pcaps = {r: i for i, (r, _w) in enumerate(pcaps)}
        self._pcap_partial = [b""] * self.workers
        self._partial = [b""] * self.workers
        self._status = [bytearray() for _ in range(self.workers)]
        self._ready = [False] * self.workers
        self._ended = [False] * self.workers
        self._open = set(self._outs) | set(self._statuses) | set(self._pcaps)
        self.finals = [{} for _ in range(self.workers)]
        self._last: list[dict[str, Any] | None] = [None] * self.workers
        self._snapshots = [None] * self.workers
        try:
            ready = self._wait_ready(stop)
            if ready and self.metrics is not None:
                self._publish()
                self.metrics.opened(self)  # type: ignore[arg-type]  # it reads nothing of it
            if ready and on_open is not None:
                on_open(self.source)
            next_flush = time.monotonic() + LIVE_FLUSH_INTERVAL
            while self.failure is None and not self.stopped:
                if stop():
                    self.stopped = True
                    break
                self.capture.follow()
                self._read(PARENT_POLL)
                now = time.monotonic()
                if self.writer is not None and now >= next_flush:
                    next_flush = now + LIVE_FLUSH_INTERVAL
                    self.writer.flush()
                if self.reopen is not None:
                    self.reopen.tick(self)  # type: ignore[arg-type]  # it reads .pcap_writer only
                if self.metrics is not None and now >= self._next_publish:
                    self._publish()
                if on_tick is not None:
                    on_tick()
        finally:
            try:
                self.source.close()  # detached: nothing more reaches the rings
            except SourceError as exc:
                self.error = self.error or str(exc)
            finally:
                os.close(stop_w)
            self._drain()
            self._reap()
            if self.pcap_writer is not None:
                self.pcap_writer.close()
        for r in list(self._outs) + list(self._statuses) + list(self._pcaps) + self._controls:
            os.close(r)
        self._controls = []
        if self.metrics is not None:
            self._publish()  # every worker's last snapshot, the counters after detaching
        self._collect()
        if self.report is not None:
            self.report.finished(self)  # type: ignore[arg-type]  # it reads .source.label

    def _publish(self) -> None:
        """The scrape's new snapshot: the workers' newest, summed, with the parent's counters."""
        assert self.metrics is not None
        from imaptap.output.metrics import REFRESH_SECONDS

        self._next_publish = time.monotonic() + REFRESH_SECONDS
        self.metrics.publish_merged([s for s in self._snapshots if s is not None], self.source.counters()
                                    or self.capture.counters())

    def tell(self, byte: bytes, worker: int | None = None) -> None:
        """Send one control byte to ``worker`` (every worker if None); with the TUI only.  A
        worker that is gone, or whose pipe is full, misses it: its death is seen on its pipes."""
        for fd in self._controls if worker is None else self._controls[worker:worker + 1]:
            try:
                os.write(fd, byte)
            except OSError:
                pass

    def _wait_ready(self, stop: Callable[[], object]) -> bool:
        """Wait until every worker polls its ring; False if one failed or a stop came first."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(self._ready):
            if self.failure is not None or any(self._ended):
                return False
            if stop():
                self.stopped = True
                return False
            if time.monotonic() > deadline:
                self.failure = f"the workers did not start within {READY_TIMEOUT:.0f} s"
                return False
            self._read(PARENT_POLL)
        return True

    def _read(self, timeout: float | None) -> None:
        """Take what the workers wrote: whole JSON lines to the writer, status bytes kept."""
        if not self._open:
            return
        for fd in select.select(list(self._open), [], [], timeout)[0]:
            data = os.read(fd, READ_BYTES)
            if fd in self._outs:
                w = self._outs[fd]
                if not data:
                    self._open.discard(fd)
                    continue
                data = self._partial[w] + data
                cut = data.rfind(b"\n") + 1
                self._partial[w] = data[cut:]
                if cut and self.writer is not None:
                    self.writer.write(data[:cut].decode("utf-8"))
            elif fd in self._pcaps:
                self._pcap_records(self._pcaps[fd], fd, data)
            else:
                w = self._statuses[fd]
                if not data:
                    self._open.discard(fd)
                    self._ended[w] = True
                    self._last_word(w)
                    continue
                if not self._ready[w] and data[:1] == READY:
                    self._ready[w] = True
                    data = data[1:]
                self._frames(w, data)

    def _drain(self) -> None:
        """The rest of what the workers write once told to stop, until every pipe ends; the
        workers still writing after `STOP_TIMEOUT` are killed, the first named as the failure."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._open:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._read(min(left, PARENT_POLL))
        hung = sorted({w for fds in (self._outs, self._statuses, self._pcaps)
                       for fd, w in fds.items() if fd in self._open})
        for w in hung:
            pid = self._pids[w] if w < len(self._pids) else 0
            if not pid:  # reaped already (0: never a pid to signal, it names our process group)
                continue
            if self.failure is None:
                self.failure = (f"live worker {w + 1} of {self.workers} did not stop within {STOP_TIMEOUT:.0f} s:"
                                " killed, its last flows are lost")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while self._open:  # a killed worker's pipes end with it
            self._read(None)

    def _pcap_records(self, w: int, fd: int, data: bytes) -> None:
        """Worker ``w``'s whole pcap records to the one file, the rest kept for the next read."""
        from imaptap.capture.pcapwrite import whole_records

        if not data:
            self._open.discard(fd)
            return
        assert self.pcap_writer is not None
        data = self._pcap_partial[w] + data
        end, count = whole_records(data)
        self._pcap_partial[w] = data[end:]
        if count:
            self.pcap_writer.write_records(data[:end], count)

    def _frames(self, w: int, data: bytes) -> None:
        """Worker ``w``'s whole status frames taken, what is not yet whole kept for the next read."""
        buf = self._status[w]
        buf += data
        for frame in take_frames(buf):
            try:
                kind, payload = pickle.loads(frame)
            except Exception as exc:  # cut short by a failure inside the worker: it ends anyway
                if self.failure is None:
                    self.failure = f"live worker {w + 1} of {self.workers} sent a broken status frame: {exc!r}"
                buf.clear()
                return
            if kind == METRICS_FRAME:
                self._snapshots[w] = payload
            elif kind == LAST_FRAME:
                self._last[w] = payload
            else:
                if kind == ENDED_FRAME and self.report is not None:
                    add = self.report.builder.add
                    for facts, audit in payload:
                        add(facts, audit)
                if self.on_frame is not None:
                    self.on_frame(w, kind, payload)

    def _last_word(self, w: int) -> None:
        """Worker ``w`` ended: its last word kept, or the first failure the run's."""
        last = self._last[w]
        final: dict[str, Any] = last if last is not None else {}
        self.finals[w] = final
        if self.failure is None:
            if last is None:
                self.failure = self._death(w)
            elif "failed" in final:
                self.failure = f"live worker {w + 1} of {self.workers} failed: {final['failed']}"

    def _death(self, w: int) -> str:
        """The one line for worker ``w``, whose status pipe ended without its last word."""
        pid = self._pids[w]
        how = "ended"
        try:
            done, status = os.waitpid(pid, 0)
            self._pids[w] = 0
            if os.WIFSIGNALED(status):
                how = f"was killed by signal {os.WTERMSIG(status)}"
            elif os.WIFEXITED(status):
                how = f"exited with status {os.WEXITSTATUS(status)}"
        except ChildProcessError:
            pass
        return f"live worker {w + 1} of {self.workers} {how}: capture stopped, its flows are lost"

    def _reap(self) -> None:
        for pid in self._pids:
            if pid:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        self._pids.clear()

    def _collect(self) -> None:
        """The run's error: a worker's failure, else the first error a worker's input had."""
        for final in self.finals:
            if final.get("error") and self.error is None:
                self.error = final["error"]
        if self.failure is not None:
            self.error = self.failure
            raise LiveWorkerFailed(self.failure)

    def stats(self) -> dict[str, Any]:
        """The stats record of one process: the parent's capture counters with the workers'
        own counts summed in, and the workers' flow counts summed."""
        record: dict[str, Any] = {"source": self.source.label}
        record.update(self.source.totals())
        for name in WORKER_SOURCE_COUNTERS:  # each worker counts these for itself
            record[name] = sum(final.get("stats", {}).get(name, 0) for final in self.finals)
        if self.stopped:
            record["stopped_by_signal"] = True
        for name in _FLOW_STATS:
            record[name] = sum(final.get("stats", {}).get(name, 0) for final in self.finals)
        if self.pcap_writer is not None:
            record["written"] = self.pcap_writer.records
        record["seconds"] = round(time.monotonic() - self.started, 3)
        if self.error:
            record["error"] = self.error
        return record


__all__ = ["LiveError", "LiveWorkerFailed", "LiveWorkerSpec", "LiveWorkers", "run_worker"]
