"""The whole tool live: `imaptap -i` on the lab's veth, real clients, SIGINT, JSON facts.

Dovecot runs in its own namespace (scripts/imaplab.py); imaplib, curl and mbsync talk to it
over IPv4 and IPv6 while imaptap's kernel program watches the host end of the veth and tcpdump
records the same sessions.  After SIGINT the JSON must hold the facts of every session, no
password, and the replayed tcpdump capture must give the same facts.
"""

from __future__ import annotations

import base64
import imaplib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imaptap_lab.programs import capturing, programs_on
from livelab import ROOT, dropped_uid

FACTS = ("username", "auth_command", "auth_mechanism", "login_ok", "login_failures", "starttls",
         "encrypted", "compressed", "mailboxes", "commands", "cleartext_credentials", "server_software")
ATTACH_TIMEOUT = 120.0
MBSYNC_CONF = """\
IMAPAccount lab
Host {host}
Port 143
User {user}
Pass "{password}"
SSLType None
AuthMechs LOGIN

IMAPStore far
Account lab

MaildirStore near
Path {tmp}/
Inbox {tmp}/INBOX

Channel lab
Far :far:
Near :near:
Sync Pull
Create Near
SyncState *
"""


def imaptap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imaptap", *args]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "userspace"))


def attached(ifname: str) -> bool:
    return capturing(ifname)  # its egress program, a TCX link or a filter


def assert_stopped_cleanly(proc: subprocess.Popen, err: str, ifname: str) -> None:
    """Exit 0 without a traceback, and neither TC program nor XDP program left on ``ifname``."""
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert programs_on(ifname) == []
    assert "xdp" not in subprocess.run(["ip", "link", "show", ifname], capture_output=True, text=True).stdout


def wait_attached(proc: subprocess.Popen, ifname: str) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while not attached(ifname):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "imaptap did not attach in time"
        time.sleep(0.2)
    time.sleep(0.5)  # the XDP program goes on after the TC filter


def assert_dropped(pid: int) -> None:
    """The process runs as nobody with only CAP_NET_ADMIN and CAP_BPF, and no way back."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(dropped_uid())] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 1 << 12 | 1 << 39
    assert int(status["CapBnd"], 16) == 1 << 12 | 1 << 39
    assert status["NoNewPrivs"].strip() == "1"


def sessions(lab) -> dict[str, str]:
    """Real clients against the lab; returns what each flow's user should be, by client kind."""
    users = lab.users
    alice, bob, carol, dave = (users[u] for u in ("alice", "bob", "carol", "dave"))
    # imaplib, IPv4, LOGIN, SELECT, FETCH a whole mail
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    imap.login("alice", alice)
    imap.select("INBOX")
    imap.fetch("1", "(BODY.PEEK[])")
    imap.logout()
    # imaplib, IPv6, AUTHENTICATE PLAIN after a continuation
    imap = imaplib.IMAP4(lab.server6, 143, timeout=30)
    imap.authenticate("PLAIN", lambda _: f"\0bob\0{bob}".encode())
    imap.select("INBOX")
    imap.logout()
    # imaplib, STARTTLS, then a login nobody on the wire can read
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    imap.starttls(ctx)
    imap.login("carol", carol)
    imap.logout()
    # curl with SASL-IR PLAIN on the non-standard port
    subprocess.run(["curl", "-sS", "--max-time", "30", "--sasl-ir", "--login-options", "AUTH=PLAIN",
                    "-u", f"alice:{alice}", f"imap://{lab.server4}:10143/"],
                   check=True, capture_output=True)
    # mbsync: COMPRESS DEFLATE right after LOGIN
    with tempfile.TemporaryDirectory(prefix="imaptap-mbsync-") as tmp:
        conf = Path(tmp) / "mbsyncrc"
        conf.write_text(MBSYNC_CONF.format(host=lab.server4, user="dave", password=dave, tmp=tmp))
        subprocess.run(["mbsync", "-c", str(conf), "-a"], check=True, capture_output=True, timeout=60)
    return {"alice": alice, "bob": bob, "carol": carol, "dave": dave}


