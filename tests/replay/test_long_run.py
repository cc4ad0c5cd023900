"""A service runs for months: what a flow leaves behind once it ended must be nothing, and it
must be freed when it ends, not at some later run of the cyclic garbage collector.

The pipeline of a deployed imaptap (JSON Lines, metrics with the server label, password
fingerprints) takes every capture of pcaps/ again and again, each pass from other client
addresses and ports and later in time, so no flow, client or clock of one pass is met again.
Between a pass after warm-up and the last, the Python heap (tracemalloc, after a collection,
with the output flushed and the metrics' snapshot taken) may not grow: every cache the analyzer keeps is bounded
(`software._GREETINGS_KEPT`, `parse._COMMAND_NAMES_KEPT`, the lru_caches), and one object kept
per ended flow would grow it by more than the bound.  (scripts/bench-soak measures the RSS of
the live service for an hour.)

With the cyclic collector off, every ended flow must be freed all the same: by reference
counting, once the table and the outputs let go of it.  A flow left in a reference cycle (its
session and streams, its message callables) waits for the collector's full runs, which are rare
in a process whose long-lived objects number a hundred thousand: a compressed flow's inflaters
(40 KB each) and every other ended flow piled up meanwhile.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from imaptap.capture.pcapwrite import MaskingWriter
from imaptap.facts import FlowFacts
from imaptap.flows import Flow
from imaptap.imap.audit import PasswordFingerprint
from imaptap.imap.session import ImapSession
from imaptap.output.ecs import EcsSink
from imaptap.output.jsonl import JsonlSink, JsonlWriter
from imaptap.output.metrics import MetricsSink
from imaptap.output.report import ReportBuilder, ReportSink
from imaptap.pipeline import MemorySource, Pipeline, Sink
from imaptap.segment import Segment
from imaptap.tui.feed import Feed
from testenv import ROOT

# the captures' segments are the TUI bench's (tests/tui/harness.py)
sys.path.insert(0, os.path.join(ROOT, "tests", "tui"))
from harness import all_captures, all_ports

#: Passes before the first measurement: the bounded caches fill, the interpreter warms up.
WARM_PASSES = 10
#: Passes measured.  Each ends every flow of pcaps/ (55 of them).
MEASURED_PASSES = 30
#: Heap growth allowed over the measured passes: measured 1.0 KB, the metrics' counters that
#: pass 256 and so stop being Python's cached small ints (32 bytes each, once per series).
#: One int kept per ended flow (36 bytes with its list slot) grows it by 30 x 55 x 36 = 58 KiB.
GROWTH_BOUND = 8 << 10
#: Seconds between passes: past the idle timeout, so every flow of a pass has ended.
PASS_GAP = 400.0


class Ended(Sink):
    def __init__(self) -> None:
        self.count = 0

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.count += 1


def moved(s: Segment, ports: set[int], k: int, shift: float) -> Segment:
    """``s`` in pass ``k``: later by ``shift``, from a client address and port of that pass."""
    client_is_src = s.dport in ports
    host, port = (s.src, s.sport) if client_is_src else (s.dst, s.dport)
    if s.ip_version == 4:
        host = f"10.{(k >> 8) & 255}.{k & 255}.{host.rsplit('.', 1)[1]}"
    port = 1024 + (port + 7 * k) % 64000
    if client_is_src:
        return s._replace(ts=s.ts + shift, src=host, sport=port)
    return s._replace(ts=s.ts + shift, dst=host, dport=port)


def test_ended_flows_leave_nothing_behind():
    base = all_captures()
    ports = all_ports()
    span = base[-1].ts - base[0].ts + PASS_GAP
    writer = devnull_writer()
    ended = Ended()
    metrics = MetricsSink(server_label=True)
    sinks: list[Sink] = [JsonlSink(writer), metrics, ended]
    heap: dict[int, int] = {}
    passes = WARM_PASSES + MEASURED_PASSES

    def segments() -> Iterator[Segment]:
        for k in range(passes + 1):
            if k in (WARM_PASSES, passes):
                writer.flush()
                metrics.refresh(pipeline)  # the scrape's snapshot as of now, not of the last second
                gc.collect()
                heap[k] = tracemalloc.get_traced_memory()[0]
            if k == passes:
                return
            for s in base:
                yield moved(s, ports, k, k * span)

    pipeline = Pipeline(MemorySource(segments(), ports), sinks, wallclock=lambda: 0.0,
                        password_fingerprint=PasswordFingerprint(bytes(range(32))))
    tracemalloc.start()
    try:
        pipeline.run()
    finally:
        tracemalloc.stop()
    per_pass = ended.count // passes
    assert per_pass >= 40 and ended.count == per_pass * passes  # every pass ended all its flows
    assert pipeline.table.stats.segments == len(base) * passes
    growth = heap[passes] - heap[WARM_PASSES]
    assert growth < GROWTH_BOUND, f"the heap grew {growth} bytes over {MEASURED_PASSES * per_pass} ended flows"


def devnull_writer() -> JsonlWriter:
    return JsonlWriter(open(os.devnull, "w"))


#: The outputs a run can have, each as what builds its pipeline over a source (``tmp``: a directory).
RUNS: dict[str, Callable[[MemorySource, str], Pipeline | Feed]] = {
    "json and metrics": lambda source, tmp: Pipeline(source, [JsonlSink(devnull_writer()), MetricsSink()]),
    "ecs": lambda source, tmp: Pipeline(source, [EcsSink(devnull_writer())]),
    "report": lambda source, tmp: Pipeline(source, [ReportSink(ReportBuilder("test"))]),
    "-w": lambda source, tmp: Pipeline(source, [JsonlSink(devnull_writer())],
                                       pcap_writer=MaskingWriter(os.path.join(tmp, "w.pcap"), source.ports)),
    "tui feed": lambda source, tmp: tui_feed(source),
}


def tui_feed(source: MemorySource) -> Feed:
    """The TUI's capture side, with a screen that takes every update at once."""
    def emit(update: object) -> None:
        feed.ready.set()

    feed = Feed(source, emit)
    feed.ready.set()
    return feed


@pytest.mark.parametrize("outputs", RUNS)
def test_an_ended_flow_is_freed_without_the_cyclic_collector(outputs, tmp_path):
    """With the collector off, at the start of each pass (the flows of the one before have
    ended), no Flow or session is alive but the table's open flows and theirs."""
    base = all_captures()
    ports = all_ports()
    span = base[-1].ts - base[0].ts + PASS_GAP
    stray: list[int] = []

    def segments() -> Iterator[Segment]:
        for k in range(3):
            for i, s in enumerate(base):
                if k and i == 1:  # the pass's first segment swept the last pass's idle flows
                    flows = run.table.flows.values()
                    live = {id(f) for f in flows} | {id(f.session) for f in flows} | earlier
                    stray.append(sum(1 for o in gc.get_objects()
                                     if type(o) in (Flow, ImapSession) and id(o) not in live))
                yield moved(s, ports, k, k * span)

    run = RUNS[outputs](MemorySource(segments(), ports), str(tmp_path))
    gc.collect()
    # what an earlier test keeps alive is not this run's (an id is not reused while it lives)
    earlier = {id(o) for o in gc.get_objects() if type(o) in (Flow, ImapSession)}
    gc.disable()
    try:
        run.run()
    finally:
        gc.enable()
    assert run.table.stats.flows >= 3 * 50
    assert stray == [0, 0], "ended flows left for the cyclic collector after the first pass and the second"
