"""imaptap_lab.capture_check: the capture reader and reassembler of make-captures, independent of
imaptap's, on the committed captures and on connections built here."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import zlib
from pathlib import Path

import pytest

from imaptap_lab import capture_check as cc
from imaptap_lab.capture_facts import Outcome
from imaptap_lab.lab import LAB_PORTS
from imaptap_lab.make_flood import PcapWriter, Session, write_flood
from testenv import OWN_PCAPS

with open(os.path.join(OWN_PCAPS, "facts.json")) as _f:
    FACTS = json.load(_f)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_every_committed_capture_shows_its_committed_facts(name):
    entry = FACTS[name]
    outcome = Outcome(entry["flows"], list(entry["secrets"]), entry["decoys"])
    cc.check_capture(Path(OWN_PCAPS, name), outcome, set(LAB_PORTS) | set(entry["ports"]))


def test_every_committed_capture_has_facts():
    assert {os.path.basename(p) for p in glob.glob(os.path.join(OWN_PCAPS, "*.pcap"))} == set(FACTS)


@pytest.mark.parametrize(("key", "wrong"), [("username", "mallory"), ("commands", ["LOGIN"]),
                                            ("starttls", "completed"), ("login_failures", 3)])
def test_a_wrong_fact_stops_the_check(key, wrong):
    entry = FACTS["failed-login.pcap"]
    flows = [dict(f) for f in entry["flows"]]
    flows[0][key] = wrong
    with pytest.raises(RuntimeError, match=f"flow 0: {key} is"):
        cc.check_capture(Path(OWN_PCAPS, "failed-login.pcap"), Outcome(flows, list(entry["secrets"])),
                         set(LAB_PORTS))


def test_a_missing_connection_stops_the_check():
    entry = FACTS["failed-login.pcap"]
    with pytest.raises(RuntimeError, match="2 connections, facts list 1"):
        cc.check_capture(Path(OWN_PCAPS, "failed-login.pcap"), Outcome(entry["flows"][:1], entry["secrets"]),
                         set(LAB_PORTS))


def test_a_decoy_that_is_not_in_the_capture_stops_the_check():
    entry = FACTS["login-atom.pcap"]
    with pytest.raises(RuntimeError, match="decoy 'not-there'"):
        cc.check_capture(Path(OWN_PCAPS, "login-atom.pcap"),
                         Outcome(entry["flows"], entry["secrets"], decoys=["not-there"]), set(LAB_PORTS))


def write_sessions(tmp_path, build) -> str:
    """A pcap written by make_flood's writer, with the sessions ``build(writer)`` makes."""
    buf = io.BytesIO()
    build(PcapWriter(buf))
    path = tmp_path / "s.pcap"
    path.write_bytes(buf.getvalue())
    return path


def test_connections_are_read_in_syn_order_with_their_payloads(tmp_path):
    def build(w):
        a = Session(w, bytes([192, 0, 2, 1]), 40001).open()
        b = Session(w, bytes([192, 0, 2, 2]), 40002).open()
        a.say("s", b"* OK ready\r\n")
        b.say("s", b"* OK ready\r\n").say("c", b"b1 LOGOUT\r\n")
        a.say("c", b"a1 LOGIN alice secret\r\n").say("s", b"a1 OK\r\n").close()
        b.close()

    conns = cc.read_connections(write_sessions(tmp_path, build), {143})
    assert [c.client for c in conns] == [("192.0.2.1", 40001), ("192.0.2.2", 40002)]
    assert conns[0].server == ("192.0.2.20", 143)
    assert conns[0].family == "ipv4"
    assert conns[0].chunks == [(False, b"* OK ready\r\n"), (True, b"a1 LOGIN alice secret\r\n"), (False, b"a1 OK\r\n")]
    assert conns[1].chunks == [(False, b"* OK ready\r\n"), (True, b"b1 LOGOUT\r\n")]


def test_a_connection_whose_syn_is_not_in_the_capture_is_left_out(tmp_path):
    def build(w):
        s = Session(w, bytes([192, 0, 2, 1]), 40001)   # never opened: data only
        s.say("c", b"a1 NOOP\r\n")

    assert cc.read_connections(write_sessions(tmp_path, build), {143}) == []


