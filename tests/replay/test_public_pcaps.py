"""Real captures from other projects' test suites, with the facts their projects expect.

Files are read in place from testenv.PUBLIC_PCAPS (README, Tests); where they are absent these
tests skip, and under CI=true they fail.
"""

import re

import pytest

from testenv import public_pcap as pcap
from testenv import require_public_pcaps


def test_the_third_party_captures_are_here():
    """The one test that stands for all of them: skipped in a user's clone, fails in CI."""
    require_public_pcaps()


def test_ndpi_imap_login_in_clear(imaptap):
    r = imaptap("-r", pcap("ndpi/imap.pcap"), "--json", "-")
    assert r.returncode == 0, r.stderr
    (f,) = r.flows
    assert f["client"] == "10.40.4.2:46045" and f["server"] == "10.40.3.2:143"
    assert f["imap"] is True and f["username"] == "samir" and f["login_ok"] is True
    assert f["cleartext_credentials"] is True and "cleartext_credentials" in f["findings"]
    assert f["capabilities"] == ["IMAP4REV1", "IDLE", "AUTH=LOGIN", "AUTH=PLAIN", "AUTH=CRAM-MD5"]
    assert f["mailboxes"] == ["INBOX"]
    assert f["server_software"] == "IMAP4Rev1 Server Version 4.9.04.012"
    assert f["server_product"] is None and f["server_version"] is None  # a version, but whose?
    assert f["commands"]["UID FETCH"] == 1 and f["commands"]["LSUB"] == 1
    assert "pfres" not in r.stdout + r.stderr
    # the {666} header literal is data: no line of the header is a message
    fetch = [m for m in r.messages if m["command"] == "FETCH" and m["kind"] == "untagged"]
    assert [m["literals"] for m in fetch] == [[666]]
    assert not [m for m in r.messages if m["text"] and "Received:" in (m["text"] or "")]


def test_ndpi_starttls_completed_then_nothing_parsed(imaptap):
    r = imaptap("-r", pcap("ndpi/imap-starttls.pcap"), "--json", "-")
    assert r.returncode == 0, r.stderr
    (f,) = r.flows
    assert f["starttls"] == "completed" and f["encrypted"] is True
    assert f["server_software"] is None  # "IMAP server ready H migmx013 ...": protocol words, a host id
    zeek_caps = open(pcap("zeek/baseline-capabilities/stdout")).read().splitlines()[-1]
    caps = [c.strip().upper() for c in zeek_caps.strip("[]").split(",")]
    assert len(caps) == 20 and f["capabilities"] == caps
    last = r.messages[-1]
    assert (last["from"], last["tag"], last["status"], last["text"]) == \
        ("server", ".", "OK", "Begin TLS negotiation now")
    assert f["bytes_not_captured"] > 1000  # the TLS bytes were never copied


def test_ndpi_imaps_port_993_is_not_plaintext_imap(imaptap):
    r = imaptap("-r", pcap("ndpi/imaps.pcap"), "--json", "-")
    assert r.returncode == 0, r.stderr
    assert r.flows == [] and r.stats["segments"] == 0
    r = imaptap("-r", pcap("ndpi/imaps.pcap"), "--json", "-", "--port", "993")
    assert len(r.flows) == 2
    assert all(f["encrypted_from_start"] and not f["imap"] for f in r.flows)
    assert r.messages == []


@pytest.mark.parametrize("name", ["arkime/imap.pcap", "suricata-verify/imap-detection.pcap"])
def test_exchange_1999_session(imaptap, name):
    r = imaptap("-r", pcap(name), "--json", "-")
    assert r.returncode == 0, r.stderr
    (f,) = r.flows  # the two unrelated flows in arkime/imap.pcap are not on port 143
    assert f["client"] == "131.151.32.21:4167" and f["server"] == "131.151.37.122:143"
    assert f["username"] == "neulingern" and f["login_ok"] is True
    assert set(f["mailboxes"]) == {"INBOX"}
    assert f["server_software"] == "Microsoft Exchange 5.5.2650.23"
    assert (f["server_product"], f["server_version"]) == ("Microsoft Exchange", "5.5.2650.23")
    assert f["capabilities"] == ["IMAP4", "IMAP4REV1", "IDLE", "LITERAL+", "LOGIN-REFERRALS", "MAILBOX-REFERRALS",
                                 "NAMESPACE", "AUTH=NTLM"]
    assert "XXXXXX" not in r.stdout
    login = [m for m in r.messages if m["command"] == "LOGIN" and m["kind"] == "request"][0]
    assert login["args"] == "neulingern ***"
    # header and RFC822 literals are skipped: no From:/Subject: line turns into a message
    assert not [m for m in r.messages if re.match(r"(From|Subject|Received):", (m["text"] or "") + (m["tag"] or ""))]
    # 256-byte prefixes of FETCH segments hide some literal announcements: the lines lost that
    # way are counted, never shown
    assert set(f["anomalies"]) <= {"bad_response"} and f["resyncs"] > 0 and f["gaps"] == 0
    whole = imaptap("-r", pcap(name), "--json", "-", "-s", "65535")
    (g,) = whole.flows
    assert g["anomalies"] == {} and g["resyncs"] == 0 and g["bytes_not_captured"] == 0
    same = ("username", "mailboxes", "commands")
    assert {k: g[k] for k in same} == {k: f[k] for k in same}


