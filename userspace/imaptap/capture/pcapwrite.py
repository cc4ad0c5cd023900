"""``-w FILE``: the segments a live capture copied, as a pcap that Wireshark and imaptap -r open.

Each Segment becomes one raw-IP record (LINKTYPE_RAW, so no link-layer addresses are made up):
an IPv4 or IPv6 header and a TCP header rebuilt from the Segment's fields, then the copied
head of the payload.  The record's original length is the packet's length on the wire, so a
reader knows how much was not copied, exactly as with ``tcpdump -s``.  A copied tail cannot be
placed in a pcap record after a hole, so it is left out.
"""

from __future__ import annotations

import socket
import struct

from imaptap.capture.decode import IPPROTO_TCP, IPV4_MIN_LEN, IPV6_LEN, TCP_MIN_LEN
from imaptap.segment import Segment

#: LINKTYPE_RAW: the record starts with the IP header.
LINKTYPE_RAW = 101
#: The snap length written into the file header: the most a record here can hold.
FILE_SNAPLEN = 65535

# libpcap's classic format, little-endian, microseconds, version 2.4 (dpkt's writer cannot
# record an original length different from the captured one, which is the point here).
_FILE_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")
_PCAP_MAGIC = 0xA1B2C3D4
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
# the headers written are the smallest ones, as the reader defines them
_TCP_HEADER = TCP_MIN_LEN
_IPV4_HEADER = IPV4_MIN_LEN
_IPV6_HEADER = IPV6_LEN
_PROTO_TCP = IPPROTO_TCP
_TTL = 64
_WINDOW = 65535


def _tcp_header(seg: Segment) -> bytes:
    return _TCP.pack(seg.sport, seg.dport, seg.seq, seg.ack, (_TCP_HEADER // 4) << 4, seg.flags & 0xFF,
                     _WINDOW, 0, 0)


def frame(seg: Segment) -> tuple[bytes, int]:
    """``(record bytes, length on the wire)`` of one segment."""
    tcp = _tcp_header(seg)
    if seg.ip_version == 6:
        wire = _IPV6_HEADER + _TCP_HEADER + seg.wire_len
        ip = _IPV6.pack(6 << 28, _TCP_HEADER + seg.wire_len, _PROTO_TCP, _TTL,
                        socket.inet_pton(socket.AF_INET6, seg.src), socket.inet_pton(socket.AF_INET6, seg.dst))
    else:
        wire = _IPV4_HEADER + _TCP_HEADER + seg.wire_len
        ip = _IPV4.pack(0x45, 0, min(wire, 0xFFFF), 0, 0x4000, _TTL, _PROTO_TCP, 0,
                        socket.inet_aton(seg.src), socket.inet_aton(seg.dst))
    return ip + tcp + seg.payload, wire


class SegmentWriter:
    """Appends segments to a pcap file as they are captured."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(_FILE_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, FILE_SNAPLEN, LINKTYPE_RAW))
        self.records = 0

    def write(self, seg: Segment) -> None:
        data, wire = frame(seg)
        sec = int(seg.ts)
        usec = int(round((seg.ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        self._file.write(_RECORD_HEADER.pack(sec, usec, len(data), wire) + data)
        self.records += 1

    def close(self) -> None:
        self._file.close()
