"""Soak: ``imaptap -i`` for half an hour or more under steady real IMAP load, sampled from outside.

A lab Dovecot (imaptap_lab.lab) with eight users; imaptap captures its veth and writes JSON
Lines (messages included) to out/soak.jsonl, as a service would.  The load, all real clients:

- IDLE_SESSIONS sessions log in, select INBOX and IDLE for the whole run (re-issued every
  IDLE_RENEW_S, as RFC 2177 asks), IDLE_TLS of them after STARTTLS; past their handshake
  their flows stay in the kernel's per-flow map the whole time; a mail delivered every
  DELIVER_EVERY_S wakes them;
- CHURN_WORKERS threads open session after session, each kind in turn: LOGIN with FETCHes,
  AUTHENTICATE PLAIN with LIST and STATUS, STARTTLS, COMPRESS DEFLATE (the deflate stream is
  real: zlib), a failed login; flows start and end all the time.

Every SAMPLE_S seconds the script reads, from outside the process: its resident memory
(anonymous and file-backed, /proc/PID/status), its open descriptors (/proc/PID/fd), the
entries of its per-flow policy map and its kernel counters (by the map ids in
/proc/PID/fdinfo, bpf(2) as root).  At the end: SIGINT, then the checks: after the warm-up RSS
and map entries flat (range within FLAT_PERCENT of the median; map entries never above the
sessions that can hold one), no descriptor more than at the end of the warm-up, nothing lost,
one flow record per session.  Samples go to out/soak.csv; an ASCII plot of the curves is
printed for the README.
Run as root:  scripts/bench-soak [--minutes 30] [--warmup 5]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import imaplib
import json
import os
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imaptap.capture.live.abi import COUNTER_NAMES, KernelCounters
from imaptap.capture.live.kernel import bpf_syscall

from imaptap_lab.checkout import OUT_DIR, USERSPACE
from imaptap_lab.lab import Lab
from imaptap_lab.mail import MAILBOX_SIZES, filler_mail, realistic_mail
from imaptap_lab.programs import capturing

USERS = {f"soak{n}": f"Soak-Pw-{n}{n}{n}" for n in range(1, 9)}
"""Eight users: Dovecot allows 10 connections per user and address (mail_max_userip_connections)."""
IDLE_SESSIONS = 16
IDLE_TLS = 4
"""Of the IDLE sessions, those after STARTTLS: each holds an entry in the policy map throughout."""
IDLE_RENEW_S = 20 * 60
"""IDLE is re-issued before 29 minutes (RFC 2177), so the server does not log the client out."""
IDLE_WAKE_S = 0.5
"""How long an IDLE session's thread waits for the server before it looks whether it is asked to
end the IDLE: the delay of a renewal or of the end of the run."""
DELIVER_EVERY_S = 60
CHURN_WORKERS = 4
CHURN_PAUSE_S = 0.3
"""Between two sessions of one worker: about ten sessions a second in all on the development VM."""
MAILS_PER_USER = len(MAILBOX_SIZES)
SAMPLE_S = 10
FLAT_PERCENT = 5.0
DEFAULT_MINUTES = 30.0
DEFAULT_WARMUP_MINUTES = 5.0
ATTACH_TIMEOUT = 120
STOP_TIMEOUT = 300
CLIENT_TIMEOUT = 30
PLOT_WIDTH, PLOT_HEIGHT = 64, 10
MAP_ENTRIES_BOUND = IDLE_SESSIONS + CHURN_WORKERS
"""The kernel's map names only flows out of the default mode (the handshake's copy): every IDLE
session once logged in (the rest of the flow cut to the snap length, or nothing after STARTTLS)
and at most each worker's current session; ended flows are forgotten."""
MAP_PLOT_STEP = 3
"""Entries per row of the map's plot: its ten rows reach above MAP_ENTRIES_BOUND."""

# bpf(2) commands and struct bpf_map_info (include/uapi/linux/bpf.h).
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_GET_NEXT_KEY, _BPF_MAP_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD = 1, 4, 14, 15
_MAP_INFO_LEN, _MAP_INFO_NAME = 40, 24


