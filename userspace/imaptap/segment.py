"""The one event type that crosses the capture boundary.

Both capture sources (the kernel program via capture/live.py and capture files via
capture/replay.py) hand the analyzer nothing but `Segment`s.  A segment carries the TCP
payload *prefix* that was copied (at most the snap length) and the payload length on the wire,
so the stream can skip bytes it never received, such as the rest of a message body.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final, NamedTuple, TypeVar

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # mypy's own package: only a build with mypyc needs it, not a run

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        """mypyc's class options, which nothing but mypyc reads: the class unchanged."""
        return lambda cls: cls

#: Default number of payload bytes copied from the start of each segment (tcpdump's ``-s``).
DEFAULT_SNAPLEN: Final = 256

#: Default number of payload bytes copied from the end of a segment longer than the snap
#: length.  A server answers a command with one write that ends in the tagged completion
#: (``a1 OK Logged in``), which a 256-byte prefix loses whenever the untagged data before it
#: is longer: after LOGIN, SELECT and FETCH on Dovecot that is the rule, not the exception.
DEFAULT_TAILLEN: Final = 128

#: Default number of payload bytes copied from the start of each segment while a flow's
#: handshake lasts (`PayloadMode.HANDSHAKE`): from its SYN until, logged in, the client sends its
#: first command on messages (`session.HANDSHAKE_COMMANDS` are the others), or for at most
#: `flows.HANDSHAKE_SEGMENTS` segments.  The facts that matter most come in those first
#: kilobytes, in lines longer than the snap length: Cyrus answers LOGIN with one ~1 KB
#: ``OK [CAPABILITY ...]``, ID with ~500 bytes, SELECT with ~450.  A segment is an MTU or less
#: as a rule, so 2 KB takes it whole.  0 (or a value not above the snap length) keeps the snap
#: length's cut from the first segment on.
DEFAULT_HANDSHAKE_SNAPLEN: Final = 2048

#: Upper bound on what one segment may carry once a flow is compressed and whole payloads are
#: copied.  Larger than any TCP segment on a 64 KiB-GSO path, small enough to bound memory.
WHOLE_PAYLOAD_CAP: Final = 65535

#: IMAP's well-known port; ``--port`` replaces it.
IMAP_PORT: Final = 143


