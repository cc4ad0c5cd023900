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
import enum
import fcntl
import heapq
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
from imaptap.flows import EndReason, Flow, FlowStats
from imaptap.flowshare import FlowShare
from imaptap.output.jsonl import JsonlSink, JsonlWriter
from imaptap.pipeline import Pipeline, ReplaySource, Sink
from imaptap.segment import FlowKey, Segment, flow_key

if TYPE_CHECKING:
    from imaptap.output.report import ReportSink

class Step(enum.IntEnum):
    """The steps of a segment's processing, in the order one process takes them (merge key part 2)."""

    ROUND_END = 0
    """A --flow-interval round: a flow idle past the timeout at the round's time ends."""
    ROUND_UPDATE = 1
    """A --flow-interval round: an open flow's flow_update record."""
    SWEEP = 2
    """The idle sweep a segment's time makes."""
    SEGMENT = 3
    """The segment itself."""
    INPUT_END = 4
    """The end of the input: every open flow ends."""


#: Bits of the merge key below the step: a flow's last segment index or a worker's count of
#: line groups, each below 2**40 (a trillion segments).
SUB_BITS = 40
#: The step and the segment index above it: the end of the input comes after any segment.
STEP_BITS = 3
END_INDEX = 1 << SUB_BITS
#: Above every merge key.
END_KEY = (END_INDEX + 1) << (STEP_BITS + SUB_BITS)
#: Line groups the parent joins into one write.
WRITE_ITEMS = 1024
#: Lines a worker collects before it sends them (about a megabyte): large chunks make the
#: pipe cheap, and a worker sends what it has at every tick of its source too.
SEND_LINES = 4096
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


def _key(index: int, step: Step, sub: int) -> int:
    return (((index << STEP_BITS) | step) << SUB_BITS) | sub


class _ShareWriter(JsonlWriter):
    """The worker's JSON writer: its lines stay in `_lines` until `WorkerOutput` sends them."""

    def _drain(self) -> None:
        pass