# --- the process's maps, from outside ------------------------------------------------------------


def _attr(*fields: tuple[str, int]) -> ctypes.Array:
    attr = (ctypes.c_uint8 * 40)()
    offset = 0
    for fmt, value in fields:
        struct.pack_into("<" + fmt, attr, offset, value)
        offset += struct.calcsize(fmt)
    return attr


def map_ids(pid: int) -> set[int]:
    """Ids of the BPF maps process ``pid`` holds descriptors of."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("map_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


class KernelMap:
    """A BPF map opened by id: its name, sizes, entries."""

    def __init__(self, map_id: int) -> None:
        self.fd = bpf_syscall(_BPF_MAP_GET_FD_BY_ID, _attr(("I", map_id)))
        info = (ctypes.c_uint8 * _MAP_INFO_LEN)()
        bpf_syscall(_BPF_OBJ_GET_INFO_BY_FD, _attr(("I", self.fd), ("I", _MAP_INFO_LEN),
                                                   ("Q", ctypes.addressof(info))))
        raw = bytes(info)
        self.key_size, self.value_size = struct.unpack_from("<II", raw, 8)
        self.name = raw[_MAP_INFO_NAME:_MAP_INFO_NAME + 16].split(b"\0", 1)[0].decode()

    def entries(self) -> int:
        """Keys in the map now (walked with BPF_MAP_GET_NEXT_KEY)."""
        key = (ctypes.c_uint8 * self.key_size)()
        nxt = (ctypes.c_uint8 * self.key_size)()
        count, first = 0, True
        while True:
            attr = _attr(("I", self.fd), ("I", 0), ("Q", 0 if first else ctypes.addressof(key)),
                         ("Q", ctypes.addressof(nxt)))
            try:
                bpf_syscall(_BPF_MAP_GET_NEXT_KEY, attr)
            except OSError:
                return count  # ENOENT: the last key
            count += 1
            first = False
            ctypes.memmove(key, nxt, self.key_size)

    def per_cpu_counters(self) -> dict[str, int]:
        """struct imaptap_counters at key 0, summed over the possible CPUs."""
        cpus = possible_cpus()
        stride = (self.value_size + 7) // 8 * 8
        value = (ctypes.c_uint8 * (stride * cpus))()
        key = ctypes.c_uint32(0)
        bpf_syscall(_BPF_MAP_LOOKUP_ELEM, _attr(("I", self.fd), ("I", 0), ("Q", ctypes.addressof(key)),
                                                ("Q", ctypes.addressof(value))))
        totals = dict.fromkeys(COUNTER_NAMES, 0)
        for cpu in range(cpus):
            c = KernelCounters.from_buffer_copy(bytes(value[cpu * stride:cpu * stride + ctypes.sizeof(KernelCounters)]))
            for name in totals:
                totals[name] += getattr(c, name)
        return totals

    def close(self) -> None:
        os.close(self.fd)


def possible_cpus() -> int:
    """CPUs the kernel sizes per-CPU maps for: /sys/devices/system/cpu/possible ("0-1")."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


def imaptap_maps(pid: int) -> dict[str, KernelMap]:
    """imaptap's maps by name (flow_modes, counters, ...), opened by id."""
    out = {}
    for map_id in map_ids(pid):
        try:
            m = KernelMap(map_id)
        except OSError:
            continue
        if m.name in out:
            m.close()
        else:
            out[m.name] = m
    return out


# --- the load ----------------------------------------------------------------------------------


@dataclass
class LoadCounts:
    """What the clients did: sessions by kind, and failures (each one is still a flow)."""

    sessions: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str) -> None:
        with self.lock:
            self.sessions[kind] = self.sessions.get(kind, 0) + 1

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    def total(self) -> int:
        with self.lock:
            return sum(self.sessions.values())


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the lab's self-signed certificate
    return ctx