def test_a_retransmission_is_trimmed(tmp_path):
    def build(w):
        s = Session(w, bytes([192, 0, 2, 1]), 40001).open()
        s.say("c", b"a1 NOOP\r\n")
        s.seq["c"] -= 4               # the last 4 bytes again, then new ones
        s.say("c", b"OP\r\na2 NOOP\r\n")

    (conn,) = cc.read_connections(write_sessions(tmp_path, build), {143})
    assert b"".join(p for side, p in conn.chunks if side) == b"a1 NOOP\r\na2 NOOP\r\n"


def test_the_sessions_flood_reads_back_as_that_many_logins(tmp_path):
    path = tmp_path / "sessions.pcap"
    with open(path, "wb") as f:
        write_flood("sessions", f, 5)
    conns = cc.read_connections(path, {143})
    assert len(conns) == 5
    for conn in conns:
        facts = cc.Observer(conn).facts
        assert (facts["username"], facts["login_ok"], facts["commands"]) == ("alice", True, ["LOGIN"])


def connection(*chunks: tuple[bool, bytes]) -> cc.Connection:
    return cc.Connection(("10.0.0.1", 40000), ("10.0.0.2", 143), "ipv4", chunks=list(chunks))


GREETING = (False, b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n")


def test_the_observer_reads_literals_and_is_not_fooled_by_their_contents():
    seen = cc.Observer(connection(
        GREETING,
        (True, b"a1 LOGIN {5}\r\n"), (False, b"+ OK\r\n"), (True, b"alice {6}\r\n"), (False, b"+ OK\r\n"),
        (True, b"secret\r\n"), (False, b"a1 OK Logged in\r\n"),
        (True, b"a2 APPEND INBOX {23+}\r\na9 LOGIN mallory evil\r\n\r\n"), (False, b"a2 OK\r\n"),
        (True, b'a3 SELECT "Sent Items"\r\n'), (False, b"a3 OK\r\n")))
    f = seen.facts
    assert f["username"] == "alice"
    assert f["commands"] == ["LOGIN", "APPEND", "SELECT"]
    assert f["mailboxes_wire"] == ["Sent Items"]
    assert (f["login_ok"], f["login_failures"], f["cleartext_credentials"]) == (True, 0, True)
    assert f["starttls"] == "offered"
    assert f["server_software"] == "Dovecot"


def test_the_observer_decodes_sasl_plain_and_counts_failures():
    wrong, right = base64.b64encode(b"\0carol\0wrong"), base64.b64encode(b"\0carol\0Carol-Pw-5520")
    seen = cc.Observer(connection(
        GREETING, (True, b"p1 AUTHENTICATE PLAIN\r\n"), (False, b"+ \r\n"), (True, wrong + b"\r\n"),
        (False, b"p1 NO [AUTHENTICATIONFAILED] failed\r\n"), (True, b"p2 AUTHENTICATE PLAIN " + right + b"\r\n"),
        (False, b"p2 OK\r\n"),
        (True, b"p3 UID FETCH 1 (FLAGS)\r\n"), (False, b"p3 OK\r\n")))
    f = seen.facts
    assert (f["username"], f["auth_command"], f["auth_mechanism"]) == ("carol", "AUTHENTICATE", "PLAIN")
    assert (f["login_ok"], f["login_failures"]) == (True, 1)
    assert f["commands"] == ["AUTHENTICATE", "AUTHENTICATE", "UID FETCH"]


def test_the_observer_stops_at_a_completed_starttls():
    seen = cc.Observer(connection(
        GREETING, (True, b"t1 STARTTLS\r\n"), (False, b"t1 OK Begin TLS\r\n"),
        (True, b"\x16\x03\x01 not IMAP\r\nt2 LOGIN alice pw\r\n")))
    f = seen.facts
    assert (f["starttls"], f["username"], f["commands"]) == ("completed", None, ["STARTTLS"])


def test_the_observer_inflates_after_compress():
    client, server = zlib.compressobj(wbits=-zlib.MAX_WBITS), zlib.compressobj(wbits=-zlib.MAX_WBITS)

    def deflate(z, data: bytes) -> bytes:
        return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)

    seen = cc.Observer(connection(
        GREETING, (True, b"c1 LOGIN dave pw\r\n"), (False, b"c1 OK\r\n"), (True, b"c2 COMPRESS DEFLATE\r\n"),
        (False, b"c2 OK Begin compression\r\n"), (True, deflate(client, b"c3 SELECT INBOX\r\n")),
        (False, deflate(server, b"* 5 EXISTS\r\nc3 OK\r\n")), (True, deflate(client, b"c4 LOGOUT\r\n"))))
    f = seen.facts
    assert f["compressed"] is True
    assert f["commands"] == ["LOGIN", "COMPRESS", "SELECT", "LOGOUT"]
    assert f["mailboxes_wire"] == ["INBOX"]
    assert b"c3 SELECT INBOX" in seen.cleartext


