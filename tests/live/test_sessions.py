"""What the kernel hands over of real IMAP sessions with Dovecot, checked byte for byte.

The client (livelab.Client) speaks IMAP to the lab's Dovecot (scripts/imaplab.py) over a
socket and keeps every byte it sent and received; each `Segment` must carry exactly those
bytes at its sequence offset, cut into head and tail as `split_payload` cuts them, in both
directions, over IPv4 and IPv6, and under the per-flow modes NONE, WHOLE and HANDSHAKE.
Without an analyzer steering it, a flow stays in the kernel's default mode: HANDSHAKE, whose
head is the handshake snap length, unless the capture is made without one.
"""

from __future__ import annotations

import socket
import time

import pytest

from imaptap.capture import live
from imaptap.capture.live import LiveCapture
from imaptap.flows import FlowTable
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_TAILLEN, PayloadMode, TcpFlag, flow_key, split_payload
from livelab import Client, both_fins, check_session, check_stream, collect, of_client

pytestmark = pytest.mark.live

IMAP, ALT = 143, 10143
MESSAGE = (b"From: carol@example.org\r\nTo: alice@example.org\r\nSubject: quarterly figures\r\n\r\n"
           + b"".join(b"line %04d of a longer body, to span several segments\r\n" % i for i in range(200)))


def session(lab, addr: str, port: int = IMAP, append: int = 2000) -> Client:
    """LOGIN, SELECT, FETCH of an 11 KB message, APPEND of ``append`` bytes, LOGOUT."""
    c = Client(addr, port)
    c.command("a1", f"LOGIN alice {lab.users['alice']}")
    c.command("a2", "SELECT INBOX")
    c.command("a3", "FETCH 1 (BODY.PEEK[])")
    c.command("a4", "APPEND INBOX", literal=MESSAGE[:append])
    c.logout()
    return c


def ifindex(lab) -> int:
    return socket.if_nametoindex(lab.host_if)


def text(addr: str) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, addr))


def test_ipv4_session_both_directions_cut_at_snaplen(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {IMAP}, 64, handshake_snaplen=0) as cap:
        t0 = time.time()
        c = session(lab, lab.server4)
        segs = collect(cap, both_fins(c))
        t1 = time.time()
        counters = cap.counters()
    check_session(segs, c, 64, ifindex(lab), t0, t1)
    mine = of_client(segs, c)
    assert all(s.ip_version == 4 for s in mine)
    assert {(s.src, s.dst) for s in mine} == {(lab.client4, lab.server4), (lab.server4, lab.client4)}
    assert any(s.wire_len > 64 and len(s.payload) == 64 for s in mine if s.sport == IMAP)
    assert any(s.wire_len > 64 and len(s.payload) == 64 for s in mine if s.sport == c.port)
    # The tagged completion at the end of the long FETCH response is in a tail, not a head.
    assert any(b"a3 OK Fetch completed" in s.tail and b"a3 OK" not in s.payload for s in mine)
    assert any(len(s.tail) == DEFAULT_TAILLEN for s in mine)
    assert counters["lost"] == 0 and counters["unparsed"] == 0
    assert counters["submitted"] == counters["received"] >= len(mine)


def test_ipv6_session_in_the_default_handshake_mode(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {IMAP}, 256) as cap:
        t0 = time.time()
        c = session(lab, lab.server6)
        segs = collect(cap, both_fins(c))
        t1 = time.time()
        assert len(cap._bpf[b"flow_modes"]) == 0, "nothing steers the flow: it has no entry"
    check_session(segs, c, DEFAULT_HANDSHAKE_SNAPLEN, ifindex(lab), t0, t1)
    mine = of_client(segs, c)
    assert all(s.ip_version == 6 for s in mine)
    # MTU-sized segments are copied whole: their length is below the handshake snap length
    assert any(256 + DEFAULT_TAILLEN < s.wire_len == len(s.payload) for s in mine if s.sport == IMAP)
    # Text form as socket.inet_ntop gives it (compressed), as replay gives it.
    assert {s.src for s in mine} == {text(lab.client6), text(lab.server6)}


