"""Live-test helpers: a throw-away network namespace with a tiny IMAP-speaking server.

Everything stays on this machine: a veth pair whose far end lives in a namespace made for the
test (``imaptap-live-<pid>-<k>``, veth ``itl<k>h``/``itl<k>n``, 10.198.k.0/30 and
fd00:198:k::/64).  Namespaces left by a killed test run (their pid is dead) are removed first.

The fixtures using these are in conftest.py.
"""

from __future__ import annotations

import array
import collections
import fcntl
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imaptap.capture.live import LiveCapture
from imaptap.segment import DEFAULT_TAILLEN, Segment, TcpFlag, split_payload
from imaptap_lab.programs import capturing, programs_on

if TYPE_CHECKING:
    from imaptap_lab.lab import Lab
    from imaptap_lab.prometheus import Prometheus

ROOT = Path(__file__).resolve().parents[2]
NETNS_PREFIX = "imaptap-live-"
SERVER_PORT = 143
OTHER_PORT = 8143
#: A CI run must exercise the kernel; a workstation without root may skip.
IN_CI = os.environ.get("CI") == "true"


def live_unavailable() -> str | None:
    """Why live tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "live tests need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"live tests need {tool} (iproute2)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "live tests need bcc (python3-bpfcc)"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "live tests need pyroute2"
    from imaptap.capture.live import kernel_headers_present

    if not kernel_headers_present():
        return "live tests need kernel headers (scripts/setup links them)"
    return None


# --- the namespace -----------------------------------------------------------------------------

SERVER = textwrap.dedent(r'''
    # A tiny IMAP-shaped server: greeting, tagged OK for every command, FETCH n sends an
    # n-byte literal, APPEND {n+} takes an n-byte literal, LOGOUT closes.
    import socket, sys, threading

    def body(n):
        return bytes((i * 7 + 13) % 251 for i in range(n))

    def serve(c):
        try:
            talk(c)
        except OSError:  # a client that resets: fine
            pass
        finally:
            c.close()

    def talk(c):
        f = c.makefile("rb")
        c.sendall(b"* OK [CAPABILITY IMAP4rev1] tiny ready\r\n")
        while True:
            line = f.readline()
            if not line:
                break
            words = line.split()
            if words and words[-1].startswith(b"{") and words[-1].endswith(b"+}"):
                f.read(int(words[-1][1:-2]))
                f.readline()
            tag = words[0] if words else b"*"
            cmd = words[1].upper() if len(words) > 1 else b""
            if cmd == b"FETCH":
                n = int(words[2])
                c.sendall(b"* 1 FETCH (BODY[] {%d}\r\n" % n + body(n) + b")\r\n" + tag + b" OK FETCH done\r\n")
            elif cmd == b"LOGOUT":
                c.sendall(b"* BYE\r\n" + tag + b" OK LOGOUT done\r\n")
                break
            else:
                c.sendall(tag + b" OK done\r\n")

    def listen(port):
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(64)
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    for p in sys.argv[2:]:
        threading.Thread(target=listen, args=(int(p),), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
''')


def server_body(n: int) -> bytes:
    return bytes((i * 7 + 13) % 251 for i in range(n))


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_leftovers() -> None:
    """Remove namespaces of earlier runs whose process is gone (their veths go with them)."""
    out = run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NETNS_PREFIX) + r"(\d+)-(\d+)", name)
        if m and not _pid_alive(int(m.group(1))):
            run("ip", "netns", "del", name, check=False)


ETHTOOL_SGRO = 0x2C
SIOCETHTOOL = 0x8946


def set_gro(ifname: str, enabled: bool) -> None:
    """``ethtool -K IF gro on|off`` without ethtool."""
    value = array.array("I", [ETHTOOL_SGRO, 1 if enabled else 0])
    ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0]).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


@dataclass
class NetLab:
    """A veth pair into a private namespace with the tiny server listening on 143 and 8143."""

    k: int
    netns: str
    host_if: str
    ns_if: str
    client4: str
    server4: str
    client6: str
    server6: str
    procs: list = field(default_factory=list)

    @property
    def ifindex(self) -> int:
        return socket.if_nametoindex(self.host_if)

    def xdp_attached(self) -> bool:
        return "prog/xdp" in run("ip", "-d", "link", "show", "dev", self.host_if).stdout

    def programs(self) -> set[tuple[str, str, str]]:
        """(hook, how, name) of each imaptap program on the host end: TCX links, filters, XDP."""
        return {(p.hook, p.method, p.name) for p in programs_on(self.host_if)}

    def tc_filters(self, direction: str) -> str:
        return run("tc", "filter", "show", "dev", self.host_if, direction, check=False).stdout.strip()

    def has_clsact(self) -> bool:
        return "clsact" in run("tc", "qdisc", "show", "dev", self.host_if).stdout


def free_slot() -> int:
    links = set(os.listdir("/sys/class/net"))
    taken = {int(m.group(2)) for line in run("ip", "netns", "list", check=False).stdout.splitlines()
             if (m := re.match(re.escape(NETNS_PREFIX) + r"(\d+)-(\d+)", line))}
    for k in range(1, 255):
        if f"itl{k}h" not in links and f"itl{k}n" not in links and k not in taken:
            return k
    raise RuntimeError("no free test slot")


def wait_port(addr: str, port: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- a client that remembers exactly what went each way -----------------------------------------


class Client:
    """A blocking IMAP-ish client recording both byte streams, to check payloads by offset."""

    def __init__(self, addr: str, port: int = SERVER_PORT) -> None:
        self.sock = socket.create_connection((addr, port), timeout=5)
        self.local = self.sock.getsockname()[:2]
        self.server_port = port
        self.sent = bytearray()
        self.received = bytearray()
        self._until(0, rb"^\* OK[^\r\n]*\r\n")   # the greeting

    @property
    def port(self) -> int:
        return self.local[1]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += data

    def _until(self, start: int, pattern: bytes) -> None:
        rx = re.compile(pattern)
        while not rx.search(self.received, max(0, start - 2)):  # the CRLF before a line counts
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before {pattern!r}")
            self.received += chunk

    def expect(self, suffix: bytes) -> None:
        self._until(0, re.escape(suffix))

    def command(self, tag: str, text: str, literal: bytes | None = None) -> None:
        """Send one command (with a LITERAL+ literal if given) and wait for its tagged OK."""
        start = len(self.received)
        if literal is None:
            self.send(f"{tag} {text}\r\n".encode())
        else:
            self.send(f"{tag} {text} {{{len(literal)}+}}\r\n".encode() + literal + b"\r\n")
        self._until(start, rb"(?:^|\r\n)" + re.escape(tag.encode()) + rb" OK[^\r\n]*\r\n")

    def logout(self) -> None:
        self.command("z", "LOGOUT")
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        self.sock.close()


# --- checking what the capture handed over ---------------------------------------------------

LIFECYCLE = TcpFlag.SYN | TcpFlag.FIN | TcpFlag.RST


def collect(cap: LiveCapture, done, timeout: float = 5.0) -> list[Segment]:
    """Poll until ``done(segments)`` holds (then a little longer for stragglers) or the timeout."""
    segs: list[Segment] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segs += cap.poll(100)
        if done(segs):
            segs += cap.poll(100)
            return segs
    return segs


def of_client(segs: list[Segment], client: Client) -> list[Segment]:
    """The segments of one client's connection."""
    ends = {client.port, client.server_port}
    return [s for s in segs if {s.sport, s.dport} == ends]


