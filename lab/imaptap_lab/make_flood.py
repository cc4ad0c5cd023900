"""Write hostile captures for the flood and giant-input tests (issue 5):  scripts/make-flood VARIANT -o FILE

Variants:
  syn        N SYN-only flows to port 143 (a SYN scan) from addresses in 198.18.0.0/15
  sessions   N short sessions: SYN, SYN-ACK, greeting, LOGIN, OK, FIN both ways
  giant-line one session whose client sends a 50 MB line without LF (then CRLF and a LOGIN)
  literal    one session: APPEND {99999999999} refused with NO [TOOBIG], SELECT INBOX, then
             APPEND {99999999999+} followed by 20 MB of literal data
  long-tag   one session: a command with a 10,000-character tag, then a LOGIN
  nul        one session: NUL bytes in a command, then a LOGIN
  bad-utf8   one session: invalid UTF-8 in a command and in a mailbox name, then a LOGIN

Packets are Ethernet/IPv4/TCP with valid sequence numbers, built with struct (dpkt objects
per packet would take a minute for the 50 MB line); checksums are zero, as captures taken
with checksum offload show them.  Only writes a file; sends nothing.

examples:
  scripts/make-flood syn -n 100000 -o /tmp/syn.pcap
  scripts/make-flood giant-line --size 50000000 -o /tmp/giant.pcap
"""

from __future__ import annotations

import argparse
import struct
import sys
from typing import BinaryIO

IMAP_PORT = 143
SERVER = bytes([192, 0, 2, 20])
#: 198.18.0.0/15 (RFC 2544 benchmarking): 131,072 addresses, so every flow has its own.
SCAN_BASE = (198 << 24) | (18 << 16)
#: Addresses in 198.18.0.0/15: a scan or session flood has at most one flow per address.
SCAN_ADDRESSES = 1 << 17
#: Payload bytes per segment: an Ethernet MSS.
MSS = 1460
USER = b"alice"

_ETH = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class PcapWriter:
    """A classic pcap (Ethernet, microsecond stamps) written with struct, one call per packet."""

    def __init__(self, out) -> None:
        self.out = out
        self.ts = 1_700_000_000.0
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))

    def packet(self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"", step: float = 0.00001) -> None:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                          65535, 0, 0)
        n = 14 + 40 + len(payload)
        sec = int(self.ts)
        self.out.write(struct.pack("<IIII", sec, int((self.ts - sec) * 1e6), n, n))
        self.out.write(_ETH + ip + tcp)
        self.out.write(payload)
        self.ts += step


