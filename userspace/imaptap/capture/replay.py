"""Replay a pcap or pcapng file as the `Segment`s a live capture would have produced.

    reader = open_capture("capture.pcapng")      # CaptureFileError if it is not a capture
    stats = ReplayStats()
    for seg in reader.segments({143}, PayloadPolicy(), stats):
        ...                                      # CaptureFileError after the last good one

Files are read from the start to the end and never seek, so a pipe reads as a file does
(``open_capture("-")`` is standard input: ``tcpdump -w - | imaptap -r -``).  On a pipe the
reader waits for data with select() and, with ``ticks``, yields a tick every `PIPE_WAIT`
seconds meanwhile, so a stop is seen while the writer is quiet.

dpkt parses the pcapng section and interface blocks (byte order, timestamp resolution and
offset); it is imported only for pcapng, as importing it was a third of imaptap's start-up.
The classic pcap file header and all records are framed here with precompiled structs because
dpkt's readers cannot say where a file was cut and cost more per record than the rest of the
replay:

- ``dpkt.pcap.Reader`` returns a short last record as if it were whole, and builds a
  ``dpkt.Packet`` per record header: it reads 250-300k records/s where this module replays
  400k records/s, decoding included (on other ports; see the measurement in the commit);
- ``dpkt.pcapng.Reader`` applies the first interface's link type and timestamp resolution to
  every packet, skips Simple Packet Blocks, silently drops a block cut in its header, and reads
  the rest of the file as one block when a length field is corrupt.

Headers below the link layer are decoded in `imaptap.capture.decode`, the reference.  For
classic pcap, the optional C module `_pcapfast` (setup.py builds it where it can) takes the
usual Ethernet/IPv4/TCP frame in the record loop and hands every other record back; the two
give the same segments (tested on every capture).
"""

from __future__ import annotations

import os
import select
import stat
import struct
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from imaptap.capture.decode import LINK_TYPES, LinkDecoder, LinkType, Ports, Skip
from imaptap.flowshare import FlowShare
from imaptap.segment import WHOLE_PAYLOAD_CAP, PayloadMode, PayloadPolicy, Segment, flow_key

try:
    import imaptap.capture._pcapfast as _pcapfast
except ImportError:  # built without a C compiler: the Python loop does the same, slower
    _pcapfast = None

#: The largest record accepted, as libpcap's MAXIMUM_SNAPLEN: a larger captured length means a
#: corrupt record header, and reading it would swallow the rest of the file.
MAX_RECORD_LEN = 262144

#: The largest pcapng block accepted (Wireshark's limit): packet blocks stay far below it, and
#: a corrupt length field must not make one read swallow the whole file.
MAX_BLOCK_LEN = 16 * 1024 * 1024

#: Read-ahead of the file: records are small, and one system call per record would dominate.
READ_BUFFER = 1 << 20
#: Records between two ticks of the generic (pcapng) loop: see `CaptureReader.segments`.
TICK_RECORDS = 4096
#: Seconds a read from a pipe waits for data before the reader yields a tick (with ``ticks``):
#: a stop is seen within this while the writer of the pipe is quiet.
PIPE_WAIT = 0.1
#: ``-r -``: standard input, and how messages name it.
STDIN = "-"
STDIN_NAME = "standard input"

ETHERNET_LINKTYPE = 1

PCAP_MAGICS = {
    # magic as read big-endian -> (byte order, nanosecond timestamps, record header length)
    0xA1B2C3D4: (">", False, 16),
    0xA1B23C4D: (">", True, 16),
    0xA1B2CD34: (">", False, 24),  # modified pcap (Alexey Kuznetsov's patches): 8 more bytes
    0xD4C3B2A1: ("<", False, 16),
    0x4D3CB2A1: ("<", True, 16),
    0x34CDB2A1: ("<", False, 24),
}
PCAP_FILE_HEADER = "IHHiIII"
"""Magic, version major and minor, time zone, sigfigs, snap length, link type."""
PCAP_FILE_HEADER_LEN = 24
PCAPNG_SHB_MAGIC = b"\x0a\x0d\x0d\x0a"
PCAPNG_BOM_LE = b"\x4d\x3c\x2b\x1a"
PCAPNG_BOM_BE = b"\x1a\x2b\x3c\x4d"
GZIP_MAGIC = b"\x1f\x8b"

