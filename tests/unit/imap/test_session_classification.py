"""Which flows are IMAP: the server confirms it, or, with no server byte captured, the client.

Sessions written from RFC 3501 and from what a web server and curl send (the real ones are in
pcaps/http-on-imap-port.pcap): a flow that is not confirmed writes no message and a flow
record without any IMAP fact; a confirmed one gets every message it had, in order.
"""

import json

import pytest

from imaptap.imap.session import MAX_HELD_MESSAGES
from imaptap.testing import analyze, conversation

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"
HTTP_GET = (b"GET / HTTP/1.1\r\nHost: 10.199.3.2:8143\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
HTTP_DIRECTORY = (b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\nContent-type: text/html; "
                  b"charset=utf-8\r\nContent-Length: 230\r\n\r\n<!DOCTYPE HTML>\n<html lang=\"en\">\n<head>\n"
                  b"<title>Directory listing for /</title>\n</head>\n<body>\n<ul>\n"
                  b"<li><a href=\"a1%20OK/\">a1 OK/</a></li>\n</ul>\n</body>\n</html>\n")
HTTP_ERROR = (b"HTTP/1.0 400 Bad request version ('Http-Pw-4242')\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\n"
              b"Connection: close\r\nContent-Type: text/html;charset=utf-8\r\n\r\n<!DOCTYPE HTML>\n"
              b"<html lang=\"en\">\n    <body>\n        <h1>Error response</h1>\n"
              b"        <p>Error code: 400</p>\n        <p>Message: Bad request version.</p>\n"
              b"a1 BAD a tag the body happens to contain\n    </body>\n</html>\n")
#: What the flow record of a flow that is not IMAP holds besides its transport facts.
EMPTY_IMAP_FACTS = {"greeting": None, "server_software": None, "username": None, "authzid": None,
                    "auth_command": None, "auth_mechanism": None, "login_ok": None, "login_failures": 0,
                    "preauth": False, "capabilities": [], "starttls": "none", "compressed": False,
                    "cleartext_credentials": False, "findings": [], "client_id": None, "server_id": None,
                    "mailboxes": [], "idles": 0, "commands": {}, "statuses": {}, "anomalies": {}, "resyncs": 0}


def run(parts, **kw):
    return analyze(conversation(parts, server=("192.0.2.20", 8143), **kw), ports=(8143,))


def assert_not_imap(result):
    f = result.flow
    assert f["imap"] is False
    assert {k: f[k] for k in EMPTY_IMAP_FACTS} == EMPTY_IMAP_FACTS
    assert result.messages == []
    stats = result.table.stats
    assert (stats.imap_flows, stats.non_imap_flows, stats.anomalies) == (0, 1, 0)


def test_http_on_a_watched_port_is_no_imap_flow():
    r = run([("c", HTTP_GET), ("s", HTTP_DIRECTORY)])
    assert_not_imap(r)
    assert r.flow["bytes_c2s"] == len(HTTP_GET) and r.flow["end"] == "fin"


def test_a_login_sent_to_a_web_server_is_no_login():
    # the server's answer is an HTTP error page, one line of which even looks like a completion
    r = run([("c", b"a1 LOGIN x Http-Pw-4242\r\n"), ("s", HTTP_ERROR)])
    assert_not_imap(r)
    assert "Http-Pw-4242" not in json.dumps(r.flows)


def test_pop3_continuations_that_nobody_waited_for_confirm_nothing():
    r = run([("s", b"+OK POP3 ready\r\n"), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"+ OK\r\n"),
             ("s", b"-ERR unknown command\r\n")])
    assert_not_imap(r)


def test_a_greeting_confirms_and_every_message_is_written():
    r = run([("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK in\r\n")])
    assert r.flow["imap"] is True and r.flow["username"] == "alice"
    assert [m["kind"] for m in r.messages] == ["untagged", "request", "response"]


def test_held_messages_are_released_in_order_once_the_server_confirms():
    # a capture that starts mid-connection: the client's commands come before any server line
    r = run([("c", b"a7 NOOP\r\n"), ("c", b"a8 SELECT Drafts\r\n"), ("s", b"a7 OK done\r\n"),
             ("s", b"a8 OK [READ-WRITE] done\r\n")], handshake=False)
    f = r.flow
    assert f["imap"] is True and f["mailboxes"] == ["Drafts"]
    assert [(m["kind"], m["tag"]) for m in r.messages] == [("request", "a7"), ("request", "a8"),
                                                          ("response", "a7"), ("response", "a8")]


