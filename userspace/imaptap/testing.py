"""Builders for tests and fuzzing: conversations as Segments, and a one-call analysis.

Shipped beside the code (as mitmproxy ships ``tflow``) so unit tests, property tests and the
fuzz harness build traffic the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from imaptap.flows import FlowTable
from imaptap.imap.session import Message
from imaptap.output.jsonl import flow_record, message_record
from imaptap.segment import DEFAULT_SNAPLEN, DEFAULT_TAILLEN, IMAP_PORT, PayloadPolicy, Segment, TcpFlag, flow_key

CLIENT = ("192.0.2.10", 40000)
SERVER = ("192.0.2.20", IMAP_PORT)

_PSH_ACK = int(TcpFlag.PSH | TcpFlag.ACK)


def conversation(
    parts: Sequence[tuple[str, bytes]],
    client: tuple[str, int] = CLIENT,
    server: tuple[str, int] = SERVER,
    cuts: Sequence[Sequence[int]] | None = None,
    handshake: bool = True,
    close: bool = True,
    ts: float = 1_700_000_000.0,
    step: float = 0.001,
) -> list[Segment]:
    """Segments of one TCP connection carrying ``parts`` ("c" or "s", bytes) in order.

    ``cuts[i]`` lists offsets at which part ``i`` is split into separate segments.
    Payloads are whole; `replay_cut` applies the capture's copy rules lazily.
    """
    ipv = 6 if ":" in client[0] else 4
    seq = {"c": 1000, "s": 50000}
    segs: list[Segment] = []
    t = ts

    def seg(side: str, flags: int, payload: bytes = b"") -> None:
        nonlocal t
        src, dst = (client, server) if side == "c" else (server, client)
        other = "s" if side == "c" else "c"
        segs.append(Segment(t, ipv, src[0], dst[0], src[1], dst[1], seq[side], seq[other], flags,
                            len(payload), payload))
        t += step

    if handshake:
        seg("c", int(TcpFlag.SYN))
        seq["c"] += 1
        seg("s", int(TcpFlag.SYN | TcpFlag.ACK))
        seq["s"] += 1
    for i, (side, data) in enumerate(parts):
        offsets = [0, *sorted(o for o in (cuts[i] if cuts and i < len(cuts) else ()) if 0 < o < len(data)), len(data)]
        for a, b in zip(offsets, offsets[1:]):
            if a == b:
                continue
            seg(side, _PSH_ACK, data[a:b])
            seq[side] += b - a
    if close:
        seg("c", int(TcpFlag.FIN | TcpFlag.ACK))
        seq["c"] += 1
        seg("s", int(TcpFlag.FIN | TcpFlag.ACK))
    return segs


def replay_cut(segments: Iterable[Segment], policy: PayloadPolicy) -> Iterator[Segment]:
    """The segments as a capture would copy them, deciding each one only when it is reached."""
    for s in segments:
        head, tail = policy.cut(flow_key(s.src, s.sport, s.dst, s.dport), s.payload, s.wire_len)
        if len(head) != len(s.payload):
            s = Segment(s.ts, s.ip_version, s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags,
                        s.wire_len, head, s.ifindex, tail)
        yield s


@dataclass
class Analysis:
    """What one run of the pipeline reported."""

    flows: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    table: FlowTable | None = None

    @property
    def flow(self) -> dict[str, Any]:
        """The only flow; fails if there is not exactly one."""
        assert len(self.flows) == 1, [f["client"] for f in self.flows]
        return self.flows[0]


def analyze(
    segments: Iterable[Segment],
    ports: Iterable[int] = (IMAP_PORT,),
    snaplen: int | None = DEFAULT_SNAPLEN,
    max_flows: int | None = None,
    taillen: int = DEFAULT_TAILLEN,
) -> Analysis:
    """Run segments through the flow table, cut as replay cuts them (whole when snaplen is None)."""
    result = Analysis()
    policy = PayloadPolicy(snaplen if snaplen is not None else 1 << 30, taillen)
    kwargs = {} if max_flows is None else {"max_flows": max_flows}

    def on_message(flow, msg: Message) -> None:
        result.messages.append(message_record(flow, msg))

    def on_end(flow) -> None:
        result.flows.append(flow_record(flow))

    table = FlowTable(frozenset(ports), policy, on_message, on_end, **kwargs)
    result.table = table
    for s in replay_cut(segments, policy):
        table.add(s)
    table.close_all()
    return result
