"""The audit report and the gate at the end of a live run, and tcpdump piped into imaptap -r -.

The real kernel program on the lab's veth, a real Dovecot, real imaplib sessions: a login in
clear, a brute force (six wrong passwords over three connections), and a login sent in clear to
the lab's strict address although it announced LOGINDISABLED.  SIGINT ends the run; the report
(JSON) must name all of it, the gate exit 3 naming those flows, and nothing print a password.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import signal
import subprocess
import time

from test_cli_live import assert_stopped_cleanly, env, imaptap_cmd, wait_attached

WRONG = [f"Live-Guess-{n}" for n in range(6)]
TCPDUMP_START = 20.0


def sessions(lab) -> list[str]:
    """The sessions the report must show; the passwords they used."""
    alice = lab.users["alice"]
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    imap.login("alice", alice)
    imap.logout()
    for i in range(0, len(WRONG), 2):
        imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
        for wrong in WRONG[i:i + 2]:
            with contextlib.suppress(imaplib.IMAP4.error):
                imap.login("bob", wrong)
        imap.logout()
    imap = imaplib.IMAP4(lab.server6_strict, 143, timeout=30)
    with contextlib.suppress(imaplib.IMAP4.error):
        imap.login("carol", lab.users["carol"])
    imap.logout()
    return [alice, lab.users["carol"], *WRONG]


def test_live_report_and_gate(lab):
    proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--port", "143", "--format", "json", "--fail-on",
                                        "cleartext_credentials,brute_force,login_despite_logindisabled"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    try:
        wait_attached(proc, lab.host_if)
        passwords = sessions(lab)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    proc.returncode = 0  # for the shared check of a clean stop
    assert_stopped_cleanly(proc, err, lab.host_if)
    (line,) = out.splitlines()
    rec = json.loads(line)
    assert rec["type"] == "report" and rec["imap_flows"] == 5
    found = {row["finding"]: row for row in rec["findings"]}
    assert found["cleartext_credentials"]["flows"] == 5
    assert found["login_despite_logindisabled"]["flows"] == 1
    assert found["brute_force"]["sources"] == [lab.client4]
    (attack,) = rec["attacks"]
    assert attack["kinds"] == ["brute_force"] and attack["top_user"] == "bob" and attack["top_user_passwords"] == 6
    servers = {s["server"]: s for s in rec["servers"]}
    assert "LOGINDISABLED" in servers[f"[{lab.server6_strict}]:143"]["offered"]
    assert "AUTH=PLAIN" in servers[f"{lab.server4}:143"]["offered"]
    named = [line for line in err.splitlines() if line.startswith("imaptap: ") and ": flow " in line]
    assert len(named) == 5  # each flow once, its findings named
    for password in passwords:
        assert password not in out and password not in err


def test_tcpdump_piped_into_imaptap(lab, tmp_path):
    """tcpdump -U -w - 'tcp port 143' | imaptap -r -: the session as it happens, read from a pipe."""
    tcpdump = subprocess.Popen(["tcpdump", "-i", lab.host_if, "-U", "-w", "-", "tcp port 143"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = subprocess.Popen(imaptap_cmd("-r", "-", "--json", "-", "--flows-only"), stdin=tcpdump.stdout,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    tcpdump.stdout.close()  # the reader holds the pipe now
    try:
        deadline = time.monotonic() + TCPDUMP_START
        line = b""
        while b"listening on" not in line:
            assert time.monotonic() < deadline, "tcpdump did not start"
            line = tcpdump.stderr.readline()
        imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
        imap.login("alice", lab.users["alice"])
        imap.select("INBOX")
        imap.logout()
        time.sleep(1.0)
    finally:
        tcpdump.send_signal(signal.SIGINT)  # tcpdump ends the pipe: imaptap reads to its end
        tcpdump.wait(timeout=30)
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    (flow,) = [r for r in records if r["type"] == "flow"]
    assert flow["username"] == "alice" and flow["login_ok"] and flow["mailboxes"] == ["INBOX"]
    assert records[-1]["source"] == "standard input" and "error" not in records[-1]
    assert lab.users["alice"] not in out + err
