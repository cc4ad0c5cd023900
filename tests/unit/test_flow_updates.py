"""--flow-interval: every open flow's facts so far, every interval of the capture clock."""

import json

import pytest

from imaptap.facts import FlowFacts
from imaptap.output.jsonl import JsonlSink, JsonlWriter, _dumps, flow_update_line, flow_update_record
from imaptap.pipeline import MemorySource, Pipeline, ReplaySource, Sink, Source
from imaptap.testing import conversation
from testenv import OWN_PCAPS

T0 = 1_700_000_000.0
GREETING = ("s", b"* OK ready\r\n")
LOGIN = [("c", b"a1 LOGIN alice secret\r\n"), ("s", b"a1 OK done\r\n")]
IDLE = [("c", b"a2 IDLE\r\n"), ("s", b"+ idling\r\n")]


class Updates(Sink):
    """Records (ts, flow id, facts) of each update and the facts of each ended flow."""

    def __init__(self):
        self.updates: list[tuple[float, int, FlowFacts]] = []
        self.ended: list[FlowFacts] = []

    def flow_update(self, flow, facts, ts):
        self.updates.append((ts, flow.id, facts))

    def flow_ended(self, flow, facts):
        self.ended.append(facts)


def timed(parts, at, **kw):
    """One connection, part ``i`` sent at ``at[i]`` seconds after T0 (the handshake at T0)."""
    segs = conversation(parts, ts=T0, step=0.0, **kw)
    # conversation() gives 2 handshake segments (SYN, SYN-ACK), one per part, then the 2 FINs
    times = [T0] * 2 + [T0 + a for a in at] + [T0 + at[-1] + 1] * 2
    assert len(times) == len(segs)
    return [s._replace(ts=t) for s, t in zip(segs, times, strict=True)]


def test_a_replay_updates_open_flows_at_each_interval_of_capture_time_with_the_facts_until_then():
    segs = timed([GREETING, *LOGIN, *IDLE], at=[0.001, 50, 50.001, 100, 100.001])
    sink = Updates()
    Pipeline(MemorySource(segs), [sink], flow_interval=30).run()
    # due at 30 (taken at the segment of 50 s) and 60 (at 100 s); 90 fell in the same quiet stretch
    assert [ts - T0 for ts, _, _ in sink.updates] == [30, 60]
    before_login, after_login = (f for _, _, f in sink.updates)
    assert before_login.username is None and before_login.end is None
    assert after_login.username == "alice" and after_login.login_ok is True and after_login.idles == 0
    assert after_login.last_ts == T0 + 50.001
    (final,) = sink.ended
    assert final.idles == 1 and final.end == "fin"  # the close came after the last round


def test_a_quiet_stretch_gives_one_round_not_one_per_interval_missed():
    segs = timed([GREETING, *LOGIN], at=[0.001, 1, 10_000])
    sink = Updates()
    Pipeline(MemorySource(segs), [sink], flow_interval=30, idle_timeout=1e9).run()
    assert [ts - T0 for ts, _, _ in sink.updates] == [30]
    # and the rounds go on from there on the interval's grid
    segs = timed([GREETING, *LOGIN, *IDLE], at=[0.001, 1, 10_000, 10_005, 10_041])
    sink = Updates()
    Pipeline(MemorySource(segs), [sink], flow_interval=30, idle_timeout=1e9).run()
    assert [ts - T0 for ts, _, _ in sink.updates] == [30, 10_020]


def test_every_open_flow_is_in_each_round_and_a_flow_idle_past_the_timeout_is_not():
    a = timed([GREETING, *LOGIN], at=[0.001, 1, 2], client=("192.0.2.10", 40000))
    b = timed([GREETING, *LOGIN, *IDLE], at=[0.001, 35, 35.001, 65, 95], client=("192.0.2.11", 40001))
    # a's close is dropped: it goes quiet at 2 s and the idle timeout (40 s) ends it
    segs = sorted(a[:-2] + b, key=lambda s: s.ts)
    sink = Updates()
    Pipeline(MemorySource(segs), [sink], flow_interval=30, idle_timeout=40).run()
    rounds = {}
    for ts, flow_id, _ in sink.updates:
        rounds.setdefault(round(ts - T0), []).append(flow_id)
    assert {t: sorted(ids) for t, ids in rounds.items()} == {30: [1, 2], 60: [2], 90: [2]}
    assert [f.end for f in sink.ended] == ["idle", "fin"]


def test_without_an_interval_there_are_no_updates():
    sink = Updates()
    Pipeline(MemorySource(timed([GREETING, *LOGIN], at=[0.001, 1, 500]))).run()
    assert sink.updates == []


class LiveStandIn(Source):
    """A live source whose wall clock the test moves: ticks only, the segments at the start."""

    live = True

    def __init__(self, segments, clock):
        self.given, self.clock = segments, clock
        self.ports = frozenset({143})
        self.policy = MemorySource([]).policy

    def segments(self):
        yield from self.given
        for _ in range(50):  # the wall clock goes on while no segment comes (IDLE)
            self.clock[0] += 7
            yield None


def test_live_rounds_follow_the_wall_clock_on_ticks():
    clock = [T0]
    segs = timed([GREETING, *LOGIN, *IDLE], at=[0.001, 0.002, 0.003, 0.004, 0.005])[:-2]  # still open
    sink = Updates()
    Pipeline(LiveStandIn(segs, clock), [sink], flow_interval=60, idle_timeout=1e9,
             wallclock=lambda: clock[0]).run()
    # rounds are due every 60 s from the open, each taken at the first tick (every 7 s) after it
    assert [round(ts - T0) for ts, _, _ in sink.updates] == [63, 126, 182, 245, 301]
    assert all(f.idles == 1 and f.end is None for _, _, f in sink.updates)


def test_the_flow_update_line_is_the_flow_record_after_type_and_ts(tmp_path):
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        writer = JsonlWriter(f)
        Pipeline(ReplaySource(f"{OWN_PCAPS}/idle.pcap", {143}), [JsonlSink(writer)], flow_interval=0.01).run()
        writer.flush()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    updates = [r for r in records if r["type"] == "flow_update"]
    (flow,) = [r for r in records if r["type"] == "flow"]
    assert len(updates) >= 2
    for r in updates:
        assert list(r)[:2] == ["type", "ts"] and list(r)[2:] == list(flow)[1:]
        assert r["end"] is None and r["first_ts"] == flow["first_ts"] and r["last_ts"] <= r["ts"]
    # on the interval's grid from the first segment on, one round per quiet stretch
    steps = [(r["ts"] - flow["first_ts"]) / 0.01 for r in updates]
    assert steps == sorted(set(steps)) and all(step == pytest.approx(round(step)) for step in steps)


@pytest.mark.parametrize("ts", [T0 + 0.1, 1e22, float("inf")])
def test_flow_update_line_equals_the_encoded_record(ts):
    sink = Updates()
    Pipeline(MemorySource(timed([GREETING, *LOGIN], at=[0.001, 1, 50])), [sink], flow_interval=10).run()
    facts = sink.updates[-1][2]
    assert flow_update_line(facts, ts) == _dumps(flow_update_record(facts, ts))
