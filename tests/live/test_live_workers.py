"""`imaptap -i --workers N` live: the kernel program spreads flows over N rings by the flow hash,
N forked workers analyse them, the parent writes one output.

A real Dovecot (imaptap_lab.lab) and real clients (imaplib, curl, mbsync); the same scripted
sessions are watched by one process and by two workers, and each run must give the same flow
and message records but for what differs between two runs of one script (flow ids, client
ports, times, tags); each flow of the two-worker run must come whole from the worker the hash
names; the run must also give what tcpdump's capture of the same packets gives in a replay.
Then the lifecycle: the parent's SIGKILL leaves nothing attached and no worker behind, a killed
worker stops the parent with its error line and exit status 1; the parent follows the veth
deleted and made again, and SIGUSR1 reopens the one output.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli_live import FACTS, assert_dropped, env, imaptap_cmd, sessions, wait_attached
from test_service_life import NOTICE_TIMEOUT, Imaptap, flows_by_user, login

from imaptap.capture.live import LiveCapture, LiveError
from imaptap.capture.live.workers import STOP_TIMEOUT
from imaptap.flowshare import flow_hash, share_of
from imaptap_lab.programs import capturing, programs_on
from livelab import dropped_uid

pytestmark = pytest.mark.live

#: More plain logins than the mixed sessions: with two workers, 2**-25 that none reaches one.
EXTRA_LOGINS = 24
#: Keys that differ between two runs of the same script: numbering, ports, clocks, and the
#: bytes cut off: whether the kernel heard that a flow's handshake is over before the server's
#: next response passed is a race against the veth's round trip, one process or several; and
#: the server's byte counts: Dovecot's completions say how long they took in two or three
#: numbers ("(0.001 + 0.000 secs)", "(0.001 + 0.000 + 0.001 secs)"; see DOVECOT_TIMES).
#: The bytes inflated of a compressed flow count the server's side too: `normalised` keeps
#: only whether there were any.
RUN_KEYS = ("flow", "client", "ts", "first_ts", "last_ts", "latency_ms", "bytes_not_captured", "bytes",
            "bytes_s2c")
#: And of a STARTTLS'd flow: TLS records differ in length from run to run, and so does how
#: the client's TLS stack closes (FIN or RST).
TLS_RUN_KEYS = ("packets", "packets_c2s", "packets_s2c", "bytes_c2s", "end")
#: Dovecot's completion texts carry the command's time ("Select completed (0.001 + 0.000 secs).").
DOVECOT_TIMES = re.compile(r"\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")
#: imaplib's tags are a random prefix and a counter: the counter is the same in both runs.
TAG_PREFIX = re.compile(r"^[A-Z]{4}(?=\d+$)")
EXIT_TIMEOUT = 60


def children(pid: int) -> list[int]:
    """The processes ``pid`` forked (its workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def assert_worker_dropped(parent: int) -> None:
    """Each worker runs as the parent's user with CAP_BPF alone (its flows' map entries), and
    holds no BPF link: only the parent keeps the programs attached."""
    pids = children(parent)
    assert len(pids) == 2
    for pid in pids:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split() == [str(dropped_uid())] * 4
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 1 << 39
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert "anon_inode:bpf_link" not in fds
    fds = [os.readlink(f"/proc/{parent}/fd/{fd}") for fd in os.listdir(f"/proc/{parent}/fd")]
    assert "anon_inode:bpf_link" in fds


def wait_ready(proc: subprocess.Popen) -> list[str]:
    """stderr up to the readiness line, which comes once every worker polls its ring."""
    lines = []
    while True:
        line = proc.stderr.readline()
        assert line, f"imaptap ended before it was ready: {''.join(lines)}"
        lines.append(line)
        if "listening on" in line:
            return lines


def start(lab, out: Path, workers: int, *more: str) -> subprocess.Popen:
    proc = subprocess.Popen(imaptap_cmd("-i", lab.host_if, "--port", "143", "--port", "10143", "--json", str(out),
                                        "--workers", str(workers), *more),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    wait_attached(proc, lab.host_if)
    return proc


def script(lab) -> None:
    """The sessions both runs watch: the mixed clients of test_cli_live, then plain logins."""
    sessions(lab)
    for _ in range(EXTRA_LOGINS):
        imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
        imap.login("bob", lab.users["bob"])
        imap.select("INBOX")
        imap.logout()


def watched(lab, tmp_path: Path, workers: int, pcap: Path | None = None) -> tuple[list[dict], str]:
    """The records of one run of `script` under ``--workers``; also its stderr."""
    records, _out, err = watched_with(lab, tmp_path, workers, pcap)
    return records, err


def watched_with(lab, tmp_path: Path, workers: int, pcap: Path | None = None, *more: str, status: int = 0,
                 run=script) -> tuple[list[dict], str, str]:
    """`watched` with more options, the exit ``status`` they give and the sessions ``run``
    makes: the records, stdout (a report) and stderr."""
    out = tmp_path / f"workers{workers}.jsonl"
    proc = start(lab, out, workers, *more)
    said: list[str] = []
    try:
        said = wait_ready(proc)
        assert_dropped(proc.pid)  # the parent as one process: CAP_NET_ADMIN and CAP_BPF
        if workers > 1:
            assert_worker_dropped(proc.pid)
        if pcap is not None:
            with lab.capture(pcap):
                run(lab)
                time.sleep(1.0)
        else:
            run(lab)
            time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=EXIT_TIMEOUT)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert programs_on(lab.host_if) == []
    return [json.loads(line) for line in out.read_text().splitlines()], stdout, "".join(said) + err


def normalised(record: dict) -> dict:
    """A record without what differs between two runs of one script."""
    out = {k: v for k, v in record.items() if k not in RUN_KEYS}
    if record.get("encrypted"):
        out = {k: v for k, v in out.items() if k not in TLS_RUN_KEYS}
    if isinstance(out.get("bytes_inflated"), int):
        out["bytes_inflated"] = out["bytes_inflated"] > 0
    if isinstance(out.get("text"), str):
        out["text"] = DOVECOT_TIMES.sub("(secs)", out["text"])
    if isinstance(out.get("tag"), str):
        out["tag"] = TAG_PREFIX.sub("", out["tag"])
    return out


def by_flow(records: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each flow record with its messages, in order of the flows' first segments."""
    messages: dict[int, list[dict]] = {}
    for r in records:
        if r["type"] == "message":
            messages.setdefault(r["flow"], []).append(r)
    flows = sorted((r for r in records if r["type"] == "flow"), key=lambda f: f["first_ts"])
    return [(f, messages.get(f["flow"], [])) for f in flows]


def endpoint(text: str) -> tuple[str, int]:
    address, port = text.rsplit(":", 1)
    return address.strip("[]"), int(port)


def test_two_workers_give_the_records_of_one_process(lab, tmp_path):
    for user in ("alice", "bob", "dave"):
        lab.deliver(user, f"Subject: workers\r\n\r\n{'body line ' * 40}\r\n".encode())
    script(lab)  # unwatched: the mail is no longer \Recent, so both runs find the same mailboxes
    one, _ = watched(lab, tmp_path, 1)
    pcap = tmp_path / "two.pcap"
    two, err = watched(lab, tmp_path, 2, pcap)
    assert "2 worker processes" in err

    flows_one, flows_two = by_flow(one), by_flow(two)
    assert len(flows_two) == len(flows_one) >= EXTRA_LOGINS + 5
    for (flow1, msgs1), (flow2, msgs2) in zip(flows_one, flows_two, strict=True):
        assert normalised(flow2) == normalised(flow1)
        assert [normalised(m) for m in msgs2] == [normalised(m) for m in msgs1]

    # each flow whole from the worker its hash names: one flow record per connection, its id in
    # that worker's residue class, and every message of the flow under that id
    ids = {}
    for flow, msgs in flows_two:
        (client, cport), (server, sport) = endpoint(flow["client"]), endpoint(flow["server"])
        worker = share_of(flow_hash(client, cport, server, sport), 2)
        assert (flow["flow"] - 1) % 2 == worker
        assert all(m["client"] == flow["client"] and m["server"] == flow["server"] for m in msgs)
        ids[flow["flow"]] = (flow["client"], flow["server"])
    assert len(ids) == len(set(ids.values())) == len(flows_two)
    assert {m["flow"] for m in two if m["type"] == "message"} <= set(ids)
    assert {(i - 1) % 2 for i in ids} == {0, 1}  # both workers had flows

    # records of one flow in their order: its messages before its flow record
    position = {id(r): i for i, r in enumerate(two)}
    for flow, msgs in flows_two:
        assert all(position[id(m)] < position[id(flow)] for m in msgs)

    stats_one, stats_two = one[-1], two[-1]
    assert stats_two["type"] == "stats" and stats_two["stopped_by_signal"] is True
    for name in ("flows", "imap_flows", "non_imap_flows", "expired", "evicted", "anomalies"):
        assert stats_two[name] == stats_one[name], name
    assert stats_two["ended_fin"] + stats_two["ended_rst"] == stats_one["ended_fin"] + stats_one["ended_rst"]
    assert stats_two["lost"] == 0 and stats_two["received"] == stats_two["submitted"] == stats_two["segments"]
    assert stats_two["policy_errors"] == 0 and stats_two["user"] == stats_one["user"]

    # what tcpdump saw of the same packets, replayed by one process
    replayed = subprocess.run(imaptap_cmd("-r", str(pcap), "--port", "143", "--port", "10143", "--json", "-",
                                          "--flows-only"), capture_output=True, text=True, env=env(), check=True)
    replay_flows = sorted((r for r in map(json.loads, replayed.stdout.splitlines()) if r["type"] == "flow"),
                          key=lambda f: f["first_ts"])
    assert [{k: f[k] for k in FACTS} for f in replay_flows] == [{k: f[k] for k in FACTS} for f, _ in flows_two]


def test_sigkill_of_the_parent_leaves_nothing_attached_and_no_worker(lab, tmp_path):
    proc = start(lab, tmp_path / "killed.jsonl", 2)
    wait_ready(proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait(timeout=EXIT_TIMEOUT)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.1)
    deadline = time.monotonic() + EXIT_TIMEOUT
    while programs_on(lab.host_if):
        assert time.monotonic() < deadline, f"left attached: {programs_on(lab.host_if)}"
        time.sleep(0.1)
    assert "xdp" not in subprocess.run(["ip", "link", "show", lab.host_if], capture_output=True, text=True).stdout
    # a new capture starts on the interface: nothing of the killed one is in the way
    again = start(lab, tmp_path / "again.jsonl", 2)
    wait_ready(again)
    again.send_signal(signal.SIGINT)
    _, err = again.communicate(timeout=EXIT_TIMEOUT)
    assert again.returncode == 0, err


def alice_before_a_signal_to_worker_2(lab, out: Path, signum: int) -> tuple[subprocess.Popen, imaplib.IMAP4, int]:
    """Two workers writing to ``out``, alice logged in (her flow open), then ``signum`` to the
    second worker: the parent, alice's session and the worker signalled."""
    proc = start(lab, out, 2)
    wait_ready(proc)
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    imap.login("alice", lab.users["alice"])
    victim = children(proc.pid)[1]
    os.kill(victim, signum)
    return proc, imap, victim


def alice_in_worker_1(lab, imap: imaplib.IMAP4) -> bool:
    """Whether alice's connection fell to the first worker (the one not signalled)."""
    port = imap.sock.getsockname()[1]
    return share_of(flow_hash(lab.client4, port, lab.server4, 143), 2) == 0


def failed_run(proc: subprocess.Popen, imap: imaplib.IMAP4, timeout: float) -> str:
    """Its stderr once ``proc`` ended with exit status 1 and no traceback; alice's session closed."""
    _, err = proc.communicate(timeout=timeout)
    try:
        imap.logout()
    except (OSError, imaplib.IMAP4.error):
        pass
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    return err


def test_a_killed_worker_stops_the_parent_with_its_error(lab, tmp_path):
    out = tmp_path / "worker-killed.jsonl"
    proc, imap, _ = alice_before_a_signal_to_worker_2(lab, out, signal.SIGKILL)
    first = alice_in_worker_1(lab, imap)
    err = failed_run(proc, imap, EXIT_TIMEOUT)
    assert "imaptap: live worker 2 of 2 was killed by signal 9: capture stopped, its flows are lost\n" in err
    assert programs_on(lab.host_if) == []
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[-1]["type"] == "stats" and "worker 2 of 2" in records[-1]["error"]
    # the other worker's flows were still ended and written
    alice = [r for r in records if r["type"] == "flow" and r["username"] == "alice"]
    if first:
        assert len(alice) == 1 and alice[0]["end"] == "end"
    else:
        assert alice == []


def test_a_worker_that_does_not_stop_is_killed_and_named_and_the_run_ends(lab, tmp_path):
    """A worker stopped by SIGSTOP never ends: the parent, told to stop, detaches, writes what
    the other worker ended, kills the stopped one after STOP_TIMEOUT and exits 1 naming it."""
    out = tmp_path / "worker-hung.jsonl"
    proc, imap, victim = alice_before_a_signal_to_worker_2(lab, out, signal.SIGSTOP)
    first = alice_in_worker_1(lab, imap)
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    err = failed_run(proc, imap, STOP_TIMEOUT + EXIT_TIMEOUT)
    took = time.monotonic() - asked
    assert (f"imaptap: live worker 2 of 2 did not stop within {STOP_TIMEOUT:.0f} s: killed, its last flows"
            " are lost\n") in err
    assert took >= STOP_TIMEOUT
    assert programs_on(lab.host_if) == []
    assert not os.path.exists(f"/proc/{victim}")  # killed and reaped
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[-1]["type"] == "stats" and "worker 2 of 2 did not stop" in records[-1]["error"]
    alice = [r for r in records if r["type"] == "flow" and r["username"] == "alice"]
    # the stop ended the open flow in the worker that still ran: it is written
    assert len(alice) == (1 if first else 0)


def test_a_perf_buffer_kernel_refuses_live_workers(live_ready, lab):
    capture = LiveCapture([lab.host_if], {143}, 256, output="perf", workers=2)
    with pytest.raises(LiveError, match="needs the BPF ring buffer"):
        capture.__enter__()
    assert programs_on(lab.host_if) == []


@pytest.mark.parametrize(("more", "refused"), [
    (("--workers", "9"), "at most 8"),
])
def test_what_live_workers_do_not_take_is_a_usage_error(more, refused, tmp_path):
    args = ["-i", "lo", "--workers", "2", "--json", str(tmp_path / "o.jsonl"), *more]
    proc = subprocess.run(imaptap_cmd(*args), capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and refused in proc.stderr


def test_the_parent_follows_the_veth_deleted_and_made_again(lab, tmp_path):
    tap = Imaptap(lab.host_if, tmp_path / "out.jsonl", "--workers", "2")
    try:
        tap.wait_said(r"listening on .*, 2 worker processes")
        before = login(lab, "alice")  # open across the whole change, in its worker's table
        first = {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)}
        lab.remove_veth()
        tap.wait_said(rf"^imaptap: {lab.host_if} is gone \(the 1st time\)")
        lab.restore_veth()
        tap.wait_said(rf"^imaptap: {lab.host_if} is back \(the 1st time, index \d+\)")
        tap.wait_until(lambda: capturing(lab.host_if), NOTICE_TIMEOUT, "not attached to the new interface")
        # the programs loaded at the start, writing into the same rings
        assert {(p.hook, p.name, p.prog_id) for p in programs_on(lab.host_if)} == first
        after = login(lab, "bob")
        after.logout()
        before.noop()
        before.logout()
        time.sleep(1.0)
    finally:
        records = tap.stop()
    flows = flows_by_user(records)
    assert set(flows) == {"alice", "bob"} and all(len(f) == 1 for f in flows.values())
    assert flows["bob"][0]["login_ok"] and flows["bob"][0]["end"] == "fin"
    alice = flows["alice"][0]
    assert alice["end"] == "fin" and alice["commands"]["NOOP"] == 1 and alice["commands"]["LOGOUT"] == 1
    stats = records[-1]
    assert (stats["interface_gone"], stats["reattached"], stats["interfaces_unavailable"]) == (1, 1, 0)


def test_sigusr1_reopens_the_one_output(lab, tmp_path):
    out = tmp_path / "out.jsonl"
    moved = tmp_path / "out.jsonl.1"
    # -Z root: nobody may not make a file in the test's directory (the reopen is what is tested)
    tap = Imaptap(lab.host_if, out, "--workers", "2", "-Z", "root")
    try:
        tap.wait_said(r"listening on")
        login(lab, "alice").logout()
        tap.wait_until(lambda: '"username":"alice"' in out.read_text(), NOTICE_TIMEOUT, "alice's flow not written")
        out.rename(moved)
        tap.proc.send_signal(signal.SIGUSR1)
        tap.wait_until(out.exists, NOTICE_TIMEOUT, "the output was not opened anew")
        login(lab, "bob").logout()
        time.sleep(1.0)
    finally:
        records = tap.stop()
    old = [json.loads(line) for line in moved.read_text().splitlines()]
    assert {f["username"] for f in old if f["type"] == "flow"} == {"alice"}
    assert {f["username"] for f in records if f["type"] == "flow"} == {"bob"}
    assert records[-1]["type"] == "stats" and records[-1]["flows"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_the_whole_group_still_ends_every_open_flow(lab, tmp_path, signum):
    out = tmp_path / "out.jsonl"
    proc = start(lab, out, 2)
    wait_ready(proc)
    still_open = [login(lab, user) for user in ("alice", "bob", "carol", "dave")]
    time.sleep(1.0)
    # as systemd stops a unit, every process of it at once: the workers wait for the parent
    workers = children(proc.pid)
    proc.send_signal(signum)
    for pid in workers:
        os.kill(pid, signum)
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    for imap in still_open:
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass
    assert proc.returncode == 0, err
    assert programs_on(lab.host_if) == []
    records = [json.loads(line) for line in out.read_text().splitlines()]
    flows = {f["username"]: f for f in records if f["type"] == "flow"}
    assert set(flows) == {"alice", "bob", "carol", "dave"}
    assert all(f["end"] == "end" and f["login_ok"] and f["mailboxes"] == ["INBOX"] for f in flows.values())
    assert records[-1]["type"] == "stats" and records[-1]["stopped_by_signal"] is True
