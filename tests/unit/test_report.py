"""The report's numbers (report.py): per server, per client address, findings ranked, attacks by source."""

import pytest

from imaptap.findings import Finding, Severity
from imaptap.imap.audit import PasswordFingerprint
from imaptap.output.report import ReportSink
from imaptap.report import (
    BRUTE_FORCE_PASSWORDS,
    MAX_USERS_PER_ROW,
    SPRAYING_USERS,
    STUFFING_USERS,
    ReportBuilder,
    address,
)
from imaptap.testing import analyze, conversation

FP = PasswordFingerprint(bytes(range(32)))
GREETING = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN LOGINDISABLED] ready.\r\n"
NO = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def session(i, logins, client="10.0.0.5", server=("10.0.0.1", 143), extra=()):
    """One connection from ``client`` trying (user, password, ok) in turn."""
    parts = [("s", GREETING)]
    for n, (user, pw, ok) in enumerate(logins):
        parts += [("c", f"a{n} LOGIN {user} {pw}\r\n".encode()),
                  ("s", f"a{n} ".encode() + (b"OK in\r\n" if ok else NO))]
    parts += list(extra)
    return conversation(parts, client=(client, 40000 + i), server=server, ts=1_700_000_000.0 + i)


def report(*sessions):
    sink = ReportSink(ReportBuilder("test"))
    analyze([s for group in sessions for s in group], password_fingerprint=FP, sinks=[sink])
    return sink.report


def test_brute_force_and_the_login_after_it():
    tries = [("alice", f"Guess-{i}", False) for i in range(BRUTE_FORCE_PASSWORDS + 1)]
    r = report(*(session(i, tries[i * 2:i * 2 + 2]) for i in range(3)), session(9, [("alice", "Right", True)]))
    (attack,) = r.attacks
    assert attack.kinds == (Finding.BRUTE_FORCE,) and attack.source == "10.0.0.5"
    assert (attack.top_user, attack.top_user_passwords, attack.users) == ("alice", BRUTE_FORCE_PASSWORDS + 1, 1)
    assert attack.succeeded == ("alice",) and attack.failed == BRUTE_FORCE_PASSWORDS + 1
    row = r.finding(Finding.BRUTE_FORCE)
    assert row.sources == ("10.0.0.5",) and row.count == 4 and {f.flow for f in row.flows} == {1, 2, 3, 4}


def test_password_spraying():
    users = [f"user{i}" for i in range(SPRAYING_USERS)]
    r = report(*(session(i, [(u, "Spring-2026", False)]) for i, u in enumerate(users)))
    (attack,) = r.attacks
    assert attack.kinds == (Finding.PASSWORD_SPRAYING,)
    assert attack.top_password == FP(b"Spring-2026") and attack.top_password_users == SPRAYING_USERS


def test_credential_stuffing():
    r = report(*(session(i, [(f"user{i}", f"Leaked-{i}", False)]) for i in range(STUFFING_USERS)))
    (attack,) = r.attacks
    assert attack.kinds == (Finding.CREDENTIAL_STUFFING,) and attack.passwords == STUFFING_USERS


@pytest.mark.parametrize("case", ["webmail", "few", "two sources", "no key"])
def test_what_is_no_attack(case):
    n = STUFFING_USERS
    if case == "webmail":  # one address, many users, each its own password, all logged in
        sessions = [session(i, [(f"user{i}", f"Own-{i}", True)]) for i in range(n + 5)]
    elif case == "few":
        sessions = [session(i, [("alice", f"Guess-{i}", False)]) for i in range(BRUTE_FORCE_PASSWORDS - 1)]
    elif case == "two sources":  # a spray split over two addresses is two small ones
        sessions = [session(i, [(f"user{i}", "Spring", False)], client=f"10.0.0.{5 + i % 2}") for i in range(n + 1)]
    else:
        sink = ReportSink(ReportBuilder())
        analyze([s for i in range(n) for s in session(i, [(f"user{i}", "Same", False)])], sinks=[sink])
        assert sink.report.attacks == ()
        return
    assert report(*sessions).attacks == ()


def test_server_and_client_rows():
    r = report(session(1, [("alice", "pw", False), ("alice", "pw2", True)]),
               session(2, [("bob", "pw", True)], client="10.0.0.6"),
               session(3, [], client="10.0.0.6", server=("10.0.0.2", 143),
                       extra=[("c", b"t1 STARTTLS\r\n"), ("s", b"t1 OK go\r\n")]))
    (s1, s2) = r.servers
    assert (s1.server, s1.sessions, s1.cleartext_logins, s1.logins_ok, s1.failed_logins) == ("10.0.0.1:143", 2, 2, 2, 1)
    assert s1.offered == ("STARTTLS", "AUTH=PLAIN", "LOGINDISABLED") and s2.starttls_used == 1
    by = {c.client: c for c in r.clients}
    assert by["10.0.0.5"].users == ("alice",) and by["10.0.0.5"].failed_logins == 1
    six = by["10.0.0.6"]
    assert (six.sessions, six.starttls_used, six.starttls_unused, six.users) == (2, 1, 1, ("bob",))
    assert r.flows == r.imap_flows == 3


def test_findings_are_ranked_by_severity_then_flows():
    r = report(session(1, [("alice", "pw", False)]), session(2, [("bob", "pw", False)]))
    severities = [row.severity for row in r.findings]
    assert severities == sorted(severities, reverse=True)
    assert r.findings[0].severity is Severity.HIGH
    names = [row.finding for row in r.findings]
    assert names.index(Finding.LOGIN_DESPITE_LOGINDISABLED) < names.index(Finding.FAILED_LOGINS)


def test_users_per_row_are_bounded():
    r = report(*(session(i, [(f"u{i}", "pw", True)]) for i in range(MAX_USERS_PER_ROW + 3)))
    (row,) = r.clients
    assert len(row.users) == MAX_USERS_PER_ROW and row.users_more == 3


def test_address():
    assert address("10.0.0.1:143") == "10.0.0.1" and address("[fd00::1]:143") == "fd00::1"