def both_fins(client: Client):
    def done(segs):
        fins = {s.sport for s in of_client(segs, client) if s.flags & TcpFlag.FIN}
        return {client.port, client.server_port} <= fins
    return done


def check_stream(segs: list[Segment], sport: int, stream: bytes, snaplen: int,
                 taillen: int = DEFAULT_TAILLEN) -> list[Segment]:
    """Every data segment from ``sport`` carries the stream's bytes at its offset, cut into head
    and tail as `split_payload` cuts them, and together the segments cover the whole stream;
    returns those segments."""
    (syn,) = {s for s in segs if s.sport == sport and s.flags & TcpFlag.SYN}
    base = (syn.seq + 1) & 0xFFFFFFFF
    data = [s for s in segs if s.sport == sport and s.wire_len > 0]
    covered = 0
    for s in data:
        off = (s.seq - base) & 0xFFFFFFFF
        want = stream[off:off + s.wire_len]
        assert len(want) == s.wire_len, f"segment at {off} beyond the stream"
        assert (s.payload, s.tail) == split_payload(want, snaplen, taillen), f"payload at offset {off} differs"
        if off <= covered:
            covered = max(covered, off + s.wire_len)
    assert covered == len(stream)
    return data


def check_session(segs, client: Client, snaplen: int, ifindex: int, t0: float, t1: float) -> None:
    """A whole session: handshake, both FINs, no pure ACK, the interface, times, every byte."""
    mine = of_client(segs, client)
    assert mine, "no segment of the session"
    c2s = [s for s in mine if s.sport == client.port]
    s2c = [s for s in mine if s.sport == client.server_port]
    assert any(s.flags & TcpFlag.SYN and not s.flags & TcpFlag.ACK for s in c2s)
    assert any(s.flags & TcpFlag.SYN and s.flags & TcpFlag.ACK for s in s2c)
    assert any(s.flags & TcpFlag.FIN for s in c2s) and any(s.flags & TcpFlag.FIN for s in s2c)
    # Pure ACKs never leave the kernel.
    assert all(s.wire_len > 0 or s.flags & LIFECYCLE for s in mine)
    assert all(s.ifindex == ifindex for s in mine)
    assert all(t0 - 0.05 <= s.ts <= t1 + 0.05 for s in mine)
    check_stream(mine, client.port, bytes(client.sent), snaplen)
    check_stream(mine, client.server_port, bytes(client.received), snaplen)