def test_other_ports_and_udp_are_counted_but_never_submitted(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {IMAP}, 256) as cap:
        cap.poll(0)
        before = cap.counters()
        session(lab, lab.server4, ALT)   # real IMAP, on a port not monitored
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u4, \
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u6:
            for _ in range(5):
                u4.sendto(b"a1 LOGIN alice secret\r\n", (lab.server4, IMAP))
                u6.sendto(b"a1 LOGIN alice secret\r\n", (lab.server6, IMAP))
        segs = collect(cap, lambda s: False, timeout=0.5)
        after = cap.counters()
    assert segs == []
    assert after["matched"] == before["matched"]
    assert after["submitted"] == before["submitted"]
    # The session is well over 10 packets each way, plus 10 datagrams.
    assert after["seen"] - before["seen"] >= 30


def offsets(segs, sport: int) -> list:
    """(stream offset, segment) of each data segment from ``sport``."""
    (syn,) = {s for s in segs if s.sport == sport and s.flags & TcpFlag.SYN}
    base = (syn.seq + 1) & 0xFFFFFFFF
    return [((s.seq - base) & 0xFFFFFFFF, s) for s in segs if s.sport == sport and s.wire_len > 0]


def test_none_mode_stops_payload_copies_but_fin_is_reported(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {IMAP}, 256, handshake_snaplen=0) as cap:
        c = Client(lab.server4)
        c.command("a1", f"LOGIN alice {lab.users['alice']}")
        key = flow_key(lab.client4, c.port, lab.server4, IMAP)
        cap.policy.set(key, PayloadMode.NONE)
        sent_before, received_before = len(c.sent), len(c.received)
        c.command("a2", "SELECT INBOX")
        c.command("a3", "FETCH 1 (BODY.PEEK[])")
        c.command("a4", "APPEND INBOX", literal=MESSAGE[:1000])
        sent_none, received_none = len(c.sent), len(c.received)
        cap.policy.forget(key)
        c.command("a5", "NOOP")
        c.logout()
        segs = of_client(collect(cap, both_fins(c)), c)
    for sport, before, none_end in ((c.port, sent_before, sent_none), (IMAP, received_before, received_none)):
        data = offsets(segs, sport)
        for off, s in data:
            if before <= off < none_end:
                assert s.payload == b"" and s.tail == b"" and s.wire_len > 0
            else:
                assert s.payload, "payload copies must resume after forget()"
        assert any(before <= off < none_end for off, _ in data)
    assert any(s.flags & TcpFlag.FIN for s in segs if s.sport == c.port)
    assert any(s.flags & TcpFlag.FIN for s in segs if s.sport == IMAP)


def test_whole_mode_copies_whole_payloads(lab):
    lab.deliver("alice", MESSAGE * 4)
    snaplen = 64
    with LiveCapture([lab.host_if], {IMAP}, snaplen) as cap:
        c = Client(lab.server4)
        greeting = len(c.received)   # copied before the mode was set
        key = flow_key(lab.client4, c.port, lab.server4, IMAP)
        cap.policy.set(key, PayloadMode.WHOLE)
        assert len(cap._bpf[b"flow_modes"]) == 1
        c.command("a1", f"LOGIN alice {lab.users['alice']}")
        c.command("a2", "SELECT INBOX")
        c.command("a3", "FETCH 1 (BODY.PEEK[])")
        # A 100 KB literal: TSO hands TC egress segments of up to 64 KiB, copied whole.
        c.command("a4", "APPEND INBOX", literal=(MESSAGE * 10)[:100000])
        c.logout()
        segs = of_client(collect(cap, both_fins(c)), c)
        cap.policy.forget(key)
        assert len(cap._bpf[b"flow_modes"]) == 0
        assert cap.counters()["lost"] == 0
    data = check_stream(segs, c.port, bytes(c.sent), live.WHOLE_PAYLOAD_CAP)
    assert all(len(s.payload) == s.wire_len and s.tail == b"" for s in data)
    assert max(s.wire_len for s in data) > 1500
    received = bytes(c.received)
    data = [(off, s) for off, s in offsets(segs, IMAP) if off >= greeting]
    covered = greeting
    for off, s in data:
        assert s.payload == received[off:off + s.wire_len] and s.tail == b""
        if off <= covered:
            covered = max(covered, off + s.wire_len)
    assert covered == len(received)
    assert max(s.wire_len for _, s in data) > 1400


