"""Whole conversations through the flow table and session, checked fact by fact."""

import base64
import hashlib
import json
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN
from imaptap.testing import analyze, conversation

GREETING = (b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
            b" AUTH=PLAIN AUTH=LOGIN] Dovecot (Debian) ready.\r\n")


def run(parts, snaplen=256, taillen=128, handshake_snaplen=DEFAULT_HANDSHAKE_SNAPLEN, **kw):
    return analyze(conversation(parts, **kw), snaplen=snaplen, taillen=taillen, handshake_snaplen=handshake_snaplen)


def everything(result) -> str:
    return json.dumps(result.flows) + json.dumps(result.messages)


def test_login_atom_session_facts():
    r = run([
        ("s", GREETING),
        ("c", b"a1 LOGIN alice Alice-Pw-7391\r\n"),
        ("s", b"a1 OK [CAPABILITY IMAP4rev1 IDLE COMPRESS=DEFLATE] Logged in\r\n"),
        ("c", b"a2 SELECT INBOX\r\n"),
        ("s", b"* 2 EXISTS\r\n* 0 RECENT\r\na2 OK [READ-WRITE] Select completed (0.001 + 0.000 secs).\r\n"),
        ("c", b"a3 LOGOUT\r\n"),
        ("s", b"* BYE Logging out\r\na3 OK Logout completed.\r\n"),
    ])
    f = r.flow
    assert f["imap"] is True
    assert f["server_software"] == "Dovecot"
    assert f["username"] == "alice" and f["login_ok"] is True and f["login_failures"] == 0
    assert f["auth_mechanism"] == "LOGIN" and f["auth_command"] == "LOGIN"
    assert f["capabilities"] == ["IMAP4REV1", "IDLE", "COMPRESS=DEFLATE"]
    assert f["starttls"] == "offered"
    assert f["cleartext_credentials"] is True
    assert f["findings"] == ["cleartext_credentials", "starttls_offered_not_used", "auth_plain_before_starttls"]
    assert f["mailboxes"] == ["INBOX"]
    assert f["commands"] == {"LOGIN": 1, "SELECT": 1, "LOGOUT": 1}
    assert f["statuses"] == {"OK": 4, "BYE": 1}
    assert f["end"] == "fin" and f["client"] == "192.0.2.10:40000" and f["server"] == "192.0.2.20:143"
    assert "Alice-Pw-7391" not in everything(r)
    login = [m for m in r.messages if m["command"] == "LOGIN" and m["kind"] == "request"][0]
    assert login["args"] == "alice ***" and login["tag"] == "a1" and login["from"] == "client"
    done = [m for m in r.messages if m["kind"] == "response" and m["tag"] == "a2"][0]
    assert done["command"] == "SELECT" and done["status"] == "OK" and done["code"] == "READ-WRITE"
    assert done["latency_ms"] == pytest.approx(1.0, abs=0.01)
    exists = [m for m in r.messages if m["command"] == "EXISTS"][0]
    assert exists["number"] == 2 and exists["kind"] == "untagged"


def test_quoted_login_strips_quotes_and_escapes():
    r = run([("s", GREETING), ("c", b'a1 LOGIN "bob \\"the\\" builder" "Bob Pw \\"q\\" 42"\r\n'),
             ("s", b"a1 OK ok\r\n")])
    assert r.flow["username"] == 'bob "the" builder'
    assert "Bob Pw" not in everything(r)


def test_literal_login_is_not_taken_for_a_username():
    r = run([
        ("s", GREETING),
        ("c", b"a1 LOGIN {5}\r\n"), ("s", b"+ OK\r\n"),
        ("c", b"carol {13}\r\n"), ("s", b"+ OK\r\n"),
        ("c", b"Carol-Pw-5520\r\n"), ("s", b"a1 OK Logged in\r\n"),
        ("c", b"a2 LOGIN {5+}\r\ndave! {3+}\r\nxyz\r\n"), ("s", b"a2 BAD already logged in\r\n"),
    ])
    f = r.flow
    assert f["username"] == "carol" and f["login_ok"] is True
    assert "{5}" not in json.dumps(f)
    assert "Carol-Pw-5520" not in everything(r) and "xyz" not in everything(r)
    req = [m for m in r.messages if m["command"] == "LOGIN" and m["kind"] == "request"]
    assert req[0]["literals"] == [5, 13] and req[0]["args"] == "carol ***"
    assert req[1]["args"] == '"dave!" ***'


def b64(s: bytes) -> bytes:
    return base64.b64encode(s)


def test_authenticate_plain_with_initial_response():
    r = run([("s", GREETING), ("c", b"A001 AUTHENTICATE PLAIN " + b64(b"\x00alice\x00Alice-Pw-7391") + b"\r\n"),
             ("s", b"A001 OK Logged in\r\n")])
    f = r.flow
    assert (f["username"], f["auth_mechanism"], f["auth_command"], f["login_ok"]) == \
        ("alice", "PLAIN", "AUTHENTICATE", True)
    assert f["cleartext_credentials"] is True
    out = everything(r)
    assert "Alice-Pw-7391" not in out and b64(b"\x00alice\x00Alice-Pw-7391").decode() not in out


def test_authenticate_plain_after_continuation():
    secret = b64(b"admin\x00alice\x00Alice-Pw-7391")
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", secret + b"\r\n"),
             ("s", b"a1 OK Logged in\r\n"), ("c", b"a2 NOOP\r\n"), ("s", b"a2 OK done\r\n")])
    f = r.flow
    assert f["username"] == "alice" and f["authzid"] == "admin" and f["login_ok"] is True
    assert f["commands"] == {"AUTHENTICATE": 1, "NOOP": 1}
    assert secret.decode() not in everything(r)
    cont = [m for m in r.messages if m["from"] == "client" and m["kind"] == "continuation"]
    assert cont[0]["args"] == "***"