class Session:
    """One TCP connection between a client and the server, keeping both sequence numbers."""

    def __init__(self, w: PcapWriter, client: bytes, cport: int) -> None:
        self.w, self.client, self.cport = w, client, cport
        self.seq = {"c": 1000, "s": 500000}

    def _send(self, side: str, flags: int, payload: bytes = b"") -> None:
        if side == "c":
            self.w.packet(self.client, SERVER, self.cport, IMAP_PORT, self.seq["c"], self.seq["s"], flags, payload)
        else:
            self.w.packet(SERVER, self.client, IMAP_PORT, self.cport, self.seq["s"], self.seq["c"], flags, payload)
        self.seq[side] += len(payload) + (1 if flags & (_SYN | _FIN) else 0)

    def open(self) -> Session:
        self._send("c", _SYN)
        self._send("s", _SYN | _ACK)
        return self

    def say(self, side: str, data: bytes) -> Session:
        for i in range(0, len(data), MSS):
            self._send(side, _PSH | _ACK, data[i : i + MSS])
        return self

    def stream(self, side: str, total: int, fill: bytes = b"x") -> Session:
        """``total`` bytes of ``fill`` in MSS segments, without building them in memory at once."""
        block = fill * (MSS // len(fill))
        block = block[:MSS]
        left = total
        while left > 0:
            n = min(left, MSS)
            self._send(side, _PSH | _ACK, block if n == MSS else block[:n])
            left -= n
        return self

    def close(self) -> None:
        self._send("c", _FIN | _ACK)
        self._send("s", _FIN | _ACK)


def _scan_addr(i: int) -> bytes:
    return struct.pack("!I", SCAN_BASE + i % SCAN_ADDRESSES)


def _login_start(s: Session) -> Session:
    return s.open().say("s", b"* OK [CAPABILITY IMAP4rev1] flood test ready\r\n")


def _login(s: Session, tag: bytes) -> Session:
    return s.say("c", tag + b" LOGIN " + USER + b" secret\r\n").say("s", tag + b" OK logged in\r\n")


def syn(w: PcapWriter, n: int, size: int) -> None:
    for i in range(n):
        # one address per flow within /15, and the port varies too, so that nothing repeats
        w.packet(_scan_addr(i), SERVER, 1024 + i % 60000, IMAP_PORT, i * 7919, 0, _SYN)


def sessions(w: PcapWriter, n: int, size: int) -> None:
    for i in range(n):
        s = _login_start(Session(w, _scan_addr(i), 1024 + i % 60000))
        _login(s, b"a1").close()


def giant_line(w: PcapWriter, n: int, size: int) -> None:
    s = _login_start(Session(w, bytes([192, 0, 2, 10]), 40001))
    s.say("c", b"a1 NOOP ").stream("c", size, b"giant line without a line feed ")
    s.say("c", b"\r\n").say("s", b"a1 BAD line too long\r\n")
    _login(s, b"a2").say("c", b"a3 LOGOUT\r\n").say("s", b"* BYE\r\na3 OK\r\n").close()


def literal(w: PcapWriter, n: int, size: int) -> None:
    s = _login_start(Session(w, bytes([192, 0, 2, 11]), 40002))
    _login(s, b"a1")
    s.say("c", b"a2 APPEND INBOX {99999999999}\r\n").say("s", b"a2 NO [TOOBIG] literal too big\r\n")
    s.say("c", b"a3 SELECT INBOX\r\n").say("s", b"* 0 EXISTS\r\na3 OK [READ-WRITE] selected\r\n")
    s.say("c", b"a4 APPEND INBOX {99999999999+}\r\n").stream("c", size, b"literal data ")
    s.close()


def long_tag(w: PcapWriter, n: int, size: int) -> None:
    s = _login_start(Session(w, bytes([192, 0, 2, 12]), 40003))
    s.say("c", b"t" * 10_000 + b" NOOP\r\n").say("s", b"* BAD tag too long\r\n")
    _login(s, b"a2").close()


def nul(w: PcapWriter, n: int, size: int) -> None:
    s = _login_start(Session(w, bytes([192, 0, 2, 13]), 40004))
    s.say("c", b"a1 NO\x00OP\r\n").say("s", b"a1 BAD\r\n")
    s.say("c", b"\x00\x00\x00\x00 CAPABILITY\r\n").say("s", b"* BAD\r\n")
    _login(s, b"a3").close()


def bad_utf8(w: PcapWriter, n: int, size: int) -> None:
    s = _login_start(Session(w, bytes([192, 0, 2, 14]), 40005))
    s.say("c", b"a1 \xff\xfe\xc3( NOOP\r\n").say("s", b"* BAD\r\n")
    _login(s, b"a2")
    s.say("c", b"a3 SELECT \"In\xffbox\xc3\"\r\n").say("s", b"a3 NO no such mailbox\r\n").close()


VARIANTS = {"syn": syn, "sessions": sessions, "giant-line": giant_line, "literal": literal,
            "long-tag": long_tag, "nul": nul, "bad-utf8": bad_utf8}
#: Default --size per variant: the figures named in issue 5.
SIZES = {"giant-line": 50_000_000, "literal": 20_000_000}
#: Flows of syn and sessions unless told (issue 5).
DEFAULT_FLOWS = 100_000
#: Write buffer: the 50 MB line goes out in MSS-sized writes.
WRITE_BUFFER = 1 << 20


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/make-flood."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("-n", "--flows", type=int, default=DEFAULT_FLOWS,
                   help=f"flows for syn and sessions (default {DEFAULT_FLOWS})")
    p.add_argument("--size", type=int, help="bytes of the giant line or of the literal data (default 50 MB / 20 MB)")
    return p


def write_flood(variant: str, out: BinaryIO, flows: int, size: int | None = None) -> None:
    """Write flood ``variant`` as a pcap to ``out``; ``size`` defaults to SIZES."""
    VARIANTS[variant](PcapWriter(out), flows, size or SIZES.get(variant, 0))


def main(argv: list[str] | None = None) -> int:
    """scripts/make-flood: write one hostile capture."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.flows > SCAN_ADDRESSES:
        p.error(f"at most {SCAN_ADDRESSES} flows: one address of 198.18.0.0/15 each")
    with open(args.output, "wb", buffering=WRITE_BUFFER) as out:
        write_flood(args.variant, out, args.flows, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