class IdleSession:
    """A client that IDLEs for the whole run on its own thread, answering the server's news.

    Past SELECT only that thread touches the connection (reads, DONE, IDLE again, LOGOUT): a TLS
    connection (an OpenSSL SSL object) must not be read by one thread while another writes to
    it, which broke records (bad record MAC) when the main thread sent DONE."""

    def __init__(self, lab: Lab, n: int, tls: bool, counts: LoadCounts) -> None:
        self.user = f"soak{n % len(USERS) + 1}"
        self.imap = imaplib.IMAP4(lab.server4, 143, timeout=CLIENT_TIMEOUT)
        if tls:
            self.imap.starttls(tls_context())
        self.imap.login(self.user, USERS[self.user])
        self.imap.select("INBOX")
        # Nothing is pending after SELECT's completion: the socket is read directly from here on.
        self.sock = self.imap.sock
        self.sock.settimeout(IDLE_WAKE_S)  # to see a request to end the IDLE between reads
        self.buffer = b""
        self.counts = counts
        self.kind = "idle-tls" if tls else "idle"
        self.renewals = 0
        self.wanted: str | None = None
        """"renew" or "stop": what the thread is asked to do next (set by `done`)."""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._idle()
        self.thread.start()

    def _line(self) -> bytes:
        """The next line from the server; b"" if none came within IDLE_WAKE_S."""
        while b"\r\n" not in self.buffer:
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                return b""
            if not chunk:
                raise RuntimeError("the server closed the IDLE session")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def _until_tagged(self, tag: bytes) -> bytes:
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while time.monotonic() < deadline:
            line = self._line()
            if line.startswith(tag + b" "):
                return line
        raise RuntimeError(f"no {tag.decode()} completion within {CLIENT_TIMEOUT} s")

    def _idle(self) -> None:
        self.sock.sendall(b"I IDLE\r\n")
        deadline = time.monotonic() + CLIENT_TIMEOUT
        line = b""
        while not line and time.monotonic() < deadline:
            line = self._line()
        if not line.startswith(b"+"):
            raise RuntimeError(f"IDLE refused: {line!r}")

    def done(self, stop: bool) -> None:
        """Ask the thread to end this IDLE (DONE); with ``stop`` it logs out after it, else it IDLEs again."""
        self.wanted = "stop" if stop else "renew"

    def _run(self) -> None:
        try:
            while True:
                wanted = self.wanted
                if wanted is not None:
                    self.wanted = None
                    self.sock.sendall(b"DONE\r\n")
                    if not self._until_tagged(b"I").startswith(b"I OK"):
                        raise RuntimeError("IDLE did not end with OK")
                    if wanted == "stop":
                        break
                    self.renewals += 1
                    self._idle()
                    continue
                self._line()  # untagged news (EXISTS, RECENT ...): nothing to answer
            self.sock.sendall(b"L LOGOUT\r\n")
            self._until_tagged(b"L")
            self.sock.close()
        except Exception as exc:  # reported with the results
            self.counts.error(f"{self.kind}: {exc!r}")
        self.counts.add(self.kind)  # ended well or not, the session was a flow


class CompressedClient:
    """IMAP over COMPRESS DEFLATE (RFC 4978) on a plain socket: what imaplib cannot do."""

    def __init__(self, addr: str, user: str, password: str) -> None:
        self.sock = socket.create_connection((addr, 143), timeout=CLIENT_TIMEOUT)
        self.buffer = b""
        self.deflate: zlib._Compress | None = None
        self.inflate: zlib._Decompress | None = None
        self._until(b"\r\n")  # the greeting
        self.command("a", f"LOGIN {user} {password}")
        self.command("b", "COMPRESS DEFLATE")
        self.deflate = zlib.compressobj(wbits=-15)
        self.inflate = zlib.decompressobj(wbits=-15)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buffer += self.inflate.decompress(chunk) if self.inflate is not None else chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def command(self, tag: str, text: str) -> bytes:
        """Send one command and read up to its tagged completion, which must be OK."""
        data = f"{tag} {text}\r\n".encode()
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)
        out = b""
        while True:
            line = self._until(b"\r\n")
            out += line
            if line.startswith(f"{tag} ".encode()):
                if not line.startswith(f"{tag} OK".encode()):
                    raise RuntimeError(f"{text.split()[0]}: {line!r}")
                return out

    def close(self) -> None:
        try:
            self.command("z", "LOGOUT")
        finally:
            self.sock.close()


