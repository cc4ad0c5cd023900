"""The one pipeline: segments from a source, through the flow table, to the sinks.

    Source --Segment--> [-w writer] --> FlowTable --Message, FlowFacts--> Sinks
    (replay file,                        (flows.py and      (JSON Lines, the TUI's feed,
     live capture,                        imap/)              the tests' collector)
     segments in memory)

The command line, the TUI and the tests all run a `Pipeline`; it owns what they must agree on:
how a source is opened, read and closed (a live capture is read once more after its programs
are detached), when the stop flag and the clock are looked at, that every flow still open is
ended (`EndReason.END`) when the input ends or the run is stopped, so each one is reported,
where the ``-w`` writer sees a segment (before the analyzer: see `MaskingWriter`), and the
final stats record.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, cast

from imaptap.facts import FlowFacts, flow_facts
from imaptap.flows import IDLE_TIMEOUT, MAX_FLOWS, EndReason, Flow, FlowTable
from imaptap.imap.session import Message
from imaptap.segment import (
    DEFAULT_HANDSHAKE_SNAPLEN,
    DEFAULT_SNAPLEN,
    DEFAULT_TAILLEN,
    PayloadPolicy,
    Segment,
    flow_key,
)

if TYPE_CHECKING:
    from imaptap.capture.pcapwrite import MaskingWriter
    from imaptap.flowshare import FlowShare

#: Segments a source hands over at most between two ticks (a replay ticks after each megabyte
#: of records, a live capture after each poll): the pipeline looks at the stop flag and the
#: clock only on a tick, not per segment.  512 segments take a few milliseconds.
CHECK_EVERY = 512
#: Milliseconds a live poll waits for the first segment: a stop is seen within this.
POLL_MS = 100


class SourceError(Exception):
    """The input cannot be read on (a cut capture file, a capture that failed): one line."""


class Source:
    """Where segments come from.

    `segments` yields them one at a time, and None ("a tick") at least every `CHECK_EVERY`
    segments or so and whenever there is nothing to hand over for a while: the pipeline looks
    at the stop flag and the clock on ticks.  Never read ahead: the analyzer changes what the
    capture copies of a flow (nothing after STARTTLS, whole payloads after COMPRESS) from the
    very next segment on.
    """

    label = ""
    """The file replayed, or the interfaces captured on."""
    live = False
    """The wall clock drives idle expiry (live); otherwise the capture's own time does."""
    ports: frozenset[int] = frozenset()
    policy: PayloadPolicy
    """The copy rules the analyzer sets per flow and the source applies."""
    errors: tuple[type[Exception], ...] = ()
    """What `segments` may raise besides SourceError when the input cannot be read on (each a
    one-line message): named here rather than translated, which would take a generator frame
    per segment."""
    flows_end_with_input = True
    """When the input ends, so do the connections in it: every open flow is ended (and
    reported).  False only for a stand-in of a live capture looked at mid-way (tests)."""

    def open(self) -> None:
        """Start reading (a live capture attaches here); SourceError if it cannot.  Idempotent."""

    def segments(self) -> Generator[Segment | None, None, None]:
        """The segments, and None at each tick; a generator, so that a run stopped early closes it."""
        raise NotImplementedError

    def close(self) -> Iterable[Segment]:
        """Stop reading; returns what still arrived as it stopped (a live capture's buffer after
        its programs were detached)."""
        return ()

    def progress(self) -> tuple[int | None, int | None]:
        """(bytes read, total bytes), where known."""
        return None, None

    def counters(self) -> dict[str, int] | None:
        """The capture's own counters while it runs (live), else None."""
        return None

    def totals(self) -> dict[str, Any]:
        """The source's part of the final stats record."""
        return {}

    def notes(self) -> tuple[str, ...]:
        """What the user should know about how the capture runs (fallbacks taken)."""
        return ()

    def listening(self) -> str | None:
        """Once open: what is captured where, for the readiness line (live), else None."""
        return None


