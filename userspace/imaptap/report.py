"""The audit report's numbers: per server, per client address, findings, password attacks.

`ReportBuilder` takes each flow's facts and audit as the flow ends (``--report``, ``--fail-on``)
or as it stands (the TUI's summary of open flows) and keeps only what the report shows, with a
bound on everything a hostile network could grow: servers, client addresses, users per address,
flows named per finding, and the users and passwords tracked per source.  `ReportBuilder.report`
returns a `Report`, immutable, which `imaptap.output.report` writes as text, Markdown or JSON.

Password attacks are told apart by source address from *failed* attempts with a password
fingerprint (`imaptap.imap.audit.PasswordFingerprint`); a success after them is named:

- brute force: one user, `BRUTE_FORCE_PASSWORDS` or more distinct passwords;
- password spraying: one password, `SPRAYING_USERS` or more distinct users;
- credential stuffing: `STUFFING_USERS` or more distinct users, each with about one password
  of its own (a leaked list of pairs), no password shared the way a spray shares one.

A web mail front end logs many users in from one address too, each with its own password: it
is not stuffing because its logins succeed, and only failures are counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from imaptap.findings import FINDINGS, Finding, Scope, Severity

if TYPE_CHECKING:
    from imaptap.facts import FlowFacts
    from imaptap.imap.audit import SessionAudit

#: Servers and client addresses given a row; flows of further ones are counted as "more".  A
#: SYN scan from spoofed addresses makes no IMAP flow, so only real sessions can fill these.
MAX_SERVERS = 1024
MAX_CLIENTS = 10_000
#: Users and mechanisms listed per row; further ones are counted.
MAX_USERS_PER_ROW = 64
MAX_MECHANISMS_PER_ROW = 16
#: Client software names counted per client address (a NAT hides a few clients, not hundreds).
MAX_SOFTWARE_PER_CLIENT = 8
#: Flows kept per finding: the report shows the first `SHOWN_FLOWS`, ``--fail-on`` names up to
#: this many on stderr, and counts the rest.
MAX_FLOWS_PER_FINDING = 1000
SHOWN_FLOWS = 10
#: Per source address: distinct users tracked, and distinct passwords tracked per user and users
#: per password.  Past them an attack is still classified on what was tracked; counts go on.
MAX_TRACKED_USERS = 4096
MAX_TRACKED_PER_KEY = 256
#: Sources tracked for attacks (only those with failed logins are).
MAX_TRACKED_SOURCES = 4096
#: The thresholds of the three attack kinds (see the module's doc).
BRUTE_FORCE_PASSWORDS = 5
SPRAYING_USERS = 5
STUFFING_USERS = 5
#: Credential stuffing: at most this many distinct passwords per user on average, and at least
#: this share of the users with a password no other user got.
STUFFING_MAX_PASSWORDS_PER_USER = 2.0
STUFFING_MIN_OWN_PASSWORD_SHARE = 0.8


def address(endpoint: str) -> str:
    """The address of an ``ip:port`` or ``[ip]:port`` endpoint."""
    host = endpoint.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


# --- the report: immutable rows ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowRef:
    """A flow as the report names it."""

    flow: int
    client: str
    server: str
    user: str | None


@dataclass(frozen=True, slots=True)
class ServerRow:
    server: str
    """``ip:port``."""
    software: str | None
    offered: tuple[str, ...]
    """STARTTLS, LOGINDISABLED and AUTH= capabilities seen before login."""
    sessions: int
    """IMAP flows."""
    starttls_used: int
    cleartext_logins: int
    """Flows in which a password crossed in clear."""
    logins_ok: int
    failed_logins: int
    """Refused LOGIN/AUTHENTICATE commands."""


@dataclass(frozen=True, slots=True)
class ClientRow:
    client: str
    """The address."""
    sessions: int
    users: tuple[str, ...]
    users_more: int
    mechanisms: tuple[str, ...]
    starttls_used: int
    starttls_unused: int
    """Flows where the server offered STARTTLS and the client went on in clear."""
    starttls_refused: int
    cleartext_logins: int
    failed_logins: int
    software: tuple[tuple[str, str | None, float, str, int], ...]
    """(name, version, confidence, basis, flows) per client software seen, most flows first."""
    tag_styles: tuple[str, ...]
    """`imaptap.clients.tag_style` of the first tags seen (for a client no signature knows)."""


@dataclass(frozen=True, slots=True)
class FindingRow:
    finding: Finding
    severity: Severity
    summary: str
    count: int
    """Flows that show it."""
    flows: tuple[FlowRef, ...]
    """The first `MAX_FLOWS_PER_FINDING` of them."""
    sources: tuple[str, ...] = ()
    """For a finding of a source: the addresses."""


@dataclass(frozen=True, slots=True)
class AttackRow:
    source: str
    kinds: tuple[Finding, ...]
    """brute_force, password_spraying, credential_stuffing: those that apply."""
    attempts: int
    failed: int
    users: int
    """Distinct users with failed attempts."""
    passwords: int
    """Distinct password fingerprints among the failed attempts."""
    top_user: str | None
    """The user tried with the most passwords, and how many."""
    top_user_passwords: int
    top_password: str | None
    """The fingerprint tried against the most users, and how many."""
    top_password_users: int
    succeeded: tuple[str, ...]
    """Users this source logged in as after failing: an attack that may have worked."""


@dataclass(frozen=True, slots=True)
class Report:
    source: str
    flows: int
    imap_flows: int
    first_ts: float | None
    last_ts: float | None
    findings: tuple[FindingRow, ...]
    """Ranked: severity, then flows, then the order of `imaptap.findings.FINDINGS`."""
    servers: tuple[ServerRow, ...]
    clients: tuple[ClientRow, ...]
    attacks: tuple[AttackRow, ...]
    servers_more: int = 0
    """IMAP flows of servers past `MAX_SERVERS`."""
    clients_more: int = 0

    def finding(self, name: Finding) -> FindingRow | None:
        """The row of one finding, if any flow showed it."""
        for row in self.findings:
            if row.finding is name:
                return row
        return None


# --- accumulation --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Server:
    software: Counter[str] = field(default_factory=Counter)
    offered: dict[str, None] = field(default_factory=dict)
    sessions: int = 0
    starttls_used: int = 0
    cleartext_logins: int = 0
    logins_ok: int = 0
    failed_logins: int = 0


@dataclass(slots=True)
class _Client:
    sessions: int = 0
    users: dict[str, None] = field(default_factory=dict)
    users_more: int = 0
    mechanisms: dict[str, None] = field(default_factory=dict)
    starttls_used: int = 0
    starttls_unused: int = 0
    starttls_refused: int = 0
    cleartext_logins: int = 0
    failed_logins: int = 0
    software: dict[tuple[str, str | None, str], list] = field(default_factory=dict)
    """(name, version, basis) -> [flows, best confidence]."""
    tag_styles: dict[str, None] = field(default_factory=dict)


@dataclass(slots=True)
class _Attempts:
    """What one source address tried."""

    attempts: int = 0
    failed: int = 0
    passwords_of: dict[str, set[str]] = field(default_factory=dict)
    """user -> fingerprints that failed for it."""
    users_of: dict[str, set[str]] = field(default_factory=dict)
    """fingerprint -> users it failed for."""
    succeeded: dict[str, None] = field(default_factory=dict)
    flows: list[FlowRef] = field(default_factory=list)
    flow_count: int = 0


class ReportBuilder:
    """Collects what the report shows, flow by flow; `report` gives it at any moment."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        self.flows = 0
        self.imap_flows = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self._servers: dict[str, _Server] = {}
        self._clients: dict[str, _Client] = {}
        self._servers_more = 0
        self._clients_more = 0
        self._finding_flows: dict[Finding, list[FlowRef]] = {}
        self._finding_counts: Counter[Finding] = Counter()
        self._sources: dict[str, _Attempts] = {}

    def copy_counts(self) -> ReportBuilder:
        """A builder that starts where this one is (the TUI adds its open flows to a copy)."""
        import copy

        return copy.deepcopy(self)

    def report_with(self, more: Iterable[tuple[FlowFacts, SessionAudit | None]]) -> Report:
        """The report as if the flows of ``more`` (facts and audit each) were counted too; this
        builder stays as it is (the TUI's summary counts the open flows in this way)."""
        builder = self
        for facts, audit in more:
            if builder is self:
                builder = self.copy_counts()
            builder.add(facts, audit)
        return builder.report()

    def add(self, facts: FlowFacts, audit: SessionAudit | None = None) -> None:
        """Count one flow; ``audit`` is its session's (for the capabilities offered before login)."""
        self.flows += 1
        if self.first_ts is None or facts.first_ts < self.first_ts:
            self.first_ts = facts.first_ts
        if self.last_ts is None or facts.last_ts > self.last_ts:
            self.last_ts = facts.last_ts
        if not facts.imap:
            return
        self.imap_flows += 1
        ref = FlowRef(facts.flow, facts.client, facts.server, facts.username)
        for name in facts.findings:
            finding = Finding(name)
            self._finding_counts[finding] += 1
            kept = self._finding_flows.setdefault(finding, [])
            if len(kept) < MAX_FLOWS_PER_FINDING:
                kept.append(ref)
        self._add_server(facts, audit)
        self._add_client(facts, audit)
        self._add_attempts(facts, ref)

    def _add_server(self, facts: FlowFacts, audit: SessionAudit | None) -> None:
        row = self._servers.get(facts.server)
        if row is None:
            if len(self._servers) >= MAX_SERVERS:
                self._servers_more += 1
                return
            row = self._servers[facts.server] = _Server()
        row.sessions += 1
        software = facts.server_software
        if software and (software in row.software or len(row.software) < MAX_SOFTWARE_PER_CLIENT):
            row.software[software] += 1
        if audit is not None:
            for name in audit.offered:
                if len(row.offered) < MAX_MECHANISMS_PER_ROW or name in row.offered:
                    row.offered[name] = None
        if facts.starttls == "completed":
            row.starttls_used += 1
        if facts.cleartext_credentials:
            row.cleartext_logins += 1
        if facts.login_ok:
            row.logins_ok += 1
        row.failed_logins += facts.login_failures

    def _add_client(self, facts: FlowFacts, audit: SessionAudit | None) -> None:
        key = address(facts.client)
        row = self._clients.get(key)
        if row is None:
            if len(self._clients) >= MAX_CLIENTS:
                self._clients_more += 1
                return
            row = self._clients[key] = _Client()
        row.sessions += 1
        users = {a.user for a in facts.login_attempts if a.user}
        if facts.username:
            users.add(facts.username)
        for user in sorted(users):
            if user in row.users:
                continue
            if len(row.users) < MAX_USERS_PER_ROW:
                row.users[user] = None
            else:
                row.users_more += 1
        if facts.auth_mechanism and (facts.auth_mechanism in row.mechanisms
                                     or len(row.mechanisms) < MAX_MECHANISMS_PER_ROW):
            label = facts.auth_mechanism if facts.auth_command != "AUTHENTICATE" else f"AUTH={facts.auth_mechanism}"
            row.mechanisms[label] = None
        if facts.starttls in ("completed", "requested"):
            row.starttls_used += 1
        elif facts.starttls == "offered":
            row.starttls_unused += 1
        elif facts.starttls == "refused":
            row.starttls_refused += 1
        if facts.cleartext_credentials:
            row.cleartext_logins += 1
        row.failed_logins += facts.login_failures
        guess = facts.client_software
        if guess is not None:
            soft = (guess.name, guess.version, guess.basis)
            seen = row.software.get(soft)
            if seen is not None:
                seen[0] += 1
                seen[1] = max(seen[1], guess.confidence)
            elif len(row.software) < MAX_SOFTWARE_PER_CLIENT:
                row.software[soft] = [1, guess.confidence]
        if audit is not None and audit.tags and len(row.tag_styles) < MAX_SOFTWARE_PER_CLIENT:
            from imaptap.clients import tag_style

            row.tag_styles[tag_style(audit.tags[0])] = None

    def _add_attempts(self, facts: FlowFacts, ref: FlowRef) -> None:
        if not facts.login_attempts:
            return
        key = address(facts.client)
        src = self._sources.get(key)
        failed = [a for a in facts.login_attempts if a.ok is False]
        if src is None:
            if not failed or len(self._sources) >= MAX_TRACKED_SOURCES:
                return  # sources that never failed are no attack
            src = self._sources[key] = _Attempts()
        src.attempts += len(facts.login_attempts) + facts.login_attempts_dropped
        src.failed += len(failed)
        src.flow_count += 1
        if len(src.flows) < MAX_FLOWS_PER_FINDING:
            src.flows.append(ref)
        for attempt in facts.login_attempts:
            user, fingerprint = attempt.user, attempt.password_hmac
            if attempt.ok and user and (src.passwords_of.get(user) or src.failed):
                if len(src.succeeded) < MAX_USERS_PER_ROW:
                    src.succeeded[user] = None
            if attempt.ok is not False or user is None or fingerprint is None:
                continue
            passwords = src.passwords_of.get(user)
            if passwords is None:
                if len(src.passwords_of) >= MAX_TRACKED_USERS:
                    continue
                passwords = src.passwords_of[user] = set()
            if len(passwords) < MAX_TRACKED_PER_KEY:
                passwords.add(fingerprint)
            users = src.users_of.get(fingerprint)
            if users is None:
                if len(src.users_of) >= MAX_TRACKED_USERS:
                    continue
                users = src.users_of[fingerprint] = set()
            if len(users) < MAX_TRACKED_PER_KEY:
                users.add(user)

    # --- the report -----------------------------------------------------------------------------

    def report(self) -> Report:
        """Everything counted so far, ranked and frozen."""
        attacks = tuple(row for key, src in self._sources.items() if (row := _attack_row(key, src)).kinds)
        counts = Counter(self._finding_counts)
        flows = {k: list(v) for k, v in self._finding_flows.items()}
        sources: dict[Finding, list[str]] = {}
        for row in attacks:
            src = self._sources[row.source]
            for kind in row.kinds:
                counts[kind] += src.flow_count
                sources.setdefault(kind, []).append(row.source)
                kept = flows.setdefault(kind, [])
                kept.extend(src.flows[: MAX_FLOWS_PER_FINDING - len(kept)])
        order = {f: i for i, f in enumerate(FINDINGS)}
        findings = sorted(counts, key=lambda f: (-FINDINGS[f].severity, -counts[f], order[f]))
        return Report(
            source=self.source,
            flows=self.flows,
            imap_flows=self.imap_flows,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
            findings=tuple(FindingRow(f, FINDINGS[f].severity, FINDINGS[f].summary, counts[f], tuple(flows.get(f, ())),
                                      tuple(sources.get(f, ()))) for f in findings),
            servers=tuple(_server_row(k, s) for k, s in sorted(self._servers.items(), key=_by_sessions)),
            clients=tuple(_client_row(k, c) for k, c in sorted(self._clients.items(), key=_by_sessions)),
            attacks=tuple(sorted(attacks, key=lambda r: (-r.failed, r.source))),
            servers_more=self._servers_more,
            clients_more=self._clients_more,
        )


