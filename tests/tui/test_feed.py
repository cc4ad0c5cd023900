"""The worker side, without a terminal: what it sends the UI, how often, and within what bounds."""

from __future__ import annotations

import threading

import pytest

from harness import StepSource, login, mixed_flows
from imaptap.testing import analyze, conversation
from imaptap.tui import feed as feed_module
from imaptap.tui.feed import Feed, FeedUpdate, MemorySource, snapshot


class Ticks:
    """A clock that moves one flush interval each time it is read."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += feed_module.FLUSH_INTERVAL
        return self.t


def run_feed(segments, ui_takes_batches: bool = True, **kw) -> tuple[Feed, list[FeedUpdate]]:
    updates: list[FeedUpdate] = []
    feed: Feed

    def emit(update: FeedUpdate) -> None:
        updates.append(update)
        if ui_takes_batches and update.batch:
            feed.ready.set()

    feed = Feed(MemorySource(segments, ports=(143, 10143)), emit, clock=Ticks(), wallclock=lambda: 0.0, **kw)
    feed.run()
    return feed, updates


def latest(updates: list[FeedUpdate]) -> dict[int, dict]:
    out = {}
    for u in updates:
        for s in u.flows:
            out[s.id] = s.facts.record()
    return out


def test_the_ui_sees_the_same_facts_as_the_json_output():
    segments = mixed_flows()
    _, updates = run_feed(segments)
    expected = analyze(segments, ports=(143, 10143)).flows
    assert list(latest(updates).values()) == sorted(expected, key=lambda r: r["flow"])
    assert updates[-1].last and updates[-1].status.done
    assert updates[-1].status.totals["flows"] == 5


def test_updates_come_per_flush_interval_not_per_segment(monkeypatch):
    monkeypatch.setattr(feed_module, "CHECK_EVERY", 64)
    segments = [s for i in range(200) for s in login(f"u{i}", i)]
    segments.sort(key=lambda s: s.ts)
    _, updates = run_feed(segments)
    chunks = -(-len(segments) // 64)
    assert len(updates) <= chunks + 2  # one per 64 segments at most (the clock moves an interval per read)
    assert len(latest(updates)) == 200


def test_a_busy_or_paused_ui_gets_counters_only_then_one_coalesced_batch():
    source = StepSource()
    updates: list[FeedUpdate] = []
    feed = Feed(source, updates.append, clock=Ticks(), wallclock=lambda: 0.0)
    worker = threading.Thread(target=feed.run)
    worker.start()
    try:
        source.queue.put(login("alice", 1, close=False))
        _until(lambda: any(u.batch for u in updates))
        assert not feed.ready.is_set()  # the UI has not taken the batch yet
        bob = login("bob", 2, close=False, extra=[("c", b"a2 SELECT INBOX\r\n"), ("s", b"a2 OK done\r\n")])
        source.queue.put(bob[:-2])
        source.queue.put(bob[-2:])
        _until(lambda: feed.table.stats.flows == 2 and len(updates) > 5)
        assert sum(u.batch for u in updates) == 1  # meanwhile: counters only
        assert updates[-1].status.flows_total == 2
        n = len(updates)
        feed.ready.set()  # the UI takes batches again
        _until(lambda: any(u.batch for u in updates[n:]))
        (batch,) = [u for u in updates[n:] if u.batch]
        assert [s.facts.username for s in batch.flows] == ["bob"]
        (bob,) = batch.flows
        assert bob.facts.username == "bob" and bob.facts.commands == {"LOGIN": 1, "SELECT": 1}
        assert [m.command for m in batch.messages[bob.id].messages][-2:] == ["SELECT", "SELECT"]
        assert batch.status.flows_total == 2
    finally:
        feed.stop()
        worker.join(5)
    assert not worker.is_alive() and source.left


def test_messages_per_flow_are_bounded_and_the_rest_counted(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_MESSAGES_PER_FLOW", 10)
    parts = [("s", b"* OK ready\r\n")] + [p for i in range(20) for p in
                                           (("c", f"a{i} NOOP\r\n".encode()), ("s", f"a{i} OK done\r\n".encode()))]
    _, updates = run_feed(conversation(parts))
    kept = sum(len(b.messages) for u in updates for b in u.messages.values())
    dropped = sum(b.dropped for u in updates for b in u.messages.values())
    assert kept + dropped == 41 and kept <= 10 * len([u for u in updates if u.messages])
    last = [b for u in updates for b in u.messages.values()][-1]
    assert last.messages[-1].command == "NOOP" and last.messages[-1].tag == "a19"


def test_a_snapshot_does_not_change_with_the_session():
    segments = conversation([("s", b"* OK ready\r\n"), ("c", b"a1 SELECT INBOX\r\n")], close=False)
    result = analyze(segments)  # closes the flow at the end; take the table's flow before
    feed = Feed(MemorySource(segments), lambda u: None, clock=Ticks())
    for s in segments:
        feed.table.add(s)
    (flow,) = feed.table.flows.values()
    snap = snapshot(flow)
    flow.session.mailboxes.append("Sent")
    flow.session.commands["FETCH"] += 1
    assert snap.facts.mailboxes == ("INBOX",) and "FETCH" not in snap.facts.commands
    assert result.flow["mailboxes"] == ["INBOX"]


def test_ended_flows_beyond_the_bound_are_reported_gone_while_the_ui_is_away(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_ENDED_FLOWS", 3)
    source = StepSource()
    updates: list[FeedUpdate] = []
    feed = Feed(source, updates.append, clock=Ticks(), wallclock=lambda: 0.0)
    worker = threading.Thread(target=feed.run)
    worker.start()
    try:
        opened = [s for i in range(6) for s in login(f"u{i}", i, close=False)]
        source.queue.put(opened)
        _until(lambda: any(u.batch for u in updates))
        shown = {s.id for u in updates for s in u.flows}
        assert len(shown) == 6
        n = len(updates)
        # the UI is away (it has not taken the batch): every flow ends, with both FINs
        fins = [s for i in range(6) for s in login(f"u{i}", i) if s.flags & 1]
        source.queue.put(fins)
        _until(lambda: feed.table.stats.ended_fin == 6)
        feed.ready.set()
        _until(lambda: any(u.batch for u in updates[n:]))
        (batch,) = [u for u in updates[n:] if u.batch]
        assert len(batch.flows) == 3 and len(batch.gone) == 3
        assert {s.id for s in batch.flows} | set(batch.gone) == shown
    finally:
        feed.stop()
        worker.join(5)


def test_a_live_capture_that_cannot_start_is_an_error_not_a_crash():
    from imaptap.pipeline import SourceError

    class NoRoot(StepSource):
        live = True

        def open(self):
            raise SourceError("live capture needs root")

    updates: list[FeedUpdate] = []
    feed = Feed(NoRoot(), updates.append, clock=Ticks(), wallclock=lambda: 0.0)
    feed.ready.set()
    worker = threading.Thread(target=feed.run)
    worker.start()
    _until(lambda: updates and updates[-1].status.done)
    feed.stop()
    worker.join(5)
    assert feed.error == "live capture needs root" and updates[-1].status.error == feed.error


def _until(cond, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.005)


def test_messages_waiting_for_an_absent_ui_are_bounded_in_total(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_PENDING_MESSAGES", 30)
    segments = []
    for i in range(4):  # four flows of 21 messages each: 84 > 30
        parts = [("s", b"* OK ready\r\n")] + [p for n in range(10) for p in
                                                (("c", f"a{n} NOOP\r\n".encode()), ("s", f"a{n} OK\r\n".encode()))]
        segments += conversation(parts, client=("10.0.0.9", 41000 + i), ts=1_700_000_000.0 + i)
    feed = Feed(MemorySource(segments), lambda u: None, clock=Ticks())
    feed.ready.clear()  # the UI never takes a batch until the end
    updates = []
    feed.emit = updates.append
    for seg in feed.source.segments():
        feed.table.add(seg)
    assert feed._pending <= 30 + 4
    feed.ready.set()
    feed._flush(1.0)
    (batch,) = [u for u in updates if u.batch]
    kept = sum(len(b.messages) for b in batch.messages.values())
    assert kept <= 34 and kept + sum(b.dropped for b in batch.messages.values()) == 84
    for b in batch.messages.values():  # each flow kept its newest
        assert b.messages[-1].tag == "a9" and b.messages[-1].kind.value == "response"


class DrainedAtDetach:
    """A stand-in for LiveCapture whose last segments are read only once it is detached, as the
    kernel's ring buffer is drained at detach."""

    def __init__(self, during, at_detach):
        from imaptap.segment import PayloadPolicy

        self.interfaces, self.ports, self.policy = ["veth0"], {143}, PayloadPolicy()
        self.notes, self.privileges = [], None
        self.during, self.at_detach = list(during), list(at_detach)
        self.polls = 0
        self.exited = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.exited = True

    def poll(self, timeout_ms):
        self.polls += 1
        if self.exited:
            out, self.at_detach = self.at_detach, []
        else:
            out, self.during = self.during, []
        return out

    def counters(self):
        return {"seen": 0, "lost": 0}


