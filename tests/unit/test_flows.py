from hypothesis import given
from hypothesis import strategies as st

from imaptap.flows import MAX_OUT_OF_ORDER, FlowTable
from imaptap.segment import PayloadPolicy, Segment, TcpFlag
from imaptap.testing import analyze, conversation

GREETING = b"* OK Dovecot ready.\r\n"
SESSION = [("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"), ("c", b"a2 SELECT INBOX\r\n"),
           ("s", b"a2 OK selected\r\n"), ("c", b"a3 LOGOUT\r\n"), ("s", b"a3 OK bye\r\n")]


def commands(result):
    return [(m["tag"], m["command"]) for m in result.messages if m["from"] == "client"]


def test_retransmissions_are_not_parsed_twice():
    segs = conversation(SESSION)
    data = [s for s in segs if s.wire_len]
    r = analyze(segs[:4] + [data[1], data[1]] + segs[4:])
    assert r.flow["commands"] == {"LOGIN": 1, "SELECT": 1, "LOGOUT": 1}
    assert r.flow["retransmissions"] == 2


def test_out_of_order_segments_are_put_back_in_order():
    segs = conversation(SESSION, cuts=[[], [4, 9], [], [], [], [], []])
    # client segments: login split in three; deliver the pieces reversed
    idx = [i for i, s in enumerate(segs) if s.payload in (b"a1 L", b"OGIN ", b"alice pw\r\n")]
    assert len(idx) == 3
    reordered = segs[: idx[0]] + [segs[idx[2]], segs[idx[1]], segs[idx[0]]] + segs[idx[2] + 1 :]
    r = analyze(reordered)
    assert r.flow["username"] == "alice" and r.flow["out_of_order"] == 2 and r.flow["gaps"] == 0


def test_partial_overlap_delivers_only_new_bytes():
    segs = conversation(SESSION, cuts=[[], [6], [], [], [], [], []])
    first = next(s for s in segs if s.payload == b"a1 LOG")
    overlap = first._replace(payload=b"a1 LOGIN al", wire_len=11)
    i = segs.index(first)
    r = analyze(segs[:i] + [overlap] + segs[i + 1 :])
    assert r.flow["username"] == "alice" and r.flow["retransmissions"] == 0


def test_a_lost_segment_is_a_gap_and_parsing_resumes():
    segs = conversation(SESSION)
    lost = next(s for s in segs if s.payload.startswith(b"a2 SELECT"))
    r = analyze([s for s in segs if s is not lost])
    f = r.flow
    assert f["gaps"] == 1 and f["mailboxes"] == [] and f["commands"] == {"LOGIN": 1, "LOGOUT": 1}
    assert f["username"] == "alice"


def test_too_many_out_of_order_segments_give_up_on_the_hole():
    parts = [("s", GREETING)] + [("c", b"a%d NOOP\r\n" % i) for i in range(MAX_OUT_OF_ORDER + 10)]
    segs = conversation(parts)
    first_noop = next(i for i, s in enumerate(segs) if s.payload.startswith(b"a0 NOOP"))
    r = analyze(segs[:first_noop] + segs[first_noop + 1 :])
    assert r.flow["commands"]["NOOP"] == MAX_OUT_OF_ORDER + 9
    assert r.flow["gaps"] == 1


def test_sequence_numbers_wrap():
    segs = conversation(SESSION)
    base = (1 << 32) - 30
    wrapped = [s._replace(seq=(s.seq - 1000 + base) % (1 << 32)) if s.sport == 40000 else s for s in segs]
    r = analyze(wrapped)
    assert r.flow["commands"] == {"LOGIN": 1, "SELECT": 1, "LOGOUT": 1} and r.flow["gaps"] == 0


def test_flow_ends_on_fin_rst_and_pure_acks_do_not_revive_it():
    segs = conversation(SESSION)
    ack = segs[-1]._replace(flags=int(TcpFlag.ACK), wire_len=0, payload=b"")
    r = analyze(segs + [ack])
    assert len(r.flows) == 1 and r.flow["end"] == "fin"
    assert r.table.stats.empty == 1
    rst = conversation(SESSION[:2], close=False) + [segs[-1]._replace(flags=int(TcpFlag.RST))]
    assert analyze(rst).flow["end"] == "rst"


def test_idle_flows_expire_on_capture_time():
    a = conversation(SESSION[:2], close=False, ts=1000.0)
    b = conversation(SESSION[:2], client=("192.0.2.11", 40001), close=False, ts=1000.0 + 31 * 60 + 5)
    r = analyze(a + b)
    assert [f["end"] for f in r.flows] == ["idle", "end"]


def test_table_is_bounded_and_evicts_the_oldest_idle_flow():
    segs = []
    for i in range(50):
        segs += conversation(SESSION[:1], client=(f"192.0.2.{i + 1}", 40000 + i), close=False, ts=1000.0 + i)
    r = analyze(segs, max_flows=10)
    assert len(r.flows) == 50
    assert [f["end"] for f in r.flows].count("evicted") == 40
    assert r.flows[0]["client"] == "192.0.2.1:40000"
    assert r.table.stats.evicted == 40 and len(r.table.flows) == 0


def test_syn_only_flows_and_reused_tuples():
    syn = Segment(1.0, 4, "192.0.2.1", "192.0.2.2", 5555, 143, 7, 0, int(TcpFlag.SYN), 0, b"")
    segs = [syn] + conversation(SESSION, client=("192.0.2.1", 5555), server=("192.0.2.2", 143), ts=2.0)
    r = analyze(segs)
    # the SYN-only attempt and the real session share a 5-tuple: the later SYN starts a new flow
    assert len(r.flows) == 1 and r.flow["username"] == "alice"
    again = (conversation(SESSION, client=("192.0.2.1", 5555), close=False)
             + conversation(SESSION, client=("192.0.2.1", 5555), ts=1_700_000_100.0))
    assert [f["end"] for f in analyze(again).flows] == ["reused", "fin"]


def test_traffic_on_other_ports_is_direction_by_port():
    r = analyze(conversation(SESSION, client=("192.0.2.1", 10143), server=("192.0.2.2", 50000)), ports={10143})
    assert r.flow["client"] == "192.0.2.2:50000"  # the side on the IMAP port is the server
    assert r.flow["username"] is None  # the roles are swapped, so nothing matches


def test_policy_entries_are_removed_when_flows_end():
    policy = PayloadPolicy(256)
    table = FlowTable({143}, policy)
    for s in conversation([("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK go\r\n")], close=False):
        table.add(s)
    assert list(policy.modes.values()) == [1]
    table.close_all()
    assert policy.modes == {}


@given(st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "9.9.9.9"]), st.integers(0, 65535)),
       st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "9.9.9.9"]), st.integers(0, 65535)))
def test_flow_key_is_the_same_both_ways_and_orders_endpoints_as_tuples_do(a, b):
    from imaptap.segment import flow_key

    key = flow_key(*a, *b)
    assert key == flow_key(*b, *a)
    assert key == (*min(a, b), *max(a, b))
