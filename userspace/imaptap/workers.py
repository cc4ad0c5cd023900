"""``imaptap -r FILE --workers N``: a replay's flows analysed by N forked processes.

Each worker reads the whole file and runs the one pipeline on the flows its share names
(`imaptap.flowshare`: a symmetric hash of the 4-tuple); the parent merges the workers' JSON
lines into exactly the order one process writes them, and writes them.

What decides that order in one process, and the merge key each line group carries here, from
the most significant part down:

1. the segment being processed: its index among all the file's segments on the watched ports
   (every worker counts the others' segments too, so the index is the same in all of them);
   the end of the input comes after every segment;
2. the step of that segment's processing: a round of ``--flow-interval`` records first (the
   flows idle past the timeout by then end, then an update of each open flow), then the idle
   sweep the segment's time makes, then the segment itself (its flow's messages, its end on
   FIN or RST, a flow it replaces or evicts); at the end of the input, every open flow ends;
3. within the rounds, the sweeps and the end: the flow's place in the flow table, which is
   least recently active first, that is the index of the flow's last segment; within a
   segment's own step, the order the worker wrote them in (that step is one worker's alone).

Flow ids are numbered in order of creation over the whole file: each worker marks where it
created a flow, and the parent, meeting the marks in merge order, gives each flow its id and
writes it into the flow's lines in place of the worker's own numbering.

The output is byte for byte that of one process (tests/replay/test_workers.py, on every
capture) as long as no flow is evicted: ``--max-flows`` bounds each worker's table, which
holds only its share, so a full table evicts another flow than one process would.  Each
worker's clock follows every segment's time: the readers hand a worker the time of another
worker's segment only where it may make an idle sweep or a round (`FlowShare.wake`).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import os
import pickle
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from imaptap.facts import FlowFacts
from imaptap.flows import Flow, FlowStats
from imaptap.flowshare import FlowShare
from imaptap.linemerge import LineGroups, merge
from imaptap.output.jsonl import JsonlSink, JsonlWriter
from imaptap.pipeline import Pipeline, ReplaySource, Sink
from imaptap.segment import Segment

if TYPE_CHECKING:
    from imaptap.output.report import ReportSink

#: A pipe's buffer, as large as Linux allows without privileges (/proc/sys/fs/pipe-max-size):
#: a worker that runs ahead of the merge writes on until it is full.
PIPE_SIZE = 1 << 20
#: Bytes the parent reads ahead of the merge from one worker at most (a few chunks): beyond,
#: the worker waits on its pipe.
MAX_BUFFERED = 64 << 20
#: Seconds the parent waits for a worker's data before it looks at the stop flag again.
STOP_POLL = 0.1
#: The length before each pickled frame a worker sends its parent (replay and live workers).
_LENGTH = struct.Struct("!Q")
_FLOW_STATS = tuple(f.name for f in dataclasses.fields(FlowStats))



def send_frame(fd: int, obj: Any) -> None:
    """``obj`` pickled to the parent as one length-prefixed frame, written whole (a blocking pipe)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    os.write(fd, _LENGTH.pack(len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def take_frames(buf: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buf``, taken out of it without their lengths; a frame
    not yet whole stays for the next read."""
    frames = []
    while len(buf) >= _LENGTH.size:
        (n,) = _LENGTH.unpack_from(buf)
        if len(buf) < _LENGTH.size + n:
            break
        frames.append(bytes(buf[_LENGTH.size:_LENGTH.size + n]))
        del buf[:_LENGTH.size + n]
    return frames

class WorkerFailed(Exception):
    """A worker process died or failed inside (a bug, or killed): one line."""


class _ShareWriter(JsonlWriter):
    """The worker's JSON writer: its lines stay in `_lines` until `WorkerOutput` sends them."""

    def _drain(self) -> None:
        pass


class WorkerOutput(Sink):
    """A worker's side of the merge: the pipeline's events handed to its `LineGroups`, which
    groups the JSON lines its pipeline writes, each with its merge key and its flow; the
    groups go to the parent in chunks."""

    def __init__(self, share: FlowShare, writer: _ShareWriter, fd: int, report: bool = False) -> None:
        self.share = share
        self.report = report
        """Each ended flow's facts and audit go to the parent too (--report, --fail-on)."""
        self.groups = LineGroups(share, writer._lines)
        self.fd = fd

    def flow_started(self, flow: Flow) -> None:
        self.groups.started(flow.id)
        return None

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.groups.ended(flow, (facts, flow.session.audit) if self.report else None)

    def flow_update(self, flow: Flow, facts: FlowFacts, ts: float) -> None:
        self.groups.updated(flow)

    def tick(self, pipeline: Pipeline) -> None:
        if self.groups.groups:
            self.send()

    def hook(self, pipeline: Pipeline) -> Callable[[Segment], None]:
        """What takes each item of the worker's source: a segment of its share, or the time of
        another worker's segment (a float)."""
        rounds = pipeline.flow_interval is not None
        self.groups.attach(pipeline.table, pipeline.round_due if rounds else None, pipeline.wake, self.send)
        return self.groups.take

    def send(self, final: dict[str, Any] | None = None) -> None:
        """The groups made so far to the parent (and ``final``, the worker's last word)."""
        send_frame(self.fd, (self.groups.items(self.share.index), final))


@dataclasses.dataclass
class WorkerSpec:
    """What each worker builds its pipeline from (the command line's choices)."""

    path: str
    ports: frozenset[int]
    snaplen: int
    taillen: int
    handshake_snaplen: int
    json: bool
    """JSON Lines are written."""
    messages: bool
    """Message records as well as flow records (not --flows-only)."""
    report: bool
    """--report or --fail-on: the parent builds the report from every ended flow's facts."""
    pipeline: dict[str, Any]
    """Pipeline's keyword arguments: max_flows, idle_timeout, flow_interval, password_fingerprint."""


def run_worker(spec: WorkerSpec, share: FlowShare, fd: int, stop: Callable[[], object] = lambda: False) -> None:
    """One worker's pipeline over its share, its items and last word sent to ``fd`` (also
    what scripts/bench-workers times in one process)."""
    source = ReplaySource(spec.path, spec.ports, spec.snaplen, spec.taillen,
                          handshake_snaplen=spec.handshake_snaplen, share=share)
    writer = _ShareWriter(sys.stderr, "the worker's lines")
    output = WorkerOutput(share, writer, fd, spec.report)
    sinks: list[Sink] = [JsonlSink(writer, spec.messages)] if spec.json else []
    pipeline = Pipeline(source, [*sinks, output], add_hook=output.hook, **spec.pipeline)
    pipeline.run(stop=stop)
    output.send({"stats": pipeline.stats(), "error": pipeline.error, "stopped": pipeline.stopped})


class ReplayWorkers:
    """A replay run by worker processes, with the one-process `Pipeline`'s `run`, `error`,
    `stopped` and `stats` as the command line uses them."""

    def __init__(self, workers: int, spec: WorkerSpec, writer: JsonlWriter | None, source: ReplaySource,
                 report: ReportSink | None = None) -> None:
        self.workers = workers
        self.spec = spec
        self.writer = writer
        self.source = source
        """The command line's source: its label names the input in the report."""
        self.report = report
        self.error: str | None = None
        self.stopped = False
        self.finals: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._pids: list[int] = []

    # --- a worker ---------------------------------------------------------------------------

    def _work(self, index: int, fd: int) -> int:
        """The body of worker ``index``, writing to ``fd``; its exit status."""
        stop: list[int] = []
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, lambda signum, frame: stop.append(signum))
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        run_worker(self.spec, FlowShare(self.workers, index), fd, stop.__len__)
        return 0

    def _fork(self, index: int, fd: int, others: list[int]) -> int:
        pid = os.fork()
        if pid:
            return pid
        status = 1
        try:
            for other in others:
                os.close(other)
            status = self._work(index, fd)
        except BaseException as exc:  # anything: the parent says it in one line
            try:
                line = traceback.format_exception_only(type(exc), exc)[-1].strip()
                send_frame(fd, ([], {"failed": line}))
            except BaseException:
                pass
        finally:
            os._exit(status)

    # --- the parent -------------------------------------------------------------------------

    def run(self, stop: Callable[[], object] = lambda: False, on_tick: object = None,
            on_open: object = None) -> None:
        """Fork the workers, merge their lines into the writer, wait for them."""
        self.started = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pipes = [os.pipe() for _ in range(self.workers)]
        for _r, w in pipes:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller limit: slower, not wrong
        done = False
        try:
            for index, (r, w) in enumerate(pipes):
                others = [fd for i, pair in enumerate(pipes) if i != index for fd in pair] + [r]
                self._pids.append(self._fork(index, w, others))
            for _r, w in pipes:
                os.close(w)
            self._merge([r for r, _w in pipes], stop)
            done = True
            if self.report is not None:
                self.report.finished(self)  # type: ignore[arg-type]  # it reads .source.label
        finally:
            for r, _w in pipes:
                os.close(r)
            self._reap(kill=not done)

    def _merge(self, fds: list[int], stop: Callable[[], object]) -> None:
        """Write the workers' items in merge-key order (`linemerge.merge`)."""
        self._stop = stop
        self._stopping = False
        self._fds = fds
        self._frames: list[collections.deque[bytes]] = [collections.deque() for _ in fds]
        self._partial = [bytearray() for _ in fds]
        """The start of a chunk not yet whole, per worker."""
        self._buffered = [0] * len(fds)
        """Bytes read from each worker and not yet merged."""
        self._ended = [False] * len(fds)
        finals: list[dict[str, Any]] = [{} for _ in fds]
        merge(len(fds), lambda w: self._chunk(w, fds[w], finals),
              self.writer.write if self.writer is not None else None,
              self.report.builder.add if self.report is not None else None)
        self.finals = finals
        first = finals[0]
        for i, final in enumerate(finals):
            if "failed" in final:
                raise WorkerFailed(f"worker {i + 1} of {len(fds)} failed: {final['failed']}")
        self.error = first.get("error")
        self.stopped = any(final.get("stopped") for final in finals)

    def _chunk(self, worker: int, fd: int, finals: list[dict[str, Any]]) -> list[Any] | None:
        """The next items of one worker (never an empty list), None after its last word (kept
        in ``finals``)."""
        frames = self._frames[worker]
        while finals[worker] == {}:
            while not frames:
                self._pump(worker)
            data = frames.popleft()
            self._buffered[worker] -= len(data)
            items, final = pickle.loads(data)
            if final is not None:
                finals[worker] = final
            if items:
                return items
        return None

    def _pump(self, needed: int) -> None:
        """Read whatever the workers have written, until worker ``needed`` has a whole chunk or
        a pause; pass a stop on to every worker.  Reading every worker, not only the one the
        merge waits for, keeps one that runs ahead from blocking on a full pipe while another
        one is not scheduled (a shared machine), up to `MAX_BUFFERED` bytes each."""
        if not self._stopping and self._stop():
            self._stopping = True
            for pid in self._pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        fds = self._fds
        watched = [fd for w, fd in enumerate(fds) if not self._ended[w]
                   and (w == needed or self._buffered[w] < MAX_BUFFERED)]
        for fd in select.select(watched, [], [], STOP_POLL)[0]:
            w = fds.index(fd)
            data = os.read(fd, PIPE_SIZE)
            if not data:
                self._ended[w] = True
                continue
            buf = self._partial[w]
            buf += data
            frames = take_frames(buf)
            self._frames[w].extend(frames)
            self._buffered[w] += len(data) - _LENGTH.size * len(frames)
        if self._ended[needed] and not self._frames[needed]:
            raise WorkerFailed(f"worker {needed + 1} ended without its results")

    def _reap(self, kill: bool) -> None:
        """Wait for every worker; ``kill`` them first where the merge did not end (the output
        failed, a worker failed): nothing they still say would be written."""
        for pid in self._pids:
            if kill:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._pids.clear()

    def stats(self) -> dict[str, Any]:
        """The stats record one process would write: the reader's counts of any worker (each
        read the whole file), the flow counts summed."""
        # Worker 1's record in its order: "segments" is the reader's key and the table's, and
        # the table's value (which is summed) stands at the reader's place, as in one process.
        record = dict(self.finals[0].get("stats", {})) if self.finals else {}
        record.pop("seconds", None)
        record.pop("error", None)
        for name in _FLOW_STATS:
            record[name] = sum(final.get("stats", {}).get(name, 0) for final in self.finals)
        record["seconds"] = round(time.monotonic() - self.started, 3)
        if self.error:
            record["error"] = self.error
        return record