class TcpFlag(enum.IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20


class Segment(NamedTuple):
    """One TCP segment on a monitored port, as the capture saw it.

    A NamedTuple rather than a frozen dataclass: one is built per captured segment, and a
    frozen dataclass's ``__init__`` (a ``object.__setattr__`` per field) cost as much as
    decoding the packet headers.
    """

    ts: float
    """Capture time, seconds since the epoch."""
    ip_version: int
    """4 or 6."""
    src: str
    """Source address in its usual text form."""
    dst: str
    sport: int
    dport: int
    seq: int
    """TCP sequence number of the first payload byte (of the SYN for a SYN)."""
    ack: int
    flags: int
    """TCP flags, see `TcpFlag`."""
    wire_len: int
    """TCP payload length on the wire; may exceed ``len(payload)``."""
    payload: bytes
    """The payload bytes that were copied: a prefix of the wire payload."""
    ifindex: int = 0
    """Interface the kernel saw it on (0 for replay)."""
    tail: bytes = b""
    """The last payload bytes, when the segment was longer than what ``payload`` holds: they
    cover wire bytes ``[wire_len - len(tail), wire_len)``; anything between is not captured."""


class PayloadMode(enum.IntEnum):
    """What the capture copies of a flow's payload; the analyzer decides, the capture obeys.

    The kernel program keeps the same values in its per-flow map, so replay and live capture
    see the same bytes for the same traffic.
    """

    PREFIX = 0
    """Copy the first snap-length bytes of each segment (the default)."""
    NONE = 1
    """Copy nothing: the flow is encrypted (after STARTTLS), only lengths and flags matter."""
    WHOLE = 2
    """Copy whole payloads (up to `WHOLE_PAYLOAD_CAP`): the flow is compressed and must be inflated."""
    HANDSHAKE = 3
    """As PREFIX with the handshake snap length: the flow's login and capabilities are still to come."""


FlowKey = tuple[str, int, str, int]
"""A connection's endpoints in a canonical order that does not depend on direction."""


def flow_key(src: str, sport: int, dst: str, dport: int) -> FlowKey:
    """The canonical key of the connection a segment belongs to: the lower (address, port)
    first.  Compared field by field rather than as tuples: this runs once per segment, and
    building the two tuples to compare was half its cost."""
    if src < dst or (src == dst and sport <= dport):
        return (src, sport, dst, dport)
    return (dst, dport, src, sport)


@mypyc_attr(allow_interpreted_subclasses=True)  # KernelPayloadPolicy (capture/live) mirrors it into the kernel
class PayloadPolicy:
    """Per-flow copy rules shared by the analyzer (which sets them) and a capture (which applies them).

    Every flow starts in the `default` mode: HANDSHAKE when the handshake snap length is above
    the snap length, else PREFIX.  `modes` holds only the flows whose mode differs from it, as
    the kernel's map does, so a flow the capture has never heard of gets the default there too.
    Replay applies the rules in Python; the live capture mirrors every change into the kernel map.
    """

    def __init__(self, snaplen: int = DEFAULT_SNAPLEN, taillen: int = DEFAULT_TAILLEN,
                 handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN) -> None:
        self.snaplen = snaplen
        self.taillen = taillen
        self.handshake_snaplen = handshake_snaplen if handshake_snaplen > snaplen else 0
        """Bytes copied from the start of a segment in HANDSHAKE mode; 0 when there is none."""
        self.default = PayloadMode.HANDSHAKE if self.handshake_snaplen else PayloadMode.PREFIX
        self.modes: dict[FlowKey, PayloadMode] = {}

    def mode(self, key: FlowKey) -> PayloadMode:
        """The mode the capture copies this flow's next segment under."""
        return self.modes.get(key, self.default)

    def set(self, key: FlowKey, mode: PayloadMode) -> None:
        if mode is self.default:
            self.modes.pop(key, None)
        else:
            self.modes[key] = mode

    def end_handshake(self, key: FlowKey) -> None:
        """The flow's handshake is over, or will never be seen: the snap length's cut from now
        on, unless the analyzer already chose another mode (NONE after STARTTLS, WHOLE)."""
        if self.default is PayloadMode.HANDSHAKE and key not in self.modes:
            self.set(key, PayloadMode.PREFIX)

    def forget(self, key: FlowKey) -> None:
        self.modes.pop(key, None)

    def cut(self, key: FlowKey, payload: bytes, wire_len: int) -> tuple[bytes, bytes]:
        """``(head, tail)``: the parts of ``payload`` the capture copies for this flow.

        ``payload`` may itself be shorter than ``wire_len`` (a file captured with a small snap
        length); then its end is not the segment's end and there is no tail to take.
        """
        mode = self.modes.get(key, self.default)
        if mode is PayloadMode.PREFIX:
            snaplen = self.snaplen
        elif mode is PayloadMode.HANDSHAKE:
            snaplen = self.handshake_snaplen
        elif mode is PayloadMode.NONE:
            return b"", b""
        else:
            return payload[:WHOLE_PAYLOAD_CAP], b""
        if len(payload) < wire_len:
            return payload[:snaplen], b""
        return split_payload(payload, snaplen, self.taillen)


def split_payload(payload: bytes, snaplen: int, taillen: int) -> tuple[bytes, bytes]:
    """The first ``snaplen`` bytes and, past them, at most the last ``taillen`` bytes.

    The kernel program makes exactly this cut, so replay and live capture see the same bytes.
    """
    n = len(payload)
    if n <= snaplen:
        return payload, b""
    if taillen <= 0:
        return payload[:snaplen], b""
    start = n - taillen
    if start < snaplen:
        start = snaplen
    return payload[:snaplen], payload[start:]
