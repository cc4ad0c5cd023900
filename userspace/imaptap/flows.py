"""Segments -> connections: direction, TCP sequence order, life cycle, a bounded table.

Every segment on a monitored port lands here, whether the kernel or a capture file produced
it.  The flow tracker decides which side is the client (the one not using the IMAP port, so a
capture that starts mid-connection still works), puts payload back in sequence order, drops
retransmissions, turns holes into gaps for the IMAP stream, and ends flows on FIN/RST, on an
idle timeout, or when the table is full (oldest idle first).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

from imaptap.imap.session import ImapSession, Message
from imaptap.imap.stream import ImapStream
from imaptap.segment import FlowKey, PayloadMode, PayloadPolicy, Segment, TcpFlag, flow_key

#: Flows tracked at once.  An idle one costs about 2 KB (4 KB logged in, 32 KB at the bound of
#: every per-flow store), so a SYN flood fills the table with about 60 MB; when full, the flow
#: idle longest is ended and counted as evicted.
MAX_FLOWS: Final = 32768

#: Seconds without a segment before a flow is ended.  IMAP IDLE clients stay silent for up to
#: 29 minutes before they re-issue IDLE (RFC 2177), so anything shorter would split sessions.
IDLE_TIMEOUT: Final = 31 * 60.0

#: Capture-clock seconds between two sweeps for idle flows.
EXPIRY_SWEEP: Final = 1.0

#: Out-of-order segments held per direction waiting for the hole before them to fill; beyond
#: this the hole is declared a gap and parsing goes on.
MAX_OUT_OF_ORDER: Final = 64

#: Segments with payload (both directions) a flow is copied under the handshake rule at most
#: (`PayloadMode.HANDSHAKE`), and their wire bytes: a login with a few retries and the long
#: answers of Cyrus (capabilities, ID, SELECT) take a dozen segments and 4 KB; a flow that never
#: logs in, or never gets to a command on messages, falls back to the snap length's cut after
#: these, so no flow costs more than 16 KB of whole copies.
HANDSHAKE_SEGMENTS: Final = 32
HANDSHAKE_BYTES: Final = 16384

_SEQ_MOD: Final = 1 << 32
_SEQ_HALF: Final = 1 << 31
_FIN: Final = int(TcpFlag.FIN)
_SYN: Final = int(TcpFlag.SYN)
_RST: Final = int(TcpFlag.RST)
_ACK: Final = int(TcpFlag.ACK)


class EndReason(enum.StrEnum):
    """How a flow ended: the ``end`` of its JSON record."""

    FIN = "fin"
    """Both sides sent FIN."""
    RST = "rst"
    """Either side sent RST."""
    IDLE = "idle"
    """No segment for longer than the idle timeout (--idle-timeout)."""
    EVICTED = "evicted"
    """The table was full (--max-flows) and this flow had been idle longest."""
    REUSED = "reused"
    """A new connection (a SYN) came with the same addresses and ports."""
    END = "end"
    """Still open when the input ended or the capture was stopped."""


def _skip(head: bytes, tail: bytes, wire_len: int, k: int) -> tuple[bytes, bytes, int]:
    """The captured parts of a segment once its first ``k`` wire bytes are dropped."""
    tail_start = wire_len - len(tail)
    head = head[k:]
    if k > tail_start:
        tail = tail[k - tail_start :]
    return head, tail, wire_len - k


#: Out-of-order segments of a direction that holds none: shared and only read (`_Direction.data`
#: makes the direction's own dict before it holds one).
_NONE_HELD: Final[dict[int, tuple[bytes, bytes, int]]] = {}


class _Direction:
    """TCP sequence tracking for one direction, feeding one `ImapStream`."""

    __slots__ = ("next_seq", "pending", "stream", "retransmissions", "out_of_order", "holes", "hole_bytes",
                 "draining")

    def __init__(self, stream: ImapStream) -> None:
        self.next_seq: int | None = None
        self.pending = _NONE_HELD
        self.stream = stream
        """Takes the segments in order (``segment``) and the holes (``gap``): the stream itself, not
        its bound methods, which would be two more objects per direction of every open flow."""
        self.retransmissions = 0
        self.out_of_order = 0
        self.holes = 0
        """Holes in the sequence space: segments the capture lost (not bytes it chose not to copy)."""
        self.hole_bytes = 0
        self.draining = False

    def syn(self, seq: int) -> None:
        self.next_seq = (seq + 1) % _SEQ_MOD

    def data(self, seq: int, head: bytes, wire_len: int, tail: bytes = b"") -> None:
        """A segment's captured head and tail, ``wire_len`` payload bytes from ``seq`` on."""
        next_seq = self.next_seq
        if next_seq is None:
            next_seq = seq
        d = (seq - next_seq) % _SEQ_MOD
        if d:
            if d < _SEQ_HALF:
                self.out_of_order += 1
                if self.pending is _NONE_HELD:
                    self.pending = {}
                if seq not in self.pending or self.pending[seq][2] < wire_len:
                    self.pending[seq] = (head, tail, wire_len)
                if len(self.pending) > MAX_OUT_OF_ORDER:
                    self.flush_one()
                return
            d -= _SEQ_MOD
            if d + wire_len <= 0:
                self.retransmissions += 1
                return
            head, tail, wire_len = _skip(head, tail, wire_len, -d)
        self.next_seq = (next_seq + wire_len) % _SEQ_MOD
        self.stream.segment(head, wire_len, tail)
        if self.pending and not self.draining:
            self._drain()

    def _drain(self) -> None:
        """Deliver held segments that the sequence space has now reached."""
        self.draining = True
        try:
            while self.pending:
                next_seq = self.next_seq
                assert next_seq is not None, "segments are held only once the sequence is known"
                ready = [s for s in self.pending if (s - next_seq) % _SEQ_MOD >= _SEQ_HALF or s == next_seq]
                if not ready:
                    return
                for seq in ready:
                    head, tail, wire_len = self.pending.pop(seq)
                    self.data(seq, head, wire_len, tail)
        finally:
            self.draining = False

    def flush_one(self) -> None:
        """Give up waiting for the earliest hole: report it as a gap and go on from there."""
        next_seq = self.next_seq
        assert next_seq is not None, "segments are held only once the sequence is known"
        nearest = min(self.pending, key=lambda s: (s - next_seq) % _SEQ_MOD)
        hole = (nearest - next_seq) % _SEQ_MOD
        self.holes += 1
        self.hole_bytes += hole
        self.stream.gap(hole)
        self.next_seq = nearest
        self._drain()

    def flush(self) -> None:
        while self.pending:
            self.flush_one()


