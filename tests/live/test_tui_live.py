"""The TUI on a real terminal over a live capture: a session shows up, -w writes it, q detaches."""

from __future__ import annotations

import imaplib
import subprocess
import sys
import threading
import time

from livelab import ROOT

sys.path.insert(0, str(ROOT / "tests" / "tui"))
from test_terminal import run_on_terminal  # noqa: E402

from test_cli_live import attached, env, imaptap_cmd  # noqa: E402


def test_live_tui_shows_the_session_writes_it_and_q_detaches(lab, tmp_path):
    written = tmp_path / "tui.pcap"
    failures: list[BaseException] = []

    def client() -> None:
        try:
            deadline = time.monotonic() + 120
            while not attached(lab.host_if):
                assert time.monotonic() < deadline, "not attached in time"
                time.sleep(0.2)
            time.sleep(0.5)
            imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
            imap.login("alice", lab.users["alice"])
            imap.select("INBOX")
            imap.logout()
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
    assert status == 0
    assert b"alice" in out and b"IMAP LOGIN (" in out  # styled words, so not one run of bytes
    assert lab.users["alice"].encode() not in out
    assert not attached(lab.host_if)
    replay = subprocess.run(imaptap_cmd("-r", str(written), "--json", "-", "--flows-only"),
                            capture_output=True, text=True, env=env(), check=True)
    assert '"username":"alice"' in replay.stdout