@pytest.mark.parametrize("answer", [b"+ OK\r\n", b"+\r\n"])
def test_a_continuation_the_client_waits_for_confirms(answer):
    r = run([("c", b"a1 LOGIN {5}\r\n"), ("s", answer)], handshake=False, close=False)
    assert r.flow["imap"] is True


def test_a_server_that_does_not_greet_first_is_not_imap_whatever_follows():
    r = run([("c", b"a1 NOOP\r\n"), ("s", b"HTTP/1.0 400 Bad request\r\n"), ("s", b"a1 OK done\r\n"),
             ("s", b"* CAPABILITY IMAP4rev1\r\n")])
    assert_not_imap(r)
    # the same lines seen from the middle of the connection: then the completion confirms
    r = run([("c", b"a1 NOOP\r\n"), ("s", b"HTTP/1.0 400 Bad request\r\n"), ("s", b"a1 OK done\r\n")],
            handshake=False)
    assert r.flow["imap"] is True


def test_a_completion_of_a_tag_the_client_never_sent_does_not_confirm():
    r = run([("c", b"GET / HTTP/1.1\r\n\r\n"), ("s", b"GET OK fine\r\n")])
    assert_not_imap(r)


@pytest.mark.parametrize("line", [b"* CAPABILITY IMAP4rev1 IDLE\r\n", b"* 3 EXISTS\r\n", b"* BYE bye\r\n",
                                  b"C12 OK done\r\n"])
def test_a_server_only_capture_is_confirmed_by_the_server(line):
    r = run([("s", line)], handshake=False, close=False)
    assert r.flow["imap"] is True


def test_a_server_only_capture_of_unknown_lines_is_not_imap():
    r = run([("s", b"* XFOO bar\r\n"), ("s", b"hello there\r\n")], handshake=False, close=False)
    assert_not_imap(r)


def test_a_client_only_capture_is_judged_by_the_client_commands():
    r = run([("c", b"a1 CAPABILITY\r\n"), ("c", b"a2 LOGIN alice Client-Pw-1\r\n"), ("c", b"a3 SELECT INBOX\r\n"),
             ("c", b"a4 LOGOUT\r\n")])
    f = r.flow
    assert f["imap"] is True and f["username"] == "alice" and f["mailboxes"] == ["INBOX"]
    assert f["login_ok"] is None and f["cleartext_credentials"] is True
    assert [m["tag"] for m in r.messages] == ["a1", "a2", "a3", "a4"]
    assert "Client-Pw-1" not in json.dumps(r.messages)


def test_a_client_only_capture_of_http_is_not_imap():
    r = run([("c", HTTP_GET), ("c", b"POST /x HTTP/1.1\r\n\r\na1 LOGIN x y\r\n")])
    assert_not_imap(r)


def test_a_client_only_capture_past_the_hold_is_decided_without_losing_a_message():
    n = MAX_HELD_MESSAGES + 50
    r = run([("c", b"a%d NOOP\r\n" % i) for i in range(n)], close=False)
    assert r.flow["imap"] is True and r.flow["commands"] == {"NOOP": n}
    assert [m["tag"] for m in r.messages] == [f"a{i}" for i in range(n)]
    assert r.table.stats.held_messages_dropped == 0


def test_the_hold_is_bounded_when_the_server_speaks_but_does_not_confirm():
    n = MAX_HELD_MESSAGES + 10
    # seen from the middle: the server's first line is the end of something the capture missed
    r = run([("s", b"lo world\r\n"), *[("c", b"a%d NOOP\r\n" % i) for i in range(n)],
             ("s", b"a%d OK done\r\n" % (n - 1))],
            handshake=False, close=False)
    assert r.flow["imap"] is True
    assert len(r.messages) == MAX_HELD_MESSAGES + 1  # the held ones, then the completion
    assert r.table.stats.held_messages_dropped == n - MAX_HELD_MESSAGES


def test_tls_from_the_first_byte_keeps_its_transport_facts():
    r = run([("c", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"), ("s", b"\x16\x03\x03\x00\x5d\x02")])
    f = r.flow
    assert f["imap"] is False and f["encrypted_from_start"] is True and f["encrypted"] is True
    assert r.table.stats.non_imap_flows == 1
