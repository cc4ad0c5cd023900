"""The TUI's feed over live workers, without a kernel: two real `WorkerFeed`s, each over the
flows the flow hash gives it, write their frames to files; the parent's `WorkersFeed` takes
them in and must give the UI what one `Feed` over every flow gives it: the same flows, the
same summary, the same activity.  (tests/live/test_live_workers_tui.py runs the whole thing
on a terminal over a real capture.)"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from test_feed import Ticks

from harness import SIZE, login, mixed_flows, run, wait_for
from imaptap import pipeline
from imaptap.activity import Activity, merged
from imaptap.capture.live.workers import FlowNumbers, LiveWorkerSpec, ShippedEnds
from imaptap.flows import Flow
from imaptap.flowshare import flow_hash, share_of
from imaptap.imap.session import Kind, Message
from imaptap.pipeline import Sink
from imaptap.testing import analyze
from imaptap.tui.app import ImaptapApp
from imaptap.tui.feed import Feed, FeedUpdate, MemorySource
from imaptap.tui.workerfeed import FEED_FRAME, PART_FRAME, TAKEN, WorkerFeed, WorkersFeed
from imaptap.workers import take_frames

PORTS = (143, 10143)
START = 0.0
"""The activity start every worker is given (the segments' clock starts after it)."""


@dataclass
class Runner:
    """What `WorkersFeed` uses of `LiveWorkers` (the kernel side is the live tests')."""

    workers: int
    source: MemorySource
    spec: LiveWorkerSpec = field(default_factory=lambda: LiveWorkerSpec(json=False, messages=True, pipeline={},
                                                                        report=True, tui=START))
    told: list[tuple[bytes, int | None]] = field(default_factory=list)
    error: str | None = None
    on_frame: Any = None

    def tell(self, byte: bytes, worker: int | None = None) -> None:
        self.told.append((byte, worker))

    def stats(self) -> dict[str, Any]:
        return {}


@dataclass
class Replaying(Runner):
    """A `Runner` whose workers send the frames they recorded, each worker its next batch only
    once told the screen took its last (`TAKEN`), as `LiveWorkers`' workers do."""

    frames: list[list[tuple[str, Any]]] = field(default_factory=list)
    due: set[int] = field(default_factory=set)

    def tell(self, byte: bytes, worker: int | None = None) -> None:
        super().tell(byte, worker)
        if byte == TAKEN and worker is not None:
            self.due.add(worker)

    def run(self, stop: Callable[[], bool], on_tick: Callable[[], None]) -> None:
        pending = [iter(f) for f in self.frames]
        self.due = set(range(len(self.frames)))
        while not stop():
            for w in sorted(self.due):
                self.due.discard(w)
                for kind, payload in pending[w]:
                    assert self.on_frame is not None
                    self.on_frame(w, kind, payload)
                    if kind == FEED_FRAME and payload.batch:
                        break
            on_tick()
            time.sleep(0.01)


def worker_frames(segments, index: int, workers: int, tmp_path) -> list[tuple[str, Any]]:
    """Worker ``index``'s frames, in the order it sent them, for its share of ``segments``."""
    mine = [s for s in segments if share_of(flow_hash(s.src, s.sport, s.dst, s.dport), workers) == index]
    path = tmp_path / f"worker-{index}.frames"
    status = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    control_r, control_w = os.pipe()
    try:
        feed = WorkerFeed(MemorySource(mine, ports=PORTS), status, control_r, lambda: False, START,
                          before=[FlowNumbers(index, workers)], sinks=[ShippedEnds(status)], clock=Ticks(),
                          wallclock=lambda: 0.0)
        feed.parts_wanted = True  # as when the UI shows the summary
        feed.run()
    finally:
        for fd in (status, control_r, control_w):
            os.close(fd)
    return [pickle.loads(frame) for frame in take_frames(bytearray(path.read_bytes()))]


def parent_over(frames: list[list[tuple[str, Any]]], source: MemorySource) -> tuple[WorkersFeed, list[FeedUpdate]]:
    updates: list[FeedUpdate] = []
    runner = Runner(len(frames), source)
    feed = WorkersFeed(runner, updates.append, clock=Ticks(), wallclock=lambda: 0.0)  # type: ignore[arg-type]
    # the workers' frames interleaved, each worker's in its own order
    for i in range(max(len(f) for f in frames)):
        for w, mine in enumerate(frames):
            if i < len(mine):
                feed._frame(w, *mine[i])
    return feed, updates


def one_process(segments) -> tuple[Feed, list[FeedUpdate]]:
    updates: list[FeedUpdate] = []
    feed = Feed(MemorySource(segments, ports=PORTS), updates.append, clock=Ticks(), wallclock=lambda: 0.0)
    feed.activity = Activity(START)
    feed.ready.set()
    feed.run()
    return feed, updates


def without_ids(records: list[dict]) -> list[dict]:
    return sorted((dict(r, flow=None) for r in records), key=repr)


def test_two_workers_through_the_parent_give_the_one_process_flows_and_summary(tmp_path):
    segments = mixed_flows()
    frames = [worker_frames(segments, w, 2, tmp_path) for w in range(2)]
    assert all(any(kind == FEED_FRAME and u.flows for kind, u in f) for f in frames), "a worker had no flow"
    feed, updates = parent_over(frames, MemorySource([], ports=PORTS))
    feed.ready.set()
    feed._flush(100.0, final=True)
    last = updates[-1]
    assert last.batch and last.last
    one, one_updates = one_process(segments)
    want = {s.id: s.facts.record() for u in one_updates for s in u.flows}
    got = {s.id: s.facts.record() for s in last.flows}
    assert without_ids(list(got.values())) == without_ids(list(want.values()))
    # ids from both residue classes, in id order
    assert {i % 2 for i in got} == {0, 1} and list(got) == sorted(got)
    # every message of every flow, under its flow's id
    assert sum(len(b.messages) for b in last.messages.values()) == sum(
        len(b.messages) for u in one_updates for b in u.messages.values())
    assert last.status.flows_total == len(want) and last.status.segments == one.table.stats.segments
    summary, alone = last.summary, one.summary()
    assert summary is not None
    assert (summary.report.flows, summary.report.imap_flows) == (alone.report.flows, alone.report.imap_flows)
    assert summary.report.servers == alone.report.servers and summary.report.clients == alone.report.clients
    def findings(report):  # the flows' ids are the workers' own
        return [(f.finding, f.count, sorted((r.client, r.user) for r in f.flows)) for f in report.findings]

    assert findings(summary.report) == findings(alone.report) and findings(alone.report)
    assert summary.activity == alone.activity and summary.activity.commands


def test_a_flow_ended_after_a_summary_part_counts_once(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHECK_EVERY", 2)  # ticks, so parts, while the flows are open
    segments = mixed_flows()
    frames = [worker_frames(segments, w, 2, tmp_path) for w in range(2)]
    # each worker's part taken while its flows were open, then their ends: the ends must not
    # count a second time what the parts counted
    first_part = [next(p for kind, p in f if kind == PART_FRAME and p.open) for f in frames]
    feed, _ = parent_over([[(PART_FRAME, p)] for p in first_part], MemorySource([], ports=PORTS))
    open_before = feed.summary()
    assert open_before.open_flows == sum(len(p.open) for p in first_part) > 0
    for w, f in enumerate(frames):
        for kind, payload in f:
            if kind == "ended":
                feed._frame(w, kind, payload)
    after = feed.summary()
    assert after.open_flows == 0
    assert after.report.flows == len({s.id for f in frames for k, u in f if k == FEED_FRAME for s in u.flows})


def test_batches_wait_for_the_ui_and_each_worker_is_told_when_its_batch_was_taken(tmp_path):
    segments = mixed_flows()
    frames = [worker_frames(segments, w, 2, tmp_path) for w in range(2)]
    first_batch = [next(u for kind, u in f if kind == FEED_FRAME and u.batch) for f in frames]
    feed, updates = parent_over([[(FEED_FRAME, b)] for b in first_batch], MemorySource([], ports=PORTS))
    runner = feed.runner
    feed.ready.clear()  # the UI is paused
    feed._flush(1.0)
    assert not updates[-1].batch and runner.told == []  # type: ignore[attr-defined]
    feed.ready.set()
    feed._flush(2.0)
    assert updates[-1].batch and not feed.ready.is_set()
    assert sorted(runner.told) == [(TAKEN, 0), (TAKEN, 1)]  # type: ignore[attr-defined]
    assert {s.id for s in updates[-1].flows} == {s.id for b in first_batch for s in b.flows}
    feed.ready.set()
    feed._flush(3.0)  # nothing new came: nothing is sent twice
    assert not updates[-1].batch


def test_the_table_over_workers_lists_flows_by_their_start_not_their_ids(tmp_path):
    """Each worker numbers its own flows, so ids are not start order: the table's default
    order is the flows' start all the same."""
    picked: list[int] = []  # two flows of worker 0 first, then one of worker 1
    i = 0
    while len(picked) < 3:
        i += 1
        first = login(f"user{i}", i)[0]
        if share_of(flow_hash(first.src, first.sport, first.dst, first.dport), 2) == (len(picked) >= 2):
            picked.append(i)
    segments = [s for n, i in enumerate(picked) for s in login(f"user{i}", i, ts=1_700_000_000.0 + n)]
    frames = [worker_frames(segments, w, 2, tmp_path) for w in range(2)]
    runner = Replaying(2, MemorySource([], ports=PORTS), frames=frames)
    app = ImaptapApp(WorkersFeed(runner, clock=time.monotonic, wallclock=lambda: 0.0,  # type: ignore[arg-type]
                                 flush_interval=0.05))

    async def go() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.flows_table.row_count == 3)
            rows = list(app.flows_table.rows)
            assert [app.store.flows[f].snap.facts.username for f in rows] == [f"user{i}" for i in picked]
            assert rows == [1, 3, 2]  # worker 1 numbers 1, 3; worker 2 numbers 2

    run(go())


def test_activities_of_one_start_add_up_to_the_activity_of_every_message():
    messages = _messages()
    whole = Activity(START)
    parts = [Activity(START), Activity(START), Activity(START)]
    for i, m in enumerate(messages):
        whole.message(m)
        parts[i % 3].message(m)
    assert merged(parts) == whole.snapshot()
    assert merged([]) == Activity().snapshot()


def test_activities_of_different_widths_fold_into_the_widest():
    narrow, wide, whole = Activity(START), Activity(START), Activity(START)
    for ts in (0.5, 3.2, 7.9):
        for a in (narrow, whole):
            a._command(ts)
    for ts in (150.0, 260.0, 5.5):  # past TIME_BUCKETS seconds: wider buckets
        for a in (wide, whole):
            a._command(ts)
    assert wide.bucket_seconds > narrow.bucket_seconds
    assert merged([narrow, wide]) == whole.snapshot()


class Collect(Sink):
    def __init__(self) -> None:
        self.messages: list[Message] = []

    def flow_started(self, flow: Flow) -> Callable[[Message], None]:
        return self.messages.append


def _messages() -> list[Message]:
    """Every message event of the mixed flows, in the order the pipeline made them."""
    collect = Collect()
    analyze(mixed_flows(), ports=PORTS, sinks=[collect])
    assert any(m.kind is Kind.REQUEST for m in collect.messages)
    return collect.messages