def facts(flow: dict) -> dict:
    return {k: flow[k] for k in FACTS}


def test_live_cli_on_real_sessions(lab, tmp_path):
    for user in ("alice", "bob", "dave"):
        for n in range(3):
            lab.deliver(user, f"Subject: live {n}\r\n\r\n{'body line ' * 40}\r\n".encode())
    out = tmp_path / "live.jsonl"
    pcap = tmp_path / "same.pcap"
    written = tmp_path / "written.pcap"
    proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--port", "143", "--port", "10143", "--json", str(out),
                                        "-w", str(written)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    try:
        wait_attached(proc, lab.host_if)
        assert_dropped(proc.pid)
        with lab.capture(pcap):
            passwords = sessions(lab)
            time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert_stopped_cleanly(proc, err, lab.host_if)

    text = out.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    stats = records[-1]
    assert stats["type"] == "stats" and stats["stopped_by_signal"] is True
    assert stats["lost"] == 0 and stats["submitted"] > 0
    # after the drop to nobody, the kernel still learnt of the STARTTLS flow (see below)
    assert stats["user"] == ("nobody" if dropped_uid() else "root") and stats["policy_errors"] == 0
    live_flows = sorted((r for r in records if r["type"] == "flow"), key=lambda f: f["first_ts"])
    by_user = {f["username"]: f for f in live_flows if f["username"]}

    alice = [f for f in live_flows if f["username"] == "alice"]
    assert len(alice) == 2
    assert alice[0]["auth_command"] == "LOGIN" and alice[0]["mailboxes"] == ["INBOX"] and alice[0]["login_ok"]
    assert alice[1]["server"].endswith(":10143") and alice[1]["auth_mechanism"] == "PLAIN"
    bob = by_user["bob"]
    assert bob["server"].startswith("[fd00:") and bob["auth_mechanism"] == "PLAIN" and bob["login_ok"]
    tls = [f for f in live_flows if f["starttls"] == "completed"]
    assert len(tls) == 1 and tls[0]["username"] is None and tls[0]["encrypted"]
    assert "carol" not in text
    dave = by_user["dave"]
    assert dave["compressed"] and dave["anomalies"] == {} and dave["mailboxes"] == ["INBOX"]
    assert dave["commands"]["UID FETCH"] >= 2  # read from the inflated stream
    for user, password in passwords.items():
        assert password not in text
        assert base64.b64encode(f"\0{user}\0{password}".encode()).decode() not in text

    replayed = subprocess.run(imaptap_cmd("-r", str(pcap), "--port", "143", "--port", "10143", "--json", "-",
                                          "--flows-only"), capture_output=True, text=True, env=env(), check=True)
    replay_flows = sorted((json.loads(line) for line in replayed.stdout.splitlines()),
                          key=lambda r: r.get("first_ts", 0))
    replay_flows = [f for f in replay_flows if f["type"] == "flow"]
    assert [facts(f) for f in replay_flows] == [facts(f) for f in live_flows]

    # -w wrote what the kernel copied (heads only): replayed, the same users, commands, mailboxes
    again = subprocess.run(imaptap_cmd("-r", str(written), "--port", "143", "--port", "10143", "--json", "-",
                                       "--flows-only"), capture_output=True, text=True, env=env(), check=True)
    assert not any(password in again.stdout for password in passwords.values())
    raw = written.read_bytes()  # the pcap itself: credentials blanked, user names kept
    for user, password in passwords.items():
        assert password.encode() not in raw
        assert base64.b64encode(f"\0{user}\0{password}".encode()) not in raw
    written_flows = sorted((json.loads(line) for line in again.stdout.splitlines()), key=lambda r: r.get("first_ts", 0))
    written_flows = [f for f in written_flows if f["type"] == "flow"]
    keys = ("username", "auth_mechanism", "mailboxes", "starttls")
    assert [{k: f[k] for k in keys} for f in written_flows] == [{k: f[k] for k in keys} for f in live_flows]
    assert stats["written"] == stats["received"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_flush_open_flows_and_detach(lab, tmp_path, signum):
    out = tmp_path / "live.jsonl"
    proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--json", str(out)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_attached(proc, lab.host_if)
        done = imaplib.IMAP4(lab.server4, 143, timeout=30)
        done.login("bob", lab.users["bob"])
        done.logout()
        still_open = imaplib.IMAP4(lab.server4, 143, timeout=30)  # open when the signal comes
        still_open.login("alice", lab.users["alice"])
        still_open.select("INBOX")
        time.sleep(1.0)
    finally:
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    try:
        still_open.logout()
    except (OSError, imaplib.IMAP4.error):
        pass
    assert_stopped_cleanly(proc, err, lab.host_if)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    flows = {f["username"]: f for f in records if f["type"] == "flow"}
    assert set(flows) == {"alice", "bob"}
    assert flows["bob"]["end"] in ("fin", "rst") and flows["alice"]["end"] == "end"
    assert flows["alice"]["mailboxes"] == ["INBOX"] and flows["alice"]["login_ok"]
    assert records[-1]["type"] == "stats" and records[-1]["stopped_by_signal"] is True


HTTP_PORT = 8143
HTTP_PASSWORD = "Http-Live-Pw-77"


def test_a_web_server_on_a_watched_port_gives_no_imap_flow_live(lab, tmp_path):
    """A real web server (python -m http.server) in the lab's namespace on --port 8143: curl's
    request and a LOGIN sent to it are no IMAP, while Dovecot's session beside them is."""
    out = tmp_path / "live.jsonl"
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.txt").write_text("a1 OK not IMAP\r\n")
    web = lab.popen_in_ns([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", lab.server4,
                           "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        deadline = time.monotonic() + 30
        while not lab.run_in_ns(["ss", "-Htln", f"sport = :{HTTP_PORT}"], capture_output=True).stdout:
            assert web.poll() is None and time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.1)
        proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--port", "143", "--port", str(HTTP_PORT),
                                            "--json", str(out)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env())
        wait_attached(proc, lab.host_if)
        listing = subprocess.run(["curl", "-sS", "--max-time", "30", f"http://{lab.server4}:{HTTP_PORT}/"],
                                 check=True, capture_output=True).stdout
        assert b"index.txt" in listing
        with socket.create_connection((lab.server4, HTTP_PORT), timeout=30) as sock:
            sock.sendall(f"a1 LOGIN x {HTTP_PASSWORD}\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert b"Error code: 400" in answer and HTTP_PASSWORD.encode() in answer  # the server quotes it
        imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
        imap.login("alice", lab.users["alice"])
        imap.logout()
        time.sleep(1.0)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        web.terminate()
        web.wait(timeout=30)
    assert proc is not None
    assert_stopped_cleanly(proc, err, lab.host_if)
    text = out.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    web_flows = [r for r in records if r["type"] == "flow" and r["server"].endswith(f":{HTTP_PORT}")]
    assert len(web_flows) == 2 and all(f["bytes_c2s"] and f["bytes_s2c"] for f in web_flows)
    assert all(not f["imap"] and f["username"] is None and not f["cleartext_credentials"] and f["commands"] == {}
               for f in web_flows)
    assert not [r for r in records if r["type"] == "message" and r["server"].endswith(f":{HTTP_PORT}")]
    assert HTTP_PASSWORD not in text and "User-Agent" not in text and '"tag":"GET"' not in text
    (imap_flow,) = [r for r in records if r["type"] == "flow" and r["imap"]]
    assert imap_flow["username"] == "alice" and imap_flow["login_ok"]
    stats = records[-1]
    assert (stats["imap_flows"], stats["non_imap_flows"]) == (1, 2)