class Flow:
    """One TCP connection to an IMAP port and what is known about it.

    A plain class rather than a dataclass: a dataclass's generated ``__init__`` is Python code
    even where mypyc compiles the class, and one is made per connection."""

    __slots__ = ("id", "key", "ip_version", "client", "server", "first_ts", "last_ts", "session", "packets_c2s",
                 "packets_s2c", "bytes_c2s", "bytes_s2c", "syn_seen", "fin_client", "fin_server", "reset",
                 "end_reason", "handshake_segments", "handshake_bytes", "c2s", "s2c")

    id: int
    key: FlowKey
    ip_version: int
    client: tuple[str, int]
    """(address, port) of the side that does not use the IMAP port."""
    server: tuple[str, int]
    first_ts: float
    last_ts: float
    session: ImapSession
    packets_c2s: int
    """Segments with payload, SYN, FIN or RST (pure ACKs are never copied by the kernel)."""
    packets_s2c: int
    bytes_c2s: int
    """TCP payload bytes on the wire."""
    bytes_s2c: int
    syn_seen: bool
    fin_client: bool
    fin_server: bool
    reset: bool
    end_reason: EndReason | None
    handshake_segments: int
    """Segments with payload still copied under the handshake rule; 0 once it no longer applies."""
    handshake_bytes: int
    """Wire bytes still copied under the handshake rule."""
    c2s: _Direction
    s2c: _Direction

    def __init__(self, id: int, key: FlowKey, ip_version: int, client: tuple[str, int], server: tuple[str, int],
                 first_ts: float, last_ts: float, session: ImapSession) -> None:
        self.id = id
        self.key = key
        self.ip_version = ip_version
        self.client = client
        self.server = server
        self.first_ts = first_ts
        self.last_ts = last_ts
        self.session = session
        self.packets_c2s = 0
        self.packets_s2c = 0
        self.bytes_c2s = 0
        self.bytes_s2c = 0
        self.syn_seen = False
        self.fin_client = False
        self.fin_server = False
        self.reset = False
        self.end_reason = None
        self.handshake_segments = 0
        self.handshake_bytes = 0
        self.c2s = _Direction(session.client)
        self.s2c = _Direction(session.server)

    def __repr__(self) -> str:
        return f"Flow(id={self.id}, client={self.client}, server={self.server}, end_reason={self.end_reason})"

    @property
    def packets(self) -> int:
        return self.packets_c2s + self.packets_s2c

    @property
    def bytes(self) -> int:
        return self.bytes_c2s + self.bytes_s2c


