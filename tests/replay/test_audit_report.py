"""The audit report of real captures (--report --format json), its numbers checked against
pcaps/facts.json (written from how each session was driven) and against the facts the
third-party captures' projects expect; and --fail-on for each finding on the captures that have
it and on those that do not."""

import collections
import json
import os

import pytest

from imaptap.clients import guess
from imaptap.findings import FINDINGS, Finding, Scope
from imaptap.pipeline import ReplaySource, Sink
from testenv import OWN_PCAPS
from testenv import public_pcap as public

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
SOFTWARE = {"imaplib": "Python imaplib", "curl": "curl", "mbsync": "mbsync", "fetchmail": "fetchmail",
            "offlineimap": "OfflineIMAP"}


def ports(name):
    return [a for p in FACTS[name]["ports"] for a in ("--port", str(p))]


def report(imaptap, path, *extra):
    r = imaptap("-r", path, "--format", "json", *extra)
    assert r.returncode == 0, r.stderr
    (rec,) = r.records
    assert rec["type"] == "report"
    return rec


def server_key(flow):
    """How facts.json tells the servers of one capture apart: family, port, and whether it is the
    strict address (it listed STARTTLS but no plaintext mechanism)."""
    return (flow["family"], flow["port"], not flow["auth_plain_offered"] and flow["starttls"] != "none")


@pytest.mark.parametrize("name", sorted(FACTS))
def test_the_report_agrees_with_the_facts(imaptap, name):
    spec = FACTS[name]
    rec = report(imaptap, os.path.join(OWN_PCAPS, name), *ports(name))
    flows = [f for f in spec["flows"] if f["imap"]]  # another protocol's flows are counted, not reported
    assert rec["flows"] == len(spec["flows"]) and rec["imap_flows"] == len(flows)
    # servers
    by_key = collections.defaultdict(list)
    for f in flows:
        by_key[server_key(f)].append(f)
    assert len(rec["servers"]) == len(by_key)
    for server in rec["servers"]:
        family = "ipv6" if server["server"].startswith("[") else "ipv4"
        port = int(server["server"].rsplit(":", 1)[1])
        strict = "LOGINDISABLED" in server["offered"]
        want = by_key[(family, port, strict)]
        assert server["software"] == want[0]["server_software"]
        assert server["sessions"] == len(want)
        assert server["starttls_used"] == sum(f["starttls"] == "completed" for f in want)
        assert server["cleartext_logins"] == sum(f["cleartext_credentials"] for f in want)
        assert server["logins_ok"] == sum(f["login_ok"] is True for f in want)
        assert server["failed_logins"] == sum(f["login_failures"] for f in want)
        assert ("AUTH=PLAIN" in server["offered"]) == any(f["auth_plain_offered"] for f in want)
        assert ("STARTTLS" in server["offered"]) == any(f["starttls"] != "none" for f in want)
    # clients: every lab client runs on the root namespace's one address per family
    families = {f["family"] for f in flows}
    assert len(rec["clients"]) == len(families)
    for client in rec["clients"]:
        want = [f for f in flows if f["family"] == ("ipv6" if ":" in client["client"] else "ipv4")]
        assert client["sessions"] == len(want)
        users = {f["username"] for f in want if f["username"]} | {a["user"] for f in want
                                                                 for a in f.get("attempts", []) if a["user"]}
        assert set(client["users"]) == users
        assert client["starttls_used"] == sum(f["starttls"] in ("completed", "requested") for f in want)
        assert client["starttls_unused"] == sum(f["starttls"] == "offered" for f in want)
        assert client["starttls_refused"] == sum(f["starttls"] == "refused" for f in want)
        assert client["cleartext_logins"] == sum(f["cleartext_credentials"] for f in want)
        assert client["failed_logins"] == sum(f["login_failures"] for f in want)
        named = {s["name"] for s in client["software"]}
        expected = {f["client_id"]["name"] if f["client_id"] else SOFTWARE.get(f["client_kind"]) for f in want}
        assert named == expected - {None}
    # findings: every finding of a flow, with its flows counted; the attacks the facts state
    counts = collections.Counter(name for f in flows for name in f["findings"])
    got = {row["finding"]: row for row in rec["findings"]}
    assert {k: v["flows"] for k, v in got.items() if FINDINGS[Finding(k)].scope is Scope.FLOW} == dict(counts)
    assert {a for row in rec["attacks"] for a in row["kinds"]} == set(spec["attacks"])
    assert {k for k in got if FINDINGS[Finding(k)].scope is Scope.SOURCE} == set(spec["attacks"])
    severities = [row["severity"] for row in rec["findings"]]
    order = ["high", "medium", "low"]
    assert severities == sorted(severities, key=order.index)
    text = json.dumps(rec)
    assert not [s for s in spec["secrets"] if s in text]


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_every_format_of_every_capture_holds_no_secret(imaptap, fmt):
    for name, spec in FACTS.items():
        r = imaptap("-r", os.path.join(OWN_PCAPS, name), *ports(name), "--format", fmt)
        assert r.returncode == 0 and r.stdout.startswith(("imaptap audit report", "# imaptap", "{")), r.stderr
        assert not [s for s in spec["secrets"] if s in r.stdout + r.stderr], name