#: The pcap link type is the low 16 bits; the high ones may carry FCS information.
PCAP_LINKTYPE_MASK = 0xFFFF

PCAP_RECORD = "IIII"
"""Seconds, micro- or nanoseconds, captured length, original length (modified pcap adds 8 bytes)."""

PCAPNG_BLOCK = "II"
"""Block type, block total length; the total length is repeated in the block's last 4 bytes."""
PCAPNG_EPB = "IIIII"
"""Enhanced Packet Block after type and length: interface, timestamp high, low, captured, original."""
PCAPNG_EPB_LEN = 32
"""Fixed part of an EPB (and of a PB), both length fields included."""
PCAPNG_EPB_DATA = 28
"""Offset of the packet data in an EPB or PB."""
PCAPNG_PB = "HHIIII"
"""Obsolete Packet Block: interface, drops, timestamp high, low, captured, original."""
PCAPNG_SPB = "I"
"""Simple Packet Block: original length; interface 0, captured = what the block holds."""
PCAPNG_SPB_LEN = 16
PCAPNG_SPB_DATA = 12
PCAPNG_MIN_BLOCK_LEN = 12

BT_SHB = 0x0A0D0D0A
BT_IDB = 1
BT_EPB = 6
BT_PB = 2
BT_SPB = 3
PCAPNG_VERSION_MAJOR = 1
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14
PACKET_BLOCKS = frozenset({BT_EPB, BT_PB, BT_SPB})


class CaptureFileError(Exception):
    """The file is not a capture this reader understands, or is cut or corrupt; one line."""


@dataclass(slots=True)
class ReplayStats:
    """What a replay read and why records gave no segment; updated as it goes."""

    packets: int = 0
    """Packet records read."""
    bytes: int = 0
    """Captured bytes in those records (not the original frame lengths)."""
    ip_fragments_skipped: int = 0
    """Fragments of fragmented IP packets carrying TCP: nothing here reassembles them."""
    non_tcp: int = 0
    """Not IP, or IP not carrying TCP."""
    other_ports: int = 0
    """TCP on ports not monitored."""
    undecodable: int = 0
    """Headers cut short by the snap length or contradicting themselves."""
    unsupported_link: int = 0
    """pcapng only: packets of an interface whose link type cannot be decoded."""
    link_type: str = ""
    """Link type name(s), comma-separated when pcapng interfaces differ."""
    pure_acks: int = 0
    """Segments without payload, SYN, FIN or RST: skipped, as the kernel program skips them."""
    segments: int = 0
    """Segments yielded."""
    position: int = 0
    """File offset read up to (a progress bar divides it by the file size)."""


# tuple.__new__ builds a Segment without the NamedTuple's Python-level __new__.
new_segment = tuple.__new__



def _count_skip(stats: ReplayStats, reason: Skip) -> None:
    """Count a record that gave no segment for one of the rarer reasons."""
    if reason is Skip.NOT_TCP:
        stats.non_tcp += 1
    elif reason is Skip.FRAGMENT:
        stats.ip_fragments_skipped += 1
    elif reason is Skip.OTHER_PORT:
        stats.other_ports += 1
    elif reason is Skip.EMPTY:
        stats.pure_acks += 1
    else:
        stats.undecodable += 1