@dataclass
class FlowStats:
    segments: int = 0
    """Segments handed to the tracker."""
    empty: int = 0
    """Segments without payload or SYN/FIN/RST: ignored (captures do not deliver them)."""
    orphans: int = 0
    """Segments of no known flow that cannot start one (a FIN or RST after the end)."""
    flows: int = 0
    imap_flows: int = 0
    """Flows that ended confirmed as IMAP."""
    non_imap_flows: int = 0
    """Flows that ended without that: another protocol on a watched port, TLS from the first
    byte, a bare SYN.  Their records carry no IMAP fact and they wrote no message."""
    ended_fin: int = 0
    ended_rst: int = 0
    expired: int = 0
    evicted: int = 0
    retransmissions: int = 0
    out_of_order: int = 0
    gaps: int = 0
    """Holes in sequence space: segments the capture lost."""
    resyncs: int = 0
    """Times the IMAP parser lost a line to uncaptured bytes and found the next one."""
    anomalies: int = 0
    held_messages_dropped: int = 0
    """Messages of flows confirmed as IMAP only after more than session.MAX_HELD_MESSAGES of
    them: the ones past the bound were never written."""


class FlowTable:
    """All open flows, keyed by connection, in least-recently-active order."""

    def __init__(
        self,
        ports: set[int] | frozenset[int],
        policy: PayloadPolicy | None = None,
        on_message: Callable[[Flow, Message], None] | None = None,
        on_flow_end: Callable[[Flow], None] | None = None,
        max_flows: int = MAX_FLOWS,
        idle_timeout: float = IDLE_TIMEOUT,
        message_sink: Callable[[Flow], Callable[[Message], None] | None] | None = None,
        password_fingerprint: Callable[[bytes], str] | None = None,
    ) -> None:
        self.ports = frozenset(ports)
        self.password_fingerprint = password_fingerprint
        """Given to every session: the keyed fingerprint of each password tried (imap/audit.py)."""
        self.policy = policy
        self.on_message = on_message
        self.message_sink = message_sink
        """Instead of on_message: makes each new flow's own message callable (JsonlWriter.sink), or
        None where no sink wants that flow's messages."""
        self.on_flow_end = on_flow_end
        self.max_flows = max_flows
        self.idle_timeout = idle_timeout
        self.flows: dict[FlowKey, Flow] = {}
        self.stats = FlowStats()
        self._next_id = 1
        self._next_sweep = 0.0
        self.now = 0.0

    # --- input -------------------------------------------------------------------------------

    def add(self, seg: Segment) -> None:
        """Account one segment to its flow and feed its payload to the IMAP session."""
        stats = self.stats
        stats.segments += 1
        ts, _, src, dst, sport, dport, seq, _, flags, wire_len, head, _, tail = seg
        if wire_len == 0 and not flags & (_SYN | _FIN | _RST):
            stats.empty += 1
            return
        if ts > self.now:
            self.advance(ts)
        key = flow_key(src, sport, dst, dport)
        flows = self.flows
        # Taken out and put back at the end (least recently active first); get and del rather
        # than pop(key, None), which compiled code calls as a Python method, once per segment.
        flow = flows.get(key)
        if flow is not None:
            del flows[key]
        if flow is not None and flags & _SYN and not flags & _ACK and flow.bytes and not flow.reset:
            self._end(flow, EndReason.REUSED)
            flow = None
        if flow is None:
            if wire_len == 0 and not flags & _SYN:
                stats.orphans += 1
                return
            flow = self._new_flow(seg, key)
        flows[key] = flow
        from_client = sport == flow.client[1] and src == flow.client[0]
        flow.last_ts = ts
        flow.session.now = ts
        if from_client:
            direction = flow.c2s
            flow.packets_c2s += 1
            flow.bytes_c2s += wire_len
        else:
            direction = flow.s2c
            flow.packets_s2c += 1
            flow.bytes_s2c += wire_len
        if flags & _SYN:
            flow.syn_seen = True
            direction.syn(seq)
            if not from_client:
                flow.session.server_from_start = True
            if wire_len:
                direction.data((seq + 1) % _SEQ_MOD, head, wire_len, tail)
        elif wire_len:
            if seq == direction.next_seq and not direction.pending:
                # _Direction.data() for the usual segment, the next one in sequence with
                # nothing held back: one call fewer per segment.
                direction.next_seq = (seq + wire_len) % _SEQ_MOD
                direction.stream.segment(head, wire_len, tail)
            else:
                direction.data(seq, head, wire_len, tail)
            if flow.handshake_segments:
                self._handshake(flow, wire_len)
        if flags & _RST:
            flow.reset = True
            self._end(self.flows.pop(key), EndReason.RST)
        elif flags & _FIN:
            if from_client:
                flow.fin_client = True
            else:
                flow.fin_server = True
            if flow.fin_client and flow.fin_server:
                self._end(self.flows.pop(key), EndReason.FIN)

    def _new_flow(self, seg: Segment, key: FlowKey) -> Flow:
        ports = self.ports
        if seg.dport in ports and (seg.sport not in ports or seg.flags & _SYN and not seg.flags & _ACK):
            client, server = (seg.src, seg.sport), (seg.dst, seg.dport)
        elif seg.sport in ports:
            client, server = (seg.dst, seg.dport), (seg.src, seg.sport)
        else:
            client, server = (seg.src, seg.sport), (seg.dst, seg.dport)
        if len(self.flows) >= self.max_flows:
            oldest = next(iter(self.flows))
            self._end(self.flows.pop(oldest), EndReason.EVICTED)
        flow_id = self._next_id
        self._next_id += 1
        # the session tells the policy its flow's modes itself: no callable kept per flow
        session = ImapSession(None, None, self.password_fingerprint, self.policy, key)
        flow = Flow(flow_id, key, seg.ip_version, client, server, seg.ts, seg.ts, session)
        policy = self.policy
        if policy is not None and policy.default is PayloadMode.HANDSHAKE:
            if seg.flags & _SYN:
                flow.handshake_segments = HANDSHAKE_SEGMENTS
                flow.handshake_bytes = HANDSHAKE_BYTES
            else:
                policy.end_handshake(key)  # seen from its middle: the handshake is past
        if self.message_sink is not None:
            session.set_message_sink(self.message_sink(flow))
        elif self.on_message is not None:
            session.set_message_sink(partial(self.on_message, flow))
        self.stats.flows += 1
        return flow

    def _handshake(self, flow: Flow, wire_len: int) -> None:
        """Count one segment of a flow's handshake; end the handshake rule once the session says
        the handshake is over, another mode took over, or the bound is reached."""
        flow.handshake_segments -= 1
        flow.handshake_bytes -= wire_len
        policy = self.policy
        assert policy is not None, "only flows of a table with a policy have a handshake"
        if (flow.session.handshake_done or flow.handshake_segments <= 0 or flow.handshake_bytes <= 0
                or flow.key in policy.modes):
            flow.handshake_segments = 0
            policy.end_handshake(flow.key)

    def advance(self, ts: float) -> None:
        """The capture clock reached ``ts``: the idle sweep due then.  `add` calls it for its own
        segments, the --workers share filter for the segments another worker analyses."""
        if ts > self.now:
            self.now = ts
            if ts >= self._next_sweep:
                self._next_sweep = ts + EXPIRY_SWEEP
                self.expire(ts)

    @property
    def next_sweep(self) -> float:
        """The capture time from which a segment makes the next idle sweep."""
        return self._next_sweep

    # --- life cycle --------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """End every flow idle for longer than the timeout (oldest first)."""
        limit = now - self.idle_timeout
        flows = self.flows
        while flows:
            key = next(iter(flows))
            flow = flows[key]
            if flow.last_ts >= limit:
                break
            del flows[key]
            self._end(flow, EndReason.IDLE)

    def close_all(self, reason: EndReason = EndReason.END) -> None:
        """End every open flow, e.g. at the end of the input."""
        while self.flows:
            key = next(iter(self.flows))
            self._end(self.flows.pop(key), reason)

    def _end(self, flow: Flow, reason: EndReason) -> None:
        flow.end_reason = reason
        flow.c2s.flush()
        flow.s2c.flush()
        flow.session.finish()
        stats = self.stats
        if reason is EndReason.FIN:
            stats.ended_fin += 1
        elif reason is EndReason.RST:
            stats.ended_rst += 1
        elif reason is EndReason.IDLE:
            stats.expired += 1
        elif reason is EndReason.EVICTED:
            stats.evicted += 1
        session = flow.session
        stats.retransmissions += flow.c2s.retransmissions + flow.s2c.retransmissions
        stats.out_of_order += flow.c2s.out_of_order + flow.s2c.out_of_order
        stats.gaps += flow.c2s.holes + flow.s2c.holes
        if session.is_imap:
            stats.imap_flows += 1
            # what the IMAP parser made of the bytes: nothing of it for a flow that is not IMAP
            stats.resyncs += session.client.resyncs + session.server.resyncs
            stats.anomalies += sum(session.anomalies.values())
            stats.held_messages_dropped += session.held_dropped
        else:
            stats.non_imap_flows += 1
        if self.policy is not None:
            self.policy.forget(flow.key)
        if self.on_flow_end is not None:
            self.on_flow_end(flow)
        session.release()