def test_the_tuis_live_path_and_the_json_path_report_the_same_segments():
    """Both run the one pipeline: what the capture still held at detach reaches the table in
    the TUI as in the JSON output (the TUI's own source once lost it)."""
    import io
    import json

    from imaptap.output.jsonl import JsonlSink, JsonlWriter
    from imaptap.pipeline import LiveSource, Pipeline

    segs = login("alice", 1) + login("bob", 2, ok=False)
    half = len(segs) // 2
    out = io.StringIO()
    json_capture = DrainedAtDetach(segs[:half], segs[half:])
    writer = JsonlWriter(out)
    json_run = Pipeline(LiveSource(json_capture), [JsonlSink(writer)])
    json_run.run(stop=lambda: json_capture.polls >= 2)
    writer.flush()
    json_flows = [json.loads(line) for line in out.getvalue().splitlines()]

    tui_capture = DrainedAtDetach(segs[:half], segs[half:])
    updates: list[FeedUpdate] = []
    feed = Feed(LiveSource(tui_capture), updates.append, clock=Ticks(), wallclock=lambda: 0.0)
    worker = threading.Thread(target=feed.run)
    worker.start()
    _until(lambda: tui_capture.polls >= 2)
    feed.stop()
    worker.join(5)
    assert feed.done
    # what was sent, and what the worker holds for the next batch (a quitting UI takes none)
    snaps = [s for u in updates for s in u.flows] + list(feed._collect()[0])
    tui_flows = {s.id: s.facts.record() for s in snaps}

    assert json_run.table.stats.segments == feed.table.stats.segments == len(segs)
    assert [f["username"] for f in json_flows if f["type"] == "flow"] == ["alice", "bob"]
    assert [tui_flows[k] for k in sorted(tui_flows)] == [f for f in json_flows if f["type"] == "flow"]


def test_sinks_given_to_the_feed_see_what_the_ui_sees():
    # the TUI with --metrics: the metrics sink rides on the feed's pipeline
    metrics = pytest.importorskip("imaptap.output.metrics")
    pytest.importorskip("prometheus_client")
    sink = metrics.MetricsSink()
    segments = mixed_flows()
    _, updates = run_feed(segments, sinks=[sink])
    ended = sum(sink.snapshot.values["imaptap_flows_ended_total"].values())
    assert ended == updates[-1].status.totals["flows"] == len(latest(updates))