def test_authenticate_login_two_continuations_and_a_failure():
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE LOGIN\r\n"), ("s", b"+ VXNlcm5hbWU6\r\n"),
             ("c", b64(b"bob") + b"\r\n"), ("s", b"+ UGFzc3dvcmQ6\r\n"), ("c", b64(b"wrong-pw") + b"\r\n"),
             ("s", b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
             ("c", b"a2 AUTHENTICATE LOGIN " + b64(b"bob") + b"\r\n"), ("s", b"+ UGFzc3dvcmQ6\r\n"),
             ("c", b64(b"right-pw") + b"\r\n"), ("s", b"a2 OK Logged in\r\n")])
    f = r.flow
    assert f["username"] == "bob" and f["login_ok"] is True and f["login_failures"] == 1
    assert f["auth_mechanism"] == "LOGIN" and f["auth_command"] == "AUTHENTICATE"
    assert "failed_logins" in f["findings"]
    out = everything(r)
    for s in (b"wrong-pw", b"right-pw", b64(b"wrong-pw"), b64(b"right-pw")):
        assert s.decode() not in out


def test_sasl_cancel_and_failed_logins_only():
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"*\r\n"),
             ("s", b"a1 BAD Authentication canceled\r\n"), ("c", b"a2 LOGIN eve nope\r\n"), ("s", b"a2 NO failed\r\n")])
    f = r.flow
    assert f["login_ok"] is False and f["login_failures"] == 2 and f["username"] == "eve"


def test_username_is_the_successful_one():
    r = run([("s", GREETING), ("c", b"a1 LOGIN root x\r\n"), ("s", b"a1 NO failed\r\n"),
             ("c", b"a2 LOGIN alice y\r\n"), ("s", b"a2 OK in\r\n"), ("c", b"a3 LOGIN mallory z\r\n"),
             ("s", b"a3 BAD already\r\n")])
    # the LOGIN sent when logged in already is answered BAD for the state: no failed login
    assert r.flow["username"] == "alice" and r.flow["login_failures"] == 1


FAKE_BODY = (
    b"From: x@example.org\r\nSubject: trap\r\n\r\n"
    + b"filler line\r\n" * 30
    + b"a1 LOGIN mallory evilpw\r\n* OK [CAPABILITY IMAP4rev1 STARTTLS] Evil ready\r\n"
    + b"a2 STARTTLS\r\na2 OK Begin TLS negotiation\r\n* BYE bye\r\n+ go ahead\r\nX-Spam-Flag: NO\r\n{5}\r\n"
    + b"a3 COMPRESS DEFLATE\r\na3 OK DEFLATE active\r\n"
)


@pytest.mark.parametrize("snaplen", [None, 256, 64])
def test_mail_body_full_of_commands_changes_no_fact(snaplen):
    # The same length, so both lose the same bytes to the snap length.
    plain = re.sub(rb"[^\r\n]", b".", FAKE_BODY)
    assert len(plain) == len(FAKE_BODY)
    def session(body):
        return [
            ("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"),
            ("c", b"a2 APPEND INBOX (\\Seen) {%d}\r\n" % len(body)), ("s", b"+ OK\r\n"),
            ("c", body + b"\r\n"), ("s", b"a2 OK [APPENDUID 1 5] Append completed.\r\n"),
            ("c", b"a3 FETCH 5 BODY[]\r\n"),
            ("s", b"* 5 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na3 OK Fetch completed.\r\n"),
            ("c", b"a4 LOGOUT\r\n"), ("s", b"* BYE\r\na4 OK bye\r\n"),
        ]
    cuts = [[], [], [], [], [], [100, 700], [], [], [90, 1000], [], []]
    trap = run(session(FAKE_BODY), snaplen=snaplen, cuts=cuts)
    base = run(session(plain), snaplen=snaplen)
    ignore = {"first_ts", "last_ts", "packets", "bytes", "packets_c2s", "packets_s2c", "bytes_c2s", "bytes_s2c",
              "bytes_not_captured"}
    a = {k: v for k, v in trap.flow.items() if k not in ignore}
    b = {k: v for k, v in base.flow.items() if k not in ignore}
    assert a == b
    assert trap.flow["username"] == "alice" and trap.flow["encrypted"] is False
    assert "mallory" not in everything(trap)
    kinds = [(m["from"], m["kind"], m["tag"], m["command"]) for m in trap.messages]
    assert kinds == [(m["from"], m["kind"], m["tag"], m["command"]) for m in base.messages]


def test_starttls_completed_stops_parsing():
    r = run([("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK Begin TLS negotiation now.\r\n"),
             ("c", b"\x16\x03\x01\x00\x30" + b"a2 LOGIN mallory x\r\n"), ("s", b"\x16\x03\x03\x00\x10* OK fake\r\n")])
    f = r.flow
    assert (f["starttls"], f["encrypted"], f["username"], f["cleartext_credentials"]) == \
        ("completed", True, None, False)
    assert f["findings"] == ["auth_plain_before_starttls"]  # the server's, whatever the client did next
    assert len(r.messages) == 3


def test_starttls_completed_tells_the_capture_to_stop_copying():
    big = b"\x17\x03\x03" + b"\x00" * 1000
    r = run([("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK go\r\n"), ("c", big), ("s", big)])
    assert r.flow["bytes_not_captured"] == 2 * len(big)


def test_starttls_refused():
    r = run([("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 NO [UNAVAILABLE] TLS not available\r\n"),
             ("c", b"a2 LOGIN alice pw\r\n"), ("s", b"a2 OK in\r\n")])
    f = r.flow
    assert f["starttls"] == "refused" and f["encrypted"] is False and f["username"] == "alice"
    assert f["findings"] == ["cleartext_credentials", "starttls_refused", "auth_plain_before_starttls"]


