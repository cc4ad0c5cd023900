"""The auditor's facts of a session (imap/audit.py): LOGINDISABLED, AUTH=PLAIN in clear, commands
behind STARTTLS, login attempts with password fingerprints, and the client's habits."""

import base64
import json
import re

import pytest

from imaptap.findings import Finding
from imaptap.imap.audit import FINGERPRINT_HEX, MAX_ATTEMPTS, MAX_HABIT_TAGS, PasswordFingerprint, SessionAudit
from imaptap.pipeline import Sink
from imaptap.testing import analyze, conversation

KEY = bytes(range(32))
FP = PasswordFingerprint(KEY)
OPEN = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN AUTH=LOGIN] ready.\r\n"
STRICT = b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=CRAM-MD5] ready.\r\n"
NO = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def run(parts, fingerprint=FP, **kw):
    return analyze(conversation(parts, **kw), password_fingerprint=fingerprint)


def test_a_login_despite_logindisabled():
    f = run([("s", STRICT), ("c", b"a1 LOGIN alice Alice-Pw-7391\r\n"),
             ("s", b"a1 NO [PRIVACYREQUIRED] Plaintext authentication disallowed.\r\n")]).flow
    assert "login_despite_logindisabled" in f["findings"] and f["cleartext_credentials"]
    assert "auth_plain_before_starttls" not in f["findings"]  # this server offers only CRAM-MD5 in clear


def test_authenticate_plain_despite_logindisabled_counts_too():
    ir = base64.b64encode(b"\0alice\0Alice-Pw-7391")
    f = run([("s", STRICT), ("c", b"a1 AUTHENTICATE PLAIN " + ir + b"\r\n"), ("s", b"a1 " + NO)]).flow
    assert "login_despite_logindisabled" in f["findings"]


