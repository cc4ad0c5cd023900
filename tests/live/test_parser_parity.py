"""The kernel's packet parser against replay's, frame by frame.

Hand-built Ethernet frames (VLAN tags, IPv4 options and fragments, IPv6 extension headers,
TCP options, padding, pure ACKs, other ports, UDP) are written with a packet socket onto the
veth, so that the kernel program sees them at XDP ingress, TC ingress or TC egress.  Each must
give exactly the `Segment` fields that capture/decode.py gives for the same bytes (the replay
path), or nothing where replay skips it.  The frames carry addresses of the test namespace
and a destination MAC nobody has: they never leave the veth pair.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from imaptap.capture import decode
from imaptap.capture.live import LiveCapture
from imaptap.segment import TcpFlag, split_payload

pytestmark = pytest.mark.live

SNAPLEN = 64
TAILLEN = 20
#: Makes every frame longer than a page, so that a packet socket sends it as a paged skb.
NONLINEAR_TRAILER = 4200
PORTS = {143}
DST_MAC = bytes.fromhex("02000000aa01")   # locally administered, unused
SRC_MAC = bytes.fromhex("02000000aa02")
ACK, PSH, SYN, FIN, RST = TcpFlag.ACK, TcpFlag.PSH, TcpFlag.SYN, TcpFlag.FIN, TcpFlag.RST
LIFECYCLE = SYN | FIN | RST


def eth(ethertype: int, body: bytes, tags: tuple[int, ...] = (), trailer: bytes = b"") -> bytes:
    hdr = DST_MAC + SRC_MAC
    for i, tpid in enumerate(tags):
        hdr += struct.pack("!HH", tpid, 100 + i)
    return hdr + struct.pack("!H", ethertype) + body + trailer


def tcp(seq: int, payload: bytes = b"", flags: int = ACK | PSH, sport: int = 40000, dport: int = 143,
        options: bytes = b"", doff: int | None = None) -> bytes:
    if doff is None:
        doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 777, doff << 4, flags, 65535, 0, 0) + options + payload


def ipv4(src: str, dst: str, body: bytes, options: bytes = b"", frag: int = 0, total_len: int | None = None,
         proto: int = 6, version: int = 4) -> bytes:
    ihl = (20 + len(options)) // 4
    tot = 20 + len(options) + len(body) if total_len is None else total_len
    return struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, tot, 1, frag, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + options + body


def ipv6(src: str, dst: str, nexthdr: int, body: bytes, payload_len: int | None = None) -> bytes:
    plen = len(body) if payload_len is None else payload_len
    return struct.pack("!IHBB16s16s", 0x60000000, plen, nexthdr, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + body


def ext8(nexthdr: int, units: int = 0) -> bytes:
    """Hop-by-hop, routing or destination options header of (units + 1) * 8 bytes."""
    return struct.pack("!BB", nexthdr, units) + b"\x01" + bytes((units + 1) * 8 - 3)


def frag6(nexthdr: int, offset_flags: int) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, offset_flags, 0x1234)


def ah(nexthdr: int) -> bytes:
    return struct.pack("!BBHII", nexthdr, 4, 0, 0x100, 1) + bytes(12)   # (4 + 2) * 4 = 24 bytes


def frames(lab) -> list[tuple[str, bytes, bool]]:
    """(name, frame, kernel_limit): kernel_limit marks frames replay decodes but the kernel, by a
    documented limit, does not."""
    c4, s4, c6, s6 = lab.client4, lab.server4, lab.client6, lab.server6
    text = b"a1 LOGIN alice secret\r\n"
    big = bytes(range(256)) + bytes(range(44))
    HOP, ROUTING, DST, FRAG, AH, TCP, UDP = 0, 43, 60, 44, 51, 6, 17
    udp = struct.pack("!HHHH", 40000, 143, 8 + len(text), 0) + text
    out = [
        ("ipv4", eth(0x0800, ipv4(c4, s4, tcp(1000, text))), False),
        ("ipv4 from the server", eth(0x0800, ipv4(s4, c4, tcp(2000, text, sport=143, dport=40000))), False),
        ("ipv4 cut at snaplen, with a tail", eth(0x0800, ipv4(c4, s4, tcp(3000, big))), False),
        ("a tail shorter than the tail length", eth(0x0800, ipv4(c4, s4, tcp(3300, big[:SNAPLEN + 6]))), False),
        ("exactly the snap length", eth(0x0800, ipv4(c4, s4, tcp(3600, big[:SNAPLEN]))), False),
        ("cut short, with a tail", eth(0x0800, ipv4(c4, s4, tcp(3900, big[:150]), total_len=20 + 20 + 1000)), False),
        ("ipv4 options", eth(0x0800, ipv4(c4, s4, tcp(4000, text), options=b"\x01" * 8)), False),
        ("tcp options", eth(0x0800, ipv4(c4, s4, tcp(5000, text, options=b"\x01\x01\x08\x0a" + bytes(8)))), False),
        ("ethernet padding", eth(0x0800, ipv4(c4, s4, tcp(6000, b"ab")), trailer=bytes(20)), False),
        ("802.1Q", eth(0x0800, ipv4(c4, s4, tcp(7000, text)), tags=(0x8100,)), False),
        ("802.1ad + 802.1Q", eth(0x86DD, ipv6(c6, s6, TCP, tcp(8000, text)), tags=(0x88A8, 0x8100)), False),
        ("0x9100 tag", eth(0x0800, ipv4(c4, s4, tcp(8500, text)), tags=(0x9100,)), False),
        ("three tags", eth(0x0800, ipv4(c4, s4, tcp(9000, text)), tags=(0x88A8, 0x8100, 0x8100)), True),
        ("syn", eth(0x0800, ipv4(c4, s4, tcp(10000, flags=SYN))), False),
        ("fin", eth(0x0800, ipv4(s4, c4, tcp(11000, flags=FIN | ACK, sport=143, dport=40000))), False),
        ("rst with payload", eth(0x0800, ipv4(c4, s4, tcp(12000, b"x", flags=RST))), False),
        ("pure ack", eth(0x0800, ipv4(c4, s4, tcp(13000, flags=ACK))), False),
        ("other port", eth(0x0800, ipv4(c4, s4, tcp(14000, text, dport=8143))), False),
        ("udp to 143", eth(0x0800, ipv4(c4, s4, udp, proto=UDP)), False),
        ("ipv4 first fragment", eth(0x0800, ipv4(c4, s4, tcp(15000, text), frag=0x2000)), False),
        ("ipv4 later fragment", eth(0x0800, ipv4(c4, s4, tcp(16000, text), frag=0x0010)), False),
        ("ipv4 total length 0 (GSO)", eth(0x0800, ipv4(c4, s4, tcp(17000, text), total_len=0)), False),
        ("ipv4 truncated", eth(0x0800, ipv4(c4, s4, tcp(18000, text), total_len=20 + 20 + 500)), False),
        ("ipv4 bad version", eth(0x0800, ipv4(c4, s4, tcp(19000, text), version=5)), False),
        ("tcp data offset < 5", eth(0x0800, ipv4(c4, s4, tcp(20000, text, doff=4))), False),
        ("ip length inside the tcp header",
         eth(0x0800, ipv4(c4, s4, tcp(21000, text, flags=SYN), total_len=30)), False),
        ("ipv6", eth(0x86DD, ipv6(c6, s6, TCP, tcp(22000, text))), False),
        ("ipv6 hop-by-hop, routing, dest opts",
         eth(0x86DD, ipv6(c6, s6, HOP, ext8(ROUTING) + ext8(DST, 1) + ext8(TCP, 2) + tcp(23000, text))), False),
        ("ipv6 ah", eth(0x86DD, ipv6(c6, s6, AH, ah(TCP) + tcp(24000, text))), False),
        ("ipv6 atomic fragment", eth(0x86DD, ipv6(c6, s6, FRAG, frag6(TCP, 0) + tcp(25000, text))), False),
        ("ipv6 fragment", eth(0x86DD, ipv6(c6, s6, FRAG, frag6(TCP, 1) + tcp(26000, text))), False),
        ("ipv6 four extension headers",
         eth(0x86DD, ipv6(c6, s6, HOP, ext8(DST) + ext8(ROUTING) + ext8(DST) + ext8(TCP) + tcp(27000, text))), False),
        ("ipv6 five extension headers",
         eth(0x86DD, ipv6(c6, s6, HOP, ext8(DST) + ext8(ROUTING) + ext8(DST) + ext8(DST) + ext8(TCP)
                          + tcp(28000, text))), True),
        ("ipv6 payload length 0", eth(0x86DD, ipv6(c6, s6, TCP, tcp(29000, text), payload_len=0)), False),
        ("ipv6 udp", eth(0x86DD, ipv6(c6, s6, UDP, udp)), False),
        ("arp", eth(0x0806, bytes(28)), False),
    ]
    return out


INJECT = textwrap.dedent('''
    import socket, struct, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    nonlinear = sys.argv[2] == "nonlinear"
    if nonlinear:
        # PACKET_VNET_HDR: each frame starts with a virtio_net_hdr whose hdr_len (14) makes
        # the kernel put only the Ethernet header in the skb's linear part.
        s.setsockopt(263, 15, 1)
    s.bind((sys.argv[1], 0))
    for line in sys.stdin:
        frame = bytes.fromhex(line.strip())
        s.send((struct.pack("=BBHHHH", 0, 0, 14, 0, 0, 0) if nonlinear else b"") + frame)
''')


def inject(lab, where: str, raw: list[bytes], nonlinear: bool = False) -> None:
    """Write frames onto the veth: from the namespace side (host ingress) or the host side
    (egress); ``nonlinear``: with the IP and TCP headers outside the skb's linear part."""
    cmd = [sys.executable, "-c", INJECT]
    layout = "nonlinear" if nonlinear else "linear"
    if where == "ns":
        cmd = ["ip", "netns", "exec", lab.netns, *cmd, lab.ns_if, layout]
    else:
        cmd = [*cmd, lab.host_if, layout]
    subprocess.run(cmd, input="\n".join(f.hex() for f in raw) + "\n", text=True, check=True, timeout=30)