class ReplaySource(Source):
    """A pcap or pcapng file, read as fast as it goes; ``-`` is standard input, ``fd`` a
    descriptor to read instead (the TUI's copy of standard input); ``share``: only the flows of
    one worker of --workers (workers.py), and the times of the others' segments as floats."""

    def __init__(self, path: str, ports: Iterable[int], snaplen: int = DEFAULT_SNAPLEN,
                 taillen: int = DEFAULT_TAILLEN, label: str | None = None,
                 handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN, fd: int | None = None,
                 share: FlowShare | None = None) -> None:
        from imaptap.capture.replay import STDIN, STDIN_NAME, CaptureFileError, ReplayStats

        self.errors = (CaptureFileError,)
        self.path = path
        self.fd = fd
        self.share = share
        self.label = (STDIN_NAME if path == STDIN else path) if label is None else label
        self.ports = frozenset(ports)
        self.policy = PayloadPolicy(snaplen, taillen, handshake_snaplen)
        self.stats = ReplayStats()
        self.size: int | None = None
        """The file's size; None for a pipe (set when open)."""
        if path != STDIN and fd is None:
            try:
                self.size = os.path.getsize(path)
            except OSError:
                pass  # open() says why
        self._reader: Any = None
        self._segments: Any = None

    def open(self) -> None:
        from imaptap.capture.replay import CaptureFileError, open_capture

        if self._reader is not None:
            return
        try:
            self._reader = open_capture(self.label if self.fd is not None else self.path, self.fd)
        except CaptureFileError as exc:
            raise SourceError(str(exc)) from None
        self.size = self._reader.size

    def segments(self) -> Generator[Segment | None, None, None]:
        # CaptureFileError (a cut or corrupt file) comes after the last good segment.
        self._segments = self._reader.segments(set(self.ports), self.policy, self.stats, ticks=True,
                                               share=self.share)
        # With a share, floats come too: only a worker's add (workers.py) is given this source.
        return cast(Generator[Segment | None, None, None], self._segments)

    def close(self) -> Iterable[Segment]:
        if self._segments is not None:
            self._segments.close()  # a stop before the end: the reader adds its last counts
        if self._reader is not None:
            self._reader.close()
        return ()

    def progress(self) -> tuple[int | None, int | None]:
        return self.stats.position, self.size

    def totals(self) -> dict[str, Any]:
        return dataclasses.asdict(self.stats) if self._reader is not None else {}


class LiveSource(Source):
    """A `LiveCapture`: attached by `open`, detached by `close`."""

    live = True

    def __init__(self, capture: Any) -> None:
        self.capture = capture
        self.label = ",".join(capture.interfaces)
        self.ports = frozenset(capture.ports)
        self.policy = capture.policy
        self._open = False

    def open(self) -> None:
        from imaptap.capture.live import LiveError

        if self._open:
            return
        try:
            self.capture.__enter__()
        except LiveError as exc:
            raise SourceError(str(exc)) from None
        self._open = True

    def segments(self) -> Generator[Segment | None, None, None]:
        from imaptap.capture.live import LiveError

        poll = self.capture.poll
        try:
            while True:
                yield from poll(POLL_MS)
                yield None
        except LiveError as exc:
            raise SourceError(str(exc)) from None

    def close(self) -> Iterable[Segment]:
        from imaptap.capture.live import LiveError

        if not self._open:
            return ()
        self._open = False
        try:
            self.capture.__exit__(None, None, None)
        except LiveError as exc:
            raise SourceError(str(exc)) from None
        finally:
            # What the kernel had delivered before the programs were detached is analysed too.
            left = self.capture.poll(0)
        return left

    def counters(self) -> dict[str, int] | None:
        return self.capture.counters() if self._open else None

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.capture.counters())
        dropped = self.capture.privileges
        if dropped is not None:
            out["user"] = dropped.user
            out["capabilities"] = dropped.capabilities
        return out

    def notes(self) -> tuple[str, ...]:
        return tuple(self.capture.notes)

    def listening(self) -> str | None:
        capture = self.capture
        hooks = []
        for name in capture.interfaces:
            mode = capture.xdp_modes.get(name)
            hooks.append(f"{name} (ingress {'TC' if mode is None else 'XDP ' + mode}, egress TC)")
        ports = sorted(self.ports)
        return (f"listening on {', '.join(hooks)}, TCP port{'s' if len(ports) > 1 else ''}"
                f" {', '.join(map(str, ports))}, copying {capture.snaplen} + {capture.taillen} bytes of each segment")


