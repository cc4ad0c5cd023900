"""Captures of a real Dovecot (and Cyrus) and real clients (scripts/make-captures), checked against pcaps/facts.json.

facts.json was written by the script that drove each session, from what it did, not from
imaptap's output.  Each capture is replayed twice: with the default 256-byte prefixes, as the
kernel copies them, and whole (-s 65535); both must give the same facts.
"""

import collections
import json
import os

import pytest

from imaptap.imap.audit import PasswordFingerprint
from testenv import OWN_PCAPS

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
SCALARS = ("username", "authzid", "auth_command", "auth_mechanism", "login_ok", "login_failures", "starttls",
           "compressed", "mailboxes", "client_id", "server_id", "server_software", "cleartext_credentials",
           "capabilities", "findings")
#: The key the captures are replayed with, so the test knows each password's fingerprint.
KEY = bytes(range(100, 132))
FINGERPRINT = PasswordFingerprint(KEY)
#: The software imaptap must name for each kind of client in facts.json (None: no guess);
#: a client that sent ID is named by it.
SOFTWARE = {"imaplib": "Python imaplib", "curl": "curl", "mbsync": "mbsync", "fetchmail": "fetchmail",
            "offlineimap": "OfflineIMAP", "raw": None}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "password-key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o600)
    return str(path)


def replay(imaptap, name, *extra):
    spec = FACTS[name]
    ports = [a for p in spec["ports"] for a in ("--port", str(p))]
    r = imaptap("-r", os.path.join(OWN_PCAPS, name), "--json", "-", *ports, *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("snap", ["256", "65535"])
@pytest.mark.parametrize("name", sorted(FACTS))
def test_capture_gives_the_facts_of_the_session(imaptap, name, snap, key_file):
    spec = FACTS[name]
    r = replay(imaptap, name, "-s", snap, "--password-key", key_file)
    flows = sorted(r.flows, key=lambda f: f["first_ts"])
    assert len(flows) == len(spec["flows"]), [f["client"] for f in flows]
    for got, want in zip(flows, spec["flows"], strict=True):
        assert got["server"].endswith(f":{want['port']}")
        assert got["ip_version"] == (6 if want["family"] == "ipv6" else 4)
        assert got["imap"] is want.get("imap", True)
        if not got["imap"]:  # another protocol on the port: no message, no IMAP fact
            assert not [m for m in r.messages if m["flow"] == got["flow"]]
            assert (got["username"], got["commands"], got["cleartext_credentials"], got["anomalies"]) == \
                (None, {}, False, {})
            continue
        for key in SCALARS:
            if key in want:
                assert got[key] == want[key], (key, got[key], want[key])
        software = want.get("server_software")
        if software == "Dovecot":
            assert (got["server_product"], got["server_version"]) == ("Dovecot", None)
        elif software is not None and software.startswith("Cyrus IMAP "):  # the version whole, +deb12u5 too
            assert (got["server_product"], got["server_version"]) == ("Cyrus IMAP", software[len("Cyrus IMAP "):])
        elif software is None:  # no server byte captured
            assert (got["server_product"], got["server_version"]) == (None, None)
        if "commands" in want:
            assert got["commands"] == dict(collections.Counter(want["commands"]))
        if "attempts" in want:
            assert [(a["user"], a["password_hmac"], a["ok"]) for a in got["login_attempts"]] == [
                (a["user"], None if a["password"] is None else FINGERPRINT(a["password"].encode()), a["ok"])
                for a in want["attempts"]]
        software = got["client_software"]
        if want["client_id"] and want["client_id"].get("name"):
            assert software["from"] == "id" and software["name"] == want["client_id"]["name"]
        elif SOFTWARE[want["client_kind"]] is None:
            assert software is None, software
        else:
            assert software["name"] == SOFTWARE[want["client_kind"]] and software["from"] == "fingerprint"
    assert r.stats["imap_flows"] + r.stats["non_imap_flows"] == len(flows)
    assert r.stats["non_imap_flows"] == sum(1 for f in spec["flows"] if not f.get("imap", True))
    everything = r.stdout + r.stderr
    for secret in spec["secrets"]:
        assert secret not in everything
    for decoy in spec.get("decoys", []):
        assert decoy not in json.dumps(r.flows)


def test_the_tail_holds_the_login_completion(imaptap):
    # Dovecot answers LOGIN with ~430 bytes: untagged CAPABILITY, then "tag OK Logged in".
    with_tail = replay(imaptap, "login-atom.pcap")
    (f,) = with_tail.flows
    assert f["login_ok"] is True and "login_completion_lost" not in f["anomalies"]
    ok = [m for m in with_tail.messages if m["command"] == "LOGIN" and m["kind"] == "response"]
    assert ok and ok[0]["text"] == "Logged in" and ok[0]["latency_ms"] is not None
    # without the tail (and without the handshake's longer heads) the completions of LOGIN,
    # SELECT and FETCH are all lost
    g = replay(imaptap, "login-atom.pcap", "--tail", "0", "--handshake-snaplen", "0")
    (f,) = g.flows
    assert f["login_ok"] is None and f["username"] == "alice"
    assert [m["command"] for m in g.messages if m["kind"] == "response"] == ["CAPABILITY", "LOGOUT"]
    # the handshake's copy rule keeps the answers of LOGIN and SELECT whole; FETCH's, after them, is cut
    h = replay(imaptap, "login-atom.pcap", "--tail", "0")
    (f,) = h.flows
    assert f["login_ok"] is True and f["capabilities"] == (with_tail.flows[0]["capabilities"])
    assert [m["command"] for m in h.messages if m["kind"] == "response"] == ["CAPABILITY", "LOGIN", "SELECT", "LOGOUT"]


CYRUS = sorted(name for name in FACTS if name.startswith("cyrus-"))


@pytest.mark.parametrize("name", CYRUS)
def test_cyrus_handshakes_are_whole_with_the_default_cut(imaptap, name):
    """Cyrus' post-login capabilities (~1 KB in one line), its ID answer and SELECT's data are
    longer than head and tail: the handshake's copy rule keeps them whole."""
    (want,) = FACTS[name]["flows"]
    (f,) = replay(imaptap, name).flows
    assert f["resyncs"] == 0 and f["bytes_not_captured"] == 0
    assert f["capabilities"] == want.get("capabilities", f["capabilities"]) and len(f["capabilities"]) > 50
    if want["server_id"]:
        assert f["server_id"] == want["server_id"] and f["server_id"]["environment"].endswith("idled")
    # the snap length's cut from the first segment on: what imaptap gave before the rule
    (cut,) = replay(imaptap, name, "--handshake-snaplen", "0").flows
    assert cut["resyncs"] >= 2 and len(cut["capabilities"]) < len(f["capabilities"])


def test_there_are_captures_of_cyrus():
    assert {FACTS[n]["flows"][0]["client_kind"] for n in CYRUS} >= {"imaplib", "curl", "fetchmail", "offlineimap"}