CHURN_KINDS = ("login-fetch", "authenticate", "starttls", "compress", "failed-login")


def churn_session(lab: Lab, kind: str, user: str) -> None:
    """One session of ``kind``, start to LOGOUT."""
    password = USERS[user]
    if kind == "compress":
        client = CompressedClient(lab.server4, user, password)
        client.command("c", "SELECT INBOX")
        client.command("d", "FETCH 1:3 (FLAGS BODY.PEEK[HEADER])")
        client.close()
        return
    imap = imaplib.IMAP4(lab.server4, 143, timeout=CLIENT_TIMEOUT)
    try:
        if kind == "login-fetch":
            imap.login(user, password)
            imap.select("INBOX")
            imap.fetch("1:*", "(FLAGS RFC822.SIZE)")
            imap.fetch("2", "(BODY.PEEK[])")
        elif kind == "authenticate":
            imap.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())
            imap.list()
            imap.status("INBOX", "(MESSAGES UNSEEN)")
        elif kind == "starttls":
            imap.starttls(tls_context())
            imap.login(user, password)
            imap.select("INBOX")
        elif kind == "failed-login":
            try:
                imap.login(user, password + "-wrong")
            except imaplib.IMAP4.error:
                pass
    finally:
        imap.logout()


def churn(lab: Lab, worker: int, counts: LoadCounts, stop: threading.Event) -> None:
    """Sessions of every kind in turn until ``stop``."""
    n = worker
    while not stop.is_set():
        kind = CHURN_KINDS[n % len(CHURN_KINDS)]
        user = f"soak{n % len(USERS) + 1}"
        try:
            churn_session(lab, kind, user)
        except Exception as exc:  # a flow all the same: counted, and the run goes on
            counts.error(f"{kind}: {exc!r}")
        counts.add(kind)
        n += CHURN_WORKERS
        stop.wait(CHURN_PAUSE_S)


def deliverer(lab: Lab, stop: threading.Event, counts: LoadCounts) -> None:
    n = 0
    while not stop.wait(DELIVER_EVERY_S):
        n += 1
        try:
            lab.deliver(f"soak{n % len(USERS) + 1}", filler_mail(f"soak delivery {n}"))
        except Exception as exc:
            counts.error(f"deliver: {exc!r}")


# --- samples, checks, plot ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the running imaptap."""

    seconds: float
    rss_anon_kb: int
    rss_file_kb: int
    fds: int
    map_entries: int
    submitted: int
    lost: int
    sessions: int
    cpu_s: float
    """CPU time imaptap used so far (user and system, /proc/PID/stat)."""

    @property
    def rss_mb(self) -> float:
        return (self.rss_anon_kb + self.rss_file_kb) / 1024