def test_attacks_name_the_login_that_followed(imaptap):
    rec = report(imaptap, os.path.join(OWN_PCAPS, "brute-force.pcap"))
    (attack,) = rec["attacks"]
    assert attack["kinds"] == ["brute_force"] and attack["top_user"] == "alice" and attack["top_user_passwords"] == 6
    assert attack["logged_in_after_failing"] == ["alice"]
    rec = report(imaptap, os.path.join(OWN_PCAPS, "password-spraying.pcap"))
    (attack,) = rec["attacks"]
    assert attack["users"] == 6 and attack["passwords"] == 1 and attack["top_password_users"] == 6
    rec = report(imaptap, os.path.join(OWN_PCAPS, "credential-stuffing.pcap"))
    (attack,) = rec["attacks"]
    assert attack["users"] == attack["passwords"] == 5 and attack["logged_in_after_failing"] == ["carol"]


class _Audits(Sink):
    def __init__(self):
        self.audits = []

    def flow_ended(self, flow, facts):
        self.audits.append(flow.session.audit)


def test_offlineimap_is_told_by_its_habits_too():
    """It sends ID; without that, its tags alone (imaplib's shape, counted from 1) still name it."""
    from imaptap.pipeline import Pipeline

    kept = _Audits()
    Pipeline(ReplaySource(os.path.join(OWN_PCAPS, "cyrus-offlineimap.pcap"), [143]), [kept]).run()
    (audit,) = kept.audits
    assert guess(audit, None).name == "OfflineIMAP"


def test_the_report_of_third_party_captures(imaptap):
    rec = report(imaptap, public("ndpi/imap.pcap"))
    (server,) = rec["servers"]
    assert server["server"] == "10.40.3.2:143" and server["software"] == "IMAP4Rev1 Server Version 4.9.04.012"
    assert server["offered"] == ["AUTH=LOGIN", "AUTH=PLAIN", "AUTH=CRAM-MD5"]
    assert (server["sessions"], server["cleartext_logins"], server["logins_ok"]) == (1, 1, 1)
    (client,) = rec["clients"]
    assert client["client"] == "10.40.4.2" and client["users"] == ["samir"] and client["mechanisms"] == ["LOGIN"]
    assert {row["finding"] for row in rec["findings"]} == {"cleartext_credentials", "auth_plain_before_starttls"}
    for name in ("arkime/imap.pcap", "suricata-verify/imap-detection.pcap"):
        rec = report(imaptap, public(name))
        (server,) = rec["servers"]
        assert server["server"] == "131.151.37.122:143" and server["software"] == "Microsoft Exchange 5.5.2650.23"
        assert server["offered"] == ["AUTH=NTLM"]  # no STARTTLS, no plaintext mechanism
        (client,) = rec["clients"]
        assert client["client"] == "131.151.32.21" and client["users"] == ["neulingern"]
        assert [row["finding"] for row in rec["findings"]] == ["cleartext_credentials"]
    rec = report(imaptap, public("ndpi/imap-starttls.pcap"))
    (client,) = rec["clients"]
    assert client["starttls_used"] == 1 and client["cleartext_logins"] == 0


