"""`imaptap -i` as a service lives: killed with SIGKILL, its interface deleted and made again, taken down.

The whole command line, as a unit file runs it.  SIGKILL runs on the tiny server's veth
(conftest.py ``netlab``); the interface tests on the Dovecot lab's veth, with real clients, as a
container's restart treats it: the veth pair is deleted and made again with the same names and
addresses (a new interface of the same name), or its root end goes down and up.  Both attach
methods run: BPF links, and the netlink fallback that ``IMAPTAP_ATTACH=netlink`` forces.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from imaptap_lab.programs import capturing, prog_loaded, programs_on
from livelab import ROOT, Client

pytestmark = pytest.mark.live

METHODS = ["link", "netlink"]
#: bcc compiles the program before it is attached: seconds on an idle machine, more on a busy CI VM.
ATTACH_TIMEOUT = 120.0
#: A link message reaches imaptap at its next poll (100 ms); the rest is netlink and bpf(2) calls.
NOTICE_TIMEOUT = 10.0
STOP_TIMEOUT = 60.0


class Imaptap:
    """``imaptap -i IFACE --json FILE`` running, its stderr read line by line as it comes."""

    def __init__(self, iface: str, out: Path, *args: str, method: str = "link", ready=None) -> None:
        """Returns once ``ready()`` (default: a capture is attached to ``iface``)."""
        self.iface = iface
        self.out = out
        env = dict(os.environ, PYTHONPATH=str(ROOT / "userspace"), IMAPTAP_ATTACH=method)
        self.proc = subprocess.Popen([sys.executable, "-m", "imaptap", "-i", iface, "--json", str(out), *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_until(ready or (lambda: capturing(iface)), ATTACH_TIMEOUT, "imaptap did not attach")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"imaptap exited: {self.lines}"
            assert time.monotonic() < deadline, f"{what}; stderr: {self.lines}"
            time.sleep(0.05)

    def said(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)

    def wait_said(self, pattern: str) -> None:
        self.wait_until(lambda: self.said(pattern), NOTICE_TIMEOUT, f"imaptap did not say {pattern!r}")

    def stop(self) -> list[dict]:
        """SIGINT; the records it wrote, after checking it exited 0 and left nothing attached
        (killed if it did not stop, so a failed test leaves no capture behind)."""
        try:
            self.proc.send_signal(signal.SIGINT)
            assert self.proc.wait(timeout=STOP_TIMEOUT) == 0, self.lines
        finally:
            self.kill()
        self._reader.join(timeout=10)
        assert not any("Traceback" in line for line in self.lines), self.lines
        assert programs_on(self.iface) == []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- SIGKILL ----------------------------------------------------------------------------------


def one_session(netlab) -> None:
    c = Client(netlab.server4)
    c.command("a1", "NOOP")
    c.logout()


@pytest.mark.parametrize("no_xdp", [False, True], ids=["xdp", "no-xdp"])
def test_sigkill_with_bpf_links_leaves_no_program(netlab, tmp_path, no_xdp):
    tap = Imaptap(netlab.host_if, tmp_path / "out.jsonl", *(["--no-xdp"] if no_xdp else []))
    try:
        attached = programs_on(netlab.host_if)
        # the kernel has XDP links and TCX (6.6+): no classic filter, no qdisc
        assert {(p.hook, p.name) for p in attached} == {("xdp" if not no_xdp else "tc ingress",
                                                         "imaptap_xdp" if not no_xdp else "imaptap_tc_in"),
                                                        ("tc egress", "imaptap_tc_eg")}
        assert {p.method for p in attached if p.hook != "xdp"} == {"tcx"} and not netlab.has_clsact()
        one_session(netlab)
    finally:
        tap.kill()
    assert programs_on(netlab.host_if) == [] and not netlab.has_clsact()
    assert not netlab.xdp_attached()
    assert not any(prog_loaded(p.prog_id) for p in attached)  # the kernel unloaded them too


@pytest.mark.parametrize("no_xdp", [False, True], ids=["xdp", "no-xdp"])
def test_sigkill_with_netlink_leaves_stale_programs_that_the_next_start_removes(netlab, tmp_path, no_xdp):
    extra = ["--no-xdp"] if no_xdp else []
    tap = Imaptap(netlab.host_if, tmp_path / "killed.jsonl", *extra, method="netlink")
    tap.kill()
    # The fallback cannot do better: the programs stay, running for nobody.
    left = programs_on(netlab.host_if)
    assert {p.name for p in left} == {"imaptap_tc_in" if no_xdp else "imaptap_xdp", "imaptap_tc_eg"}
    assert {p.method for p in left if p.hook != "xdp"} == {"netlink"}
    # The next start, whichever method, finds them by name and removes them before attaching.
    def replaced() -> bool:  # the stale programs are there from the start: wait for the new ones
        return {p.method for p in programs_on(netlab.host_if) if p.hook != "xdp"} == {"tcx"} and capturing(
            netlab.host_if) and not any(p.prog_id in {q.prog_id for q in left} for p in programs_on(netlab.host_if))

    again = Imaptap(netlab.host_if, tmp_path / "again.jsonl", *extra, ready=replaced)
    try:
        assert again.said(r"removed a stale imaptap (XDP program|TC filter)")
        assert not any(prog_loaded(p.prog_id) for p in left)
        one_session(netlab)
        time.sleep(0.5)
    finally:
        records = again.stop()  # nothing left: checked there
    flows = [r for r in records if r["type"] == "flow"]
    assert len(flows) == 1 and flows[0]["commands"] == {"NOOP": 1, "LOGOUT": 1} and flows[0]["end"] == "fin"
    # The killed run's clsact qdisc stays, empty: nothing says whose it was, so it is not removed.
    assert netlab.tc_filters("egress") == "" and netlab.tc_filters("ingress") == ""


# --- interfaces that come and go ----------------------------------------------------------------


def login(lab, user: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    imap.login(user, lab.users[user])
    imap.select("INBOX")
    return imap


def flows_by_user(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["type"] == "flow" and r["username"]:
            out.setdefault(r["username"], []).append(r)
    return out


def interface_metrics(port: int) -> dict[str, float]:
    """The interface families of one scrape of ``imaptap --metrics`` (name -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^imaptap_capture_(interface\w*) (\S+)$", body, re.MULTILINE)}


def wait_metrics(tap: Imaptap, port: int, want: dict[str, float]) -> None:
    """Until a scrape shows ``want`` (the sink refreshes its snapshot at most once a second)."""
    def shown() -> bool:
        got = interface_metrics(port)
        return {name: got.get(name) for name in want} == want

    tap.wait_until(shown, NOTICE_TIMEOUT, f"metrics never showed {want}")


@pytest.mark.parametrize("method", METHODS)
def test_veth_deleted_and_made_again_during_a_session(lab, tmp_path, method):
    tap = Imaptap(lab.host_if, tmp_path / "out.jsonl", "--metrics", "127.0.0.1:0", method=method)
    try:
        tap.wait_said(r"serving metrics on http://")
        port = int(next(m.group(1) for line in tap.lines
                        if (m := re.search(r"serving metrics on http://[^ ]+:(\d+)/metrics", line))))
        wait_metrics(tap, port, {"interface_gone_total": 0, "interface_reattached_total": 0,
                                 "interfaces_unavailable": 0})
        before = login(lab, "alice")  # open across the whole change: its flow stays in the table
        first = {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)}
        first_index = socket.if_nametoindex(lab.host_if)
        lab.remove_veth()
        tap.wait_said(rf"^imaptap: {lab.host_if} is gone \(the 1st time\)")
        # what the metrics engineer's alert sees: one interface unavailable, one gone
        wait_metrics(tap, port, {"interface_gone_total": 1, "interface_reattached_total": 0,
                                 "interfaces_unavailable": 1})
        lab.restore_veth()
        tap.wait_said(rf"^imaptap: {lab.host_if} is back \(the 1st time, index \d+\)")
        tap.wait_until(lambda: capturing(lab.host_if), NOTICE_TIMEOUT, "not attached to the new interface")
        wait_metrics(tap, port, {"interface_gone_total": 1, "interface_reattached_total": 1,
                                 "interfaces_unavailable": 0})
        assert socket.if_nametoindex(lab.host_if) != first_index
        # The programs loaded at the start, on the new interface: nothing was compiled again.
        assert {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)} == first
        # A new session through the new interface is captured and reported.
        after = login(lab, "bob")
        after.logout()
        # The old one goes on where it was (TCP retransmits over the new veth) and ends with FIN.
        before.noop()
        before.logout()
        time.sleep(1.0)
    finally:
        records = tap.stop()
    assert not tap.said("Traceback")
    flows = flows_by_user(records)
    assert set(flows) == {"alice", "bob"} and all(len(f) == 1 for f in flows.values())
    bob, alice = flows["bob"][0], flows["alice"][0]
    assert bob["login_ok"] and bob["mailboxes"] == ["INBOX"] and bob["end"] == "fin"
    # One record of alice's session from its LOGIN to its LOGOUT: nothing of it was lost or split.
    assert alice["login_ok"] and alice["end"] == "fin" and alice["commands"]["LOGOUT"] == 1
    assert alice["commands"]["NOOP"] == 1 and alice["mailboxes"] == ["INBOX"]
    stats = records[-1]
    assert stats["type"] == "stats" and stats["lost"] == 0
    assert (stats["interface_gone"], stats["reattached"], stats["interfaces_unavailable"]) == (1, 1, 0)
    if method == "netlink":
        assert not lab_has_clsact(lab)  # the one added to the new interface was removed at the end