def expected(frame: bytes):
    """What replay makes of the frame: Segment fields without ts/ifindex, or None."""
    p = decode.decode_ethernet(frame, PORTS)
    if isinstance(p, decode.Skip):
        return None
    version, src, dst, sport, dport, seq, ack, flags, wire_len, payload = p
    if wire_len == 0 and not flags & LIFECYCLE:
        return None  # pure ACKs stay in the kernel
    return (version, src, dst, sport, dport, seq, ack, flags, wire_len, *split_payload(payload, SNAPLEN, TAILLEN))


@pytest.mark.parametrize("hook", ["xdp", "tc-ingress", "tc-egress", "tc-egress-nonlinear"])
def test_kernel_parses_every_frame_as_replay_does(netlab, hook):
    """tc-egress-nonlinear: only the Ethernet header is in the linear part of the skb, so the
    program must pull the rest (bpf_skb_pull_data) and parse again.  (A packet socket builds
    such skbs only for frames longer than a page: those frames get a trailer, which both
    parsers ignore, and the veth a larger MTU.)"""
    cases = frames(netlab)
    if hook == "tc-egress-nonlinear":
        subprocess.run(["ip", "link", "set", netlab.host_if, "mtu", "9000"], check=True)
        subprocess.run(["ip", "-n", netlab.netns, "link", "set", netlab.ns_if, "mtu", "9000"], check=True)
        cases = [(name, frame + bytes(NONLINEAR_TRAILER), limit) for name, frame, limit in cases]
    # The snap length's cut from the first frame on: these frames are not sessions.
    with LiveCapture([netlab.host_if], PORTS, SNAPLEN, use_xdp=hook == "xdp", taillen=TAILLEN,
                     handshake_snaplen=0) as cap:
        before = cap.counters()
        inject(netlab, "host" if hook.startswith("tc-egress") else "ns", [f for _, f, _ in cases],
               nonlinear=hook == "tc-egress-nonlinear")
        segs = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            segs += cap.poll(100)
        after = cap.counters()
    got = {s.seq: (s.ip_version, s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags, s.wire_len, s.payload,
                   s.tail) for s in segs}
    assert len(got) == len(segs), "a frame was reported twice"
    problems = []
    for name, frame, kernel_limit in cases:
        want = expected(frame)
        have = [v for v in got.values() if want is not None and v[5] == want[5]]
        if kernel_limit:
            assert want is not None, f"{name}: replay should decode it"
            if hook == "tc-ingress" and name == "three tags":
                continue  # the stack moves the outer tag into metadata before TC: two remain
            if have:
                problems.append(f"{name}: the kernel reported a frame beyond its documented limits")
            continue
        if want is None:
            continue
        if not have:
            problems.append(f"{name}: not reported, replay gives {want}")
        elif have[0] != want:
            problems.append(f"{name}: kernel {have[0]} != replay {want}")
    reported = {v[5] for v in got.values()}
    wanted = {w[5] for _, f, lim in cases if not lim and (w := expected(f)) is not None}
    extra = reported - wanted
    if hook == "tc-ingress":
        extra.discard(9000)
    assert not extra, f"reported but replay skips: seqs {sorted(extra)}"
    assert not problems, "\n".join(problems)
    # Fragments (three of them: v4 first, v4 later, v6) and the five-extension-header frame.
    assert after["unparsed"] - before["unparsed"] >= 4
    assert after["seen"] - before["seen"] >= len(cases)
