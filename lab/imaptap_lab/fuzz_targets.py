"""Fuzz targets: plain functions taking bytes, run by scripts/fuzz (atheris) and tests/fuzz.

``imap_stream`` drives one `ImapSession` with an input read as a list of operations, so the
fuzzer controls direction, segment boundaries, gaps and head/tail cuts.  ``capture_file`` hands
the input to the capture-file reader and the flow table as a file.  Both raise only for a bug:
an unexpected exception or a bound broken.
"""

from __future__ import annotations

import os
import tempfile

from imaptap.capture.replay import CaptureFileError, ReplayStats, open_capture
from imaptap.flows import FlowTable
from imaptap.imap.parse import LITERAL_KEEP
from imaptap.imap.session import (
    DISPLAY_CAP,
    MAILBOX_BUDGET,
    MAX_COMMAND_NAMES,
    MAX_HELD_MESSAGES,
    MAX_MAILBOX_NAME,
    MAX_PENDING,
    MAX_TAG,
    MAX_USERNAME,
    ImapSession,
)
from imaptap.imap.stream import LINE_CAP, MAX_LITERALS_PER_LINE
from imaptap.segment import IMAP_PORT, PayloadPolicy

# --- the operation encoding of imap_stream ---------------------------------------------------
#
# Each operation starts with one byte ``h``: bit 7 is the direction (set: server), bits 5-6 the
# operation.  Operations 0-2 feed ``((h & 0x1f) << 8) | next byte`` bytes (at most 8191, so a
# few chunks exceed LINE_CAP); operation 3 reads a selector byte: even -> gap(n) with n a 3-byte
# big-endian count (literal bodies and long holes), odd -> segment(head, wire_len, tail) with
# one length byte for head and tail each and a 2-byte count of bytes missing between them.

SERVER_BIT = 0x80
OP_SPECIAL = 3
MAX_FEED = 0x1FFF


def encode_feed(server: bool, data: bytes) -> bytes:
    """Operations feeding ``data`` from one side, split at MAX_FEED (used to convert seeds)."""
    out = bytearray()
    for i in range(0, len(data), MAX_FEED):
        chunk = data[i : i + MAX_FEED]
        out.append((SERVER_BIT if server else 0) | (len(chunk) >> 8))
        out.append(len(chunk) & 0xFF)
        out += chunk
    return bytes(out)


def _check_stream(stream) -> None:
    # The partial line is cut at LINE_CAP; kept bytes of earlier physical lines count against it.
    assert len(stream.buf) <= LINE_CAP, len(stream.buf)
    assert stream.kept + len(stream.buf) <= LINE_CAP + 2, (stream.kept, len(stream.buf))
    assert len(stream.literals) <= MAX_LITERALS_PER_LINE
    assert len(stream.tail) <= 32
    assert len(stream.pre) < 2
    if stream.lit is not None:
        assert len(stream.lit.data) <= LITERAL_KEEP
    assert stream.lit_left >= 0


def _check_session(session) -> None:
    _check_stream(session.client)
    _check_stream(session.server)
    assert len(session._pending) <= MAX_PENDING
    assert len(session._held) <= MAX_HELD_MESSAGES
    assert sum(len(m) for m in session.mailboxes) <= MAILBOX_BUDGET
    assert all(len(m) <= MAX_MAILBOX_NAME + 1 for m in session.mailboxes)
    assert all(len(t) <= MAX_TAG for t in session._pending)
    assert len(session.commands) <= MAX_COMMAND_NAMES + 1
    assert session.username is None or len(session.username) <= MAX_USERNAME


def _check_message(msg) -> None:
    # Shown text is cut at DISPLAY_CAP characters plus the "…" that marks the cut.
    for value in (msg.args, msg.text, msg.code):
        assert value is None or len(value) <= DISPLAY_CAP + 1, len(value)


def imap_stream(data: bytes) -> None:
    """Feed one ImapSession the operations encoded in ``data``, then finish it."""
    session = ImapSession(on_message=_check_message)
    pos, n = 0, len(data)
    while pos < n:
        h = data[pos]
        stream = session.server if h & SERVER_BIT else session.client
        op = (h >> 5) & 3
        pos += 1
        if op != OP_SPECIAL:
            length = ((h & 0x1F) << 8) | (data[pos] if pos < n else 0)
            pos += 1
            stream.feed(data[pos : pos + length])
            pos += length
        else:
            sel = data[pos] if pos < n else 0
            pos += 1
            if sel & 1 == 0:
                stream.gap(int.from_bytes(data[pos : pos + 3], "big"))
                pos += 3
            else:
                hl = data[pos] if pos < n else 0
                tl = data[pos + 1] if pos + 1 < n else 0
                missing = int.from_bytes(data[pos + 2 : pos + 4], "big")
                pos += 4
                head = data[pos : pos + hl]
                tail = data[pos + hl : pos + hl + tl]
                pos += hl + tl
                stream.segment(head, len(head) + missing + len(tail), tail)
        _check_session(session)
    session.finish()
    _check_session(session)


# --- capture_file ----------------------------------------------------------------------------

#: One file per process, rewritten for every input: on tmpfs when there is one, since
#: open_capture only takes paths.
_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
_scratch: str | None = None


def _scratch_path() -> str:
    global _scratch
    if _scratch is None:
        fd, _scratch = tempfile.mkstemp(prefix="imaptap-fuzz-", suffix=".pcap", dir=_SCRATCH_DIR)
        os.close(fd)
    return _scratch


def capture_file(data: bytes) -> None:
    """Replay ``data`` as a capture file through a FlowTable; only CaptureFileError may escape."""
    path = _scratch_path()
    with open(path, "wb") as f:
        f.write(data)
    policy = PayloadPolicy()
    table = FlowTable(frozenset({IMAP_PORT}), policy, lambda flow, msg: _check_message(msg))
    try:
        with open_capture(path) as reader:
            # Every port, as ``imaptap -r --port`` with unusual ports would: more code reached.
            for seg in reader.segments(None, policy, ReplayStats()):
                table.add(seg)
    except CaptureFileError:
        pass
    finally:
        table.close_all()


TARGETS = {"imap_stream": imap_stream, "capture_file": capture_file}