def test_arkime_greeting_alone_is_an_imap_flow(imaptap):
    r = imaptap("-r", pcap("arkime/imap-tag.pcap"), "--json", "-")
    (f,) = r.flows
    assert f["imap"] is True and f["greeting"] == "IMAP4 ready" and f["commands"] == {}
    assert f["server_software"] is None  # protocol words name no product


def test_arkime_pop3_is_no_imap_flow(imaptap):
    r = imaptap("-r", pcap("arkime/pop3-tag.pcap"), "--json", "-")
    assert r.returncode == 0 and r.flows == [] and r.messages == []
    # even when told port 110 is IMAP, a POP3 greeting does not confirm IMAP
    r = imaptap("-r", pcap("arkime/pop3-tag.pcap"), "--json", "-", "--port", "110")
    assert r.flows and not any(f["imap"] for f in r.flows)


def test_suricata_server_only_capture(imaptap):
    r = imaptap("-r", pcap("suricata-verify/tcp-async-01.pcap"), "--json", "-")
    assert r.returncode == 0, r.stderr
    (f,) = r.flows
    assert f["server"].endswith(":143")
    assert f["commands"] == {} and f["username"] is None
    assert f["server_software"] == "Coremail"
    assert (f["server_product"], f["server_version"]) == ("Coremail", None)  # its ID names no version
    assert f["server_id"] == {"name": "Coremail Imap", "vendor": "Mailtech", "transid": "30hHvAA3YDdrIA5c"}
    assert "STARTTLS" in f["capabilities"] and f["starttls"] == "offered"
    assert not [m for m in r.messages if m["from"] == "client"]
    body_fetch = [m for m in r.messages if m["command"] == "FETCH"]
    assert [m.get("literals") for m in body_fetch] == [[180237], None]
    assert body_fetch[1]["args"] == "(UID 1320886124 FLAGS ())"  # found again after 180 KB of body
    # everything else the server said is a real response: greeting, CAPABILITY, ID, SELECT data, completions
    assert len(r.messages) < 40
    assert all(m["tag"] is None or re.fullmatch(r"C\d+", m["tag"]) for m in r.messages)


def test_zeek_fuzz_corpus_exchange_session():
    from imaptap.imap.session import ImapSession

    msgs = []
    s = ImapSession(on_message=msgs.append)
    data = open(pcap("zeek/fuzz-corpus/imap-0001.pcap.pkt"), "rb").read()
    parts = re.split(rb"\x01PKT([\x01\x02])", data)[1:]
    for direction, chunk in zip(parts[::2], parts[1::2], strict=True):
        (s.client if direction == b"\x01" else s.server).feed(chunk)
    s.finish()
    assert s.username == "neulingern" and s.login_ok and s.mailboxes == ["INBOX", "INBOX"]
    assert not s.anomalies


@pytest.mark.parametrize("name", ["imap-0002.pcap.pkt", "imap-0003.pcap.pkt"])
def test_zeek_fuzz_junk_does_not_raise(name):
    from imaptap.imap.session import ImapSession

    s = ImapSession(on_message=lambda m: None)
    data = open(pcap("zeek/fuzz-corpus/" + name), "rb").read()
    parts = re.split(rb"\x01PKT([\x01\x02])", data)[1:]
    for direction, chunk in zip(parts[::2], parts[1::2], strict=True):
        (s.client if direction == b"\x01" else s.server).feed(chunk)
    s.finish()
