"""`FlowFacts`, the flow record: what is known of one flow at one moment, as one typed,
immutable value (built by `imaptap.facts.flow_facts`, the one place that reads a `Flow`).

Its fields are the JSON flow record's keys after ``"type": "flow"`` (README, "JSON Lines"), in
the order they are written, and their declared types say how output/jsonl.py writes each one.
mypyc does not compile this module: compiled, a class keeps its annotations as evaluated types
(``str | None`` as ``type``), not the text jsonl reads, while `flow_facts` in facts.py, which
runs once per flow, is compiled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from imaptap.clients import ClientGuess
from imaptap.imap.audit import LoginAttempt


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
    """Confirmed as IMAP by the server (or, in a one-sided capture without a server byte, by
    the client's commands); when false, every IMAP fact below is empty."""
    greeting: str | None
    server_software: str | None
    """The product and version the greeting names (as written), else the ID answer's name."""
    server_product: str | None
    """The product alone (``Dovecot``, ``Cyrus IMAP``, ...): from the greeting, else from ID."""
    server_version: str | None
    """Its version, from the greeting, else from ID (``+``, ``~`` and the like kept)."""
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
    login_attempts: tuple[LoginAttempt, ...]
    """Each LOGIN and AUTHENTICATE: its user, outcome and password fingerprint, never the password."""
    login_attempts_dropped: int
    """Attempts past what a flow keeps (`imaptap.imap.audit.MAX_ATTEMPTS`)."""
    client_software: ClientGuess | None
    """The client's software: from its ID, else a passive fingerprint (`imaptap.clients`)."""

    def record(self) -> dict[str, Any]:
        """The JSON flow record as a dict: JSON's types (lists, not tuples), copies throughout."""
        rec: dict[str, Any] = {"type": "flow"}
        for key, value in zip(self._fields, self, strict=True):
            if isinstance(value, ClientGuess):
                rec[key] = value.record()
            elif isinstance(value, tuple) and value and isinstance(value[0], LoginAttempt):
                rec[key] = [attempt.record() for attempt in value]
            elif isinstance(value, tuple):
                rec[key] = list(value)
            elif isinstance(value, dict):
                rec[key] = dict(value)
            else:
                rec[key] = value
        return rec