def _by_sessions(item: tuple[str, _Server | _Client]) -> tuple[int, str]:
    return (-item[1].sessions, item[0])


def _server_row(key: str, s: _Server) -> ServerRow:
    software = s.software.most_common(1)[0][0] if s.software else None
    return ServerRow(key, software, tuple(s.offered), s.sessions, s.starttls_used, s.cleartext_logins, s.logins_ok,
                     s.failed_logins)


def _client_row(key: str, c: _Client) -> ClientRow:
    software = sorted(((name, version, round(conf, 2), basis, n) for (name, version, basis), (n, conf)
                       in c.software.items()), key=lambda t: (-t[4], -t[2], t[0]))
    return ClientRow(key, c.sessions, tuple(c.users), c.users_more, tuple(c.mechanisms), c.starttls_used,
                     c.starttls_unused, c.starttls_refused, c.cleartext_logins, c.failed_logins, tuple(software),
                     tuple(c.tag_styles))


def _attack_row(key: str, src: _Attempts) -> AttackRow:
    users = len(src.passwords_of)
    passwords = len(src.users_of)
    top_user, top_user_n = max(((u, len(p)) for u, p in src.passwords_of.items()), key=lambda t: (t[1], t[0]),
                               default=(None, 0))
    top_pw, top_pw_n = max(((p, len(u)) for p, u in src.users_of.items()), key=lambda t: (t[1], t[0]),
                           default=(None, 0))
    kinds = []
    if top_user_n >= BRUTE_FORCE_PASSWORDS:
        kinds.append(Finding.BRUTE_FORCE)
    if top_pw_n >= SPRAYING_USERS:
        kinds.append(Finding.PASSWORD_SPRAYING)
    if users >= STUFFING_USERS:
        pairs = sum(len(p) for p in src.passwords_of.values())
        own = sum(1 for p in src.passwords_of.values() if any(len(src.users_of.get(fp, ())) == 1 for fp in p))
        if pairs / users <= STUFFING_MAX_PASSWORDS_PER_USER and own / users >= STUFFING_MIN_OWN_PASSWORD_SHARE:
            kinds.append(Finding.CREDENTIAL_STUFFING)
    return AttackRow(key, tuple(kinds), src.attempts, src.failed, users, passwords, top_user, top_user_n, top_pw,
                     top_pw_n, tuple(src.succeeded))


#: Findings of a source, which only `ReportBuilder.report` knows.
SOURCE_FINDINGS = frozenset(f for f, info in FINDINGS.items() if info.scope is Scope.SOURCE)