def test_the_observer_takes_id_parameters_from_both_sides():
    seen = cc.Observer(connection(
        GREETING, (True, b'i1 ID ("name" "imaptap-lab" "version" "1.2")\r\n'),
        (False, b'* ID ("name" "Dovecot")\r\ni1 OK\r\n')))
    assert seen.facts["client_id"] == {"name": "imaptap-lab", "version": "1.2"}
    assert seen.facts["server_id"] == {"name": "Dovecot"}


def test_tokens_unescape_quoted_strings_and_keep_literals_whole():
    assert cc.tokens([b'"Bob Pw \\"quoted\\" 42" (a b) {3}', b"x y", b""]) == [
        b'Bob Pw "quoted" 42', "(", b"a", b"b", ")", b"x y", ]


def test_the_observer_follows_scram_and_keeps_its_secrets():
    b64 = base64.b64encode
    final, signature = b64(b"c=biws,r=abcdef,p=cHJvb2Y="), b64(b"v=c2lnbmF0dXJl")
    seen = cc.Observer(connection(
        GREETING, (True, b"s1 AUTHENTICATE SCRAM-SHA-1 " + b64(b"n,a=al=2Cice,n=al=3Dice,r=abc") + b"\r\n"),
        (False, b"+ " + b64(b"r=abcdef,s=c2FsdA==,i=4096") + b"\r\n"), (True, final + b"\r\n"),
        (False, b"+ " + signature + b"\r\n"), (True, b"\r\n"), (False, b"s1 OK Logged in\r\n")))
    f = seen.facts
    assert (f["username"], f["authzid"], f["auth_mechanism"], f["login_ok"]) == \
        ("al=ice", "al,ice", "SCRAM-SHA-1", True)
    assert f["cleartext_credentials"] is False and f["commands"] == ["AUTHENTICATE"]
    assert seen.sasl_secrets == [final.decode(), signature.decode()]


def test_the_observer_does_not_count_logins_sent_when_logged_in():
    seen = cc.Observer(connection(
        GREETING, (True, b"w1 LOGIN carol pw\r\n"), (False, b"w1 OK in\r\n"), (True, b"w2 LOGIN mallory x\r\n"),
        (False, b"w2 BAD Error in IMAP command LOGIN: Unknown command\r\n"),
        (True, b"w3 AUTHENTICATE PLAIN " + base64.b64encode(b"\0eve\0y") + b"\r\n"), (False, b"w3 BAD Unknown\r\n")))
    f = seen.facts
    assert (f["username"], f["auth_command"], f["login_ok"], f["login_failures"]) == ("carol", "LOGIN", True, 0)
    assert f["commands"] == ["LOGIN", "LOGIN", "AUTHENTICATE"]


def test_the_observer_decides_what_is_imap():
    assert cc.Observer(connection(GREETING)).facts["imap"] is True
    http = connection((True, b"GET / HTTP/1.1\r\n\r\n"), (False, b"HTTP/1.0 200 OK\r\n\r\n"))
    assert cc.Observer(http).facts["imap"] is False
    assert cc.Observer(connection((True, b"a1 LOGIN x y\r\n"))).facts["imap"] is True  # the client alone
    assert cc.Observer(connection((True, b"hello\r\n"))).facts["imap"] is False
    one_sided = cc.Observer(connection((True, b"a1 NOOP\r\n")))
    assert (one_sided.facts["server_software"], one_sided.facts["starttls"]) == (None, "none")