def open_capture(path: str | os.PathLike[str], fd: int | None = None) -> CaptureReader:
    """Open a pcap or pcapng file (``-``: standard input; ``fd``: that descriptor, named
    ``path``); CaptureFileError if it cannot be replayed at all."""
    name = os.fspath(path)
    try:
        if fd is not None:
            f: BinaryIO = open(fd, "rb", buffering=0, closefd=True)
        elif name == STDIN:
            name = STDIN_NAME
            f = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
        else:
            f = open(name, "rb", buffering=0)
    except OSError as exc:
        raise CaptureFileError(f"{name}: {exc.strerror or exc}") from None
    try:
        head = _read_exact(f, 4)
        if not head:
            raise CaptureFileError(f"{name}: empty file")
        if head == PCAPNG_SHB_MAGIC:
            reader: CaptureReader = _PcapngReader(name, f, head)
        elif len(head) == 4 and struct.unpack(">I", head)[0] in PCAP_MAGICS:
            reader = _PcapReader(name, f, head)
        elif head.startswith(GZIP_MAGIC):
            raise CaptureFileError(f"{name}: gzip-compressed; decompress it first")
        else:
            raise CaptureFileError(f"{name}: not a pcap or pcapng file")
    except CaptureFileError:
        f.close()
        raise
    except OSError as exc:  # e.g. a directory: open() succeeds, read() fails
        f.close()
        raise CaptureFileError(f"{name}: {exc.strerror or exc}") from None
    return reader


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the input (a pipe hands over what it has)."""
    data = f.read(n) or b""
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


class CaptureReader:
    """An open capture file; `segments` replays it."""

    def __init__(self, name: str, f: BinaryIO) -> None:
        self.name = name
        """The path as given, for messages."""
        self._file = f
        self._fd = f.fileno()
        mode = os.fstat(self._fd).st_mode
        self.seekable = stat.S_ISREG(mode)
        """A regular file (its size is known); otherwise a pipe or socket, read as it comes."""
        self.size: int | None = os.fstat(self._fd).st_size if self.seekable else None
        self._replayed = False

    def _fill(self, ticks: bool) -> Generator[None, None, bytes]:
        """The next chunk of the input (b"" at its end); on a pipe, while none has come, a tick
        every PIPE_WAIT seconds (with ``ticks``)."""
        if not self.seekable:
            while not select.select([self._fd], [], [], PIPE_WAIT if ticks else None)[0]:
                yield None
        return self._file.read(READ_BUFFER) or b""

    def segments(self, ports: Ports, policy: PayloadPolicy, stats: ReplayStats, ticks: bool = False,
                 share: FlowShare | None = None) -> Generator[Segment | float | None, None, None]:
        """Every TCP segment with ``sport`` or ``dport`` in ``ports`` (None: all), payload cut by ``policy``.

        Pure ACKs (no payload, no SYN, FIN or RST) are counted, not yielded, as in the kernel.
        If the file turns out cut short or corrupt, everything before the bad record is yielded
        first, then CaptureFileError is raised.  ``ticks``: also yield None after every
        READ_BUFFER bytes of records (classic pcap) or TICK_RECORDS records (pcapng), and while
        a pipe keeps the reader waiting, so a caller can answer a signal in a long stretch of
        traffic that yields no segment.  The input is read once, forward: open it again to
        replay it again.  ``share`` (a worker of ``--workers``): only the segments of its flows;
        of another worker's segment, its time (a float) where it reaches ``share.wake``, else
        nothing but a count (flowshare.py).
        """
        if self._replayed:
            raise RuntimeError(f"{self.name} was replayed already: open it again")
        self._replayed = True
        try:
            yield from self._segments(ports, policy, stats, ticks, share)
        except OSError as exc:  # a disk or network file system failing mid-way
            raise self._error(f"read error: {exc.strerror or exc}") from None

    def _segments(self, ports: Ports, policy: PayloadPolicy, stats: ReplayStats, ticks: bool = False,
                  share: FlowShare | None = None) -> Generator[Segment | float | None, None, None]:
        other_port, empty = Skip.OTHER_PORT, Skip.EMPTY
        cut = policy.cut
        countdown = TICK_RECORDS
        for record in self._records(stats, ticks):
            if record is None:
                yield None
                continue
            ts, decode, data = record
            countdown -= 1
            if not countdown:
                countdown = TICK_RECORDS
                if ticks:
                    yield None
            stats.packets += 1
            stats.bytes += len(data)
            p = decode(data, ports)
            if type(p) is Skip:
                if p is other_port:
                    stats.other_ports += 1
                elif p is empty:
                    stats.pure_acks += 1
                else:
                    _count_skip(stats, p)
                continue
            version, src, dst, sport, dport, seq, ack, flags, wire_len, payload = p
            stats.segments += 1
            if share is not None and not share.owns(src, sport, dst, dport):
                share.skip()
                if ts >= share.wake:
                    yield ts
                continue
            payload, tail = cut(flow_key(src, sport, dst, dport), payload, wire_len)
            yield new_segment(Segment,
                              (ts, version, src, dst, sport, dport, seq, ack, flags, wire_len, payload, 0, tail))

    def _records(self, stats: ReplayStats, ticks: bool) -> Iterator[tuple[float, LinkDecoder, bytes] | None]:
        """(time, the decoder for the record's link type, captured bytes) per packet record, and
        None where a pipe kept the reader waiting (with ``ticks``)."""
        raise NotImplementedError

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, problem: str) -> CaptureFileError:
        return CaptureFileError(f"{self.name}: {problem}")


class _PcapReader(CaptureReader):
    """Classic libpcap files: either byte order, micro- or nanosecond, and the modified variant."""

    def __init__(self, name: str, f: BinaryIO, head: bytes) -> None:
        super().__init__(name, f)
        buf = head + _read_exact(f, PCAP_FILE_HEADER_LEN - len(head))
        if len(buf) < PCAP_FILE_HEADER_LEN:
            raise self._error(f"truncated file header ({len(buf)} of {PCAP_FILE_HEADER_LEN} bytes)")
        magic = struct.unpack_from(">I", buf)[0]
        order, nano, record_len = PCAP_MAGICS[magic]
        _magic, _major, _minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from(order + PCAP_FILE_HEADER, buf)
        self.linktype = linktype & PCAP_LINKTYPE_MASK
        self.snaplen = snaplen
        link = LINK_TYPES.get(self.linktype)
        if link is None:
            raise self._error(f"unsupported link type {self.linktype}")
        self.link = link
        self._record_len = record_len
        self._record = struct.Struct(order + PCAP_RECORD)
        self._big_endian = order == ">"
        self._divisor = 1e9 if nano else 1e6
        self._data_start = len(buf)

    def _segments(self, ports: Ports, policy: PayloadPolicy, stats: ReplayStats, ticks: bool = False,
                  share: FlowShare | None = None) -> Generator[Segment | float | None, None, None]:
        """The generic loop over `_records`, fused into one for classic pcap: one link type and
        fixed record headers, read in large chunks.  This loop runs once per packet of a
        capture, and the two generators and the reads per record were a third of a replay.

        For Ethernet the C accelerator, where it was built, takes the usual frame (untagged
        IPv4 without options, TCP) in place, without copying the record, and hands every other
        record back to this loop, which decodes it with `imaptap.capture.decode`, the reference
        the accelerator is tested against."""
        stats.link_type = self.link.name
        empty, other_port = Skip.EMPTY, Skip.OTHER_PORT
        cut = policy.cut
        modes = policy.modes  # PayloadPolicy changes it in place: looked up per segment below
        snaplen, taillen = policy.snaplen, policy.taillen
        decode = self.link.decode
        fast = self.linktype == ETHERNET_LINKTYPE and snaplen >= 0
        # The C accelerator takes the usual records and hands every other one to this loop
        # (see _pcapfast.c).
        scan = _pcapfast.scan if fast and _pcapfast is not None else None
        counts = None
        if scan is not None:
            _pcapfast.keep_buffers()
            SEGMENT, NEED_MORE, CLOCK = _pcapfast.SEGMENT, _pcapfast.NEED_MORE, _pcapfast.CLOCK
            counts = bytearray(_COUNTS.size)  # what scan() consumed, for _take_counts
            config = (self._record_len, self._big_endian, self._divisor, _port_bitmap(ports), modes, snaplen,
                      taillen, Segment, MAX_RECORD_LEN, counts, int(PayloadMode.NONE), int(PayloadMode.WHOLE),
                      WHOLE_PAYLOAD_CAP, int(PayloadMode.PREFIX), int(PayloadMode.HANDSHAKE),
                      policy.handshake_snaplen, int(policy.default), None if share is None else share.config())
        unpack = self._record.unpack_from
        record_len = self._record_len
        divisor = self._divisor
        fill = self._fill
        buf = b""
        off = 0
        base = self._data_start  # file offset of buf[0]
        try:
            while True:
                more = yield from fill(ticks)
                if off:
                    base += off
                    buf = buf[off:] + more
                    off = 0
                else:
                    buf += more
                end_of_file = not more
                n = len(buf)
                while off + record_len <= n:
                    if scan is not None:
                        code, off, seg = scan(buf, off, config)
                        if code == SEGMENT:
                            yield seg
                            continue
                        if code == NEED_MORE:
                            break
                        if code == CLOCK:  # the time of another worker's segment, from share.wake on
                            yield seg
                            continue
                        # else the record at off is this loop's
                    sec, frac, caplen, _wire = unpack(buf, off)
                    if caplen > MAX_RECORD_LEN:
                        raise self._error(f"corrupt packet record at byte {base + off} (captured length {caplen})")
                    start = off + record_len
                    stop = start + caplen
                    if stop > n:
                        break
                    off = stop
                    stats.packets += 1
                    stats.bytes += caplen
                    p = decode(buf[start:stop], ports)
                    if type(p) is Skip:
                        if p is empty:
                            stats.pure_acks += 1
                        elif p is other_port:
                            stats.other_ports += 1
                        else:
                            _count_skip(stats, p)
                        continue
                    # the same steps as CaptureReader._segments
                    version, src, dst, sport, dport, seq, ack, flags, wire_len, payload = p
                    stats.segments += 1
                    if share is not None and not share.owns(src, sport, dst, dport):
                        share.skip()
                        ts = sec + frac / divisor
                        if ts >= share.wake:
                            yield ts
                        continue
                    head, tail = cut(flow_key(src, sport, dst, dport), payload, wire_len)
                    yield new_segment(Segment, (sec + frac / divisor, version, src, dst, sport, dport, seq, ack, flags,
                                                wire_len, head, 0, tail))
                stats.position = base + off
                if counts is not None:
                    _take_counts(stats, counts)
                if ticks:
                    yield None
                if end_of_file:
                    if off < n:
                        what = "record header" if n - off < record_len else "record"
                        raise self._error(f"truncated packet {what} at byte {base + off}")
                    return
        finally:
            if counts is not None:
                _take_counts(stats, counts)


_COUNTS = struct.Struct("=5q")
"""The C loop's counts: packets, bytes, pure ACKs, other ports, segments (_pcapfast.c)."""


def _take_counts(stats: ReplayStats, counts: bytearray) -> None:
    """Add what the C loop counted to the stats, and start its counts again."""
    packets, nbytes, pure_acks, other_ports, segments = _COUNTS.unpack(counts)
    if packets or segments:
        stats.packets += packets
        stats.bytes += nbytes
        stats.pure_acks += pure_acks
        stats.other_ports += other_ports
        stats.segments += segments
        counts[:] = bytes(_COUNTS.size)


def _port_bitmap(ports: Ports) -> bytes | None:
    """The ports as a 65,536-bit map for the C accelerator; None keeps every port."""
    if ports is None:
        return None
    bits = bytearray(8192)
    for port in ports:
        if 0 <= port <= 0xFFFF:
            bits[port >> 3] |= 1 << (port & 7)
    return bytes(bits)


@dataclass(slots=True)
class _Interface:
    """What a pcapng Interface Description Block says about its packets."""

    linktype: int
    link: LinkType | None
    """None when the link type cannot be decoded."""
    divisor: float
    """Timestamp units per second (if_tsresol)."""
    offset: int
    """Seconds added to every timestamp (if_tsoffset)."""


class _PcapngReader(CaptureReader):
    """pcapng: several sections and interfaces, each with its own link type and time resolution."""

    def __init__(self, name: str, f: BinaryIO, head: bytes) -> None:
        super().__init__(name, f)
        self._order = "<"
        self._interfaces: list[_Interface] = []
        self._buf = head
        self._off = 0
        self._pos = 0
        """File offset of ``_buf[_off]``."""
        # Say now what a user wants to hear before any output: the section header is sound,
        # and some interface declared before the first packet can be decoded.  The walk is the
        # replay's own start (nothing is read twice): it stops at the first packet block, which
        # the replay takes first, or where a pipe has nothing more to give yet.
        self._walk = self._blocks(ticks=True)
        self._held: tuple[int, int, bytes] | None = None
        for item in self._walk:
            if item is None:
                break
            if item[0] in PACKET_BLOCKS:
                self._held = item
                break
        if self._interfaces and not any(i.link for i in self._interfaces):
            linktypes = sorted({i.linktype for i in self._interfaces})
            raise self._error(f"unsupported link type {', '.join(map(str, linktypes))}")

    def _link_names(self) -> str:
        names = dict.fromkeys(i.link.name for i in self._interfaces if i.link is not None)
        return ",".join(names)

    def _need(self, n: int, ticks: bool) -> Generator[None, None, bool]:
        """Make ``n`` bytes ready in the buffer; False when the input ends before."""
        while len(self._buf) - self._off < n:
            more = yield from self._fill(ticks)
            if not more:
                return False
            self._buf = self._buf[self._off :] + more
            self._off = 0
        return True

    def _take(self, n: int) -> bytes:
        data = self._buf[self._off : self._off + n]
        self._off += n
        self._pos += n
        return data

    def _blocks(self, ticks: bool) -> Generator[tuple[int, int, bytes] | None, None, None]:
        """(type, file offset, whole block) per block, from where the reading stands, and None
        while a pipe keeps it waiting; section and interface blocks are taken in on the way."""
        while True:
            pos = self._pos
            if not (yield from self._need(8, ticks)):
                if len(self._buf) == self._off:
                    return
                raise self._error(f"truncated block header at byte {pos}")
            head = self._buf[self._off : self._off + 8]
            head_len = 8
            if head[:4] == PCAPNG_SHB_MAGIC:
                # The section's byte order follows its length field; the type reads the same
                # either way.
                if not (yield from self._need(12, ticks)):
                    raise self._error(f"truncated section header block at byte {pos}")
                bom = self._buf[self._off + 8 : self._off + 12]
                if bom == PCAPNG_BOM_LE:
                    self._order = "<"
                elif bom == PCAPNG_BOM_BE:
                    self._order = ">"
                else:
                    raise self._error(f"corrupt section header block at byte {pos} (byte-order magic {bom.hex()})")
                head_len = 12
            btype, blen = struct.unpack_from(self._order + PCAPNG_BLOCK, head)
            if blen < PCAPNG_MIN_BLOCK_LEN or blen % 4 or blen > MAX_BLOCK_LEN:
                raise self._error(f"corrupt block at byte {pos} (length {blen})")
            if not (yield from self._need(blen, ticks)):
                if len(self._buf) - self._off < head_len:
                    raise self._error(f"truncated block header at byte {pos}")
                raise self._error(f"truncated block at byte {pos}")
            block = self._take(blen)
            if block[-4:] != block[4:8]:
                raise self._error(f"corrupt block at byte {pos} (its two length fields differ)")
            if btype == BT_SHB:
                self._section(block, pos)
            elif btype == BT_IDB:
                self._interface(block, pos)
            yield btype, pos, block

    def _section(self, block: bytes, pos: int) -> None:
        import dpkt.pcapng

        kind = dpkt.pcapng.SectionHeaderBlockLE if self._order == "<" else dpkt.pcapng.SectionHeaderBlock
        try:
            shb = kind(block)
        except (dpkt.Error, struct.error, ValueError) as exc:
            raise self._error(f"corrupt section header block at byte {pos} ({exc})") from None
        if shb.v_major != PCAPNG_VERSION_MAJOR:
            raise self._error(f"unsupported pcapng version {shb.v_major}.{shb.v_minor}")
        self._interfaces = []  # interface numbers restart in every section

    def _interface(self, block: bytes, pos: int) -> None:
        import dpkt.pcapng

        kind = dpkt.pcapng.InterfaceDescriptionBlockLE if self._order == "<" else dpkt.pcapng.InterfaceDescriptionBlock
        try:
            idb = kind(block)
        except (dpkt.Error, struct.error, ValueError) as exc:
            raise self._error(f"corrupt interface description block at byte {pos} ({exc})") from None
        divisor, offset = 1e6, 0
        for opt in idb.opts:
            if opt.code == OPT_IF_TSRESOL and len(opt.data) >= 1:
                # High bit clear: a negative power of 10; set: a negative power of 2.
                resol = opt.data[0]
                divisor = float(2 ** (resol & 0x7F) if resol & 0x80 else 10 ** (resol & 0x7F))
            elif opt.code == OPT_IF_TSOFFSET and len(opt.data) >= 8:
                offset = struct.unpack_from(self._order + "q", opt.data)[0]
        self._interfaces.append(_Interface(idb.linktype, LINK_TYPES.get(idb.linktype), divisor, offset))

    def _records(self, stats: ReplayStats, ticks: bool) -> Iterator[tuple[float, LinkDecoder, bytes] | None]:
        stats.link_type = self._link_names()
        ts = 0.0
        order = ""
        for item in self._pending_then_rest():
            if item is None:
                if ticks:
                    yield None
                continue
            btype, pos, block = item
            stats.position = pos + len(block)
            if btype not in PACKET_BLOCKS:
                if btype == BT_IDB:
                    stats.link_type = self._link_names()
                continue
            if order != self._order:
                order = self._order
                epb = struct.Struct(order + PCAPNG_EPB).unpack_from
                pb = struct.Struct(order + PCAPNG_PB).unpack_from
                spb = struct.Struct(order + PCAPNG_SPB).unpack_from
            blen = len(block)
            if btype == BT_EPB:
                if blen < PCAPNG_EPB_LEN:
                    raise self._error(f"corrupt enhanced packet block at byte {pos}")
                iface_id, ts_high, ts_low, caplen, _wire = epb(block, 8)
                if caplen > blen - PCAPNG_EPB_LEN:
                    raise self._error(f"corrupt enhanced packet block at byte {pos} (captured length {caplen})")
                data = block[PCAPNG_EPB_DATA : PCAPNG_EPB_DATA + caplen]
            elif btype == BT_SPB:
                if blen < PCAPNG_SPB_LEN:
                    raise self._error(f"corrupt simple packet block at byte {pos}")
                (wire,) = spb(block, 8)
                iface_id, ts_high, ts_low = 0, -1, 0  # no timestamp: the last one stands
                data = block[PCAPNG_SPB_DATA : PCAPNG_SPB_DATA + min(wire, blen - PCAPNG_SPB_LEN)]
            else:
                if blen < PCAPNG_EPB_LEN:
                    raise self._error(f"corrupt packet block at byte {pos}")
                iface_id, _drops, ts_high, ts_low, caplen, _wire = pb(block, 8)
                if caplen > blen - PCAPNG_EPB_LEN:
                    raise self._error(f"corrupt packet block at byte {pos} (captured length {caplen})")
                data = block[PCAPNG_EPB_DATA : PCAPNG_EPB_DATA + caplen]
            if iface_id >= len(self._interfaces):
                raise self._error(f"packet block at byte {pos} names interface {iface_id}, never described")
            iface = self._interfaces[iface_id]
            if ts_high >= 0:
                ts = iface.offset + ((ts_high << 32) | ts_low) / iface.divisor
            if iface.link is None:
                stats.packets += 1
                stats.bytes += len(data)
                stats.unsupported_link += 1
                continue
            yield ts, iface.link.decode, data

    def _pending_then_rest(self) -> Iterator[tuple[int, int, bytes] | None]:
        """The block the opening walk stopped at, then the rest of the input."""
        if self._held is not None:
            held, self._held = self._held, None
            yield held
        yield from self._walk