@pytest.mark.parametrize("handshake", [0, 300], ids=["prefix", "handshake"])
@pytest.mark.parametrize("options", [
    {"use_xdp": False},
    {"xdp_mode": "skb"},
    {"output": "perf"},
    {"use_xdp": False, "output": "perf"},
], ids=["tc-only", "xdp-skb", "perf-buffer", "tc-perf"])
def test_variants_capture_the_same_sessions(lab, options, handshake):
    """Each variant of the program, with the snap length's cut and with the handshake's (the
    default mode of a flow nothing steers)."""
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {IMAP, ALT}, 100, handshake_snaplen=handshake, **options) as cap:
        if options.get("xdp_mode") == "skb":
            assert cap.xdp_modes == {lab.host_if: "skb"}
        t0 = time.time()
        c = session(lab, lab.server4)
        c6 = session(lab, lab.server6, ALT, append=300)
        segs = collect(cap, lambda s: both_fins(c)(s) and both_fins(c6)(s))
        t1 = time.time()
    head = max(100, handshake)
    check_session(segs, c, head, ifindex(lab), t0, t1)
    check_session(segs, c6, head, ifindex(lab), t0, t1)


def test_the_analyzer_ends_the_handshake_and_the_kernel_cuts_from_then_on(lab):
    """With the analyzer in the loop: the greeting, CAPABILITY, the login's and SELECT's answers
    whole (up to 2 KB a segment); the client's first command on messages (NOOP) ends the
    handshake, the analyzer writes PREFIX into the map, and the FETCH after it is cut to the
    snap length and tail."""
    lab.deliver("alice", MESSAGE)
    segs = []
    with LiveCapture([lab.host_if], {IMAP}, 64, taillen=16) as cap:
        table = FlowTable({IMAP}, cap.policy)

        def feed(until, timeout=5.0):
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                for seg in cap.poll(50):
                    segs.append(seg)
                    table.add(seg)
            assert until(), "the analyzer did not get there"

        c = Client(lab.server4)
        key = flow_key(lab.client4, c.port, lab.server4, IMAP)
        c.command("a1", "CAPABILITY")
        c.command("a2", f"LOGIN alice {lab.users['alice']}")
        c.command("a3", "SELECT INBOX")
        feed(lambda: key in table.flows and "SELECT" in table.flows[key].session.commands)
        assert key not in cap.policy.modes and len(cap._bpf[b"flow_modes"]) == 0
        handshake_end = len(c.received)
        c.command("a4", "NOOP")
        feed(lambda: cap.policy.mode(key) is PayloadMode.PREFIX)
        assert [v.value for v in cap._bpf[b"flow_modes"].values()] == [int(PayloadMode.PREFIX)]
        fetch_start = len(c.received)
        c.command("a5", "FETCH 1 (BODY.PEEK[])")
        c.logout()
        feed(lambda: key not in table.flows)
        assert len(cap._bpf[b"flow_modes"]) == 0, "the entry goes when the flow ends"
    received = bytes(c.received)
    server = offsets(of_client(segs, c), IMAP)
    login_answer = [s for off, s in server if off < handshake_end]
    assert sum(s.wire_len for s in login_answer) > 64 * len(login_answer), "long lines in the handshake"
    assert all(s.payload == received[off:off + s.wire_len] and s.tail == b""
               for off, s in server if off < handshake_end)
    fetched = [(off, s) for off, s in server if off >= fetch_start]
    assert sum(s.wire_len for _, s in fetched) > len(MESSAGE)
    assert all((s.payload, s.tail) == split_payload(received[off:off + s.wire_len], 64, 16) for off, s in fetched)
    assert any(len(s.payload) == 64 for _, s in fetched)