class MemorySource(Source):
    """Segments from memory (tests, benchmarks), cut as a capture would copy them: each one
    only when it is reached, so the analyzer's payload modes apply as they do live."""

    def __init__(self, segments: Iterable[Segment], ports: Iterable[int] = (143,), label: str = "segments",
                 snaplen: int = DEFAULT_SNAPLEN, taillen: int = DEFAULT_TAILLEN, open_at_end: bool = False,
                 handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN) -> None:
        self.given = segments
        self.label = label
        self.ports = frozenset(ports)
        self.policy = PayloadPolicy(snaplen, taillen, handshake_snaplen)
        self.flows_end_with_input = not open_at_end

    def segments(self) -> Generator[Segment | None, None, None]:
        cut = self.policy.cut
        for i, s in enumerate(self.given, 1):
            head, tail = cut(flow_key(s.src, s.sport, s.dst, s.dport), s.payload, s.wire_len)
            if len(head) != len(s.payload):
                s = s._replace(payload=head, tail=tail)
            yield s
            if not i % CHECK_EVERY:
                yield None


def build_source(*, read: str | None, interfaces: list[str] | None, ports: frozenset[int],
                 snaplen: int = DEFAULT_SNAPLEN, taillen: int = DEFAULT_TAILLEN, xdp_mode: str | None = None,
                 use_xdp: bool = True, user: str | None = None, write: str | None = None,
                 append: bool = False, handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN,
                 read_fd: int | None = None, workers: int = 1) -> tuple[Source, MaskingWriter | None]:
    """The source the command line names (a file to replay, else a live capture on
    ``interfaces`` or the default route's), not yet open, and the ``-w`` writer of ``write``
    (or None), appending to the file if ``append``; ``read_fd`` is read in place of ``read``
    when given; ``workers``: a live capture's ring buffers, one per worker process.
    SourceError (one line) for a bad interface or option, an unwritable ``-w`` file, or live
    capture without bcc's side of the package."""
    source: Source
    if read:
        source = ReplaySource(read, ports, snaplen, taillen, handshake_snaplen=handshake_snaplen, fd=read_fd)
    else:
        try:
            from imaptap.capture import live
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise SourceError(f"live capture unavailable: {exc}") from None
        try:
            capture = live.LiveCapture(interfaces or [live.default_interface()], set(ports), snaplen,
                                       xdp_mode=xdp_mode, use_xdp=use_xdp, taillen=taillen,
                                       handshake_snaplen=handshake_snaplen, user=user, workers=workers)
        except live.LiveError as exc:
            raise SourceError(str(exc)) from None
        source = LiveSource(capture)
    writer = None
    if write:
        from imaptap.capture.pcapwrite import MaskingWriter
        from imaptap.output.rotation import NotAppendable

        try:
            writer = MaskingWriter(write, ports, append)
        except OSError as exc:
            raise SourceError(f"cannot write {write}: {exc.strerror or exc}") from None
        except NotAppendable as exc:
            raise SourceError(str(exc)) from None
    return source, writer


