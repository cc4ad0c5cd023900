"""Builders for tests and fuzzing: conversations as Segments, and a one-call analysis.

Shipped beside the code (as mitmproxy ships ``tflow``) so unit tests, property tests and the
fuzz harness build traffic the same way; nothing else in the package imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imaptap.facts import FlowFacts
from imaptap.flows import MAX_FLOWS, Flow, FlowTable
from imaptap.imap.session import Message
from imaptap.output.jsonl import message_record
from imaptap.pipeline import MemorySource, Pipeline, Sink
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_SNAPLEN, DEFAULT_TAILLEN, IMAP_PORT, Segment, TcpFlag

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
    Payloads are whole; `imaptap.pipeline.MemorySource` applies the capture's copy rules lazily.
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
        for a, b in zip(offsets, offsets[1:], strict=False):
            if a == b:
                continue
            seg(side, _PSH_ACK, data[a:b])
            seq[side] += b - a
    if close:
        seg("c", int(TcpFlag.FIN | TcpFlag.ACK))
        seq["c"] += 1
        seg("s", int(TcpFlag.FIN | TcpFlag.ACK))
    return segs


@dataclass
class Analysis(Sink):
    """What one run of the pipeline reported, as the JSON output would have it."""

    flows: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    table: FlowTable | None = None

    @property
    def flow(self) -> dict[str, Any]:
        """The only flow; fails if there is not exactly one."""
        assert len(self.flows) == 1, [f["client"] for f in self.flows]
        return self.flows[0]

    def flow_started(self, flow: Flow) -> Callable[[Message], None]:
        messages = self.messages
        return lambda msg: messages.append(message_record(flow, msg))

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.flows.append(facts.record())


def analyze(
    segments: Iterable[Segment],
    ports: Iterable[int] = (IMAP_PORT,),
    snaplen: int | None = DEFAULT_SNAPLEN,
    max_flows: int | None = None,
    taillen: int = DEFAULT_TAILLEN,
    handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN,
    password_fingerprint: Callable[[bytes], str] | None = None,
    sinks: Sequence[Sink] = (),
) -> Analysis:
    """Run segments through the pipeline, cut as a capture cuts them (whole when snaplen is None),
    with ``sinks`` besides the collector."""
    result = Analysis()
    source = MemorySource(segments, ports, snaplen=snaplen if snaplen is not None else 1 << 30, taillen=taillen,
                          handshake_snaplen=handshake_snaplen)
    pipeline = Pipeline(source, [result, *sinks], max_flows=MAX_FLOWS if max_flows is None else max_flows,
                        password_fingerprint=password_fingerprint)
    result.table = pipeline.table
    pipeline.run()
    return result