def take_sample(pid: int, started: float, maps: dict[str, KernelMap], counts: LoadCounts) -> Sample:
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0])
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    utime, stime = stat[stat.rindex(")") + 2:].split()[11:13]  # fields 14 and 15, after the name
    counters = maps["counters"].per_cpu_counters()
    return Sample(round(time.monotonic() - started, 1), status["RssAnon"], status["RssFile"] + status["RssShmem"],
                  len(os.listdir(f"/proc/{pid}/fd")), maps["flow_modes"].entries(), counters["submitted"],
                  counters["lost"], counts.total(), (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK"))


def flat(values: Sequence[float]) -> float:
    """The range of ``values`` in percent of their median."""
    med = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / med if med else 0.0


def ascii_plot(title: str, xs: Sequence[float], series: dict[str, Sequence[float]], high: float, unit: str) -> str:
    """A small plot in text, for the README: each series (its mark, its values) over xs in seconds,
    from 0 to ``high``, so that a flat curve looks flat."""
    grid = [[" "] * PLOT_WIDTH for _ in range(PLOT_HEIGHT)]
    span = (xs[-1] - xs[0]) or 1
    for mark, ys in series.items():
        for x, y in zip(xs, ys, strict=True):
            col = min(PLOT_WIDTH - 1, int((x - xs[0]) / span * (PLOT_WIDTH - 1)))
            row = PLOT_HEIGHT - 1 - min(PLOT_HEIGHT - 1, round(y / high * (PLOT_HEIGHT - 1)))
            grid[row][col] = mark
    lines = [title]
    for i, row in enumerate(grid):
        label = high * (PLOT_HEIGHT - 1 - i) / (PLOT_HEIGHT - 1)
        lines.append(f"{label:6.0f} {unit:<2} |" + "".join(row).rstrip())
    lines.append(" " * 10 + "+" + "-" * PLOT_WIDTH)
    lines.append(" " * 10 + f"{xs[0] / 60:<6.0f}" + " " * (PLOT_WIDTH - 16) + f"{xs[-1] / 60:>10.0f} min")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-soak."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="how long the load runs")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_MINUTES,
                   help="minutes at the start left out of the flatness checks")
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-soak: imaptap -i under steady load for --minutes, sampled, then checked."""
    args = build_parser().parse_args(argv)
    OUT_DIR.mkdir(exist_ok=True)
    out, samples_csv = OUT_DIR / "soak.jsonl", OUT_DIR / "soak.csv"
    counts = LoadCounts()
    samples: list[Sample] = []
    with Lab(users=USERS) as lab:
        for user in USERS:
            for i, size in enumerate(MAILBOX_SIZES):
                lab.deliver(user, realistic_mail(i, size))
        env = dict(os.environ, PYTHONPATH=str(USERSPACE))
        err_path = out.with_suffix(".stderr")
        with open(err_path, "w") as err:
            tap = subprocess.Popen([sys.executable, "-m", "imaptap", "-i", lab.host_if, "--json", str(out)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                   start_new_session=True)
        stop = threading.Event()
        threads: list[threading.Thread] = []
        idles: list[IdleSession] = []
        try:
            deadline = time.monotonic() + ATTACH_TIMEOUT
            while not capturing(lab.host_if):
                if tap.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"imaptap did not start: {err_path.read_text()}")
                time.sleep(0.2)
            maps = imaptap_maps(tap.pid)
            started = time.monotonic()
            idles = [IdleSession(lab, n, n < IDLE_TLS, counts) for n in range(IDLE_SESSIONS)]
            threads = [threading.Thread(target=churn, args=(lab, w, counts, stop), daemon=True)
                       for w in range(CHURN_WORKERS)]
            threads.append(threading.Thread(target=deliverer, args=(lab, stop, counts), daemon=True))
            for t in threads:
                t.start()
            end = started + args.minutes * 60
            renew = started + IDLE_RENEW_S
            while time.monotonic() < end:
                time.sleep(max(0.0, min(SAMPLE_S - (time.monotonic() - started) % SAMPLE_S, end - time.monotonic())))
                if time.monotonic() >= renew:
                    for idle in idles:
                        idle.done(stop=False)
                    renew += IDLE_RENEW_S
                sample = take_sample(tap.pid, started, maps, counts)
                samples.append(sample)
                print(f"{sample.seconds / 60:6.1f} min  RSS {sample.rss_mb:6.1f} MB (anon"
                      f" {sample.rss_anon_kb / 1024:5.1f})  fds {sample.fds}  map {sample.map_entries}"
                      f"  submitted {sample.submitted}  lost {sample.lost}  sessions {sample.sessions}"
                      f"  cpu {sample.cpu_s:.1f} s", flush=True)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            for idle in idles:
                idle.done(stop=True)
            for idle in idles:
                idle.thread.join(timeout=60)
            time.sleep(2.0)  # the last FINs through the ring buffer
            for m in maps.values():
                m.close()
        finally:
            stop.set()
            if tap.poll() is None:
                tap.send_signal(signal.SIGINT)
            try:
                tap.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(tap.pid, signal.SIGKILL)
                tap.wait()
    with open(samples_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Sample.__slots__)
        for s in samples:
            writer.writerow([getattr(s, name) for name in Sample.__slots__])
    return report(args, samples, counts, out, tap.returncode)


def report(args: argparse.Namespace, samples: list[Sample], counts: LoadCounts, out: Path, returncode: int) -> int:
    """Print the figures and the checks; 0 if every check passed."""
    flows = 0
    stats: dict = {}
    with open(out, "rb") as f:
        for line in f:
            if line.startswith(b'{"type":"flow"'):
                flows += 1
            elif line.startswith(b'{"type":"stats"'):
                stats = json.loads(line)
    steady = [s for s in samples if s.seconds >= args.warmup * 60] or samples
    rss = [s.rss_mb for s in steady]
    entries = [s.map_entries for s in steady]
    fds = [s.fds for s in steady]
    print()
    print(f"soak: {args.minutes:.0f} min, {len(samples)} samples every {SAMPLE_S} s, warm-up {args.warmup:.0f} min;"
          f" kernel {os.uname().release}, {os.cpu_count()} CPUs")
    print(f"sessions {counts.total()} ({', '.join(f'{k} {v}' for k, v in sorted(counts.sessions.items()))});"
          f" client errors {len(counts.errors)}: {counts.errors[:3]}")
    print(f"segments submitted {stats.get('submitted')}, lost {stats.get('lost')}; flow records {flows}")
    print(f"RSS after warm-up: median {statistics.median(rss):.1f} MB, {min(rss):.1f}-{max(rss):.1f}"
          f" ({flat(rss):.1f}%); anonymous {statistics.median(s.rss_anon_kb for s in steady) / 1024:.1f} MB,"
          f" file {statistics.median(s.rss_file_kb for s in steady) / 1024:.1f} MB")
    cpu = samples[-1].cpu_s - steady[0].cpu_s
    print(f"imaptap's CPU after warm-up: {cpu:.1f} s in {(samples[-1].seconds - steady[0].seconds) / 60:.1f} min"
          f" ({100 * cpu / max(1.0, samples[-1].seconds - steady[0].seconds):.1f}% of a core),"
          f" {1e6 * cpu / max(1, samples[-1].submitted - steady[0].submitted):.0f} us a segment")
    print(f"policy map entries after warm-up: {min(entries)}-{max(entries)} (median {statistics.median(entries)});"
          f" descriptors {min(fds)}-{max(fds)}")
    checks = {
        "exit 0": returncode == 0,
        f"RSS flat after warm-up (range within {FLAT_PERCENT:.0f}% of its median)": flat(rss) <= FLAT_PERCENT,
        "map entries bounded by the sessions that hold one": max(entries) <= MAP_ENTRIES_BOUND,
        "no descriptor more than after the warm-up": max(fds) <= fds[0],
        "nothing lost": stats.get("lost") == 0 and all(s.lost == 0 for s in samples),
        "one flow record per session": flows == counts.total(),
    }
    for name, ok in checks.items():
        print("ok  " if ok else "FAIL", name)
    xs = [s.seconds for s in samples]
    print()
    top = max(s.rss_mb for s in samples)
    print(ascii_plot("imaptap -i resident memory: * all, a anonymous (MB)", xs,
                     {"*": [s.rss_mb for s in samples], "a": [s.rss_anon_kb / 1024 for s in samples]},
                     (PLOT_HEIGHT - 1) * 5 * -(-top * 1.25 // (5 * (PLOT_HEIGHT - 1))), "MB"))  # rows of 5 MB steps
    print()
    print(ascii_plot("entries of the per-flow policy map", xs, {"*": [float(s.map_entries) for s in samples]},
                     float(MAP_PLOT_STEP * (PLOT_HEIGHT - 1)), ""))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