@pytest.mark.parametrize("parts", [
    # STARTTLS as the server asks: no password in clear
    [("s", STRICT), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK Begin TLS negotiation now.\r\n"),
     ("c", b"\x16\x03\x01\x00\x30" + bytes(48))],
    # CRAM-MD5 sends no password
    [("s", STRICT), ("c", b"a1 AUTHENTICATE CRAM-MD5\r\n"), ("s", b"+ PDEyMzQ+\r\n"),
     ("c", base64.b64encode(b"alice 0123456789abcdef0123456789abcdef") + b"\r\n"), ("s", b"a1 OK in\r\n")],
    # a server that never announced LOGINDISABLED
    [("s", OPEN), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n")],
])
def test_no_login_despite_logindisabled(parts):
    assert "login_despite_logindisabled" not in run(parts).flow["findings"]


def test_auth_plain_offered_in_clear_is_the_servers_finding():
    assert "auth_plain_before_starttls" in run([("s", OPEN), ("c", b"a1 LOGOUT\r\n")]).flow["findings"]
    later = run([("s", b"* OK ready.\r\n"), ("c", b"a1 CAPABILITY\r\n"),
                 ("s", b"* CAPABILITY IMAP4rev1 AUTH=LOGIN\r\na1 OK done\r\n")]).flow
    assert "auth_plain_before_starttls" in later["findings"]
    assert "auth_plain_before_starttls" not in run([("s", STRICT), ("c", b"a1 LOGOUT\r\n")]).flow["findings"]


def test_commands_pipelined_behind_starttls():
    f = run([("s", OPEN), ("c", b"a1 STARTTLS\r\na2 LOGIN mallory Injected-Pw-1\r\n"),
             ("s", b"a1 OK Begin TLS negotiation now.\r\n")]).flow
    assert "commands_after_starttls" in f["findings"]
    assert "Injected-Pw-1" not in json.dumps(f)


def test_a_command_sent_before_the_answer_in_its_own_segment_counts_too():
    f = run([("s", OPEN), ("c", b"a1 STARTTLS\r\n"), ("c", b"a2 NOOP\r\n"), ("s", b"a1 OK go\r\n")]).flow
    assert "commands_after_starttls" in f["findings"]


@pytest.mark.parametrize("parts", [
    [("s", OPEN), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK go\r\n"), ("c", b"\x16\x03\x01\x00\x30" + bytes(48))],
    [("s", OPEN), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 BAD not now\r\n"), ("c", b"a2 NOOP\r\n"),
     ("s", b"a2 OK done\r\n")],
])
def test_no_commands_behind_starttls(parts):
    assert "commands_after_starttls" not in run(parts).flow["findings"]


def test_login_attempts_with_outcomes_and_fingerprints():
    f = run([("s", OPEN), ("c", b'a1 LOGIN alice "Wrong-1"\r\n'), ("s", b"a1 " + NO),
             ("c", b"a2 LOGIN alice {7}\r\n"), ("s", b"+ go\r\n"), ("c", b"Wrong-2\r\n"), ("s", b"a2 " + NO),
             ("c", b"a3 LOGIN alice Right-3\r\n"), ("s", b"a3 OK in\r\n")]).flow
    attempts = f["login_attempts"]
    assert [(a["user"], a["ok"]) for a in attempts] == [("alice", False), ("alice", False), ("alice", True)]
    assert [a["password_hmac"] for a in attempts] == [FP(b"Wrong-1"), FP(b"Wrong-2"), FP(b"Right-3")]
    assert all(re.fullmatch(f"[0-9a-f]{{{FINGERPRINT_HEX}}}", a["password_hmac"]) for a in attempts)
    text = json.dumps(f)
    assert "Wrong-1" not in text and "Wrong-2" not in text and "Right-3" not in text


def test_the_same_password_has_the_same_fingerprint_whatever_carries_it():
    pw = b'Pw "q" 1'
    login = run([("s", OPEN), ("c", b'a1 LOGIN bob "Pw \\"q\\" 1"\r\n'), ("s", b"a1 " + NO)]).flow
    plain = run([("s", OPEN), ("c", b"a1 AUTHENTICATE PLAIN " + base64.b64encode(b"\0bob\0" + pw) + b"\r\n"),
                 ("s", b"a1 " + NO)]).flow
    sasl_login = run([("s", OPEN), ("c", b"a1 AUTHENTICATE LOGIN\r\n"), ("s", b"+ VXNlcm5hbWU6\r\n"),
                      ("c", base64.b64encode(b"bob") + b"\r\n"), ("s", b"+ UGFzc3dvcmQ6\r\n"),
                      ("c", base64.b64encode(pw) + b"\r\n"), ("s", b"a1 " + NO)]).flow
    got = [f["login_attempts"][0] for f in (login, plain, sasl_login)]
    assert {a["password_hmac"] for a in got} == {FP(pw)}
    assert [(a["command"], a["mechanism"], a["user"]) for a in got] == [
        ("LOGIN", "LOGIN", "bob"), ("AUTHENTICATE", "PLAIN", "bob"), ("AUTHENTICATE", "LOGIN", "bob")]


def test_another_key_gives_other_fingerprints_and_no_key_none():
    parts = [("s", OPEN), ("c", b"a1 LOGIN alice Same-Pw\r\n"), ("s", b"a1 " + NO)]
    other = PasswordFingerprint(bytes(32))
    a = run(parts).flow["login_attempts"][0]["password_hmac"]
    b = run(parts, fingerprint=other).flow["login_attempts"][0]["password_hmac"]
    assert a != b
    assert run(parts, fingerprint=None).flow["login_attempts"][0]["password_hmac"] is None


def test_a_short_key_is_refused_and_the_key_never_shows():
    with pytest.raises(ValueError):
        PasswordFingerprint(b"short")
    assert KEY.hex() not in repr(FP) and str(KEY) not in repr(FP)


def test_attempts_are_bounded():
    parts = [("s", OPEN)]
    for i in range(MAX_ATTEMPTS + 8):
        parts += [("c", f"a{i} LOGIN u{i} pw{i}\r\n".encode()), ("s", f"a{i} ".encode() + NO)]
    f = run(parts).flow
    assert len(f["login_attempts"]) == MAX_ATTEMPTS and f["login_attempts_dropped"] == 8
    assert f["login_failures"] == MAX_ATTEMPTS + 8


def test_a_lost_login_completion_still_gives_the_attempt_an_outcome():
    f = run([("s", OPEN), ("c", b"a1 LOGIN alice x1\r\n"), ("c", b"a2 LOGIN alice x2\r\n"),
             ("s", b"a2 OK in\r\n")]).flow
    assert [a["ok"] for a in f["login_attempts"]] == [False, True]


def test_habits():
    audit = SessionAudit()
    for i, name in enumerate(["CAPABILITY", "LOGIN", "SELECT", "FETCH", "LOGOUT"]):
        audit.command(f"DOML{i}", name, False)
    assert audit.tags == ["DOML0", "DOML1", "DOML2", "DOML3"][:MAX_HABIT_TAGS]
    assert audit.opening[:2] == ["CAPABILITY", "LOGIN"]
    kept = Audits()
    analyze(conversation([("s", OPEN), ("c", b"A0001 AUTHENTICATE PLAIN AGEAYg==\r\n"), ("s", b"A0001 NO no\r\n"),
                          ("c", b'A0002 LOGIN "alice" {2+}\r\npw\r\n'), ("s", b"A0002 OK in\r\n"),
                          ("c", b'A0003 SELECT "INBOX"\r\n'), ("s", b"A0003 OK done\r\n")]),
            sinks=[kept])
    (audit,) = kept.audits
    assert audit.login_forms == ("quoted", "literal+") and audit.mailbox_form == "quoted"
    assert audit.sasl_ir is True and audit.opening == ["AUTHENTICATE", "LOGIN", "SELECT"]


class Audits(Sink):
    """Keeps the audit of every flow that ended."""

    def __init__(self):
        self.audits = []

    def flow_ended(self, flow, facts):
        self.audits.append(flow.session.audit)


def test_the_findings_are_finding_names():
    f = run([("s", STRICT), ("c", b"a1 STARTTLS\r\na2 LOGIN alice pw\r\n"), ("s", b"a1 OK go\r\n")]).flow
    assert all(Finding(name) for name in f["findings"])
    assert f["findings"][-2:] == ["login_despite_logindisabled", "commands_after_starttls"]


def test_what_is_offered_after_a_login_is_not_an_offer_before_one():
    kept = Audits()
    analyze(conversation([("s", b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] ready.\r\n"),
                          ("c", b"a1 LOGIN alice pw\r\n"),
                          ("s", b"a1 OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=GSSAPI] in\r\n")]), sinks=[kept])
    (audit,) = kept.audits
    assert audit.offered == ["STARTTLS", "AUTH=PLAIN"] and not audit.logindisabled
