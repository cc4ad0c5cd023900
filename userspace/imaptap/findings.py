"""The findings imaptap reports, each with its severity and what it means: a contract.

A flow record's ``findings`` lists the names of `Scope.FLOW` (README, "JSON Lines"); the audit
report (``--report``) adds the `Scope.SOURCE` ones, which only a set of flows from one client
address shows (password attacks); ``--fail-on`` takes any of them, or ``any``.  Declared here
once: the session, the report, the gate and the TUI read this table.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class Severity(enum.IntEnum):
    """How bad a finding is; the report ranks by it, highest first."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Scope(enum.Enum):
    """Where a finding is seen: in one flow, or only across the flows of one client address."""

    FLOW = "flow"
    SOURCE = "source"


class Finding(enum.StrEnum):
    """A finding's name, as the JSON, the report and ``--fail-on`` spell it."""

    CLEARTEXT_CREDENTIALS = "cleartext_credentials"
    STARTTLS_OFFERED_NOT_USED = "starttls_offered_not_used"
    STARTTLS_REFUSED = "starttls_refused"
    FAILED_LOGINS = "failed_logins"
    LOGIN_DESPITE_LOGINDISABLED = "login_despite_logindisabled"
    AUTH_PLAIN_BEFORE_STARTTLS = "auth_plain_before_starttls"
    COMMANDS_AFTER_STARTTLS = "commands_after_starttls"
    BRUTE_FORCE = "brute_force"
    PASSWORD_SPRAYING = "password_spraying"
    CREDENTIAL_STUFFING = "credential_stuffing"


class FindingInfo(NamedTuple):
    """What the report says about a finding."""

    severity: Severity
    scope: Scope
    summary: str
    """One line for a person: what happened."""


FINDINGS: dict[Finding, FindingInfo] = {
    Finding.COMMANDS_AFTER_STARTTLS: FindingInfo(
        Severity.HIGH, Scope.FLOW,
        "commands sent in clear behind STARTTLS, before TLS began (plaintext injection, CVE-2011-0411 class)"),
    Finding.BRUTE_FORCE: FindingInfo(
        Severity.HIGH, Scope.SOURCE, "many passwords tried against one user from one address"),
    Finding.PASSWORD_SPRAYING: FindingInfo(
        Severity.HIGH, Scope.SOURCE, "one password tried against many users from one address"),
    Finding.CREDENTIAL_STUFFING: FindingInfo(
        Severity.HIGH, Scope.SOURCE,
        "many users tried from one address, each with its own password, mostly failing (a leaked list)"),
    Finding.LOGIN_DESPITE_LOGINDISABLED: FindingInfo(
        Severity.HIGH, Scope.FLOW, "the client sent a password in clear although the server announced LOGINDISABLED"),
    Finding.CLEARTEXT_CREDENTIALS: FindingInfo(
        Severity.HIGH, Scope.FLOW, "a password or SASL secret crossed the network readable"),
    Finding.AUTH_PLAIN_BEFORE_STARTTLS: FindingInfo(
        Severity.MEDIUM, Scope.FLOW,
        "the server offered AUTH=PLAIN or AUTH=LOGIN on a connection not encrypted (RFC 3501 6.2.3 says not to)"),
    Finding.STARTTLS_OFFERED_NOT_USED: FindingInfo(
        Severity.MEDIUM, Scope.FLOW, "the server offered STARTTLS and the client did not use it"),
    Finding.STARTTLS_REFUSED: FindingInfo(
        Severity.MEDIUM, Scope.FLOW, "the client asked for STARTTLS and the server refused it"),
    Finding.FAILED_LOGINS: FindingInfo(Severity.LOW, Scope.FLOW, "logins were refused"),
}
"""Every finding, in the order the report lists findings of equal severity and count."""

#: ``--fail-on any``: every finding.
ANY = "any"


def parse_finding_list(text: str) -> frozenset[Finding]:
    """The findings of a comma-separated list (``any`` for all); ValueError naming a bad one."""
    chosen: set[Finding] = set()
    for word in text.split(","):
        name = word.strip().lower()
        if not name:
            continue
        if name == ANY:
            chosen.update(Finding)
            continue
        try:
            chosen.add(Finding(name))
        except ValueError:
            known = ", ".join(f.value for f in Finding)
            raise ValueError(f"unknown finding {word.strip()!r} (known: {known}, {ANY})") from None
    if not chosen:
        raise ValueError("no finding named")
    return frozenset(chosen)
