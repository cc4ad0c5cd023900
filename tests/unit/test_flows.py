from hypothesis import given
from hypothesis import strategies as st

from imaptap.flows import HANDSHAKE_BYTES, HANDSHAKE_SEGMENTS, MAX_OUT_OF_ORDER, FlowTable
from imaptap.segment import PayloadMode, PayloadPolicy, Segment, TcpFlag
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


# -- the handshake's copy rule (PayloadMode.HANDSHAKE) ----------------------------------------

CAPS = b" ".join(b"X-CAPABILITY-%03d" % i for i in range(60))  # ~1 KB, as Cyrus sends after login
SERVER_ID = b'* ID ("name" "Cyrus IMAPD" "environment" "' + b"Built w/this and that; " * 20 + b'end")\r\n'
LONG_SESSION = [
    ("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK [CAPABILITY IMAP4rev1 " + CAPS + b"] in\r\n"),
    ("c", b"a2 ID NIL\r\n"), ("s", SERVER_ID + b"a2 OK done\r\n"),
    ("c", b"a3 SELECT INBOX\r\n"), ("s", b"* OK [UIDVALIDITY 7] Ok\r\n" * 30 + b"a3 OK selected\r\n"),
    ("c", b"a4 FETCH 1 (FLAGS)\r\n"), ("s", b"* CAPABILITY IMAP4rev1 " + CAPS + b"\r\na4 OK done\r\n"),
]
KEY = ("192.0.2.10", 40000, "192.0.2.20", 143)


def test_the_handshake_is_copied_whole_and_the_cut_applies_after_it():
    r = analyze(conversation(LONG_SESSION[:-1]))
    f = r.flow
    assert len(f["capabilities"]) == 61 and f["capabilities"][-1] == "X-CAPABILITY-059"
    assert f["server_id"]["environment"].endswith("; end") and f["resyncs"] == 0
    # the same without the handshake rule: the login's answer, ID and SELECT's data are cut
    cut = analyze(conversation(LONG_SESSION[:-1]), handshake_snaplen=0).flow
    assert cut["resyncs"] >= 2 and len(cut["capabilities"]) < 61
    assert not cut["server_id"]["environment"].endswith("; end")  # cut mid-value, as the issue saw
    # after the first command on messages (FETCH) the snap length's cut is back
    after = analyze(conversation(LONG_SESSION)).flow
    assert after["resyncs"] == 1 and after["bytes_not_captured"] > 0


def test_the_kernel_is_told_when_the_handshake_is_over_and_forgets_it_at_the_end():
    policy = PayloadPolicy()
    table = FlowTable({143}, policy)
    segs = conversation(LONG_SESSION, close=False)
    fetch = next(i for i, s in enumerate(segs) if s.payload.startswith(b"a4 FETCH"))
    for s in segs[:fetch]:
        table.add(s)
    assert policy.modes == {}, "every flow starts in the default mode: no entry"
    assert policy.mode(KEY) is PayloadMode.HANDSHAKE
    table.add(segs[fetch])
    assert policy.modes == {KEY: PayloadMode.PREFIX}
    table.close_all()
    assert policy.modes == {}


def test_a_flow_that_never_logs_in_falls_back_after_the_bound():
    junk = [("c", b"a%d NOOP\r\n" % i) for i in range(HANDSHAKE_SEGMENTS + 5)]
    policy = PayloadPolicy()
    table = FlowTable({143}, policy)
    segs = conversation([("s", GREETING), *junk], close=False)
    data = [s for s in segs if s.wire_len]
    for s in segs:
        table.add(s)
        if s is data[HANDSHAKE_SEGMENTS - 2]:
            assert policy.modes == {}
    assert policy.modes == {KEY: PayloadMode.PREFIX}
    # and one big segment reaches the byte bound at once
    big = PayloadPolicy()
    table = FlowTable({143}, big)
    for s in conversation([("s", GREETING), ("c", b"x" * HANDSHAKE_BYTES)], close=False):
        table.add(s)
    assert big.modes == {KEY: PayloadMode.PREFIX}


def test_a_flow_seen_from_its_middle_is_cut_from_its_first_segment_on():
    policy = PayloadPolicy()
    table = FlowTable({143}, policy)
    first, *rest = conversation(LONG_SESSION, handshake=False, close=False)
    table.add(first)
    assert policy.modes == {KEY: PayloadMode.PREFIX}


def test_starttls_and_compress_keep_their_modes_past_the_handshake():
    for command, mode in ((b"STARTTLS", PayloadMode.NONE), (b"COMPRESS DEFLATE", PayloadMode.WHOLE)):
        policy = PayloadPolicy()
        table = FlowTable({143}, policy)
        parts = [("s", GREETING), ("c", b"a1 " + command + b"\r\n"), ("s", b"a1 OK go\r\n")]
        parts += [("c", b"\x16\x03\x01 junk %d\r\n" % i) for i in range(HANDSHAKE_SEGMENTS + 2)]
        for s in conversation(parts, close=False):
            table.add(s)
        assert policy.modes == {KEY: mode}


def test_without_a_handshake_snap_length_no_flow_gets_an_entry():
    policy = PayloadPolicy(handshake_snaplen=0)
    assert policy.default is PayloadMode.PREFIX and policy.handshake_snaplen == 0
    table = FlowTable({143}, policy)
    for s in conversation(LONG_SESSION, close=False):
        table.add(s)
    assert policy.modes == {}
    assert PayloadPolicy(snaplen=4096).default is PayloadMode.PREFIX  # -s above it: no handshake rule
