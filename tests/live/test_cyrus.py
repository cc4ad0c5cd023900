"""The whole tool live against the lab's second server, Cyrus IMAP, with real clients.

Cyrus 3.6 answers a login with one ~1 KB ``OK [CAPABILITY ...]`` and ID with a ~500-byte list,
lines longer than the snap length's head and tail.  `imaptap -i` watches the veth while
imaplib, fetchmail and offlineimap3 talk to it: with the default settings the kernel copies
each flow's handshake whole (`PayloadMode.HANDSHAKE`, ended by the analyzer through the kernel
map), so the capabilities and the ID answer come out whole and nothing is resynchronised;
tcpdump's capture of the same sessions, replayed, gives the same facts.
"""

from __future__ import annotations

import imaplib
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_cli_live import assert_stopped_cleanly, env, imaptap_cmd, wait_attached

from imaptap_lab import cyrus
from imaptap_lab.lab import IMAP_PORT, Lab
from imaptap_lab.make_captures import FETCHMAIL_RC, OFFLINEIMAP_RC
from livelab import IN_CI

pytestmark = pytest.mark.live

FACTS = ("imap", "username", "authzid", "auth_command", "auth_mechanism", "login_ok", "mailboxes", "commands",
         "server_software", "server_product", "server_version", "client_id", "server_id", "capabilities",
         "cleartext_credentials")
CLIENT_TIMEOUT = 60


@pytest.fixture
def cyrus_lab(live_ready):
    """Cyrus in its own namespace, unpacked from the .debs scripts/setup fetched."""
    tools = ("tcpdump", "openssl", "dpkg-deb", "fetchmail", "offlineimap")
    missing = [tool for tool in tools if not shutil.which(tool)]
    try:
        cyrus.debs()
    except cyrus.CyrusError as err:
        missing.append(str(err))
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true and {', '.join(missing)} missing (scripts/setup installs them)", pytrace=False)
        pytest.skip(f"needs {', '.join(missing)}")
    with Lab(server="cyrus") as lab:
        yield lab


def sessions(lab: Lab, tmp: Path) -> dict:
    """imaplib (LOGIN, ID, SELECT, FETCH), fetchmail and offlineimap; what imaplib received."""
    imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
    imap = imaplib.IMAP4(lab.server4, 143, timeout=CLIENT_TIMEOUT)
    _, data = imap.login("alice", lab.users["alice"])
    imap._simple_command("ID", '("name" "imaptap-live")')
    server_id = imap.untagged_responses.pop("ID")[0]
    imap.select("INBOX")
    imap.fetch("1", "(BODY.PEEK[])")
    imap.logout()
    rc = tmp / "fetchmailrc"
    rc.write_text(FETCHMAIL_RC.format(host=lab.server4, port=IMAP_PORT, user="carol", password=lab.users["carol"]))
    rc.chmod(0o600)
    subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "--idfile", str(tmp / "ids"), "--pidfile",
                    str(tmp / "pid")], check=True, capture_output=True, timeout=CLIENT_TIMEOUT, env={"HOME": str(tmp)})
    rc = tmp / "offlineimaprc"
    rc.write_text(OFFLINEIMAP_RC.format(tmp=tmp, host=lab.server4, port=IMAP_PORT, user="dave",
                                        password=lab.users["dave"]))
    subprocess.run(["offlineimap", "-c", str(rc), "-o"], check=True, capture_output=True, timeout=CLIENT_TIMEOUT,
                   env={"HOME": str(tmp), "PATH": "/usr/bin:/bin"})
    return {"greeting": imap.welcome, "login": data[-1], "id": server_id}


def test_live_capture_of_cyrus_keeps_the_handshake_whole(cyrus_lab, tmp_path):
    lab = cyrus_lab
    for user in ("alice", "carol", "dave"):
        for n in range(2):
            lab.deliver(user, f"Subject: cyrus {n}\r\n\r\n{'body line ' * 60}\r\n".encode())
    out, pcap = tmp_path / "live.jsonl", tmp_path / "same.pcap"
    proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--json", str(out)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_attached(proc, lab.host_if)
        with lab.capture(pcap), tempfile.TemporaryDirectory(prefix="imaptap-cyrus-") as tmp:
            received = sessions(lab, Path(tmp))
            time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert_stopped_cleanly(proc, err, lab.host_if)

    text = out.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records[-1]["lost"] == 0 and records[-1]["policy_errors"] == 0
    flows = sorted((r for r in records if r["type"] == "flow"), key=lambda f: f["first_ts"])
    assert [f["username"] for f in flows] == ["alice", "carol", "dave"]
    assert all(f["login_ok"] and f["resyncs"] == 0 and f["server_software"].startswith("Cyrus IMAP 3.")
               for f in flows)
    alice, carol, dave = flows
    # the version whole, as the greeting writes it (Debian's "+deb12uN" and all)
    version = re.search(rb" Cyrus IMAP (\S+) server ready", received["greeting"]).group(1).decode()
    assert all((f["imap"], f["server_product"], f["server_version"]) == (True, "Cyrus IMAP", version)
               for f in flows)
    whole = received["login"].split(b"]", 1)[0].removeprefix(b"[CAPABILITY ").decode().upper().split()
    assert len(whole) > 50 and alice["capabilities"] == whole == carol["capabilities"]
    assert alice["server_id"]["environment"] in received["id"].decode() and dave["server_id"] == alice["server_id"]
    assert received["id"].decode().endswith(f'"environment" "{alice["server_id"]["environment"]}")')
    assert (carol["auth_command"], dave["auth_mechanism"]) == ("LOGIN", "PLAIN")
    assert dave["client_id"]["name"] == "OfflineIMAP" and alice["client_id"] == {"name": "imaptap-live"}
    for password in (lab.users[u] for u in ("alice", "carol", "dave")):
        assert password not in text

    replayed = subprocess.run(imaptap_cmd("-r", str(pcap), "--json", "-", "--flows-only"), capture_output=True,
                              text=True, env=env(), check=True)
    replay_flows = sorted((r for r in map(json.loads, replayed.stdout.splitlines()) if r["type"] == "flow"),
                          key=lambda f: f["first_ts"])
    assert [{k: f[k] for k in FACTS} for f in replay_flows] == [{k: f[k] for k in FACTS} for f in flows]
    assert all(f["resyncs"] == 0 for f in replay_flows)
