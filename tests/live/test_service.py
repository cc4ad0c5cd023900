"""imaptap as a service, live: the readiness line, and deploy/systemd/imaptap.service's
sandbox (tests/live/sandbox.py builds it from the unit file) with real Dovecot sessions,
systemd's readiness protocol, logrotate with deploy/logrotate/imaptap twice, and a stop.
"""

from __future__ import annotations

import gzip
import imaplib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sandbox
from livelab import IN_CI, ROOT, SERVER_PORT

UNIT = ROOT / "deploy" / "systemd" / "imaptap.service"
LOGROTATE = ROOT / "deploy" / "logrotate" / "imaptap"
#: Seconds to wait for the capture to be attached (bcc compiles the program first).
ATTACH_TIMEOUT = 180.0
#: Seconds to wait for records to reach the file (the live flush is every second).
RECORDS_TIMEOUT = 30.0
#: CAP_NET_ADMIN and CAP_BPF: what imaptap keeps once attached.
KEPT = 1 << 12 | 1 << 39
#: The unit's bounding set: CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF.
BOUNDING = KEPT | 1 << 38
SESSIONS_PER_PHASE = 3
PHASES = 3


def imaptap_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imaptap", *args]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "userspace"))


class Lines:
    """``proc``'s stderr line by line, read by a thread (a select() on the pipe misses lines
    already in the reader's buffer); `rest`, once it ended, is what came after the lines taken."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import queue
        import threading

        self.queue: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line)

    def next(self, timeout: float) -> str:
        import queue

        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no line from imaptap in time") from None

    def until(self, prefix: str, timeout: float) -> str:
        """The first line starting with ``prefix`` (notes come before the readiness line)."""
        deadline = time.monotonic() + timeout
        while not (line := self.next(max(0.0, deadline - time.monotonic()))).startswith(prefix):
            pass
        return line

    def rest(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.queue.queue)


@pytest.mark.parametrize(("extra", "hooks"), [((), "ingress XDP native, egress TC"),
                                              (("--no-xdp",), "ingress TC, egress TC")])
def test_the_readiness_line_comes_once_capture_has_begun(netlab, extra, hooks):
    proc = subprocess.Popen(imaptap_cmd("-i", netlab.host_if, "--port", str(SERVER_PORT), "--json", "-", *extra),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    lines = Lines(proc)
    try:
        line = lines.until("imaptap: listening on", ATTACH_TIMEOUT)
        assert line == (f"imaptap: listening on {netlab.host_if} ({hooks}), TCP port {SERVER_PORT},"
                        " copying 256 + 128 bytes of each segment\n")
        # ready means reading: a session at once after the line is captured
        imap = imaplib.IMAP4(netlab.server4, SERVER_PORT, timeout=10)
        imap.login("readiness", "x")
        imap.logout()
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, lines.rest()
    flows = [json.loads(x) for x in out.splitlines() if '"type":"flow"' in x]
    assert [f["username"] for f in flows] == ["readiness"]


def test_a_connection_still_open_is_in_flow_updates_by_the_wall_clock(netlab, tmp_path):
    out = tmp_path / "live.jsonl"
    proc = subprocess.Popen(imaptap_cmd("-i", netlab.host_if, "--port", str(SERVER_PORT), "--json", str(out),
                                        "--flow-interval", "1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env())
    lines = Lines(proc)
    try:
        lines.until("imaptap: listening on", ATTACH_TIMEOUT)
        imap = imaplib.IMAP4(netlab.server4, SERVER_PORT, timeout=10)
        imap.login("idler", "x")
        opened = time.time()
        deadline = time.monotonic() + RECORDS_TIMEOUT
        updates: list[dict] = []
        while len(updates) < 2:  # read while the client is still connected
            assert time.monotonic() < deadline, "no flow_update of the open connection reached the file"
            time.sleep(0.2)
            updates = [r for r in map(json.loads, out.read_text().splitlines()) if r["type"] == "flow_update"]
        still_open = time.time()
        imap.logout()
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, lines.rest()
    assert {u["username"] for u in updates} == {"idler"} and all(u["end"] is None for u in updates)
    # the wall clock: each round's time is when it was taken, a second apart, while open
    assert all(opened - 1 < u["ts"] < still_open for u in updates)
    assert 0.9 < updates[1]["ts"] - updates[0]["ts"] < 2.5
    records = [json.loads(line) for line in out.read_text().splitlines()]
    (flow,) = [r for r in records if r["type"] == "flow"]
    assert flow["username"] == "idler" and flow["end"] == "fin"


# --- the unit's sandbox -------------------------------------------------------------------------


def test_every_directive_of_the_unit_is_emulated_or_explained():
    unit = sandbox.parse_unit(UNIT)
    known = sandbox.EMULATED | sandbox.RUN_BY_THE_TEST | set(sandbox.NOT_EMULATED)
    assert not [d for d in unit if d not in known]


def service_layout(tmp_path: Path) -> tuple[Path, Path, str]:
    """``opt`` as the sandbox mounts it at /opt (the package, the executable, sandbox.py, a
    mount point for the venv), a logs directory owned by the service's user, and the venv; the
    state directory beside the logs (`state_of`)."""
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").exists():
        pytest.fail("the service test runs from the project's virtual environment (scripts/setup)", pytrace=False)
    opt = tmp_path / "opt"
    (opt / "venv").mkdir(parents=True)
    shutil.copytree(ROOT / "userspace" / "imaptap", opt / "src" / "imaptap",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(sandbox.__file__), opt / "sandbox.py")
    (opt / "bin").mkdir()
    exe = opt / "bin" / "imaptap"
    exe.write_text("#!/opt/venv/bin/python\nimport sys\nsys.path.insert(0, '/opt/src')\n"
                   "from imaptap.cli import main\nsys.exit(main())\n")
    for path in (opt, *opt.rglob("*")):
        path.chmod(0o755 if path.is_dir() or path == exe else 0o644)
    logs = tmp_path / "logs"
    nobody = __import__("pwd").getpwnam("nobody")
    for directory in (logs, state_of(tmp_path)):
        directory.mkdir()
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    return opt, logs, str(venv)


def state_of(tmp_path: Path) -> Path:
    """What the sandbox mounts as the unit's StateDirectory (the password key's place)."""
    return tmp_path / "state"


def exec_start(unit: dict[str, list[str]], options: str) -> list[str]:
    """The unit's ExecStart with IMAPTAP_OPTIONS set as /etc/default/imaptap would, for /opt's layout."""
    (line,) = unit["ExecStart"]
    words = shlex.split(line)
    assert words[0] == "/opt/imaptap/bin/imaptap" and words[1:] == ["$IMAPTAP_OPTIONS"]
    return ["/opt/bin/imaptap", *shlex.split(options)]


def logrotate_config(tmp_path: Path, logs: Path, pid: int) -> str:
    """deploy/logrotate/imaptap for these logs, its postrotate what `systemctl reload` does (ExecReload)."""
    text = LOGROTATE.read_text()
    unit = sandbox.parse_unit(UNIT)
    (reload,) = unit["ExecReload"]
    assert reload == '/bin/sh -c "kill -USR1 $MAINPID"'
    assert "systemctl reload 'imaptap.service'" in text
    lines = []
    for line in text.splitlines():
        if "systemctl reload" in line:
            line = f"        {reload.replace('$MAINPID', str(pid))}"
        lines.append(line.replace("/var/log/imaptap", str(logs)))
    conf = tmp_path / "logrotate.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    return str(conf)


def receive(notify: socket.socket, proc: subprocess.Popen, timeout: float) -> str:
    """The next notification the service sends; fails with its stderr if it ends first."""
    deadline = time.monotonic() + timeout
    notify.settimeout(0.5)
    while True:
        try:
            return notify.recv(4096).decode()
        except TimeoutError:
            if proc.poll() is not None:
                pytest.fail(f"the service ended ({proc.returncode}): {proc.stderr.read()}")
            assert time.monotonic() < deadline, "no notification from the service in time"


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def session(lab, user: str, password: str) -> int:
    """One real session (LOGIN, SELECT, LOGOUT); its client port, which names its flow."""
    imap = imaplib.IMAP4(lab.server4, 143, timeout=30)
    port = imap.sock.getsockname()[1]
    try:
        imap.login(user, password)
        imap.select("INBOX")
    except imaplib.IMAP4.error:
        pass  # a wrong password: the failure is the fact
    imap.logout()
    return port


def records_of(path: Path) -> list[dict]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode()
    assert text.endswith("\n"), f"{path.name} ends in the middle of a record"
    return [json.loads(line) for line in text.splitlines()]


def wait_for_flows(path: Path, ports: set[int]) -> None:
    deadline = time.monotonic() + RECORDS_TIMEOUT
    while True:
        text = path.read_text() if path.exists() else ""
        done = {int(r["client"].rsplit(":", 1)[1]) for r in map(json.loads, text.splitlines()) if r["type"] == "flow"}
        if ports <= done:
            return
        assert time.monotonic() < deadline, f"flows {sorted(ports - done)} did not reach {path.name}"
        time.sleep(0.2)


def test_the_unit_captures_in_its_sandbox_rotates_with_logrotate_and_stops(lab, tmp_path):
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    for tool in (logrotate, "setpriv", "unshare", "systemd-analyze"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"CI=true and {tool} is missing (scripts/setup installs it)", pytrace=False)
            pytest.skip(f"needs {tool}")
    pytest.importorskip("seccomp") if not IN_CI else __import__("seccomp")
    unit = sandbox.parse_unit(UNIT)
    opt, logs, venv = service_layout(tmp_path)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(sandbox.spec_of(unit, str(logs), str(opt), venv, str(state_of(tmp_path)))))
    (default,) = [v for v in unit["Environment"] if v.startswith('"IMAPTAP_OPTIONS=')]
    options = f"-i {lab.host_if} -w /var/log/imaptap/imaptap.pcap " + default.strip('"').split("=", 1)[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"imaptap-test-{os.getpid()}"
    notify.bind("\0" + address)  # abstract: reachable from any mount namespace
    service_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": "@" + address,
                   "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(sandbox.command(str(spec_path), exec_start(unit, options)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=service_env)
    users = lab.users
    phases: list[set[int]] = []
    passwords = list(users.values())
    try:
        ready = receive(notify, proc, ATTACH_TIMEOUT)
        assert ready.startswith(f"READY=1\nSTATUS=listening on {lab.host_if} (ingress XDP native, egress TC)"), ready
        st = status(proc.pid)
        assert st["Uid"].split()[0] == str(__import__("pwd").getpwnam("nobody").pw_uid)
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == KEPT and int(st["CapAmb"], 16) == 0
        assert int(st["CapBnd"], 16) == BOUNDING and st["NoNewPrivs"].strip() == "1"
        assert st["Seccomp"].strip() == "2"  # the filter is on
        conf, state = logrotate_config(tmp_path, logs, proc.pid), str(tmp_path / "logrotate.state")
        current = logs / "imaptap.jsonl"
        for phase in range(PHASES):
            ports = {session(lab, "alice", users["alice"]) for _ in range(SESSIONS_PER_PHASE)}
            ports.add(session(lab, "bob", "not-bobs-password"))
            phases.append(ports)
            wait_for_flows(current, ports)
            if phase == PHASES - 1:
                break
            r = subprocess.run([logrotate, "-f", "-s", state, conf], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + RECORDS_TIMEOUT
            while not current.exists():  # opened anew by imaptap, on the signal
                assert time.monotonic() < deadline, "imaptap did not reopen its file"
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        _, err = proc.communicate(timeout=120)
    stopping = receive(notify, proc, 1.0)
    notify.close()
    assert proc.returncode == 0, err
    assert stopping == "STOPPING=1" and "Traceback" not in err
    assert f"imaptap: listening on {lab.host_if}" in err
    # StateDirectory: the password key made there, the service's own, and no complaint about it
    key = state_of(tmp_path) / "password-key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == __import__("pwd").getpwnam("nobody").pw_uid
    assert "password key" not in err

    # logrotate: the current file, .1, and .2 compressed a round late (delaycompress)
    generations = [logs / "imaptap.jsonl.2.gz", logs / "imaptap.jsonl.1", current]
    assert sorted(p.name for p in logs.iterdir() if ".jsonl" in p.name) == sorted(p.name for p in generations)
    files = [records_of(p) for p in generations]
    seen: dict[int, int] = {}
    hmacs: dict[str, set[str]] = {}
    for n, records in enumerate(files):
        for r in records:
            if r["type"] == "flow":
                port = int(r["client"].rsplit(":", 1)[1])
                assert port not in seen, f"the flow of port {port} is in two files"
                seen[port] = n
                assert r["username"] in ("alice", "bob") and r["login_ok"] is (r["username"] == "alice")
                hmacs.setdefault(r["username"], set()).update(a["password_hmac"] for a in r["login_attempts"])
    # one key all along: each user's one password, one fingerprint, over every phase
    assert {u: len(h) for u, h in hmacs.items()} == {"alice": 1, "bob": 1} and hmacs["alice"] != hmacs["bob"]
    # every session's flow, in the file of its phase: the reopen came between the phases
    assert seen == {port: n for n, ports in enumerate(phases) for port in ports}
    stats = files[-1][-1]
    assert stats["type"] == "stats" and [r["type"] for f in files for r in f].count("stats") == 1
    assert stats["lost"] == 0 and stats["stopped_by_signal"] is True
    assert stats["user"] == "nobody" and stats["capabilities"] == ["CAP_NET_ADMIN", "CAP_BPF"]

    pcaps = [logs / "imaptap.pcap.2.gz", logs / "imaptap.pcap.1", logs / "imaptap.pcap"]
    total = 0
    for path in pcaps:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        plain = tmp_path / path.name.removesuffix(".gz")
        plain.write_bytes(raw)
        r = subprocess.run(imaptap_cmd("-r", str(plain), "--json", "-", "--flows-only"), capture_output=True,
                           text=True, env=env())
        assert r.returncode == 0, r.stderr  # each file valid by itself
        total += json.loads(r.stdout.splitlines()[-1])["segments"]
        for password in passwords:
            assert password.encode() not in raw
    assert total == stats["written"] == stats["received"]
    everything = b"".join(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes() for p in generations)
    for password in passwords:
        assert password.encode() not in everything