def dropped_uid() -> int:
    """The user imaptap runs as once attached: nobody, unless nobody cannot read this checkout's
    Python (a clone under /root, say), when it stays root with the capabilities dropped."""
    from imaptap import privileges

    nobody = privileges.lookup("nobody")
    return nobody.pw_uid if privileges.python_readable_by(nobody.pw_uid, nobody.pw_gid) else 0


# --- imaptap --metrics in the lab (test_metrics_live.py, test_fleet.py) --------------------------

#: Seconds for bcc to compile and attach (a loaded 2-core machine takes tens of them).
ATTACH_TIMEOUT = 120.0


class CountingIMAP4(imaplib.IMAP4):
    """imaplib that counts the commands it sends in clear text, as imaptap names them."""

    def __init__(self, *args, **kwargs) -> None:
        self.sent: collections.Counter[str] = collections.Counter()
        self.encrypted = False
        super().__init__(*args, **kwargs)

    def _command(self, name, *args):
        if not self.encrypted:
            self.sent["UID " + args[0].upper() if name == "UID" else name] += 1
        if name == "STARTTLS":
            self.encrypted = True  # its completion is the last thing seen in clear
        return super()._command(name, *args)


def lab_sessions(lab: Lab, host: str) -> dict:
    """Real client sessions against one lab; what they did, counted by the client side."""
    users = lab.users
    sent: collections.Counter[str] = collections.Counter()
    done = {"sessions": 0, "ok": collections.Counter(), "failed": 0, "cleartext": 0, "starttls": 0}

    def finish(imap: CountingIMAP4) -> None:
        imap.logout()
        sent.update(imap.sent)
        done["sessions"] += 1

    # LOGIN in clear, SELECT, FETCH, NOOP
    imap = CountingIMAP4(host, 143, timeout=30)
    imap.login("alice", users["alice"])
    imap.select("INBOX")
    imap.noop()
    done["ok"]["LOGIN"] += 1
    done["cleartext"] += 1
    finish(imap)
    # two failed LOGINs, then the right password
    imap = CountingIMAP4(host, 143, timeout=30)
    for wrong in ("Wrong-Pw-1", "Wrong-Pw-2"):
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("bob", wrong)
        done["failed"] += 1
    imap.login("bob", users["bob"])
    done["ok"]["LOGIN"] += 1
    imap.list()
    done["cleartext"] += 1
    finish(imap)
    # AUTHENTICATE PLAIN after a continuation, then STATUS
    imap = CountingIMAP4(host, 143, timeout=30)
    imap.authenticate("PLAIN", lambda _: f"\0carol\0{users['carol']}".encode())
    done["ok"]["PLAIN"] += 1
    imap.status("INBOX", "(MESSAGES)")
    done["cleartext"] += 1
    finish(imap)
    # STARTTLS first: the login is encrypted, nobody on the wire can count it
    imap = CountingIMAP4(host, 143, timeout=30)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    imap.starttls(ctx)
    done["starttls"] += 1
    imap.login("dave", users["dave"])
    finish(imap)
    done["commands"] = sent
    return done


def attached(ifname: str) -> bool:
    """Whether an imaptap capture is on ``ifname``: a TCX link (which ``tc filter show`` does not
    list) or a classic filter."""
    return capturing(ifname)


def metrics_port(err_path: Path, proc: subprocess.Popen) -> int:
    """The port imaptap says it serves metrics on (``--metrics ADDR:0``)."""
    deadline = time.monotonic() + 30
    while True:
        m = re.search(r"serving metrics on http://[^ ]+:(\d+)/metrics", err_path.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, "no metrics line on stderr"
        time.sleep(0.1)


def start_imaptap(iface: str, listen: str, tmp: Path, *extra: str, netns: str | None = None):
    """``imaptap -i iface --metrics listen`` (in ``netns`` if given), running until SIGINT."""
    cmd = [sys.executable, "-m", "imaptap", "-i", iface, "--json", str(tmp / "out.jsonl"), "--metrics", listen,
           *extra]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    err = tmp / "stderr"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "userspace")))
    return proc, err


def wait_capturing(prom: Prometheus, instance: str) -> None:
    """Until the imaptap at ``instance`` serves its capture's counters: the sink reads them from the
    first tick on, which comes once the source is open, its programs attached (XDP and TC)."""
    prom.wait_for(f'imaptap_capture_packets_seen_total{{instance="{instance}"}} >= 0', lambda v: v is not None,
                  timeout=ATTACH_TIMEOUT)


def stop(proc: subprocess.Popen, err: Path) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, err.read_text()
    text = err.read_text()
    assert "Traceback" not in text, text
