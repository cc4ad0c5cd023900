"""Property tests: arbitrary bytes and arbitrary segmentation never raise and never change facts."""

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imaptap.segment import Segment
from imaptap.testing import analyze, conversation

# Capture artefacts: how many segments there were and which bytes the capture skipped after TLS.
TIMING = {"first_ts", "last_ts", "packets", "packets_c2s", "packets_s2c", "flow", "bytes_not_captured"}


def facts(result):
    flows = [{k: v for k, v in f.items() if k not in TIMING} for f in result.flows]
    msgs = [{k: v for k, v in m.items() if k not in ("ts", "latency_ms")} for m in result.messages]
    return flows, msgs


imapish = st.sampled_from([
    b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n", b"a1 LOGIN alice pw\r\n", b"a1 OK in\r\n",
    b"a2 AUTHENTICATE PLAIN\r\n", b"+ \r\n", b"AGFsaWNlAHB3\r\n", b"a3 STARTTLS\r\n", b"a3 OK go\r\n",
    b"a4 COMPRESS DEFLATE\r\n", b"a4 OK DEFLATE active\r\n", b"a5 APPEND INBOX {10}\r\n", b"{3}\r\n",
    b"* 1 FETCH (BODY[] {7}\r\n", b"a6 IDLE\r\n", b"DONE\r\n", b'a7 ID ("name" "x")\r\n', b"\x16\x03\x01",
    b"a8 SELECT {4+}\r\nINBX\r\n", b"a9 NO [TOOBIG] no\r\n", b"\r\n", b"\n", b"}", b"{", b"~{2}\r\n",
])
chunk = st.one_of(st.binary(max_size=60), imapish)
stream_bytes = st.lists(chunk, max_size=25).map(b"".join)


def split_points(data_len):
    return st.lists(st.integers(min_value=1, max_value=max(1, data_len - 1)), max_size=8)


@st.composite
def two_segmentations(draw):
    parts = draw(st.lists(st.tuples(st.sampled_from("cs"), stream_bytes.filter(bool)), min_size=1, max_size=8))
    cuts_a = [draw(split_points(len(d))) for _, d in parts]
    cuts_b = [draw(split_points(len(d))) for _, d in parts]
    return parts, cuts_a, cuts_b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_segmentations())
def test_resegmenting_a_stream_gives_the_same_facts(case):
    parts, cuts_a, cuts_b = case
    a = analyze(conversation(parts, cuts=cuts_a), snaplen=None)
    b = analyze(conversation(parts, cuts=cuts_b), snaplen=None)
    assert facts(a) == facts(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_segmentations(), st.integers(min_value=1, max_value=300))
def test_arbitrary_bytes_with_a_snap_length_never_raise(case, snaplen):
    parts, cuts, _ = case
    r = analyze(conversation(parts, cuts=cuts), snaplen=snaplen)
    assert len(r.flows) == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.lists(st.integers(1, 3000), max_size=6),
       st.sampled_from([None, 256, 40]))
def test_no_mail_body_changes_a_fact(body, cut_at, snaplen):
    def session(b):
        return [
            ("s", b"* OK Dovecot ready.\r\n"), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"),
            ("c", b"a2 APPEND INBOX {%d}\r\n" % len(b)), ("s", b"+ OK\r\n"), ("c", b + b"\r\n"),
            ("s", b"a2 OK appended\r\n"), ("c", b"a3 FETCH 1 BODY[]\r\n"),
            ("s", b"* 1 FETCH (BODY[] {%d}\r\n" % len(b) + b + b")\r\na3 OK done\r\n"),
            ("c", b"a4 SELECT Sent\r\n"), ("s", b"a4 OK\r\n"),
        ]
    cuts = [[], [], [], [], [], cut_at, [], [], cut_at, [], []]
    benign = bytes(0x2E if c not in (10, 13) else c for c in body)  # same length and line shape
    a = analyze(conversation(session(body), cuts=cuts), snaplen=snaplen)
    b = analyze(conversation(session(benign), cuts=cuts), snaplen=snaplen)
    assert facts(a) == facts(b)
    assert a.flow["username"] == "alice" and a.flow["mailboxes"] == ["Sent"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=10), st.lists(st.integers(1, 400), max_size=10))
def test_compressed_streams_resegment_to_the_same_facts(lines, cuts):
    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    z = b"".join(comp.compress(ln) + comp.flush(zlib.Z_SYNC_FLUSH) for ln in lines)
    parts = [("s", b"* OK ready\r\n"), ("c", b"a1 COMPRESS DEFLATE\r\n"), ("s", b"a1 OK DEFLATE active\r\n"), ("s", z)]
    a = analyze(conversation(parts, cuts=[[], [], [], cuts]), snaplen=256)
    b = analyze(conversation(parts), snaplen=256)
    assert facts(a) == facts(b)


segment_st = st.builds(
    Segment,
    ts=st.floats(0, 1e4),
    ip_version=st.just(4),
    src=st.sampled_from(["192.0.2.1", "192.0.2.2"]),
    dst=st.sampled_from(["192.0.2.1", "192.0.2.2"]),
    sport=st.sampled_from([143, 1000, 1001]),
    dport=st.sampled_from([143, 1000]),
    seq=st.integers(0, (1 << 32) - 1),
    ack=st.integers(0, (1 << 32) - 1),
    flags=st.integers(0, 63),
    wire_len=st.integers(0, 3000),
    payload=st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(segment_st, max_size=40))
def test_arbitrary_segments_never_raise(segs):
    segs = [s for s in segs if s.wire_len >= len(s.payload)]
    analyze(segs, snaplen=256)
