"""One direction of an IMAP connection: bytes in, logical lines out.

The stream joins lines split across segments, counts literal bytes instead of parsing them
(so a mail body that contains ``a1 LOGIN mallory x`` is data, never a command), and skips
bytes it never received: the capture copies only a prefix of each segment, and the flow
tracker reports the rest, and any hole in the sequence space, through `gap`.  A gap inside a
literal just shortens the literal; a gap anywhere else loses the current line and the stream
resynchronises at the next line boundary.

The session switches the stream to encrypted (after STARTTLS) or compressed (after COMPRESS
DEFLATE) from inside its line callback; the switch takes effect at the very next byte.
"""

from __future__ import annotations

import enum
import re
import zlib
from collections.abc import Callable
from typing import Any, Final

from imaptap.imap.anomalies import StreamAnomaly
from imaptap.imap.parse import KNOWN_COMMANDS, LITERAL_KEEP, Literal, RawLine, literal_mark

#: Bytes kept of one logical line.  RFC 7162 asks clients to keep command lines under 8192
#: octets; twice that leaves room for long server responses without unbounded buffering.
LINE_CAP: Final = 16384

#: Literals kept per logical line; a FETCH of many parts has a few, a hostile line thousands.
MAX_LITERALS_PER_LINE: Final = 256

#: Bytes inflated per step, so one compressed segment never expands into unbounded memory.
INFLATE_STEP: Final = 65536

#: A literal larger than this is reported as an anomaly (it is still skipped byte for byte).
LARGE_LITERAL: Final = 1 << 30

#: Bytes at the end of an over-long physical line kept to see whether it ends in a literal marker.
_MARK_TAIL: Final = 32

_raw_line: Final = tuple.__new__
#: A stream's line buffer while no line is split across segments: shared, and never written.
_NO_BYTES: Final = b""
#: The physical lines and literals of a line not begun, and the literals of a line without
#: any: one empty tuple shared by all (an empty list is 56 bytes; two a stream, four a flow).
_NONE: Final[tuple[()]] = ()

_TLS_RECORD: Final = (b"\x16\x03", b"\x15\x03", b"\x17\x03")

# Where a resynchronising stream may start again at a segment start: a line that can only be
# the beginning of a response (server) or of a command (client).  Used only after a gap
# outside any literal, where waiting for the next line feed would cost a whole line.
_TAG: Final = rb"[!#$&'\x2c-.0-9:-Z^-z|~\]\[]{1,64}"
_SERVER_LINE_START: Final = re.compile(
    rb"(?:\* (?:OK|NO|BAD|BYE|PREAUTH|CAPABILITY|LIST|LSUB|STATUS|FLAGS|SEARCH|ID|\d{1,10} [A-Z])"
    rb"|\+(?: |\r?\n)|" + _TAG + rb" (?:OK|NO|BAD)[ \r\n])",
    re.I,
)
_CLIENT_LINE_START: Final = re.compile(
    _TAG + rb" (?:" + b"|".join(c.encode() for c in sorted(KNOWN_COMMANDS)) + rb")(?: |\r?\n)|DONE\r?\n",
    re.I,
)


class Mode(enum.Enum):
    LINES = "lines"
    LITERAL = "literal"
    RESYNC = "resync"
    ENCRYPTED = "encrypted"
    UNDECODABLE = "undecodable"
    """Compressed, and a byte of the deflate stream was lost: nothing more can be read."""


# The members as module constants for the per-byte paths: reading ``Mode.LITERAL`` goes through
# the enum's metaclass and costs five times a global.
_LINES: Final = Mode.LINES
_LITERAL: Final = Mode.LITERAL
_RESYNC: Final = Mode.RESYNC
_ENCRYPTED: Final = Mode.ENCRYPTED
_UNDECODABLE: Final = Mode.UNDECODABLE


def _inflate_until_error(inflater: zlib._Decompress, data: bytes) -> bytes:
    """What ``inflater`` makes of ``data`` before the byte it cannot take (at most INFLATE_STEP
    bytes: one call with that limit stopped short of the error, or it would not have failed)."""
    out = []
    n = 0
    for i in range(len(data)):
        try:
            chunk = inflater.decompress(data[i : i + 1])
        except zlib.error:
            break
        out.append(chunk)
        n += len(chunk)
        if n >= INFLATE_STEP:
            break
    return b"".join(out)[:INFLATE_STEP]