# --- --fail-on -----------------------------------------------------------------------------------

FLOW_FINDINGS = [f for f in Finding if FINDINGS[f].scope is Scope.FLOW]


@pytest.mark.parametrize("finding", list(Finding))
def test_fail_on_each_finding_on_the_captures_that_have_it_and_those_that_do_not(imaptap, finding):
    have = [n for n, spec in FACTS.items()
            if finding.value in spec["attacks"] or any(finding.value in f.get("findings", ()) for f in spec["flows"])]
    have_not = [n for n in FACTS if n not in have]
    assert have and have_not, "each finding must be shown by some capture and not by another"
    for name in sorted(FACTS):
        r = imaptap("-r", os.path.join(OWN_PCAPS, name), *ports(name), "--json", os.devnull,
                    "--fail-on", finding.value)
        lines = r.stderr.splitlines()
        if name in have_not:
            assert r.returncode == 0 and lines == [], (name, r.stderr)
            continue
        assert r.returncode == 3, (name, r.stderr)
        spec = FACTS[name]
        if FINDINGS[finding].scope is Scope.FLOW:
            want = sum(finding.value in f.get("findings", ()) for f in spec["flows"])
        else:
            want = sum(f["imap"] for f in spec["flows"])  # every flow of the attacking source tried a password
        assert len(lines) == want and all(line.startswith("imaptap: ") and finding.value in line
                                          for line in lines), (name, r.stderr)
        assert len({line.split("flow ")[1].split()[0] for line in lines}) == want  # each flow once


def test_fail_on_any_and_lists(imaptap):
    clean = os.path.join(OWN_PCAPS, "starttls.pcap")  # only the server's AUTH=PLAIN in clear
    r = imaptap("-r", clean, "--json", os.devnull, "--fail-on", "cleartext_credentials,failed_logins")
    assert r.returncode == 0 and r.stderr == ""
    r = imaptap("-r", clean, "--json", os.devnull, "--fail-on", "any")
    assert r.returncode == 3 and "auth_plain_before_starttls: flow 1 " in r.stderr
    r = imaptap("-r", os.path.join(OWN_PCAPS, "failed-login.pcap"), "--fail-on", "failed_logins,cleartext_credentials")
    assert r.returncode == 3 and r.flows  # JSON to stdout as usual, the gate's lines on stderr
    assert r.stderr.splitlines()[0].startswith("imaptap: cleartext_credentials, failed_logins: flow 1 ")


@pytest.mark.parametrize("value", ["bogus", "cleartext_credentials,nope", ","])
def test_fail_on_a_bad_name_is_one_line_and_status_2(imaptap, value):
    r = imaptap("-r", os.path.join(OWN_PCAPS, "login-atom.pcap"), "--fail-on", value)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_bad_input_wins_over_the_gate(imaptap, tmp_path):
    data = open(os.path.join(OWN_PCAPS, "failed-login.pcap"), "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 3 // 4])
    r = imaptap("-r", str(cut), "--json", os.devnull, "--fail-on", "any")
    assert r.returncode == 2 and "truncated" in r.stderr


def test_report_and_json_to_stdout_are_refused(imaptap):
    r = imaptap("-r", os.path.join(OWN_PCAPS, "login-atom.pcap"), "--report", "--json", "-")
    assert r.returncode == 2 and "standard output" in r.stderr
