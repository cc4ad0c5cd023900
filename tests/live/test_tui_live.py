"""The TUI on a real terminal over a live capture: a session shows up, -w writes it, q detaches."""

from __future__ import annotations

import imaplib
import os
import subprocess
import sys
import threading
import time

from test_cli_live import attached, dropped_uid, env, imaptap_cmd

from livelab import ROOT

# test_terminal lives beside the TUI tests, which are not on the path of the live ones.
sys.path.insert(0, str(ROOT / "tests" / "tui"))
from test_terminal import run_on_terminal

KEPT = 1 << 12 | 1 << 39  # CAP_NET_ADMIN, CAP_BPF


def thread_status(iface: str) -> list[dict[str, str]]:
    """/proc status of every thread of the imaptap process capturing on ``iface``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"imaptap" not in cmd or iface.encode() not in cmd or int(pid) == os.getpid():
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                text = open(f"/proc/{pid}/task/{tid}/status").read()
                out.append(dict(line.split(":", 1) for line in text.splitlines()))
        except OSError:
            continue
    return out


def wait_then_log_in(lab, user: str) -> imaplib.IMAP4:
    """Once imaptap is attached to the lab's veth (and half a second more), ``user`` logs in."""
    deadline = time.monotonic() + 120
    while not attached(lab.host_if):
        assert time.monotonic() < deadline, "not attached in time"
        time.sleep(0.2)
    time.sleep(0.5)
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    imap.login(user, lab.users[user])
    return imap


def test_live_tui_shows_the_session_writes_it_and_q_detaches(lab, tmp_path):
    written = tmp_path / "tui.pcap"
    failures: list[BaseException] = []
    threads: list[dict[str, str]] = []

    def client() -> None:
        try:
            imap = wait_then_log_in(lab, "alice")
            imap.select("INBOX")
            imap.logout()
            threads.extend(thread_status(lab.host_if))
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        status, out = run_on_terminal("-i", lab.host_if, "-w", str(written),
                                      steps=((b"LOGOUT", b"q"),), timeout=150)
    finally:
        thread.join()
    assert not failures, failures
    # Attached, the TUI runs as nobody: the worker thread that will detach keeps CAP_NET_ADMIN
    # and CAP_BPF, every other thread lost all of its capabilities with the change of user.
    assert threads and all(t["Uid"].split() == [str(dropped_uid())] * 4 for t in threads)
    caps = sorted(int(t["CapEff"], 16) for t in threads)
    if dropped_uid():
        assert caps[-1] == KEPT and set(caps) <= {0, KEPT}
    else:  # staying root (see privileges): capabilities are per thread, only the worker's go
        assert KEPT in caps
    assert status == 0
    assert b"alice" in out and b"IMAP LOGIN (" in out  # styled words, so not one run of bytes
    assert lab.users["alice"].encode() not in out
    assert not attached(lab.host_if)
    replay = subprocess.run(imaptap_cmd("-r", str(written), "--json", "-", "--flows-only"),
                            capture_output=True, text=True, env=env(), check=True)
    assert '"username":"alice"' in replay.stdout
    assert lab.users["alice"].encode() not in written.read_bytes()


def test_live_tui_summary_and_gate(lab):
    """r over a live capture: the summary shows the live session; at q, --fail-on names it (exit 3)."""
    failures: list[BaseException] = []

    def client() -> None:
        try:
            imap = wait_then_log_in(lab, "dave")
            imap.logout()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        status, out = run_on_terminal("-i", lab.host_if, "--fail-on", "cleartext_credentials",
                                      # r closes it too; ESC then q would read as alt+q
                                      steps=((b"LOGOUT", b"r"), (b"commands per second", b"r"), (b"Details", b"q")),
                                      timeout=150)
    finally:
        thread.join()
    assert not failures, failures
    assert b"summary of" in out and b"dave" in out and b"latency per command" in out
    assert status == 3 and b"cleartext_credentials: flow 1 " in out  # stderr is the terminal too
    assert lab.users["dave"].encode() not in out
    assert not attached(lab.host_if)
