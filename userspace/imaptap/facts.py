"""What is known of one flow at one moment, as one typed, immutable value.

`FlowFacts` is the JSON flow record (README, "JSON Lines"): its fields are the record's keys
after ``"type": "flow"``, in the order they are written, and `flow_facts` is the one place
that reads them off a live `Flow` and its session.  The JSON writer serialises it, the TUI
shows it (from another thread: nothing in it is shared with the flow, which goes on changing),
and the tests compare it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from imaptap.flows import Flow


def endpoint(addr: tuple[str, int]) -> str:
    """``ip:port``, IPv6 as ``[ip]:port``."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class FlowFacts(NamedTuple):
    """One flow's facts: the keys of its JSON record, in order."""

    flow: int
    """The flow's id, unique in one run; message records name it."""
    client: str
    """``ip:port`` of the side not on the IMAP port."""
    server: str
    ip_version: int
    first_ts: float
    last_ts: float
    packets: int
    """Segments with payload, SYN, FIN or RST, both directions."""
    bytes: int
    """TCP payload bytes on the wire, both directions."""
    packets_c2s: int
    packets_s2c: int
    bytes_c2s: int
    bytes_s2c: int
    end: str | None
    """How the flow ended (an `imaptap.flows.EndReason` value), None while it is open."""
    imap: bool
    """Confirmed as IMAP by a greeting, a known command or a tagged completion."""
    greeting: str | None
    server_software: str | None
    username: str | None
    """The user of the successful login, else the last one tried."""
    authzid: str | None
    auth_command: str | None
    """``LOGIN`` or ``AUTHENTICATE``."""
    auth_mechanism: str | None
    login_ok: bool | None
    login_failures: int
    preauth: bool
    capabilities: tuple[str, ...]
    starttls: str
    """An `imaptap.imap.session.StartTls` value."""
    encrypted: bool
    encrypted_from_start: bool
    compressed: bool
    cleartext_credentials: bool
    findings: tuple[str, ...]
    client_id: dict[str, str | None] | None
    """The client's ID parameters (RFC 2971)."""
    server_id: dict[str, str | None] | None
    mailboxes: tuple[str, ...]
    """SELECT and EXAMINE targets, decoded, in order."""
    mailboxes_dropped: int
    idles: int
    commands: dict[str, int]
    """Commands by name, in the order first seen."""
    statuses: dict[str, int]
    anomalies: dict[str, int]
    """Counts by `imaptap.imap.anomalies` name."""
    gaps: int
    """Holes in the sequence space: segments the capture lost."""
    gap_bytes: int
    resyncs: int
    """Lines lost to bytes not copied, the stream found again at the next line."""
    bytes_not_captured: int
    bytes_inflated: int
    retransmissions: int
    out_of_order: int

    def record(self) -> dict[str, Any]:
        """The JSON flow record as a dict: JSON's types (lists, not tuples), copies throughout."""
        rec: dict[str, Any] = {"type": "flow"}
        for key, value in zip(self._fields, self, strict=True):
            if isinstance(value, tuple):
                rec[key] = list(value)
            elif isinstance(value, dict):
                rec[key] = dict(value)
            else:
                rec[key] = value
        return rec


def flow_facts(flow: Flow) -> FlowFacts:
    """The facts of ``flow`` now, detached from it."""
    s = flow.session
    c2s, s2c = flow.c2s, flow.s2c
    client, server = s.client, s.server
    return FlowFacts(
        flow=flow.id,
        client=endpoint(flow.client),
        server=endpoint(flow.server),
        ip_version=flow.ip_version,
        first_ts=flow.first_ts,
        last_ts=flow.last_ts,
        packets=flow.packets_c2s + flow.packets_s2c,
        bytes=flow.bytes_c2s + flow.bytes_s2c,
        packets_c2s=flow.packets_c2s,
        packets_s2c=flow.packets_s2c,
        bytes_c2s=flow.bytes_c2s,
        bytes_s2c=flow.bytes_s2c,
        end=None if flow.end_reason is None else flow.end_reason.value,
        imap=s.is_imap,
        greeting=s.greeting,
        server_software=s.server_software,
        username=s.username,
        authzid=s.authzid,
        auth_command=s.auth_command,
        auth_mechanism=s.auth_mechanism,
        login_ok=s.login_ok,
        login_failures=s.login_failures,
        preauth=s.preauth,
        capabilities=tuple(s.capabilities),
        starttls=s.starttls.value,
        encrypted=s.encrypted,
        encrypted_from_start=s.encrypted_from_start,
        compressed=s.compressed,
        cleartext_credentials=s.cleartext_credentials,
        findings=tuple(s.findings),
        client_id=None if s.client_id is None else dict(s.client_id),
        server_id=None if s.server_id is None else dict(s.server_id),
        mailboxes=tuple(s.mailboxes),
        mailboxes_dropped=s.mailboxes_dropped,
        idles=s.idles,
        commands=dict(s.commands),
        statuses=dict(s.statuses),
        anomalies=dict(s.anomalies),
        gaps=c2s.holes + s2c.holes,
        gap_bytes=c2s.hole_bytes + s2c.hole_bytes,
        resyncs=client.resyncs + server.resyncs,
        bytes_not_captured=client.bytes_missed + server.bytes_missed,
        bytes_inflated=client.bytes_inflated + server.bytes_inflated,
        retransmissions=c2s.retransmissions + s2c.retransmissions,
        out_of_order=c2s.out_of_order + s2c.out_of_order,
    )
