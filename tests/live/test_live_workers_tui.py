"""The TUI over live workers (`imaptap -i IFACE --workers 2` on a real terminal): two sessions
whose client ports the flow hash gives to different workers both show, the summary counts
both, --fail-on names both, -w writes both masked, q detaches and no worker is left; a killed
worker ends the TUI with its one line and exit status 1; with --metrics, one process or two
workers, a scrape taken while the screen runs counts every session."""

from __future__ import annotations

import imaplib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from test_cli_live import env, imaptap_cmd
from test_live_workers_metrics import by, samples, scrape_until
from test_tui_live import run_on_terminal

from imaptap.flowshare import flow_hash, share_of
from imaptap_lab import prometheus
from imaptap_lab.programs import programs_on
from livelab import attached

pytestmark = pytest.mark.live

#: Where the search for client ports of a chosen worker starts: above Linux's ephemeral range
#: (32768-60999), so no connection of the host holds them.
FIRST_PORT = 61100
#: How long a scrape may take to count sessions that ended (the workers publish once a refresh).
SCRAPE_TIMEOUT = 15


class PortIMAP(imaplib.IMAP4):
    """imaplib connecting from a chosen client port (so the test knows which worker sees it)."""

    def __init__(self, host: str, source: tuple[str, int]) -> None:
        self.source = source
        super().__init__(host, 143, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.source)
        sock.settimeout(timeout)
        sock.connect((self.host, self.port))
        return sock


def port_of_worker(lab, worker: int, workers: int, after: int = FIRST_PORT) -> int:
    """A client port from which a connection to the lab's server goes to ``worker``."""
    port = after
    while share_of(flow_hash(lab.client4, port, lab.server4, 143), workers) != worker:
        port += 1
    return port


def when_attached(lab, then: Callable[[], None], failures: list[BaseException]) -> threading.Thread:
    """A thread that runs ``then`` once imaptap is attached to the lab's veth (failures kept)."""

    def body() -> None:
        try:
            deadline = time.monotonic() + 120
            while not attached(lab.host_if):
                assert time.monotonic() < deadline, "not attached in time"
                time.sleep(0.2)
            time.sleep(0.5)
            then()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def forked(pid: int) -> list[int]:
    """The processes any thread of ``pid`` forked, in pid order: the TUI's capture thread forks
    the workers, and /proc lists a child under the thread that made it."""
    return sorted(p for task in os.listdir(f"/proc/{pid}/task") for p in children_of_task(pid, int(task)))


def children_of_task(pid: int, task: int) -> list[int]:
    with open(f"/proc/{pid}/task/{task}/children") as f:
        return [int(p) for p in f.read().split()]


def imaptap_processes(iface: str) -> list[int]:
    """The pids of imaptap processes capturing on ``iface``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"imaptap" in cmd and iface.encode() in cmd and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def test_the_tui_shows_and_sums_the_flows_of_both_workers(lab, tmp_path):
    written = tmp_path / "workers-tui.pcap"
    failures: list[BaseException] = []
    seen: list[int] = []
    ports = {"alice": port_of_worker(lab, 0, 2), "bob": port_of_worker(lab, 1, 2)}

    def sessions() -> None:
        for user, port in ports.items():
            imap = PortIMAP(lab.server4, (lab.client4, port))
            imap.login(user, lab.users[user])
            imap.select("INBOX")
            imap.logout()
        seen.extend(imaptap_processes(lab.host_if))

    thread = when_attached(lab, sessions, failures)

    def after_the_sessions(pid: int) -> None:
        thread.join()
        time.sleep(1.5)  # the flows' ends reach the screen (a flush or two of each worker)

    try:
        status, out = run_on_terminal("-i", lab.host_if, "--workers", "2", "-w", str(written),
                                      "--fail-on", "cleartext_credentials",
                                      # r opens the summary and closes it; ESC then q would read as alt+q
                                      steps=((b"LIVE", after_the_sessions), (b"", b"r"),
                                             (b"2 flows (2 IMAP)", b"r"), (b"Details", b"q")),
                                      timeout=180)
    finally:
        thread.join()
    assert not failures, failures
    assert len(seen) == 3, seen  # the parent and its two workers
    assert b"alice" in out and b"bob" in out and b"latency per command" in out
    # one flow from each worker: worker 1 numbers 1, 3, ...; worker 2 numbers 2, 4, ...
    assert status == 3, out[-2000:]
    assert b"cleartext_credentials: flow 1 " in out and b"cleartext_credentials: flow 2 " in out
    for user in ports:
        assert lab.users[user].encode() not in out
    assert b"Traceback" not in out
    assert programs_on(lab.host_if) == []
    assert imaptap_processes(lab.host_if) == []
    replay = subprocess.run(imaptap_cmd("-r", str(written), "--json", "-", "--flows-only"),
                            capture_output=True, text=True, env=env(), check=True)
    assert '"username":"alice"' in replay.stdout and '"username":"bob"' in replay.stdout
    for user in ports:
        assert lab.users[user].encode() not in written.read_bytes()


def test_a_killed_worker_ends_the_tui_with_its_line_and_status_1(lab):
    failures: list[BaseException] = []
    killed: list[int] = []

    def kill_a_worker() -> None:
        parent = min(imaptap_processes(lab.host_if))
        victim = forked(parent)[1]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    thread = when_attached(lab, kill_a_worker, failures)
    try:
        status, out = run_on_terminal("-i", lab.host_if, "--workers", "2", steps=(), timeout=120)
    finally:
        thread.join()
    assert not failures, failures
    assert killed
    assert status == 1, out[-2000:]
    assert b"imaptap: live worker 2 of 2 was killed by signal 9: capture stopped, its flows are lost" in out
    assert b"Traceback" not in out
    assert programs_on(lab.host_if) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_the_tui_with_metrics_answers_scrapes_of_every_session(lab, workers):
    """The TUI and --metrics together (one process, and two workers): a scrape taken while the
    screen runs counts both sessions' logins, and promtool takes it."""
    failures: list[BaseException] = []
    got: list[dict] = []
    port = prometheus.free_port()

    def logins(text: str) -> dict:
        return by(samples(text), "imaptap_logins_total", "outcome")
    ports = {"alice": port_of_worker(lab, 0, 2), "bob": port_of_worker(lab, 1, 2)}

    def sessions_then_scrape() -> None:
        for user, client_port in ports.items():
            imap = PortIMAP(lab.server4, (lab.client4, client_port))
            imap.login(user, lab.users[user])
            imap.logout()
        text = scrape_until(f"http://127.0.0.1:{port}/metrics",
                            lambda text: logins(text) == {("success",): 2}, SCRAPE_TIMEOUT)
        got.append({"text": text, "counted": logins(text)})

    thread = when_attached(lab, sessions_then_scrape, failures)
    try:
        status, out = run_on_terminal("-i", lab.host_if, "--workers", str(workers),
                                      "--metrics", f"127.0.0.1:{port}",
                                      steps=((b"LIVE", lambda pid: thread.join()), (b"", b"q")),
                                      timeout=180)
    finally:
        thread.join()
    assert not failures, failures
    assert status == 0, out[-2000:]
    (scrape,) = got
    assert scrape["counted"] == {("success",): 2}, scrape["text"][-3000:]
    for user in ports:
        assert lab.users[user].encode() not in out and lab.users[user] not in scrape["text"]
    checked = prometheus.promtool("check", "metrics", input=scrape["text"].encode())
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert programs_on(lab.host_if) == []
    assert imaptap_processes(lab.host_if) == []
