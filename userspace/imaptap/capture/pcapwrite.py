"""``-w FILE``: the segments a live capture copied, as a pcap that Wireshark and imaptap -r open,
with every password and SASL response blanked (`MaskingWriter`).

Each Segment becomes one raw-IP record (LINKTYPE_RAW, so no link-layer addresses are made up):
an IPv4 or IPv6 header and a TCP header rebuilt from the Segment's fields, then the copied
head of the payload.  The record's original length is the packet's length on the wire, so a
reader knows how much was not copied, exactly as with ``tcpdump -s``.  A copied tail cannot be
placed in a pcap record after a hole, so it is left out.

The file can be appended to (``--append``, and after `SegmentWriter.reopen`, which logrotate's
signal asks for): a pcap imaptap wrote gets more records, a record cut short by a killed run is
cut off first, and an empty or new file gets the header.  Each file is a valid pcap on its own.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from imaptap.capture.decode import IPPROTO_TCP, IPV4_MIN_LEN, IPV6_LEN, TCP_MIN_LEN
from imaptap.output.rotation import NotAppendable
from imaptap.segment import FlowKey, Segment, flow_key

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
        # The payload length field has 16 bits, as IPv4's total length: a GSO segment of the
        # kernel's can be longer, and the record's original length keeps its true size.
        ip = _IPV6.pack(6 << 28, min(_TCP_HEADER + seg.wire_len, 0xFFFF), _PROTO_TCP, _TTL,
                        socket.inet_pton(socket.AF_INET6, seg.src), socket.inet_pton(socket.AF_INET6, seg.dst))
    else:
        wire = _IPV4_HEADER + _TCP_HEADER + seg.wire_len
        ip = _IPV4.pack(0x45, 0, min(wire, 0xFFFF), 0, 0x4000, _TTL, _PROTO_TCP, 0,
                        socket.inet_aton(seg.src), socket.inet_aton(seg.dst))
    return ip + tcp + seg.payload, wire


#: The file header every file written here starts with.
FILE_HEADER = _FILE_HEADER.pack(_PCAP_MAGIC, 2, 4, 0, 0, FILE_SNAPLEN, LINKTYPE_RAW)


def complete_end(f: BinaryIO, size: int) -> int:
    """The offset after the last whole record of the pcap ``f`` (``size`` bytes, header checked)."""
    pos = _FILE_HEADER.size
    while True:
        f.seek(pos)
        head = f.read(_RECORD_HEADER.size)
        if len(head) < _RECORD_HEADER.size:
            return pos
        incl = _RECORD_HEADER.unpack(head)[2]
        if pos + _RECORD_HEADER.size + incl > size:
            return pos
        pos += _RECORD_HEADER.size + incl


def open_for_append(path: str) -> BinaryIO:
    """``path`` open for appending records, created with a header where it is new or empty.

    NotAppendable where it holds something else than a pcap as written here; a last record cut
    short (the run that wrote it was killed) is cut off, so the records appended stay readable.
    """
    f = open(path, "a+b")
    try:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(_FILE_HEADER.size)
        if not FILE_HEADER.startswith(head) if size < _FILE_HEADER.size else head != FILE_HEADER:
            raise NotAppendable(f"cannot append to {path}: not a pcap file as imaptap writes them"
                                " (classic pcap, raw IP)")
        if size < _FILE_HEADER.size:  # new, empty, or a header cut short
            f.truncate(0)
            f.write(FILE_HEADER)
            return f
        end = complete_end(f, size)
        if end < size:
            f.truncate(end)
        f.seek(0, os.SEEK_END)
    except BaseException:
        f.close()
        raise
    return f


class SegmentWriter:
    """Appends segments to a pcap file as they are captured."""

    def __init__(self, path: str, append: bool = False) -> None:
        self.path = path
        self._file = self._open(append)  # open for the writer's lifetime; close() closes it
        self.records = 0
        """Records written, to every file this writer had open."""

    def _open(self, append: bool) -> BinaryIO:
        if append:
            return open_for_append(self.path)
        f = open(self.path, "wb")
        f.write(FILE_HEADER)
        return f

    def write(self, seg: Segment) -> None:
        data, wire = frame(seg)
        sec = int(seg.ts)
        usec = int(round((seg.ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        self._file.write(_RECORD_HEADER.pack(sec, usec, len(data), wire) + data)
        self.records += 1

    def write_records(self, data: bytes, count: int) -> None:
        """``count`` whole records, made by another writer (a live worker's `PipeSegmentWriter`)."""
        self._file.write(data)
        self.records += count

    def reopen(self) -> None:
        """Go on in a file opened anew at the same path (appending), the old one complete and
        closed: after logrotate moved it away.  OSError or NotAppendable leave the old one open."""
        new = self._open(append=True)
        old, self._file = self._file, new
        old.close()

    def close(self) -> None:
        self._file.close()


class PipeSegmentWriter(SegmentWriter):
    """A live worker's records, no file header, to a pipe: the parent writes them whole into
    the one file (`whole_records`, `SegmentWriter.write_records`) and reopens it on SIGUSR1."""

    def __init__(self, fd: int, buffering: int) -> None:
        self.path = "the worker's pcap pipe"
        self._file = os.fdopen(fd, "wb", buffering=buffering)
        self.records = 0

    def flush(self) -> None:
        """What is buffered to the parent (at each tick of the worker: a live file stays current)."""
        self._file.flush()

    def reopen(self) -> None:
        pass  # the parent's file is reopened, not this pipe


def whole_records(data: bytes | bytearray) -> tuple[int, int]:
    """The end of the whole records at the start of ``data`` (records without a file header,
    as `PipeSegmentWriter` sends them), and how many they are."""
    end = count = 0
    header = _RECORD_HEADER.size
    while end + header <= len(data):
        length = _RECORD_HEADER.unpack_from(data, end)[2]
        if end + header + length > len(data):
            break
        end += header + length
        count += 1
    return end, count


#: Client segments held per flow, and in all, before they are written unblanked-as-far-as-known
#: (a client that sends this much without an answer is not logging in).
HOLD_SEGMENTS = 64
HOLD_BYTES = 4 << 20


def blank(payloads: list[bytes], secrets: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """``payloads`` (consecutive segments of one direction) with every occurrence of a secret
    overwritten by its replacement of the same length, also where one straddles two segments.
    ``secrets``: (bytes on the wire, replacement) pairs, as `ImapSession.secrets` keeps them."""
    joined = bytearray().join(payloads)
    hit = False
    for secret, replacement in secrets:
        n = len(secret)
        i = joined.find(secret)
        while i >= 0:
            joined[i : i + n] = replacement
            hit = True
            i = joined.find(secret, i + n)
    if not hit:
        return payloads
    out, pos = [], 0
    for p in payloads:
        out.append(bytes(joined[pos : pos + len(p)]))
        pos += len(p)
    return out


class MaskingWriter:
    """A `SegmentWriter` that never writes a credential.

    The analyzer learns a password only once its line (or literal) is complete, and a line can
    span segments, so a client segment is not written at once: it is held until the server
    next speaks in that flow (a server answers a command only once it has all of it, by then
    analysed), or the flow ends, and the held segments are then written with every credential
    the flow's session knows (`ImapSession.secrets`) overwritten by ``*``.  The same holds for
    server segments while the session says the server may send a secret (SCRAM's signature):
    they wait for the client's next segment; the others are written with the secrets known so
    far blanked (a server may quote what the client sent).  ``write`` must see
    each segment before the flow table does, and ``flow_ended`` must be called from the table's
    end-of-flow callback (`imaptap.pipeline.Pipeline` does both).  Records of one flow keep
    their order; across flows a held segment can follow a later one of another flow (pcap
    readers accept that).
    """

    def __init__(self, path: str, ports: Iterable[int], append: bool = False,
                 out: SegmentWriter | None = None) -> None:
        self._out = SegmentWriter(path, append) if out is None else out
        self.name = path
        self.ports = frozenset(ports)
        self.flows: Mapping[FlowKey, Any] = {}
        """The flow table's flows (the pipeline binds them once the table exists)."""
        self._held: dict[FlowKey, list[Segment]] = {}
        self._held_from_client: dict[FlowKey, bool] = {}
        """Which side a flow's held segments come from: one side at a time, in order."""
        self._held_bytes = 0

    @property
    def records(self) -> int:
        return self._out.records

    def _secrets(self, key: FlowKey, flow: Any = None) -> list[tuple[bytes, bytes]]:
        if flow is None:
            flow = self.flows.get(key)
        return flow.session.secrets if flow is not None else []

    def write(self, seg: Segment) -> None:
        key = flow_key(seg.src, seg.sport, seg.dst, seg.dport)
        flow = self.flows.get(key)
        if flow is not None:
            from_client = seg.src == flow.client[0] and seg.sport == flow.client[1]
        else:  # not seen yet: the table will make the side not on an IMAP port the client
            from_client = seg.dport in self.ports
        if key in self._held and self._held_from_client[key] != from_client:
            self._flush(key)  # the other side speaks: what it answers has been analysed
        if from_client or flow is not None and flow.session.server_secrets_pending:
            held = self._held.setdefault(key, [])
            self._held_from_client[key] = from_client
            held.append(seg)
            self._held_bytes += len(seg.payload)
            if len(held) > HOLD_SEGMENTS:
                self._flush(key, keep_last=True)
            while self._held_bytes > HOLD_BYTES:
                oldest = next(iter(self._held))
                if oldest != key:
                    self._flush(oldest)
                elif len(self._held[key]) > 1:
                    self._flush(key, keep_last=True)
                else:
                    break
            return
        secrets = self._secrets(key, flow)
        if secrets and seg.payload:
            # what the client sent is known by now: a server that quotes it back (a web server's
            # error page does) must not carry it into the file either
            (payload,) = blank([seg.payload], secrets)
            if payload is not seg.payload:
                seg = seg._replace(payload=payload)
        self._out.write(seg)

    def reopen(self) -> None:
        """`SegmentWriter.reopen`: held segments go to the new file once they may be written."""
        self._out.reopen()

    def write_records(self, data: bytes, count: int) -> None:
        """`SegmentWriter.write_records`: a live worker's records, already masked by it."""
        self._out.write_records(data, count)

    def flow_ended(self, flow: Any) -> None:
        """The table ended ``flow``: its last client segment has been analysed too."""
        if flow.key in self._held:
            self._flush(flow.key, flow=flow)

    def _flush(self, key: FlowKey, flow: Any = None, keep_last: bool = False) -> None:
        held = self._held.pop(key)
        from_client = self._held_from_client.pop(key)
        # A bound forces this flush while the newest segment is not analysed yet: it stays.
        last = held.pop() if keep_last and held else None
        self._held_bytes -= sum(len(s.payload) for s in held)
        secrets = self._secrets(key, flow)
        payloads = blank([s.payload for s in held], secrets) if secrets else [s.payload for s in held]
        for seg, payload in zip(held, payloads, strict=True):
            self._out.write(seg if payload is seg.payload else seg._replace(payload=payload))
        if last is not None:
            self._held[key] = [last]
            self._held_from_client[key] = from_client

    def close(self) -> None:
        for key in list(self._held):
            self._flush(key)
        self._out.close()