class Sink:
    """What takes the pipeline's events: messages as they are parsed, flows as they end.

    ``flow_started`` is asked once per new flow for the callable its messages go to; None (the
    default) means none are wanted, and where no sink wants them the analyzer does not even
    make them.  ``flow_ended`` receives the flow and its final facts.  ``flow_update`` receives
    every open flow and its facts so far every ``flow_interval`` seconds of the capture clock,
    where the pipeline was given one.  ``tick`` is called on every tick of the source (a few
    times a second at most, live and replay alike), with the pipeline, for work that follows
    the clock rather than the traffic; ``opened`` once the source is open (a live capture
    attached, its privileges dropped); ``finished`` once the run is over and every flow has
    ended.
    """

    def flow_started(self, flow: Flow) -> Callable[[Message], None] | None:
        return None

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        pass

    def flow_update(self, flow: Flow, facts: FlowFacts, ts: float) -> None:
        pass

    def tick(self, pipeline: Pipeline) -> None:
        pass

    def opened(self, pipeline: Pipeline) -> None:
        pass

    def finished(self, pipeline: Pipeline) -> None:
        pass


def _never() -> bool:
    return False


class Pipeline:
    """One run of a `Source` through a `FlowTable` into `Sink`s."""

    def __init__(
        self,
        source: Source,
        sinks: Iterable[Sink] = (),
        *,
        pcap_writer: MaskingWriter | None = None,
        max_flows: int = MAX_FLOWS,
        idle_timeout: float = IDLE_TIMEOUT,
        flow_interval: float | None = None,
        wallclock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        password_fingerprint: Callable[[bytes], str] | None = None,
        add_hook: Callable[[Pipeline], Callable[[Segment], None]] | None = None,
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        self.pcap_writer = pcap_writer
        """The ``-w`` writer: sees each segment before the flow table, and each flow's end."""
        self.wallclock = wallclock
        """The capture clock of a live source (idle expiry)."""
        self.clock = clock
        """Measures the run's duration."""
        self.table = FlowTable(source.ports, source.policy, on_flow_end=self._flow_ended,
                               message_sink=self._message_sink, max_flows=max_flows, idle_timeout=idle_timeout,
                               password_fingerprint=password_fingerprint)
        if pcap_writer is not None:
            pcap_writer.flows = self.table.flows
        self.error: str | None = None
        """Why the input ended early, as one line (a cut file, a failed capture)."""
        self.stopped = False
        """The run was stopped before its input ended."""
        self.opened = False
        self.started = clock()
        self.add_hook = add_hook
        """Makes what takes each segment in place of the table (a worker of --workers, workers.py)."""
        self.flow_interval = flow_interval
        """Seconds of the capture clock between two `Sink.flow_update` rounds (None: none)."""
        self._next_update = -math.inf
        self._add: Callable[[Segment], None] = self.table.add
        """What takes a segment once a round of updates is done: the table, or -w then the table."""
        """When the next round is due; before the first segment (a replay) or the open (live), any time."""

    # --- the table's callbacks ------------------------------------------------------------------

    def _message_sink(self, flow: Flow) -> Callable[[Message], None] | None:
        calls = [call for sink in self.sinks if (call := sink.flow_started(flow)) is not None]
        if not calls:
            return None
        if len(calls) == 1:
            return calls[0]

        def each(msg: Message) -> None:
            for call in calls:
                call(msg)

        return each

    def _flow_ended(self, flow: Flow) -> None:
        if self.pcap_writer is not None:
            self.pcap_writer.flow_ended(flow)  # its last client segments are analysed now
        facts = flow_facts(flow)
        for sink in self.sinks:
            sink.flow_ended(flow, facts)

    # --- interim records of open flows --------------------------------------------------------

    def now(self) -> float:
        """The capture clock: the wall clock live, the time of the latest segment in a replay."""
        return self.wallclock() if self.source.live else self.table.now

    def _updates_due(self, now: float) -> None:
        """Hand every open flow to the sinks' `Sink.flow_update` if a round is due at ``now``.

        A replay's round is taken before the first segment at or after the time it was due, and
        carries that time: the flows are then exactly as they were at it.  Rounds missed over a
        quiet stretch are not made up: one round, then the next due after ``now``.
        """
        interval = self.flow_interval
        assert interval is not None
        due = self._next_update
        if now < due:
            return
        if due == -math.inf:  # the clock's first reading: the first round is one interval on
            self._next_update = now + interval
            return
        ts = now if self.source.live else due
        table = self.table
        table.expire(ts)  # a flow idle past the timeout by then is no longer open
        for flow in list(table.flows.values()):
            facts = flow_facts(flow)
            for sink in self.sinks:
                sink.flow_update(flow, facts, ts)
        self._next_update = due + interval * (math.floor((now - due) / interval) + 1)

    def round_due(self, ts: float) -> None:
        """A replay's round of `Sink.flow_update` records, if one is due at a segment of time ``ts``."""
        if ts >= self._next_update:
            self._updates_due(ts)

    def wake(self) -> float:
        """The capture time from which a segment changes more than its own flow: it makes an idle
        sweep or (with ``flow_interval``) a round of updates (a replay)."""
        sweep = self.table.next_sweep
        return sweep if self.flow_interval is None else min(sweep, self._next_update)

    def _update_then_add(self, seg: Segment) -> None:
        if seg.ts >= self._next_update:
            self._updates_due(seg.ts)
        self._add(seg)

    # --- the run --------------------------------------------------------------------------------

    def run(self, stop: Callable[[], object] = _never, on_tick: Callable[[], None] | None = None,
            on_open: Callable[[Source], None] | None = None) -> None:
        """Read the source until it ends, fails, or ``stop()`` returns true, then end every flow.

        ``stop`` and ``on_tick`` are called at every tick of the source; ``on_open`` once the
        source is open (a live capture attached).
        A failure of the source is kept in `error`; whatever was read before it is analysed.
        """
        source = self.source
        table = self.table
        writer = self.pcap_writer
        add: Callable[[Segment], None]
        add = self._add = table.add if writer is None else self._write_then_add
        live = source.live
        updates = self.flow_interval is not None
        if updates and not live:
            # A replay's rounds follow the capture's time segment by segment: its ticks come only
            # every megabyte of records, which may span hours of a quiet capture.
            add = self._update_then_add
        if self.add_hook is not None:
            add = self.add_hook(self)
        self.started = self.clock()
        segments: Generator[Segment | None, None, None] | None = None
        errors: tuple[type[Exception], ...] = (SourceError, *source.errors)
        try:
            source.open()
            self.opened = True
            for sink in self.sinks:
                sink.opened(self)
            if updates and live:
                self._updates_due(self.wallclock())  # the first round is due one interval on
            if on_open is not None:
                on_open(source)
            segments = source.segments()
            for seg in segments:
                if seg is not None:
                    add(seg)
                    continue
                if live:
                    now = self.wallclock()
                    table.expire(now)
                    if updates:
                        self._updates_due(now)
                if stop():
                    self.stopped = True
                    break
                for sink in self.sinks:
                    sink.tick(self)
                if on_tick is not None:
                    on_tick()
        except errors as exc:
            self.error = str(exc)
        finally:
            if segments is not None:
                segments.close()
            try:
                for seg in source.close():
                    add(seg)
            except SourceError as exc:
                self.error = self.error or str(exc)
            if source.flows_end_with_input or self.stopped:
                table.close_all(EndReason.END)
            if writer is not None:
                writer.close()
            for sink in self.sinks:
                sink.finished(self)

    def _write_then_add(self, seg: Segment) -> None:
        assert self.pcap_writer is not None
        self.pcap_writer.write(seg)  # before the table: see MaskingWriter
        self.table.add(seg)

    def stats(self) -> dict[str, Any]:
        """The final stats record (the JSON ``stats`` line without its type)."""
        record: dict[str, Any] = {"source": self.source.label}
        record.update(self.source.totals())
        if self.pcap_writer is not None:
            record["written"] = self.pcap_writer.records
        if self.stopped:
            record["stopped_by_signal"] = True
        record.update(dataclasses.asdict(self.table.stats))
        record["seconds"] = round(self.clock() - self.started, 3)
        if self.error:
            record["error"] = self.error
        return record