def lab_has_clsact(lab) -> bool:
    return "clsact" in subprocess.run(["tc", "qdisc", "show", "dev", lab.host_if], capture_output=True,
                                      text=True).stdout


@pytest.mark.parametrize("method", METHODS)
def test_link_down_and_up(lab, tmp_path, method):
    tap = Imaptap(lab.host_if, tmp_path / "out.jsonl", method=method)
    try:
        attached = {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)}
        lab.set_link(False)
        tap.wait_said(rf"^imaptap: {lab.host_if} is down \(the 1st time\)")
        lab.set_link(True)
        tap.wait_said(rf"^imaptap: {lab.host_if} is up \(the 1st time\)")
        # Down and up keep the interface, and the programs on it: the very same ones.
        assert {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)} == attached
        deadline = time.monotonic() + 30
        while True:  # the route and the neighbour come back with the link
            try:
                login(lab, "carol").logout()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(1.0)
    finally:
        records = tap.stop()
    assert not tap.said("is gone") and not tap.said("is back")
    flows = flows_by_user(records)
    assert list(flows) == ["carol"] and flows["carol"][0]["login_ok"]
    stats = records[-1]
    assert (stats["interface_down"], stats["interface_gone"], stats["reattached"]) == (1, 0, 0)
    assert stats["interfaces_unavailable"] == 0 and stats["lost"] == 0