class ImapStream:
    """Reassembles one direction's bytes into `RawLine`s delivered to ``on_line``.

    The callbacks are plain functions called with ``owner`` first (the session passes its own
    methods unbound, and itself): a bound method or closure per stream would be kept by every
    open flow.  The line buffer is made at the first line split across segments.
    """

    __slots__ = (
        "owner",
        "on_line",
        "on_anomaly",
        "on_tls",
        "mode",
        "buf",
        "tail",
        "chunks",
        "literals",
        "kept",
        "truncated",
        "lit",
        "lit_left",
        "inflater",
        "_inflating",
        "started",
        "pre",
        "bytes_seen",
        "bytes_missed",
        "bytes_encrypted",
        "bytes_inflated",
        "lines",
        "resyncs",
        "line_start",
    )

    def __init__(
        self,
        owner: Any,
        on_line: Callable[[Any, RawLine], None],
        on_anomaly: Callable[[Any, StreamAnomaly, str], None],
        on_tls: Callable[[Any], None] | None = None,
        server: bool = True,
    ) -> None:
        self.owner = owner
        """Passed first to every callback."""
        self.on_line = on_line
        self.on_anomaly = on_anomaly
        self.on_tls = on_tls
        self.mode = _LINES
        self.buf: bytearray | bytes = _NO_BYTES
        """The physical line being collected: the shared empty bytes until a line is split."""
        self.tail = b""
        self.chunks: list[bytes] | tuple[()] = _NONE
        self.literals: list[Literal] | tuple[()] = _NONE
        self.kept = 0
        self.truncated = False
        self.lit: Literal | None = None
        self.lit_left = 0
        self.inflater: zlib._Decompress | None = None
        self._inflating = False
        self.started = False
        self.pre = b""
        self.bytes_seen = 0
        """Captured bytes fed in (compressed bytes as they came off the wire)."""
        self.bytes_missed = 0
        """Bytes that went by on the wire but were not captured."""
        self.bytes_encrypted = 0
        self.bytes_inflated = 0
        self.lines = 0
        self.resyncs = 0
        """Uncaptured bytes outside literals, each of which cost a line."""
        self.line_start = _SERVER_LINE_START if server else _CLIENT_LINE_START
        """Where a resynchronising stream may start again (a shared pattern, not its bound match)."""

    # --- state switches, called by the session --------------------------------------------

    def start_encryption(self) -> None:
        """Everything after the current line is TLS: stop parsing for good."""
        self._drop_partial()
        self.mode = _ENCRYPTED

    def start_compression(self) -> None:
        """Everything after the current line is a raw DEFLATE stream (RFC 4978)."""
        if self.inflater is None and self.mode is not _ENCRYPTED:
            self.inflater = zlib.decompressobj(-15)

    def cancel_literal(self) -> None:
        """The server refused a synchronising literal: the client will not send its bytes."""
        if self.mode is _LITERAL and self.lit is not None and self.lit.sync and not self.lit.data:
            self.lit.complete = False
            self.lit_left = 0
            self.mode = _LINES
            self._emit()

    @property
    def pending_head(self) -> bytes | None:
        """First physical line of a logical line still waiting for literal bytes."""
        return self.chunks[0] if self.chunks else None

    @property
    def waiting_for_literal(self) -> bool:
        return self.mode is _LITERAL and self.lit is not None and self.lit.sync and not self.lit.data

    @property
    def compressed(self) -> bool:
        return self.inflater is not None

    # --- input -------------------------------------------------------------------------------

    def segment(self, head: bytes, wire_len: int, tail: bytes = b"") -> None:
        """One segment: its captured head and tail, ``wire_len`` bytes on the wire."""
        if self.mode is _LITERAL and self.lit_left > wire_len:
            lit = self.lit
            assert lit is not None, "a literal is being read"
            if lit.size > LITERAL_KEEP and self.inflater is None:
                # Wholly inside a literal too large to keep (the body of a mail): count it.
                captured = len(head) + len(tail)
                self.lit_left -= wire_len
                self.bytes_seen += captured
                if wire_len > captured:
                    self.bytes_missed += wire_len - captured
                    lit.complete = False
                return
        if head:
            if self.started and self.inflater is None and self.mode is not _ENCRYPTED:
                # feed() for a stream already under way, uncompressed: the usual case
                self.bytes_seen += len(head)
                self._consume(head, True)
            else:
                self.feed(head, True)
        missing = wire_len - len(head) - len(tail)
        if missing > 0:
            self.gap(missing)
        if tail:
            self.feed(tail, False)

    def feed(self, data: bytes, segment_start: bool = True) -> None:
        """Captured bytes, in order: a segment's head (a segment start) or its tail (after a gap)."""
        if not data:
            return
        self.bytes_seen += len(data)
        if self.mode is _ENCRYPTED:
            self.bytes_encrypted += len(data)
            return
        if self.inflater is not None:
            self._inflate(self.inflater, data)
            return
        if not self.started:
            if self.pre:
                data = self.pre + data
                self.pre = b""
            if len(data) < 2:
                self.pre = data  # one byte cannot tell TLS from IMAP yet
                return
            self.started = True
            if data[:2] in _TLS_RECORD:
                self.mode = _ENCRYPTED
                self.bytes_encrypted += len(data)
                if self.on_tls is not None:
                    self.on_tls(self.owner)
                return
        self._consume(data, segment_start)

    def gap(self, n: int) -> None:
        """``n`` bytes went by that were not captured."""
        if n <= 0:
            return
        self.bytes_missed += n
        if self.mode is _ENCRYPTED or self.mode is _UNDECODABLE:
            return
        if self.inflater is not None:
            # DEFLATE cannot skip: every later byte depends on the lost ones.
            self.mode = _UNDECODABLE
            self._drop_partial()
            self.on_anomaly(self.owner, StreamAnomaly.COMPRESSED_GAP,
                            f"{n} compressed bytes not captured; stream no longer decodable")
            return
        self._start()
        if self.mode is _LITERAL:
            take = n if n < self.lit_left else self.lit_left
            self.lit_left -= take
            assert self.lit is not None
            self.lit.complete = False
            n -= take
            if self.lit_left == 0:
                self.mode = _LINES
            if n == 0:
                return
        if self.mode is _RESYNC:
            return
        self.resyncs += 1
        if self.buf or self.chunks:
            self.truncated = True
            physical = bytes(self.buf)
            self.buf = _NO_BYTES
            self.tail = b""
            self._finish_physical(physical, b"", complete=False)
        if self.mode is _LINES:
            self.mode = _RESYNC

    def finish(self) -> None:
        """End of the connection: a line still being collected is delivered as truncated."""
        self._start()
        if self.mode in (_LINES, _LITERAL) and (self.buf or self.chunks):
            self.truncated = True
            if self.buf:
                chunks = self.chunks
                if isinstance(chunks, tuple):
                    chunks = self.chunks = []
                chunks.append(bytes(self.buf).rstrip(b"\r"))
                self.buf = _NO_BYTES
            self._emit()

    # --- internals ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Decide "not TLS" for a stream whose first byte was held back, and parse that byte."""
        if not self.started:
            self.started = True
            if self.pre:
                pre, self.pre = self.pre, b""
                self._consume(pre, True)

    def _inflate(self, inflater: zlib._Decompress, data: bytes) -> None:
        if self.mode is _UNDECODABLE:
            return
        self._inflating = True
        try:
            while True:
                # zlib drops what a call inflated before it met an error, so the stream would
                # depend on where the segments were cut: on an error, the same bytes are
                # inflated again from a copy, one at a time, up to the bad one.
                before = inflater.copy()
                try:
                    out = inflater.decompress(data, INFLATE_STEP)
                    error = None
                except zlib.error as exc:
                    out, error = _inflate_until_error(before, data), exc
                if out:
                    self.bytes_inflated += len(out)
                    self._consume(out, False)
                    if self.mode is _ENCRYPTED or self.mode is _UNDECODABLE:
                        return
                if error is not None:
                    self.mode = _UNDECODABLE
                    self._drop_partial()
                    self.on_anomaly(self.owner, StreamAnomaly.INFLATE_ERROR, str(error))
                    return
                data = inflater.unconsumed_tail
                if not data:
                    break
        finally:
            self._inflating = False

    def _consume(self, data: bytes, segment_start: bool) -> None:
        pos = 0
        n = len(data)
        if self.mode is _RESYNC and segment_start and self.line_start.match(data):
            self.mode = _LINES
        while pos < n:
            mode = self.mode
            if mode is _LITERAL:
                take = self.lit_left if self.lit_left < n - pos else n - pos
                lit = self.lit
                assert lit is not None, "a literal is being read"
                # Only literals that can be kept whole are kept (user names, ID values);
                # the contents of a mail body are never needed.
                room = LITERAL_KEEP - len(lit.data) if lit.size <= LITERAL_KEEP else 0
                if room > 0:
                    lit.data += data[pos : pos + (take if take < room else room)]
                self.lit_left -= take
                pos += take
                if self.lit_left == 0:
                    if len(lit.data) < lit.size:
                        lit.complete = False
                    self.mode = _LINES
                continue
            if mode is _RESYNC:
                lf = data.find(b"\n", pos)
                if lf < 0:
                    return
                pos = lf + 1
                self.mode = _LINES
                continue
            if mode is not _LINES:
                if mode is _ENCRYPTED:
                    self.bytes_encrypted += n - pos
                return
            if self.inflater is not None and not self._inflating:
                # COMPRESS became active on the line just delivered: the rest is deflate.
                self._inflate(self.inflater, data[pos:])
                return
            lf = data.find(b"\n", pos)
            if lf < 0:
                self._append(data, pos, n)
                return
            if not self.buf and not self.chunks and lf - pos <= LINE_CAP:
                # The common case: a whole line inside one segment, no literal (its end found
                # by index, so the line is sliced once).
                end = lf - 1 if lf > pos and data[lf - 1] == 0x0D else lf  # without its CR
                if end == pos or data[end - 1] != 0x7D:  # not a literal's "}"
                    line = data[pos:end]
                    pos = lf + 1
                    self.lines += 1
                    self.on_line(self.owner, _raw_line(RawLine, ([line], _NONE, False)))
                    continue
            self._append(data, pos, lf)
            pos = lf + 1
            physical = bytes(self.buf)
            tail = self.tail
            self.buf = _NO_BYTES
            self.tail = b""
            self._finish_physical(physical, tail, complete=True)

    def _append(self, data: bytes, start: int, end: int) -> None:
        buf = self.buf
        if isinstance(buf, bytes):  # the shared empty one: this line is the first split since
            buf = self.buf = bytearray()
        room = LINE_CAP - self.kept - len(buf)
        if end - start <= room:
            buf += data[start:end]
            return
        if room > 0:
            buf += data[start : start + room]
        if not self.truncated:
            self.truncated = True
            self.on_anomaly(self.owner, StreamAnomaly.LINE_TOO_LONG,
                            f"line longer than {LINE_CAP} bytes; the rest is not kept")
        self.tail = (self.tail + data[max(start, end - _MARK_TAIL) : end])[-_MARK_TAIL:]

    def _finish_physical(self, physical: bytes, tail: bytes, complete: bool) -> None:
        if physical.endswith(b"\r"):
            physical = physical[:-1]
        mark = None
        if complete:
            end = (tail[:-1] if tail.endswith(b"\r") else tail) if tail else physical
            mark = literal_mark(end)
        chunks = self.chunks
        if isinstance(chunks, tuple):
            chunks = self.chunks = []
        chunks.append(physical)
        self.kept += len(physical)
        if mark is None:
            self._emit()
            return
        size, sync, binary = mark
        if len(self.literals) >= MAX_LITERALS_PER_LINE:
            if len(self.literals) == MAX_LITERALS_PER_LINE:
                self.on_anomaly(self.owner, StreamAnomaly.TOO_MANY_LITERALS,
                                f"more than {MAX_LITERALS_PER_LINE} literals in one line")
            self.truncated = True
            lit = Literal(size, complete=False, binary=binary, sync=sync)
        else:
            lit = Literal(size, binary=binary, sync=sync)
            literals = self.literals
            if isinstance(literals, tuple):
                literals = self.literals = []
            literals.append(lit)
        if size >= LARGE_LITERAL:
            self.on_anomaly(self.owner, StreamAnomaly.LARGE_LITERAL, f"literal of {size} bytes announced")
        if size > 0:
            self.lit = lit
            self.lit_left = size
            self.mode = _LITERAL

    def _emit(self) -> None:
        line = _raw_line(RawLine, (self.chunks, self.literals, self.truncated))
        self.chunks = _NONE
        self.literals = _NONE
        self.kept = 0
        self.truncated = False
        self.lit = None
        self.lines += 1
        self.on_line(self.owner, line)

    def _drop_partial(self) -> None:
        self.buf = _NO_BYTES
        self.tail = b""
        self.chunks = _NONE
        self.literals = _NONE
        self.kept = 0
        self.truncated = False
        self.lit = None
        self.lit_left = 0
