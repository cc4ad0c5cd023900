"""The one pipeline: stop and end-of-input rules, the -w hook, sinks, and the stats record."""

import itertools

from imaptap.facts import FlowFacts
from imaptap.flows import EndReason
from imaptap.imap.session import Kind
from imaptap.pipeline import CHECK_EVERY, MemorySource, Pipeline, ReplaySource, Sink, Source
from imaptap.testing import conversation
from testenv import OWN_PCAPS

SESSION = [("s", b"* OK ready\r\n"), ("c", b"a1 LOGIN alice secret\r\n"), ("s", b"a1 OK done\r\n")]


class Collect(Sink):
    def __init__(self, messages=True):
        self.messages = [] if messages else None
        self.ended: list[FlowFacts] = []

    def flow_started(self, flow):
        return None if self.messages is None else self.messages.append

    def flow_ended(self, flow, facts):
        self.ended.append(facts)


class Endless(Source):
    """Segments, then a stop request, then ticks that never end (other ports' traffic)."""

    def __init__(self, segments, stop):
        self.given, self.stop, self.ports = segments, stop, frozenset({143})
        self.policy = MemorySource([]).policy
        self.closed = False

    def segments(self):
        yield from self.given
        self.stop.append(15)  # a signal handler ran while records without segments were read
        yield from itertools.repeat(None)

    def close(self):
        self.closed = True
        return ()


def test_a_stop_during_a_stretch_without_segments_ends_the_run_and_every_flow():
    stop: list[int] = []
    segs = conversation(SESSION, close=False)
    sink = Collect()
    source = Endless(segs, stop)
    p = Pipeline(source, [sink])
    p.run(stop=stop.__len__)
    assert source.closed and p.stopped
    assert p.table.stats.segments == len(segs) and not p.table.flows
    (facts,) = sink.ended
    assert facts.end == EndReason.END.value and facts.username == "alice"
    assert p.stats()["stopped_by_signal"] is True


def test_the_stop_flag_is_looked_at_every_check_every_segments():
    looks = []
    segs = [s for i in range(3) for s in conversation(SESSION * 200, client=("192.0.2.10", 40000 + i))]
    Pipeline(MemorySource(segs)).run(stop=lambda: looks.append(1) and False)
    assert len(looks) == len(segs) // CHECK_EVERY


def test_the_end_of_input_ends_every_flow_unless_the_source_says_they_stay_open():
    segs = conversation(SESSION, close=False)
    ended = Collect()
    Pipeline(MemorySource(segs), [ended]).run()
    assert [f.end for f in ended.ended] == ["end"]
    still = Collect()
    p = Pipeline(MemorySource(segs, open_at_end=True), [still])
    p.run()
    assert still.ended == [] and len(p.table.flows) == 1


def test_messages_reach_every_sink_that_wants_them_and_none_are_made_for_none():
    segs = conversation(SESSION)
    a, b, quiet = Collect(), Collect(), Collect(messages=False)
    Pipeline(MemorySource(segs), [a, quiet, b]).run()
    assert a.messages == b.messages and [m.kind for m in a.messages] == [Kind.UNTAGGED, Kind.REQUEST, Kind.RESPONSE]
    assert quiet.ended == a.ended == b.ended
    alone = Pipeline(MemorySource(segs), [quiet])
    alone.run()
    # nobody wanted messages: the session was given no callable to make them for
    assert quiet.messages is None


def test_a_replay_and_its_stats_record(tmp_path):
    path = f"{OWN_PCAPS}/login-atom.pcap"
    sink = Collect()
    p = Pipeline(ReplaySource(path, {143}), [sink])
    p.run()
    rec = p.stats()
    assert list(rec)[:2] == ["source", "packets"] and rec["source"] == path
    assert rec["segments"] == p.table.stats.segments > 0 and "error" not in rec
    assert [f.username for f in sink.ended] == ["alice"]


def test_a_file_that_cannot_be_read_is_an_error_in_the_record_not_an_exception(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all" * 10)
    p = Pipeline(ReplaySource(str(bad), {143}))
    p.run()
    assert p.error.endswith("not a pcap or pcapng file") and p.stats()["error"] == p.error
    assert "packets" not in p.stats()  # nothing was read: no reader counts


def test_w_works_with_a_replay_and_writes_no_password(tmp_path):
    from imaptap.capture.pcapwrite import MaskingWriter

    out = tmp_path / "out.pcap"
    writer = MaskingWriter(str(out), {143})
    p = Pipeline(MemorySource(conversation(SESSION)), pcap_writer=writer)
    p.run()
    raw = out.read_bytes()
    assert b"secret" not in raw and b"a1 LOGIN alice ******" in raw
    assert p.stats()["written"] == writer.records == len(conversation(SESSION))
    again = Collect()
    Pipeline(ReplaySource(str(out), {143}), [again]).run()
    assert [f.username for f in again.ended] == ["alice"]


def test_sinks_are_ticked_on_the_sources_ticks_and_told_when_the_run_is_over():
    class Clocked(Collect):
        def __init__(self):
            super().__init__()
            self.ticks, self.done = 0, None

        def tick(self, pipeline):
            self.ticks += 1

        def finished(self, pipeline):
            self.done = (len(self.ended), len(pipeline.table.flows))

    segs = [s for i in range(3) for s in conversation(SESSION * 200, client=("192.0.2.10", 40000 + i))]
    sink = Clocked()
    Pipeline(MemorySource(segs), [sink]).run()
    assert sink.ticks == len(segs) // CHECK_EVERY
    assert sink.done == (3, 0)  # after every flow ended
