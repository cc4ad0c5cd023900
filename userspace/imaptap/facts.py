"""What is known of one flow at one moment, as one typed, immutable value.

`FlowFacts` is the JSON flow record (README, "JSON Lines"): its fields are the record's keys
after ``"type": "flow"``, in the order they are written (declared in imaptap/flowrecord.py,
which mypyc leaves alone, and imported from here), and `flow_facts` is the one place that reads
them off a live `Flow` and its session.  The JSON writer serialises it, the TUI
shows it (from another thread: nothing in it is shared with the flow, which goes on changing),
and the tests compare it.  A flow not (yet) confirmed as IMAP gets only its transport facts:
every IMAP fact is empty, whatever its session made of the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from imaptap.clients import guess
from imaptap.flowrecord import FlowFacts
from imaptap.flows import EndReason
from imaptap.imap.session import StartTls

if TYPE_CHECKING:
    from imaptap.flows import Flow

_new: Final = tuple.__new__
# The values of the members flow records carry, looked up: an enum's ``.value`` is a Python
# descriptor, which compiled code calls like any other (twice a flow).
_END_VALUES: Final = {reason: reason.value for reason in EndReason}
_STARTTLS_VALUES: Final = {state: state.value for state in StartTls}


def endpoint(addr: tuple[str, int]) -> str:
    """``ip:port``, IPv6 as ``[ip]:port``."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def flow_facts(flow: Flow) -> FlowFacts:
    """The facts of ``flow`` now, detached from it."""
    s = flow.session
    c2s, s2c = flow.c2s, flow.s2c
    client, server = s.client, s.server
    if not s.is_imap:
        return _transport_facts(flow)
    # tuple.__new__ in field order (each value names its field): the NamedTuple's keyword
    # __new__ took three times as long, a percent of a flows-only replay.
    return _new(FlowFacts, (
        flow.id,  # flow
        endpoint(flow.client),  # client
        endpoint(flow.server),  # server
        flow.ip_version,  # ip_version
        flow.first_ts,  # first_ts
        flow.last_ts,  # last_ts
        flow.packets_c2s + flow.packets_s2c,  # packets
        flow.bytes_c2s + flow.bytes_s2c,  # bytes
        flow.packets_c2s,  # packets_c2s
        flow.packets_s2c,  # packets_s2c
        flow.bytes_c2s,  # bytes_c2s
        flow.bytes_s2c,  # bytes_s2c
        None if flow.end_reason is None else _END_VALUES[flow.end_reason],  # end
        s.is_imap,  # imap
        s.greeting,  # greeting
        s.server_software,  # server_software
        s.server_product,  # server_product
        s.server_version,  # server_version
        s.username,  # username
        s.authzid,  # authzid
        s.auth_command,  # auth_command
        s.auth_mechanism,  # auth_mechanism
        s.login_ok,  # login_ok
        s.login_failures,  # login_failures
        s.preauth,  # preauth
        tuple(s.capabilities),  # capabilities
        _STARTTLS_VALUES[s.starttls],  # starttls
        s.encrypted,  # encrypted
        s.encrypted_from_start,  # encrypted_from_start
        s.compressed,  # compressed
        s.cleartext_credentials,  # cleartext_credentials
        tuple(s.findings),  # findings
        None if s.client_id is None else dict(s.client_id),  # client_id
        None if s.server_id is None else dict(s.server_id),  # server_id
        tuple(s.mailboxes),  # mailboxes
        s.mailboxes_dropped,  # mailboxes_dropped
        s.idles,  # idles
        dict(s.commands),  # commands
        dict(s.statuses),  # statuses
        dict(s.anomalies),  # anomalies
        c2s.holes + s2c.holes,  # gaps
        c2s.hole_bytes + s2c.hole_bytes,  # gap_bytes
        client.resyncs + server.resyncs,  # resyncs
        client.bytes_missed + server.bytes_missed,  # bytes_not_captured
        client.bytes_inflated + server.bytes_inflated,  # bytes_inflated
        c2s.retransmissions + s2c.retransmissions,  # retransmissions
        c2s.out_of_order + s2c.out_of_order,  # out_of_order
        tuple(s.audit.attempts),  # login_attempts
        s.audit.attempts_dropped,  # login_attempts_dropped
        guess(s.audit, s.client_id),  # client_software
    ))


def _transport_facts(flow: Flow) -> FlowFacts:
    """The facts of a flow not confirmed as IMAP: what TCP and TLS say, no IMAP fact at all (a
    web server's answer is not a user, a login or a capability list)."""
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
        end=None if flow.end_reason is None else _END_VALUES[flow.end_reason],
        imap=False,
        greeting=None,
        server_software=None,
        server_product=None,
        server_version=None,
        username=None,
        authzid=None,
        auth_command=None,
        auth_mechanism=None,
        login_ok=None,
        login_failures=0,
        preauth=False,
        capabilities=(),
        starttls=StartTls.NONE.value,
        encrypted=s.encrypted,
        encrypted_from_start=s.encrypted_from_start,
        compressed=False,
        cleartext_credentials=False,
        findings=(),
        client_id=None,
        server_id=None,
        mailboxes=(),
        mailboxes_dropped=0,
        idles=0,
        commands={},
        statuses={},
        anomalies={},
        gaps=c2s.holes + s2c.holes,
        gap_bytes=c2s.hole_bytes + s2c.hole_bytes,
        resyncs=0,
        bytes_not_captured=client.bytes_missed + server.bytes_missed,
        bytes_inflated=0,
        retransmissions=c2s.retransmissions + s2c.retransmissions,
        out_of_order=c2s.out_of_order + s2c.out_of_order,
        login_attempts=(),
        login_attempts_dropped=0,
        client_software=None,
    )