class WorkerOutput(Sink):
    """A worker's side of the merge: groups the JSON lines its pipeline writes, each with its
    merge key and its flow, and sends them to the parent in chunks."""

    def __init__(self, share: FlowShare, writer: _ShareWriter, fd: int, report: bool = False) -> None:
        self.share = share
        self.report = report
        """Each ended flow's facts and audit go to the parent too (--report, --fail-on)."""
        self.lines = writer._lines
        self.fd = fd
        self.index = 0
        """The index of the segment being processed (1 for the first)."""
        self.step = Step.SWEEP
        self.groups: list[tuple[int, int, int, int, bool, Any]] = []
        """(merge key, end in `lines`, the worker's flow id, a flow's creation, the flow's last
        lines, its facts and audit for the report or None)."""
        self.start = 0
        """Where the lines not yet in a group start."""
        self.count = 0
        """Line groups made so far: the order of a segment's own groups."""
        self.last: dict[FlowKey, int] = {}
        """Each open flow's last segment index, by flow key: its place in the table."""

    # --- grouping ---------------------------------------------------------------------------

    def _group(self, key: int, flow_id: int, ends: bool = False, ended: Any = None) -> None:
        self.groups.append((key, len(self.lines), flow_id, 0, ends, ended))
        self.start = len(self.lines)

    def _own_key(self) -> int:
        self.count += 1
        return _key(self.index, Step.SEGMENT, self.count)

    def flow_started(self, flow: Flow) -> None:
        if len(self.lines) > self.start:  # not expected: every earlier line belongs to a flow's end
            self._group(self._own_key(), -1)
        self.groups.append((self._own_key(), len(self.lines), flow.id, 1, False, None))
        return None

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        reason = flow.end_reason
        place = self.last.pop(flow.key, 0)
        if reason is EndReason.END:
            key = _key(END_INDEX, Step.INPUT_END, place)
        elif reason is EndReason.IDLE:
            key = _key(self.index, self.step, place)
        else:
            key = self._own_key()
        self._group(key, flow.id, True, (facts, flow.session.audit) if self.report else None)

    def flow_update(self, flow: Flow, facts: FlowFacts, ts: float) -> None:
        self._group(_key(self.index, Step.ROUND_UPDATE, self.last[flow.key]), flow.id)

    def tick(self, pipeline: Pipeline) -> None:
        if self.groups:
            self.send()

    def hook(self, pipeline: Pipeline) -> Callable[[Segment], None]:
        """What takes each item of the worker's source: a segment of its share, or the time of
        another worker's segment (a float)."""
        table = pipeline.table
        flows = table.flows
        add, advance, round_due, wake = table.add, table.advance, pipeline.round_due, pipeline.wake
        rounds = pipeline.flow_interval is not None
        share = self.share
        last = self.last
        lines = self.lines
        own = 0
        due = share.wake  # no segment before this time makes a sweep or a round

        def take(seg: Segment | float) -> None:
            nonlocal own, due
            if isinstance(seg, float):
                ts = seg
                self.index = own + share.skipped
                if rounds:
                    self.step = Step.ROUND_END
                    round_due(ts)
                self.step = Step.SWEEP
                advance(ts)
            else:
                ts = seg.ts
                own += 1
                self.index = index = own + share.skipped
                if rounds and ts >= due:
                    self.step = Step.ROUND_END
                    round_due(ts)
                    self.step = Step.SWEEP
                add(seg)
                key = flow_key(seg.src, seg.sport, seg.dst, seg.dport)
                flow = flows.get(key)
                if flow is not None:
                    last[key] = index
                    if len(lines) > self.start:
                        self._group(self._own_key(), flow.id)
                if len(lines) >= SEND_LINES:
                    self.send()
            if ts >= due:  # a sweep or a round may have been made: the next one's time
                share.wake = due = wake()

        return take

    # --- sending ----------------------------------------------------------------------------

    def send(self, final: dict[str, Any] | None = None) -> None:
        """The groups made so far to the parent (and ``final``, the worker's last word)."""
        lines = self.lines
        items: list[tuple[int, int, int, str | None, bool, Any]] = []
        start = 0
        worker = self.share.index
        for key, end, flow_id, created, ends, ended in self.groups:
            if created:
                items.append((key, worker, flow_id, None, False, None))
            else:
                items.append((key, worker, flow_id, "".join(lines[start:end]), ends, ended))
                start = end
        del lines[:start]
        self.groups.clear()
        self.start = len(lines)
        send_frame(self.fd, (items, final))


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
        """Write the workers' items in merge-key order.  A heap holds each worker's next key;
        the worker whose key is lowest gives every item below the next lowest worker's key at
        once (a run of one worker's segments is the rule, so the heap is seldom touched)."""
        self._stop = stop
        self._stopping = False
        self._fds = fds
        self._frames: list[collections.deque[bytes]] = [collections.deque() for _ in fds]
        self._partial = [bytearray() for _ in fds]
        """The start of a chunk not yet whole, per worker."""
        self._buffered = [0] * len(fds)
        """Bytes read from each worker and not yet merged."""
        self._ended = [False] * len(fds)
        write = self.writer.write if self.writer is not None else None
        builder = self.report.builder if self.report is not None else None
        ids: list[dict[int, int]] = [{} for _ in fds]
        next_id = 0
        finals: list[dict[str, Any]] = [{} for _ in fds]
        lists: list[list[Any] | None] = [self._chunk(w, fd, finals) for w, fd in enumerate(fds)]
        places = [0] * len(fds)
        heap = [(items[0][0], w) for w, items in enumerate(lists) if items is not None]
        heapq.heapify(heap)
        out: list[str] = []
        while heap:
            _, w = heapq.heappop(heap)
            bound = heap[0][0] if heap else END_KEY
            items = lists[w]
            i = places[w]
            numbers = ids[w]
            while items is not None:
                if i == len(items):
                    items = lists[w] = self._chunk(w, fds[w], finals)
                    i = 0
                    continue
                key, _, flow_id, text, ends, ended = items[i]
                if key > bound:
                    break
                i += 1
                if text is None:  # a flow made: its id in one process
                    next_id += 1
                    numbers[flow_id] = next_id
                    continue
                new_id = numbers.pop(flow_id, flow_id) if ends else numbers.get(flow_id, flow_id)
                if write is not None:
                    if new_id != flow_id:
                        # Every line names its flow once as "flow":N, and JSON strings cannot hold
                        # that text unescaped (a quote in a string is \"), nor can a client's ID
                        # parameter named flow (its value is a string or null).
                        text = text.replace(f'"flow":{flow_id},', f'"flow":{new_id},')
                    out.append(text)
                    if len(out) >= WRITE_ITEMS:
                        write("".join(out))
                        out.clear()
                if ended is not None and builder is not None:
                    facts, audit = ended
                    builder.add(facts._replace(flow=new_id), audit)
            if items is not None:
                places[w] = i
                heapq.heappush(heap, (items[i][0], w))
        if write is not None and out:
            write("".join(out))
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