def test_flow_that_starts_with_tls_is_encrypted():
    r = run([("c", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"), ("s", b"\x16\x03\x03\x00\x5d\x02")])
    f = r.flow
    assert f["encrypted"] is True and f["encrypted_from_start"] is True and f["imap"] is False
    assert r.messages == []


def deflate(comp, data):
    return comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)


ODD_NAME = hashlib.sha256(b"x").hexdigest() * 2  # does not compress below a 64-byte snap


def compressed_session():
    cc = zlib.compressobj(6, zlib.DEFLATED, -15)
    sc = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = b"Subject: big\r\n\r\n" + bytes(range(256)) * 40 + b"\r\na9 LOGIN mallory x\r\n"
    return [
        ("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"),
        ("c", b"a2 COMPRESS DEFLATE\r\n"), ("s", b"a2 OK DEFLATE active\r\n"),
        ("c", deflate(cc, b"a3 SELECT " + ODD_NAME.encode() + b"\r\n")),
        ("s", deflate(sc, b"* 1 EXISTS\r\na3 OK [READ-WRITE] Select completed.\r\n")),
        ("c", deflate(cc, b"a4 FETCH 1 BODY[]\r\n")),
        ("s", deflate(sc, b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na4 OK done\r\n")),
        ("c", deflate(cc, b"a5 LOGOUT\r\n")), ("s", deflate(sc, b"* BYE\r\na5 OK bye\r\n")),
    ]


def test_compress_is_inflated_when_whole_payloads_are_copied():
    r = run(compressed_session(), snaplen=256)
    f = r.flow
    assert f["compressed"] is True
    assert f["mailboxes"] == [ODD_NAME]
    assert f["commands"] == {"LOGIN": 1, "COMPRESS": 1, "SELECT": 1, "FETCH": 1, "LOGOUT": 1}
    assert f["bytes_not_captured"] == 0 and f["anomalies"] == {}
    assert "mallory" not in everything(r)


def test_compress_without_whole_payloads_prints_no_deflate_bytes():
    # A capture that kept only prefixes, e.g. tcpdump -s 64: nothing after COMPRESS can be read.
    from imaptap.flows import FlowTable
    from imaptap.output.jsonl import flow_record, message_record
    from imaptap.testing import Analysis
    segs = conversation(compressed_session())
    head = ("ts", "ip_version", "src", "dst", "sport", "dport", "seq", "ack", "flags", "wire_len")
    cut = [s.__class__(*[getattr(s, f) for f in head], s.payload[:64]) for s in segs]
    res = Analysis()
    table = FlowTable({143}, None, lambda fl, m: res.messages.append(message_record(fl, m)),
                      lambda fl: res.flows.append(flow_record(fl)))
    for s in cut:
        table.add(s)
    table.close_all()
    f = res.flow
    assert f["compressed"] is True and f["mailboxes"] == []
    assert any(k.endswith("compressed_gap") for k in f["anomalies"])
    assert [m["command"] for m in res.messages if m["from"] == "client"] == ["LOGIN", "COMPRESS"]


def test_id_both_ways_and_mailboxes_in_order():
    r = run([("s", GREETING), ("c", b'a1 ID ("name" "Thunderbird" "version" "115.3.1")\r\n'),
             ("s", b'* ID ("name" "Dovecot" "version" {6}\r\n2.3.19)\r\na1 OK ID completed.\r\n'),
             ("c", b"a2 LOGIN alice pw\r\n"), ("s", b"a2 OK in\r\n"),
             ("c", b'a3 SELECT "Entw&APw-rfe"\r\n'), ("s", b"a3 OK\r\n"),
             ("c", b"a4 EXAMINE {7}\r\n"), ("s", b"+ OK\r\n"), ("c", b"Archive\r\n"), ("s", b"a4 OK\r\n"),
             ("c", b'a5 SELECT "with \\"quote\\""\r\n'), ("s", b"a5 NO no such mailbox\r\n"),
             ("c", b"a6 UID FETCH 1:* (FLAGS)\r\n"), ("s", b"a6 OK\r\n")])
    f = r.flow
    assert f["client_id"] == {"name": "Thunderbird", "version": "115.3.1"}
    assert f["server_id"] == {"name": "Dovecot", "version": "2.3.19"}
    assert f["mailboxes"] == ["Entwürfe", "Archive", 'with "quote"']
    assert f["commands"]["UID FETCH"] == 1


def test_idle_with_a_mail_arriving():
    r = run([("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"), ("c", b"a2 SELECT INBOX\r\n"),
             ("s", b"* 1 EXISTS\r\na2 OK\r\n"), ("c", b"a3 IDLE\r\n"), ("s", b"+ idling\r\n"),
             ("s", b"* 2 EXISTS\r\n"), ("c", b"DONE\r\n"), ("s", b"a3 OK Idle completed (12.3 + 0.1 secs).\r\n")])
    f = r.flow
    assert f["idles"] == 1 and f["commands"] == {"LOGIN": 1, "SELECT": 1, "IDLE": 1}
    assert f["anomalies"] == {}
    assert [m["command"] for m in r.messages if m["from"] == "client"][-1] == "DONE"
    assert any(m["command"] == "EXISTS" and m["number"] == 2 for m in r.messages)


def test_refused_literal_does_not_swallow_the_rest():
    r = run([("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"),
             ("c", b"a2 APPEND INBOX {4294967296}\r\n"), ("s", b"a2 NO [TOOBIG] Mail too big\r\n"),
             ("c", b"a3 SELECT Sent\r\n"), ("s", b"a3 OK\r\n")])
    f = r.flow
    assert f["mailboxes"] == ["Sent"]
    assert f["commands"] == {"LOGIN": 1, "APPEND": 1, "SELECT": 1}
    resp = [m for m in r.messages if m["tag"] == "a2" and m["kind"] == "response"][0]
    assert resp["command"] == "APPEND" and resp["code"] == "TOOBIG"


@pytest.mark.parametrize("tag", [".", "a0000", "C00000", "A001", "x" * 10_000])
def test_tags_of_any_shape_and_length_match(tag):
    t = tag.encode()
    r = run([("s", GREETING), ("c", t + b" CAPABILITY\r\n"),
             ("s", b"* CAPABILITY IMAP4rev1\r\n" + t + b" OK done\r\n")], snaplen=None)
    (req,) = [m for m in r.messages if m["kind"] == "request"]
    (resp,) = [m for m in r.messages if m["kind"] == "response"]
    assert resp["command"] == "CAPABILITY" and resp["latency_ms"] is not None
    assert resp["tag"] == req["tag"]
    if len(tag) <= 64:
        assert resp["tag"] == tag
    else:  # kept as its start and a hash, so the pending table stays small
        assert len(resp["tag"]) == 64 and resp["tag"].startswith(tag[:40])


def test_capture_started_mid_connection():
    r = run([("c", b"a7 SELECT Drafts\r\n"), ("s", b"* 0 EXISTS\r\na7 OK\r\n")], handshake=False,
            client=("192.0.2.10", 143 + 1), server=("192.0.2.20", 143))
    f = r.flow
    assert f["client"] == "192.0.2.10:144" and f["server"] == "192.0.2.20:143"
    assert f["mailboxes"] == ["Drafts"] and f["server_software"] is None and f["greeting"] is None


@pytest.mark.parametrize("snaplen, taillen, lines", [(None, 0, 5), (256, 128, 5), (256, 0, 4)])
def test_server_side_only_capture_invents_no_requests(snaplen, taillen, lines):
    r = run([("s", GREETING), ("s", b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK done\r\n"),
             ("s", b"* 21 FETCH (UID 5 BODY[] {300}\r\n" + b"a1 LOGIN mallory x\r\n" * 15 + b")\r\na2 OK done\r\n")],
            snaplen=snaplen, taillen=taillen, handshake_snaplen=0)
    f = r.flow
    assert f["commands"] == {} and f["username"] is None
    assert [m["from"] for m in r.messages] == ["server"] * lines


def test_ipv6_endpoints():
    r = run([("s", GREETING)], client=("2001:db8::10", 50000), server=("2001:db8::1", 143))
    assert r.flow["client"] == "[2001:db8::10]:50000" and r.flow["server"] == "[2001:db8::1]:143"
    assert r.flow["ip_version"] == 6


def test_pop3_on_the_imap_port_is_not_confirmed_imap():
    r = run([("s", b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"), ("c", b"USER alice\r\n")])
    assert r.flow["imap"] is False and r.flow["username"] is None


def test_preauth_text_that_names_no_software():
    r = run([("s", b"* PREAUTH [CAPABILITY IMAP4rev1] IMAP4rev1 server logged in as alice\r\n")])
    f = r.flow
    assert f["preauth"] is True
    assert (f["server_software"], f["server_product"], f["server_version"]) == (None, None, None)


@pytest.mark.parametrize(
    "greeting, software, product, version",
    [
        ("[CAPABILITY IMAP4rev1 LITERAL+] Dovecot ready.", "Dovecot", "Dovecot", None),
        ("Dovecot (Debian) ready.", "Dovecot", "Dovecot", None),
        ("Microsoft Exchange IMAP4rev1 server version 5.5.2650.23 (umr) ready", "Microsoft Exchange 5.5.2650.23",
         "Microsoft Exchange", "5.5.2650.23"),
        ("Microsoft Exchange Server 2003 IMAP4rev1 server version 6.5.7638.1 (mx.example.org) ready.",
         "Microsoft Exchange 6.5.7638.1", "Microsoft Exchange", "6.5.7638.1"),
        ("The Microsoft Exchange IMAP4 service is ready.", "Microsoft Exchange", "Microsoft Exchange", None),
        ("Microsoft Exchange Server 2007 IMAP4 service ready", "Microsoft Exchange 2007", "Microsoft Exchange",
         "2007"),
        ("Cyrus IMAP v2.4.17-Debian-2.4.17 server ready", "Cyrus IMAP v2.4.17-Debian-2.4.17", "Cyrus IMAP",
         "2.4.17-Debian-2.4.17"),
        ("mail.example.org Cyrus IMAP 3.6.1-Debian-3.6.1-4+deb12u5 server ready",
         "Cyrus IMAP 3.6.1-Debian-3.6.1-4+deb12u5", "Cyrus IMAP", "3.6.1-Debian-3.6.1-4+deb12u5"),
        ("Cyrus IMAP4 v2.3.16-Fedora-RPM-2.3.16-13 server ready", "Cyrus IMAP v2.3.16-Fedora-RPM-2.3.16-13",
         "Cyrus IMAP", "2.3.16-Fedora-RPM-2.3.16-13"),
        ("IMAP4Rev1 Server Version 4.9.04.012", "IMAP4Rev1 Server Version 4.9.04.012", None, None),
        ("Coremail System IMap Server Ready(Coremail)", "Coremail", "Coremail", None),
        ("Courier-IMAP ready. Copyright 1998-2018 Double Precision, Inc.  See COPYING for distribution information.",
         "Courier-IMAP", "Courier-IMAP", None),
        ("mail.example.org Zimbra IMAP4rev1 server ready", "Zimbra", "Zimbra", None),
        ("localhost IMAP4rev1 2007f.404 at Thu, 11 Feb 2010 16:23:54 -0500 (EST)", "UW IMAP 2007f.404", "UW IMAP",
         "2007f.404"),
        ("mail.example.org IMAP4rev1 v12.264 server ready", "UW IMAP v12.264", "UW IMAP", "12.264"),
        ("Gimap ready for requests from 192.0.2.7 h4mb12345678qkb", "Gimap", "Gimap", None),
        ("Kerio Connect 9.2.7 IMAP4rev1 server ready", "Kerio Connect 9.2.7", "Kerio Connect", "9.2.7"),
        ("mx.example.org IMAP4rev1 MDaemon 17.5.1 ready", "MDaemon 17.5.1", "MDaemon", "17.5.1"),
        ("Domino IMAP4 Server Release 8.5.3FP6 ready Tue, 4 Jun 2013 10:00:00 +0200", "Lotus Domino 8.5.3FP6",
         "Lotus Domino", "8.5.3FP6"),
        ("CommuniGate Pro IMAP Server 6.1.10 at mail.example.org ready", "CommuniGate Pro 6.1.10",
         "CommuniGate Pro", "6.1.10"),
        ("mail.example.org IMAP4rev1 Mercury/32 v4.62 server ready.", "Mercury/32 v4.62", "Mercury/32", "4.62"),
        ("Stalwart IMAP4rev2 at your service.", "Stalwart", "Stalwart", None),
        # protocol words are not products
        ("IMAP4rev1", None, None, None),
        ("IMAP4 ready", None, None, None),
        ("IMAPrev1", None, None, None),
        ("[CAPABILITY IMAP4rev2] Server ready", None, None, None),
        ("IMAP4 server ready for requests from 10.1.2.3", None, None, None),
    ],
)
def test_server_software_from_greeting(greeting, software, product, version):
    r = run([("s", b"* OK " + greeting.encode() + b"\r\n")])
    f = r.flow
    assert (f["server_software"], f["server_product"], f["server_version"]) == (software, product, version)


@pytest.mark.parametrize(
    "greeting, id_answer, software, product, version",
    [
        # a greeting of protocol words only: the ID answer names the software
        (b"IMAP4rev1", b'("name" "Cyrus IMAPD" "version" "3.6.1-Debian-3.6.1-4+deb12u5" "vendor" "Project Cyrus")',
         "Cyrus IMAPD", "Cyrus IMAP", "3.6.1-Debian-3.6.1-4+deb12u5"),
        # the greeting names the product, ID adds its version
        (b"Dovecot (Debian) ready.", b'("name" "Dovecot" "version" "2.3.19.1")', "Dovecot", "Dovecot", "2.3.19.1"),
        (b"mail Zimbra IMAP4rev1 server ready", b'("NAME" "Zimbra" "VERSION" "8.8.15_GA_3869" "RELEASE" "2019")',
         "Zimbra", "Zimbra", "8.8.15_GA_3869"),
        # another product's version is not this one's
        (b"Dovecot ready.", b'("name" "nginx" "version" "1.22.1")', "Dovecot", "Dovecot", None),
        (b"IMAP4 ready", b'("name" "Acme Mail" "version" "2.0~rc1")', "Acme Mail", "Acme Mail", "2.0~rc1"),
        (b"IMAP4 ready", b"NIL", None, None, None),
    ],
)
def test_server_software_from_id_where_the_greeting_names_none(greeting, id_answer, software, product, version):
    r = run([("s", b"* OK " + greeting + b"\r\n"), ("c", b"a1 ID NIL\r\n"),
             ("s", b"* ID " + id_answer + b"\r\na1 OK ID completed.\r\n")], snaplen=None)
    f = r.flow
    assert (f["server_software"], f["server_product"], f["server_version"]) == (software, product, version)


def test_hostile_strings_are_plain_data():
    user = "[bold red]root[/]\x1b[31mevil\x1b[0m"
    r = run([("s", GREETING), ("c", b'a1 LOGIN "' + user.encode() + b'" pw\r\n'), ("s", b"a1 NO failed\r\n")])
    assert r.flow["username"] == user


def test_lost_login_completions_are_inferred_from_what_follows():
    lost = b"a1 OK " + b"x" * 4000 + b"\r\n"  # a completion the capture cuts off
    login = [("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"* CAPABILITY " + b"Y" * 400 + b"\r\n" + lost)]
    ok = run([*login, ("c", b"a2 SELECT INBOX\r\n"), ("s", b"a2 OK done\r\n")], taillen=0, handshake_snaplen=0)
    assert ok.flow["login_ok"] is True and ok.flow["anomalies"]["login_completion_lost"] == 1
    failed = run([*login, ("c", b"a2 LOGIN alice pw2\r\n"), ("s", b"a2 OK in\r\n")], taillen=0, handshake_snaplen=0)
    assert failed.flow["login_failures"] == 1 and failed.flow["login_ok"] is True
    unknown = run([*login, ("c", b"a2 CAPABILITY\r\n"), ("s", b"a2 OK done\r\n")], taillen=0, handshake_snaplen=0)
    assert unknown.flow["login_ok"] is None


_untagged_heads = st.builds(
    lambda number, space, word, rest: b"* " + number + space + word + rest,
    st.sampled_from([b"", b"1", b"42", b"0", b"1234567890", b"12345678901", b"-1"]),
    st.sampled_from([b" ", b"", b"  "]),
    st.one_of(st.sampled_from([b"FETCH", b"OK", b"exists", b"CAPABILITY", b"ID", b"X-Y.z", b"", b"1A", b"A" * 64,
                               b"A" * 65, b"Ok\x00", b"\xc3\xa9"]),
              st.binary(max_size=8).filter(lambda b: b"\n" not in b and b"\r" not in b)),
    st.one_of(st.just(b""), st.just(b" "),
              st.binary(max_size=12).map(lambda b: b" " + b.replace(b"\n", b"").replace(b"\r", b""))),
)


@settings(max_examples=600, deadline=None)
@given(_untagged_heads)
def test_untagged_lines_are_split_as_the_grammar_says(head):
    """_untagged splits "* [n ]NAME[ rest]" by hand; session.UNTAGGED_GRAMMAR is the grammar it follows."""
    from imaptap.imap import session as session_module

    messages = []
    s = session_module.ImapSession(on_message=messages.append)
    s.server.feed(b"* OK hi\r\n" + head + b"\r\n")
    m = re.match(session_module.UNTAGGED_GRAMMAR, head, re.S)
    if m is None:
        assert s.anomalies["bad_untagged"] == 1 and len(messages) == 1
        return
    assert s.anomalies["bad_untagged"] == 0
    number, word, after = m.groups()
    upper = word.decode("latin-1").upper()
    if len(messages) == 2:
        msg = messages[1]
        assert (msg.status if number is None and upper in session_module._STATUSES else msg.command) == upper
        assert msg.number == (int(number) if number is not None and msg.command else None)
        if msg.command is not None:
            assert msg.args == (session_module._shown(after) if after else None)
    else:
        assert s.anomalies["unknown_untagged"] == 1


def test_which_completions_time_the_server_alone():
    from imaptap.flows import FlowTable
    from imaptap.segment import PayloadPolicy

    timed = {}

    def record(flow, msg):
        if msg.kind.value == "response":
            timed[msg.tag] = (flow.session.latency_timed_server, msg.latency_ms is not None)

    table = FlowTable({143}, PayloadPolicy(1 << 20, 0), on_message=record)
    for seg in conversation([
        ("s", GREETING),
        ("c", b"a1 LOGIN {5}\r\n"), ("s", b"+ OK\r\n"), ("c", b"alice pw\r\n"), ("s", b"a1 OK\r\n"),
        ("c", b"a2 IDLE\r\n"), ("s", b"+ idling\r\n"), ("c", b"DONE\r\n"), ("s", b"a2 OK\r\n"),
        ("c", b"a3 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"AGEAYg==\r\n"), ("s", b"a3 NO\r\n"),
        ("c", b"a4 APPEND INBOX {3}\r\n"), ("s", b"a4 NO [TOOBIG] no\r\n"),
        ("c", b"a5 NOOP\r\n"), ("c", b"a6 NOOP\r\n"), ("s", b"a5 OK\r\na6 OK\r\n"),
        ("s", b"zz OK never asked\r\n"),
    ]):
        table.add(seg)
    assert timed == {"a1": (True, True), "a2": (False, True), "a3": (False, True), "a4": (False, True),
                     "a5": (True, True), "a6": (True, True), "zz": (False, False)}


# --- SASL mechanisms beyond PLAIN and LOGIN -------------------------------------------------

# RFC 5802 section 5: user "user", the SCRAM-SHA-1 exchange of its example
SCRAM_FIRST = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
SCRAM_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SCRAM_FINAL = b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
SCRAM_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def scram_session(first=SCRAM_FIRST, initial_response=True, outcome=b"a1 OK Logged in\r\n"):
    start = [("c", b"a1 AUTHENTICATE SCRAM-SHA-1 " + b64(first) + b"\r\n")] if initial_response else [
        ("c", b"a1 AUTHENTICATE SCRAM-SHA-1\r\n"), ("s", b"+ \r\n"), ("c", b64(first) + b"\r\n")]
    rest = [("s", b"+ " + b64(SCRAM_SERVER_FIRST) + b"\r\n"), ("c", b64(SCRAM_FINAL) + b"\r\n")]
    if outcome.startswith(b"a1 OK"):
        rest += [("s", b"+ " + b64(SCRAM_SERVER_FINAL) + b"\r\n"), ("c", b"\r\n")]
    return [("s", GREETING), *start, *rest, ("s", outcome), ("c", b"a2 LOGOUT\r\n"), ("s", b"a2 OK bye\r\n")]


@pytest.mark.parametrize("initial_response", [True, False])
def test_scram_whole_exchange_user_outcome_and_no_secret(initial_response):
    r = run(scram_session(initial_response=initial_response))
    f = r.flow
    assert (f["username"], f["authzid"], f["auth_mechanism"], f["auth_command"], f["login_ok"]) == \
        ("user", None, "SCRAM-SHA-1", "AUTHENTICATE", True)
    assert f["anomalies"] == {} and f["cleartext_credentials"] is False
    assert f["findings"] == ["starttls_offered_not_used", "auth_plain_before_starttls"]  # the greeting offers PLAIN
    assert f["commands"] == {"AUTHENTICATE": 1, "LOGOUT": 1}
    out = everything(r)
    for secret in (SCRAM_FINAL, SCRAM_SERVER_FINAL, b"v0X8v3Bz2T0CJGbJQyF0X", b"rmF9pqV8S7suAoZWja4dJRkFsKQ"):
        assert b64(secret).decode() not in out and secret.decode() not in out
    cont = [(m["from"], m["args"], m["text"]) for m in r.messages if m["kind"] == "continuation"]
    assert cont[-3:] == [("client", "***", None), ("server", None, "***"), ("client", None, None)]
    assert ("server", None, b64(SCRAM_SERVER_FIRST).decode()) in cont  # salt and nonce are no secret


def test_scram_authzid_and_a_wrong_password():
    r = run(scram_session(first=b"n,a=admin,n=alice,r=rOprNGfwEbeRWgbNEkqO",
                          outcome=b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"))
    f = r.flow
    assert (f["username"], f["authzid"], f["login_ok"], f["login_failures"]) == ("alice", "admin", False, 1)
    assert f["anomalies"] == {}


def test_ntlm_user_and_domain_from_the_authenticate_message():
    from test_sasl import ntlm_authenticate

    msg, secrets = ntlm_authenticate("carol", "LAB")
    negotiate = b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + b"\x00" * 16
    challenge = b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 40
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE NTLM\r\n"), ("s", b"+\r\n"), ("c", b64(negotiate) + b"\r\n"),
             ("s", b"+ " + b64(challenge) + b"\r\n"), ("c", b64(msg) + b"\r\n"), ("s", b"a1 OK Logged in\r\n")],
            snaplen=None)
    f = r.flow
    assert (f["username"], f["auth_mechanism"], f["login_ok"], f["cleartext_credentials"]) == \
        ("LAB\\carol", "NTLM", True, False)
    assert b64(msg).decode() not in everything(r)


def test_gssapi_and_external_record_the_mechanism_and_no_user():
    from test_sasl import wrap_token

    ap_req = b"\x60\x82\x02\x10\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01\x00" + b"\x6e" * 40
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE GSSAPI " + b64(ap_req) + b"\r\n"),
             ("s", b"+ " + b64(b"\x6f" * 30) + b"\r\n"), ("c", b"\r\n"),
             ("s", b"+ " + b64(wrap_token(b"\x07\x00\x10\x00")) + b"\r\n"),
             ("c", b64(wrap_token(b"\x01\x00\x10\x00")) + b"\r\n"), ("s", b"a1 OK Logged in\r\n")], snaplen=None)
    f = r.flow
    assert (f["username"], f["authzid"], f["auth_mechanism"], f["login_ok"]) == (None, None, "GSSAPI", True)
    assert f["anomalies"] == {} and b64(ap_req).decode() not in everything(r)
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE GSSAPI " + b64(ap_req) + b"\r\n"),
             ("s", b"+ " + b64(b"\x6f" * 30) + b"\r\n"), ("c", b"\r\n"),
             ("s", b"+ " + b64(wrap_token(b"\x07\x00\x10\x00")) + b"\r\n"),
             ("c", b64(wrap_token(b"\x01\x00\x10\x00alice")) + b"\r\n"), ("s", b"a1 OK Logged in\r\n")], snaplen=None)
    assert (r.flow["username"], r.flow["authzid"]) == (None, "alice")
    # EXTERNAL: the identity came with the TLS client certificate; the message is the authzid
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE EXTERNAL =\r\n"), ("s", b"a1 OK Logged in\r\n")])
    assert (r.flow["username"], r.flow["authzid"], r.flow["auth_mechanism"], r.flow["login_ok"]) == \
        (None, None, "EXTERNAL", True)
    r = run([("s", GREETING), ("c", b"a1 AUTHENTICATE EXTERNAL\r\n"), ("s", b"+\r\n"),
             ("c", b64(b"alice@example.org") + b"\r\n"), ("s", b"a1 OK Logged in\r\n")])
    assert (r.flow["username"], r.flow["authzid"]) == (None, "alice@example.org")


def test_an_empty_line_outside_authenticate_is_still_no_command():
    r = run([("s", GREETING), ("c", b"\r\n"), ("c", b"a1 NOOP\r\n"), ("s", b"a1 OK\r\n")])
    assert r.flow["anomalies"] == {"bad_request": 1}


# --- more of the grammar: several literals, LITERAL-, IMAP4rev2, UTF-8 names, bare LF, states ----

def logged_in(*parts):
    return [("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n"), *parts]


MAIL_1 = b"From: a@example.org\r\nSubject: one\r\n\r\nb1 LOGIN mallory x\r\n"
MAIL_2 = b"From: b@example.org\r\nSubject: two\r\n\r\n* BYE fake\r\n"


@pytest.mark.parametrize("sync", [True, False])
def test_multiappend_several_literals_in_one_command(sync):
    # RFC 3502: one APPEND, two messages, each its own literal
    mark = (lambda n: b"{%d}" % n) if sync else (lambda n: b"{%d+}" % n)
    go = [("s", b"+ OK\r\n")] if sync else []
    r = run(logged_in(("c", b"a2 APPEND Drafts (\\Seen) " + mark(len(MAIL_1)) + b"\r\n"), *go,
                      ("c", MAIL_1 + b" (\\Seen) " + mark(len(MAIL_2)) + b"\r\n"), *go,
                      ("c", MAIL_2 + b"\r\n"),
                      ("s", b"a2 OK [APPENDUID 38505 3955:3956] APPEND completed\r\n"),
                      ("c", b"a3 LOGOUT\r\n"), ("s", b"a3 OK bye\r\n")), snaplen=None)
    f = r.flow
    assert f["commands"] == {"LOGIN": 1, "APPEND": 1, "LOGOUT": 1} and f["anomalies"] == {}
    assert f["username"] == "alice" and "mallory" not in everything(r)
    (append,) = [m for m in r.messages if m["command"] == "APPEND" and m["kind"] == "request"]
    assert append["literals"] == [len(MAIL_1), len(MAIL_2)]
    done = [m for m in r.messages if m["tag"] == "a2" and m["kind"] == "response"][0]
    assert done["command"] == "APPEND" and done["code"] == "APPENDUID 38505 3955:3956"


def test_catenate_text_literals_between_urls():
    # RFC 4469 section 5's example, shortened: URL parts and TEXT literals in one APPEND
    text1 = b"Content-Type: multipart/mixed; boundary=\"x\"\r\n\r\n--x\r\n"
    text2 = b"\r\n--x--\r\n"
    r = run(logged_in(("c", b'a2 APPEND Drafts CATENATE (URL "/Drafts;UIDVALIDITY=385759045/;UID=20/;section=HEADER"'
                            b" TEXT {%d}\r\n" % len(text1)), ("s", b"+ Ready for literal data\r\n"),
                      ("c", text1 + b' URL "/Drafts;UIDVALIDITY=385759045/;UID=20/;section=1.MIME" TEXT {%d}\r\n'
                       % len(text2)), ("s", b"+ Ready for literal data\r\n"),
                      ("c", text2 + b")\r\n"), ("s", b"a2 OK [APPENDUID 385759045 45] CATENATE Completed\r\n"),
                      ("c", b"a3 NOOP\r\n"), ("s", b"a3 OK done\r\n")), snaplen=None)
    f = r.flow
    assert f["commands"] == {"LOGIN": 1, "APPEND": 1, "NOOP": 1} and f["anomalies"] == {}
    (append,) = [m for m in r.messages if m["command"] == "APPEND" and m["kind"] == "request"]
    assert append["literals"] == [len(text1), len(text2)]
    assert [m["command"] for m in r.messages if m["kind"] == "response"] == ["LOGIN", "APPEND", "NOOP"]


def test_literal_minus_refused_before_its_bytes_came():
    # RFC 7888: with LITERAL-, a {n+} over 4096 bytes is answered BAD [TOOBIG] at once, and the
    # client's bytes still come: they are the literal, not commands
    body = b"a9 LOGIN mallory evil\r\n" * 300
    r = run(logged_in(("c", b"a2 APPEND INBOX {%d+}\r\n" % len(body) + body[:1000]),
                      ("s", b"a2 BAD [TOOBIG] Literal too big\r\n"), ("c", body[1000:] + b"\r\n"),
                      ("c", b"a3 NOOP\r\n"), ("s", b"a3 OK done\r\n")), snaplen=None)
    f = r.flow
    assert f["commands"] == {"LOGIN": 1, "APPEND": 1, "NOOP": 1} and f["anomalies"] == {}
    assert f["username"] == "alice" and f["login_failures"] == 0 and "mallory" not in everything(r)
    bad = [m for m in r.messages if m["tag"] == "a2" and m["kind"] == "response"][0]
    assert (bad["command"], bad["status"], bad["code"], bad["latency_ms"]) == ("APPEND", "BAD", "TOOBIG", None)
    assert [m["tag"] for m in r.messages if m["kind"] == "request"] == ["a1", "a2", "a3"]


def test_imap4rev2_after_enable():
    # RFC 9051: ENABLE IMAP4rev2, then its responses (ESEARCH, LIST with CHILDINFO, no RECENT,
    # BINARY with a literal8) and mailbox names in UTF-8
    r = run([("s", b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 AUTH=PLAIN] Server ready\r\n"),
             ("c", b"a1 AUTHENTICATE PLAIN " + b64(b"\x00alice\x00pw") + b"\r\n"),
             ("s", b"a1 OK [CAPABILITY IMAP4rev2 IMAP4rev1 ENABLE] done\r\n"),
             ("c", b"a2 ENABLE IMAP4rev2\r\n"), ("s", b"* ENABLED IMAP4rev2\r\na2 OK Enabled\r\n"),
             ("c", b"a3 LIST \"\" \"*\" RETURN (CHILDREN)\r\n"),
             ("s", "* LIST (\\HasNoChildren) \"/\" \"Entwürfe\"\r\n* LIST (\\NonExistent) \"/\" \"Tom&-Jerry\" "
                   "(\"CHILDINFO\" (\"SUBSCRIBED\"))\r\na3 OK LIST done\r\n".encode()),
             ("c", "a4 SELECT \"Entwürfe\"\r\n".encode()),
             ("s", b"* 3 EXISTS\r\n* OK [UIDVALIDITY 3857529045] UIDs valid\r\n* LIST () \"/\" Drafts\r\n"
                   b"a4 OK [READ-WRITE] SELECT completed\r\n"),
             ("c", b"a5 UID SEARCH RETURN (ALL) UNSEEN\r\n"),
             ("s", b'* ESEARCH (TAG "a5") UID ALL 4:5\r\na5 OK done\r\n'),
             ("c", b"a6 UID FETCH 4 (BINARY.PEEK[1])\r\n"),
             ("s", b"* 2 FETCH (UID 4 BINARY[1] ~{6}\r\n\x00\x01\r\n\xff\xfe)\r\na6 OK done\r\n"),
             ("c", b'a7 SELECT "Tom&-Jerry"\r\n'), ("s", b"a7 NO [NONEXISTENT] no such mailbox\r\n")], snaplen=None)
    f = r.flow
    assert f["username"] == "alice" and f["login_ok"] is True and f["anomalies"] == {}
    assert "IMAP4REV2" in f["capabilities"]
    assert f["mailboxes"] == ["Entwürfe", "Tom&-Jerry"]  # as sent (modified UTF-7 would make "&-" an "&")
    assert f["commands"] == {"AUTHENTICATE": 1, "ENABLE": 1, "LIST": 1, "SELECT": 2, "UID SEARCH": 1,
                             "UID FETCH": 1}
    fetch = [m for m in r.messages if m["command"] == "FETCH"][0]
    assert fetch["literals"] == [6] and fetch["number"] == 2


@pytest.mark.parametrize("enabled, decoded", [(b"UTF8=ACCEPT", "Entw&APw-rfe"), (b"CONDSTORE", "Entwürfe")])
def test_utf8_accept_mailbox_names_are_taken_as_sent(enabled, decoded):
    # RFC 6855: after ENABLE UTF8=ACCEPT names go raw; before it (or without it) modified UTF-7
    r = run(logged_in(("c", b"a2 ENABLE " + enabled + b"\r\n"), ("s", b"* ENABLED " + enabled + b"\r\na2 OK\r\n"),
                      ("c", "a3 SELECT \"Größe\"\r\n".encode()), ("s", b"a3 OK\r\n"),
                      ("c", b'a4 SELECT "Entw&APw-rfe"\r\n'), ("s", b"a4 OK\r\n")))
    assert r.flow["mailboxes"] == ["Größe", decoded]


def test_completions_ending_in_a_bare_lf():
    r = run([("s", b"* OK [CAPABILITY IMAP4rev1] ready\n"), ("c", b"a1 LOGIN alice pw\r\n"),
             ("s", b"* CAPABILITY IMAP4rev1 IDLE\na1 OK Logged in\n"), ("c", b"a2 SELECT INBOX\n"),
             ("s", b"* 1 EXISTS\na2 OK [READ-WRITE] done\n"), ("c", b"a3 LOGOUT\r\n"), ("s", b"* BYE\na3 OK\n")])
    f = r.flow
    assert f["login_ok"] is True and f["mailboxes"] == ["INBOX"] and f["anomalies"] == {}
    assert f["capabilities"] == ["IMAP4REV1", "IDLE"] and f["statuses"] == {"OK": 4, "BYE": 1}
    done = [m for m in r.messages if m["kind"] == "response"]
    assert [(m["command"], m["text"]) for m in done] == [("LOGIN", "Logged in"), ("SELECT", "done"),
                                                         ("LOGOUT", "")]


def test_bad_answers_to_commands_sent_in_the_wrong_state():
    r = run([("s", GREETING),
             # not authenticated yet: these are refused, and say nothing about a login
             ("c", b"a1 SELECT INBOX\r\n"), ("s", b"a1 BAD Error in IMAP command SELECT: Unknown command.\r\n"),
             ("c", b"a2 FETCH 1 FLAGS\r\n"), ("s", b"a2 BAD Error in IMAP command FETCH: Unknown command.\r\n"),
             ("c", b"a3 COMPRESS DEFLATE\r\n"), ("s", b"a3 BAD Not logged in.\r\n"),
             ("c", b"a4 AUTHENTICATE PLAIN " + b64(b"\x00alice\x00Alice-Pw-1") + b"\r\n"), ("s", b"a4 OK in\r\n"),
             # authenticated: a second login is refused for the state, and is no failed login
             ("c", b"a5 LOGIN mallory Mallory-Pw-2\r\n"), ("s", b"a5 BAD Error in IMAP command LOGIN.\r\n"),
             ("c", b"a6 AUTHENTICATE CRAM-MD5\r\n"), ("s", b"a6 BAD Error in IMAP command AUTHENTICATE.\r\n"),
             ("c", b"a7 STARTTLS\r\n"), ("s", b"a7 BAD TLS is already active or not allowed now.\r\n"),
             ("c", b"a8 FETCH 1 FLAGS\r\n"), ("s", b"a8 BAD No mailbox selected.\r\n"),
             ("c", b"a9 NOOP\r\n"), ("s", b"a9 OK NOOP completed.\r\n")])
    f = r.flow
    assert (f["username"], f["auth_command"], f["auth_mechanism"], f["login_ok"], f["login_failures"]) == \
        ("alice", "AUTHENTICATE", "PLAIN", True, 0)
    assert f["compressed"] is False and f["starttls"] == "refused" and f["anomalies"] == {}
    assert f["statuses"] == {"OK": 3, "BAD": 7} and "failed_logins" not in f["findings"]
    assert f["cleartext_credentials"] is True  # mallory's password crossed in clear all the same
    assert "Mallory-Pw-2" not in everything(r) and "Alice-Pw-1" not in everything(r)
    lost = run([("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("c", b"a2 SELECT INBOX\r\n"),
                ("s", b"a2 BAD Not logged in.\r\n")])
    assert lost.flow["login_ok"] is None  # a refused SELECT tells nothing of the lost completion


def test_unauthenticate_makes_a_later_login_count_again():
    r = run(logged_in(("c", b"a2 UNAUTHENTICATE\r\n"), ("s", b"a2 OK done\r\n"),
                      ("c", b"a3 LOGIN bob wrong\r\n"), ("s", b"a3 NO [AUTHENTICATIONFAILED] failed\r\n"),
                      ("c", b"a4 LOGIN bob right\r\n"), ("s", b"a4 OK in\r\n")))
    assert (r.flow["username"], r.flow["login_failures"], r.flow["login_ok"]) == ("bob", 1, True)


def test_preauth_is_authenticated():
    r = run([("s", b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as alice\r\n"), ("c", b"a1 LOGIN eve x\r\n"),
             ("s", b"a1 BAD already authenticated\r\n")])
    assert (r.flow["username"], r.flow["login_failures"], r.flow["auth_command"]) == (None, 0, None)
