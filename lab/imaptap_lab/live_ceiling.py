"""The live ceiling (``scripts/bench-live --only ceiling``): how many IMAP segments a second
live capture takes without losing one, with and without the analyzer, and what happens past it.

The load must be able to outrun the analyzer, which real clients on a 2-core VM cannot (40
imaplib sessions are themselves the limit near 25,000 segments a second).  So tcpreplay replays
a capture of real Dovecot sessions (scripts/bench-replay's wire-frames capture: 3,000 sessions
as MTU-sized frames, both directions) onto the host end of the lab's veth, looped for
``--ceiling-seconds`` at each of the rising rates of ``--ceiling-rates`` (IMAP segments a second,
turned into tcpreplay's packets a second by the file's share of segments among its frames).
The kernel program sees each frame on the namespace end's ingress (XDP native, the default
``--ceiling-side ns``) or, with ``--ceiling-side host``, on the host end's egress (TC).

The frames keep their addresses (the lab's private 10.199.S.0/30 and fd00:199:S::/64 of the lab
that recorded them) and ports (143), and their Ethernet addresses are rewritten once by
tcprewrite to REPLAY_SRC_MAC and REPLAY_DST_MAC, which no veth has: once the hooks have seen
a frame, the namespace's stack drops it as addressed to another host (PACKET_OTHERHOST), so
neither Dovecot nor the namespace's TCP answers a replayed segment, and nothing leaves the veth.

Two arms per rate, in rounds whose order of rates and arms is rotated:

- ``imaptap -i``: the real command line with full JSON Lines to a file, as a user runs it;
- ``capture alone``: `LiveCapture` polled and every record decoded into a `Segment`, nothing
  else, with handshake snap length 0 (no analyzer ends any flow's handshake, so with the
  default every record would be a 2 KB copy; with 0 each is cut to head and tail, as the
  analyzer's flows are once logged in).

Per run: segments offered (exactly: the IMAP segments among the frames tcpreplay says it sent),
seen and matched by the program, submitted to the ring buffer, lost there (full), received by
userspace, the arm's CPU time (from /proc, once it has drained what was submitted) per
segment received, tcpreplay's own CPU, and what the rest of the machine did meanwhile (busy and
stolen CPU from /proc/stat, less ours): the VM is shared.  The zero-loss knee is the highest
rate at which no round lost a segment.

With ``--ceiling-workers 1,2``, the ``imaptap -i`` arm runs once per worker count, ``--workers
N`` (the kernel program spreading the flows over N rings, one forked worker each); its CPU
time is the parent's and its workers'.  On the 2-vCPU VM this is developed on, tcpreplay takes
most of one core itself, so two workers share what is left with it: the runs past one worker's
knee show what a second process adds there, not what a free second core would.

With ``--ceiling-worker-cpu FRACTION`` (imaptap_lab.cpucap), each worker process is held to
FRACTION of one core by a cgroup of its own (a CFS quota), standing in for cores the VM does not
have: as long as N caps, the uncapped parent and tcpreplay fit in the machine, the knee of N
workers can be N times the knee of one, and the summary prints that ratio ("scaling") with the
parent's CPU, which no cap holds and where the design would stop scaling.  ``--workers 1`` is
one process (no parent, no fork): its arm caps that whole process, capture and output included,
where the N-worker arms cap each worker and leave the parent, which writes the output, uncapped.
The caps are set once the arm said it listens (the workers are forked by then), so compiling
and attaching are not capped.  The overload check, a question about the uncapped analyzer, is
left out of a capped run.

Past the knee (``overload``): one more imaptap run at the top rate with ``--metrics``, scraped
twice a second while it is flooded: every scrape must answer, the loss counter must grow, and
at the end the stats record must account for every segment offered (submitted + lost), and
SIGINT must stop it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from imaptap_lab import cpucap, tui_overload
from imaptap_lab.bench_live import PYTHON, _socket_in, cpu_seconds
from imaptap_lab.checkout import OUT_DIR, USERSPACE
from imaptap_lab.lab import IMAP_PORT, Lab
from imaptap_lab.rounds import rotated

#: IMAP segments a second offered, rising from what the analyzer takes with room to spare on a
#: 2-core VM to far past it (tcpreplay itself reaches 300,000-450,000 segments a second here).
DEFAULT_RATES = (10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 150_000, 200_000, 300_000)
#: Seconds tcpreplay sends at each rate: long enough that the ring buffer (4 MiB, ~9,000
#: records of a long segment) absorbs less than a tenth of a second's excess past the knee.
DEFAULT_SECONDS = 10.0
#: Rounds of every rate and arm.
DEFAULT_ROUNDS = 3
#: The worker counts of the ``imaptap -i`` arm (--workers); one: the one-process capture.
DEFAULT_WORKERS = (1,)
#: Sessions of the bench capture replayed (scripts/bench-replay --wire-frames makes it).
CAPTURE_SESSIONS = 3000
#: Ethernet addresses of the replayed frames: locally administered, unicast, and never a veth's
#: (checked), so the namespace drops every frame once the hooks saw it.
REPLAY_SRC_MAC = "02:00:00:00:00:01"
REPLAY_DST_MAC = "02:00:00:00:00:02"
#: An arm is ready once the programs are attached; compiling them takes a few seconds.
READY_TIMEOUT_S = 120.0
#: After tcpreplay ends, the arm has drained the ring buffer once its CPU time grew by less
#: than SETTLE_CPU_S over SETTLE_POLL_S (its idle ticks cost about 1%), or after SETTLE_MAX_S.
SETTLE_POLL_S = 0.5
SETTLE_CPU_S = 0.02
SETTLE_MAX_S = 60.0
#: Bound on an arm's exit after SIGINT (it writes every open flow and the stats record).
STOP_TIMEOUT_S = 60.0
#: The overload run scrapes /metrics this often, each scrape bounded by SCRAPE_TIMEOUT_S.
SCRAPE_INTERVAL_S = 0.5
SCRAPE_TIMEOUT_S = 10.0
#: Bytes read from the end of imaptap's JSON Lines for its last line, the stats record.
STATS_TAIL = 8192
#: Width of the bars of the printed curve, for the highest rate offered.
CURVE_WIDTH = 60
#: The metrics an overload run follows (README, "Metrics").
LOST_METRIC = "imaptap_capture_segments_lost_total"
SUBMITTED_METRIC = "imaptap_capture_segments_submitted_total"
RECEIVED_METRIC = "imaptap_capture_records_received_total"
LAG_METRIC = "imaptap_capture_lag_seconds"
#: The metrics sink renews what scrapes see at most once a second (output/metrics.py): wait
#: longer than that before the last scrape, so it shows the final counts.
METRICS_SNAPSHOT_S = 2.0

CAPTURE_ALONE = r'''
import json, signal, sys
from imaptap.capture.live import LiveCapture
stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append(True))
with LiveCapture([sys.argv[1]], {143}, 256, handshake_snaplen=0) as cap:
    print("ready", flush=True)
    while not stop:
        cap.poll(100)
while cap.poll(0):
    pass
print(json.dumps(cap.counters()), flush=True)
'''


class Arm(enum.StrEnum):
    """What takes the replayed segments."""

    ANALYZER = "imaptap -i"
    CAPTURE = "capture alone"


class Side(enum.StrEnum):
    """Where the kernel program is attached."""

    NS = "ns"
    """The namespace end of the veth: tcpreplay's frames arrive on its ingress (XDP)."""
    HOST = "host"
    """The host end, where tcpreplay sends: its egress (TC)."""


def arm_label(arm: Arm, workers: int) -> str:
    """``imaptap -i``, ``imaptap -i --workers 2``, ``capture alone``."""
    return str(arm) if workers == 1 else f"{arm} --workers {workers}"


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the processes it forked (live workers) so far."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


class CeilingError(RuntimeError):
    """A run could not be made (a tool missing, an arm that did not start); the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayCapture:
    """The capture tcpreplay sends, with the running count of its IMAP segments."""

    path: Path
    segments_before: tuple[int, ...]
    """segments_before[i]: IMAP segments (payload, SYN, FIN or RST on port 143) among frames 0..i-1."""

    @property
    def packets(self) -> int:
        return len(self.segments_before) - 1

    @property
    def segments(self) -> int:
        return self.segments_before[-1]

    def segments_in(self, sent: int) -> int:
        """IMAP segments among the first ``sent`` frames of the capture looped."""
        loops, rest = divmod(sent, self.packets)
        return loops * self.segments + self.segments_before[rest]

    def pps_for(self, segments_per_second: float) -> float:
        """tcpreplay's packets a second that offer ``segments_per_second`` IMAP segments."""
        return segments_per_second * self.packets / self.segments


@dataclasses.dataclass(frozen=True, slots=True)
class Sent:
    """What tcpreplay reported, and its own CPU time."""

    packets: int
    seconds: float
    failed: int
    cpu: float


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """One arm at one rate: what was offered and what came of it."""

    arm: Arm
    rate: int
    """IMAP segments a second asked of tcpreplay."""
    sent: Sent
    offered: int
    """IMAP segments among the frames sent."""
    counters: dict
    """The capture's counters at the end (the stats record's, or LiveCapture.counters())."""
    cpu: float
    """The arm's CPU seconds from the first frame until it drained."""
    machine_busy: float
    """CPU of the whole machine while tcpreplay sent, in cores, less the arm's and tcpreplay's."""
    steal: float
    """CPU the host gave to other guests meanwhile, in cores."""
    stop_seconds: float
    """From SIGINT to the arm's exit."""
    workers: int = 1
    """The analyzer's --workers."""
    parent_cpu: float | None = None
    """The CPU seconds of the parent alone, where it forked workers."""
    cap: float | None = None
    """The cores each worker (or the one process) was held to, if capped."""
    throttled: float | None = None
    """Of the CFS periods the capped processes ran in, the share in which their cap stopped them."""

    @property
    def lost(self) -> int:
        return int(self.counters.get("lost", 0))

    @property
    def received(self) -> int:
        return int(self.counters.get("received", 0))

    @property
    def lost_share(self) -> float:
        """Segments lost among those offered."""
        return self.lost / self.offered if self.offered else 0.0

    @property
    def label(self) -> str:
        """The arm, with its worker count where it has several."""
        return arm_label(self.arm, self.workers)

    def figures(self) -> dict:
        """The run as the report shows it."""
        seconds = self.sent.seconds or float("nan")
        c = self.counters
        return {"arm": self.label, "rate asked": self.rate, "frames sent": self.sent.packets,
                "send seconds": self.sent.seconds, "failed sends": self.sent.failed,
                "offered segments/s": round(self.offered / seconds),
                "received segments/s": round(self.received / seconds),
                "offered": self.offered, "seen": c.get("seen"), "matched": c.get("matched"),
                "submitted": c.get("submitted"), "lost": self.lost, "received": self.received,
                "not accounted": self.offered - int(c.get("submitted", 0)) - self.lost,
                "CPU us per segment": round(1e6 * self.cpu / self.received, 2) if self.received else None,
                "CPU cores": round(self.cpu / seconds, 3), "tcpreplay CPU cores": round(self.sent.cpu / seconds, 3),
                "rest of the machine, cores": round(self.machine_busy, 2), "steal, cores": round(self.steal, 2),
                "stop seconds": round(self.stop_seconds, 2),
                "workers": self.workers, "CPU cap per worker, cores": self.cap,
                "parent CPU us per segment": per_segment(self.parent_cpu, self.received),
                "workers CPU us per segment": (per_segment(self.cpu - self.parent_cpu, self.received)
                                               if self.parent_cpu is not None else None),
                "parent CPU cores": round(self.parent_cpu / seconds, 3) if self.parent_cpu is not None else None,
                "throttled periods share": round(self.throttled, 3) if self.throttled is not None else None}


def per_segment(cpu: float | None, segments: int) -> float | None:
    """Microseconds of CPU per segment, rounded as the report shows them; None without either."""
    return round(1e6 * cpu / segments, 2) if cpu is not None and segments else None


# --- the capture --------------------------------------------------------------------------------

def tools_missing() -> list[str]:
    """The programs this section runs that are not installed (scripts/setup installs them)."""
    import shutil

    return [tool for tool in ("tcpreplay", "tcprewrite") if shutil.which(tool) is None]


def bench_capture() -> Path:
    """scripts/bench-replay's wire-frames capture, made (a few minutes) where it is missing."""
    path = OUT_DIR / f"bench-replay-{CAPTURE_SESSIONS}-wire.pcap"
    if not path.exists():
        from imaptap_lab.bench_replay import make_capture

        path.parent.mkdir(parents=True, exist_ok=True)
        make_capture(str(path) + ".tmp", CAPTURE_SESSIONS, offloads=False)
        os.rename(str(path) + ".tmp", path)
    return path


def link_addresses(lab: Lab) -> set[str]:
    """The Ethernet addresses of both ends of the lab's veth."""
    out = {Path(f"/sys/class/net/{lab.host_if}/address").read_text().strip()}
    shown = lab.run_in_ns(["ip", "-o", "link", "show", lab.ns_if], capture_output=True, text=True).stdout
    out.update(re.findall(r"link/ether ([0-9a-f:]{17})", shown))
    return out


def rewrite_macs(source: Path, path: Path) -> None:
    """``source`` written to ``path`` with every frame from REPLAY_SRC_MAC to REPLAY_DST_MAC."""
    subprocess.run(["tcprewrite", f"--enet-smac={REPLAY_SRC_MAC}", f"--enet-dmac={REPLAY_DST_MAC}",
                    "-i", str(source), "-o", str(path)], check=True, capture_output=True)


def replay_capture(path: Path) -> ReplayCapture:
    """``path`` (Ethernet frames) and where its IMAP segments are, by imaptap's own decoder: the
    frames the kernel program submits (pure ACKs are not)."""
    import dpkt
    from imaptap.capture.decode import Skip, decode_ethernet

    before = [0]
    ports = frozenset({IMAP_PORT})
    with open(path, "rb") as f:
        for _, frame in dpkt.pcap.Reader(f):
            before.append(before[-1] + (not isinstance(decode_ethernet(frame, ports), Skip)))
    return ReplayCapture(path, tuple(before))


def prepare(source: Path, lab: Lab, tmp: Path) -> ReplayCapture:
    """``source`` with the replay's Ethernet addresses, and where its IMAP segments are."""
    taken = link_addresses(lab) & {REPLAY_SRC_MAC, REPLAY_DST_MAC}
    if taken:
        raise CeilingError(f"the lab's veth has the replay's Ethernet address {taken.pop()}: start it again")
    path = tmp / "ceiling.pcap"
    rewrite_macs(source, path)
    return replay_capture(path)


# --- one run ------------------------------------------------------------------------------------

def machine_ticks() -> tuple[int, int]:
    """(busy, stolen) clock ticks of all CPUs so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq, steal


TCPREPLAY_SENT = re.compile(r"Actual: (\d+) packets .* sent in ([\d.]+) seconds")
TCPREPLAY_FAILED = re.compile(r"Failed packets:\s+(\d+)")


def tcpreplay_cmd(iface: str, capture: ReplayCapture, pps: float, seconds: float) -> list[str]:
    """tcpreplay sending the capture looped onto ``iface`` at ``pps`` frames a second for ``seconds``."""
    return ["tcpreplay", "-i", iface, f"--pps={pps:.0f}", "--loop=0", f"--duration={seconds:g}", "--preload-pcap",
            str(capture.path)]


def tcpreplay(iface: str, capture: ReplayCapture, pps: float, seconds: float) -> Sent:
    """Send the capture looped onto ``iface`` at ``pps`` frames a second for ``seconds``."""
    proc = subprocess.Popen(tcpreplay_cmd(iface, capture, pps, seconds),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)   # not proc.wait(): its rusage is the CPU it cost
    proc.returncode = os.waitstatus_to_exitcode(status)
    sent, failed = TCPREPLAY_SENT.search(out), TCPREPLAY_FAILED.search(out)
    if sent is None or proc.returncode != 0:
        raise CeilingError(f"tcpreplay failed ({proc.returncode}): {out.strip()[-500:]}")
    return Sent(int(sent.group(1)), float(sent.group(2)), int(failed.group(1)) if failed else 0,
                usage.ru_utime + usage.ru_stime)


class ArmProcess:
    """An arm started on the side's interface, ready once its programs are attached."""

    def __init__(self, arm: Arm, lab: Lab, side: Side, tmp: Path, extra: tuple[str, ...] = (),
                 workers: int = 1, caps: cpucap.CpuCaps | None = None) -> None:
        self.arm = arm
        self.workers = workers
        if workers > 1:
            extra = (*extra, "--workers", str(workers))
        self.out = tmp / "ceiling.jsonl"
        self.err = tmp / "ceiling.stderr"
        iface = lab.ns_if if side is Side.NS else lab.host_if
        if arm is Arm.ANALYZER:
            cmd = [PYTHON, "-m", "imaptap", "-i", iface, "--json", str(self.out), *extra]
        else:
            cmd = [PYTHON, "-c", CAPTURE_ALONE, iface]
        env = dict(os.environ, PYTHONPATH=str(USERSPACE))
        with open(self.err, "w") as err:
            kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            self.proc = lab.popen_in_ns(cmd, **kwargs) if side is Side.NS else subprocess.Popen(cmd, **kwargs)
        try:
            self._wait_ready()
            if caps is not None:
                self._cap(caps)
        except BaseException:
            self.kill()
            raise

    def worker_pids(self) -> list[int]:
        """The processes doing the analysis: the forked workers, or the one process."""
        return cpucap.children(self.proc.pid) if self.workers > 1 else [self.proc.pid]

    def _cap(self, caps: cpucap.CpuCaps) -> None:
        """Each worker (or the one process) into a capped cgroup of its own."""
        pids = self.worker_pids()
        if len(pids) != self.workers:
            raise CeilingError(f"imaptap --workers {self.workers} runs {len(pids)} processes under its parent")
        try:
            for pid in pids:
                caps.cap(pid)
        except cpucap.CapError as err:
            raise CeilingError(str(err)) from None

    def parent_cpu(self) -> float | None:
        """The parent's own CPU time where it forked workers; None for one process."""
        return cpu_seconds(self.proc.pid) if self.workers > 1 else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        if self.arm is Arm.CAPTURE:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()   # "ready", or nothing if it died
            if line.strip() != "ready":
                raise CeilingError(f"the capture alone did not start: {self.err.read_text().strip()[-500:]}")
            return
        while "listening on" not in self.err.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CeilingError(f"imaptap did not start: {self.err.read_text().strip()[-500:]}")
            time.sleep(0.05)

    def cpu(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def settle(self) -> None:
        """Wait until it has handled what the kernel submitted (its CPU time stops growing)."""
        deadline = time.monotonic() + SETTLE_MAX_S
        last = self.cpu()
        while time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_S)
            now = self.cpu()
            if now - last < SETTLE_CPU_S:
                return
            last = now

    def stop(self) -> tuple[dict, float]:
        """SIGINT, then (the capture's counters at the end, seconds until it exited)."""
        t = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            stdout, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CeilingError(f"{self.arm} did not stop within {STOP_TIMEOUT_S:g} s of SIGINT") from None
        seconds = time.monotonic() - t
        if self.proc.returncode != 0:
            raise CeilingError(f"{self.arm} exited with {self.proc.returncode}: {self.err.read_text().strip()[-500:]}")
        if self.arm is Arm.CAPTURE:
            return json.loads(stdout.strip().splitlines()[-1]), seconds
        stats = last_record(self.out)
        self.out.unlink()
        return stats, seconds

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # it detaches what it attached
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def last_record(path: Path) -> dict:
    """The last line of a JSON Lines file, parsed (imaptap's stats record); {} if there is none."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - STATS_TAIL))
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith(b"{") else {}


def run_once(lab: Lab, capture: ReplayCapture, arm: Arm, rate: int, seconds: float, side: Side, tmp: Path,
             workers: int = 1, cap: float | None = None) -> Run:
    """Start the arm, replay at ``rate`` segments a second, let it drain, stop it; with ``cap``,
    the analyzer's workers (or its one process) each held to that many cores."""
    with cpucap.CpuCaps(cap) if cap is not None and arm is Arm.ANALYZER else contextlib.nullcontext() as caps:
        return _run_once(lab, capture, arm, rate, seconds, side, tmp, workers, caps)


def _run_once(lab: Lab, capture: ReplayCapture, arm: Arm, rate: int, seconds: float, side: Side, tmp: Path,
              workers: int, caps: cpucap.CpuCaps | None) -> Run:
    proc = ArmProcess(arm, lab, side, tmp, workers=workers, caps=caps)
    try:
        cpu0 = proc.cpu()
        parent0 = proc.parent_cpu()
        throttled0 = caps.throttling() if caps is not None else None
        busy0, steal0 = machine_ticks()
        t = time.monotonic()
        sent = tcpreplay(lab.host_if, capture, capture.pps_for(rate), seconds)
        span = time.monotonic() - t   # tcpreplay's run, reading the file into memory included
        busy1, steal1 = machine_ticks()
        cpu_sending = proc.cpu() - cpu0
        proc.settle()
        cpu = proc.cpu() - cpu0
        parent1 = proc.parent_cpu()
        throttled = None
        if caps is not None and throttled0 is not None:
            t1 = caps.throttling()
            periods = t1.periods - throttled0.periods
            throttled = (t1.throttled - throttled0.throttled) / periods if periods else 0.0
    except BaseException:
        proc.kill()
        raise
    counters, stop_seconds = proc.stop()
    ticks = os.sysconf("SC_CLK_TCK")
    rest = ((busy1 - busy0) / ticks - cpu_sending - sent.cpu) / span
    parent = parent1 - parent0 if parent1 is not None and parent0 is not None else None
    return Run(arm, rate, sent, capture.segments_in(sent.packets), counters, cpu, max(0.0, rest),
               (steal1 - steal0) / ticks / span, stop_seconds, workers, parent,
               caps.fraction if caps is not None else None, throttled)


# --- the figures --------------------------------------------------------------------------------

def summarize(runs: list[Run]) -> dict:
    """Per arm and rate: medians over the rounds, and the worst loss of any round."""
    out: dict = {}
    for label in dict.fromkeys(r.label for r in runs):
        rows = {}
        for rate in sorted({r.rate for r in runs if r.label == label}):
            mine = [r for r in runs if r.label == label and r.rate == rate]
            figures = [r.figures() for r in mine]

            def median(key: str, figures: list[dict] = figures) -> float | None:
                values = [f[key] for f in figures if f[key] is not None]
                return statistics.median(values) if values else None

            rows[rate] = {"rounds": len(mine),
                          "offered segments/s": median("offered segments/s"),
                          "received segments/s": median("received segments/s"),
                          "lost, median": median("lost"), "lost, most": max(r.lost for r in mine),
                          "lost share, median": round(statistics.median(r.lost_share for r in mine), 4),
                          "not accounted, most": max(abs(f["not accounted"]) for f in figures),
                          "CPU us per segment": median("CPU us per segment"), "CPU cores": median("CPU cores"),
                          "tcpreplay CPU cores": median("tcpreplay CPU cores"),
                          "rest of the machine, cores": median("rest of the machine, cores"),
                          "steal, cores": median("steal, cores"),
                          "stop seconds, most": max(f["stop seconds"] for f in figures),
                          **{key: median(key) for key in CAPPED_MEDIANS}}
        if rows:
            first = next(r for r in runs if r.label == label)
            out[label] = {"rates": rows, "knee": knee(rows), "arm": str(first.arm), "workers": first.workers,
                          "CPU cap per worker, cores": first.cap}
    return out


#: The figures of the parent and the workers apart, and of the caps, a summary takes medians of.
CAPPED_MEDIANS = ("parent CPU us per segment", "workers CPU us per segment", "parent CPU cores",
                  "throttled periods share")


def knee(rows: dict) -> dict:
    """The highest offered rate below which no round of any rate lost a segment, and the first that did."""
    zero_loss, first_loss = None, None
    for rate in sorted(rows):
        row = rows[rate]
        if row["lost, most"]:
            first_loss = row["offered segments/s"]
            break
        zero_loss = row["offered segments/s"]
    return {"zero loss up to segments/s": zero_loss, "losses from segments/s": first_loss}


def scaling(summary: dict) -> list[dict]:
    """Per worker count of the analyzer: its knee, the ratio of that knee to one worker's, the
    most it took at any rate (with the same ratio: finer than the rates' steps where the arm was
    flooded), and the CPU per segment (the parent's and the workers' apart) at the knee."""
    arms = [s for s in summary.values() if s["arm"] == str(Arm.ANALYZER)]

    def most_received(s: dict) -> float:
        return max((row["received segments/s"] or 0) for row in s["rates"].values())

    one = next((s for s in arms if s["workers"] == 1), None)
    one_knee = one["knee"]["zero loss up to segments/s"] if one else None
    one_most = most_received(one) if one else None
    out = []
    for s in sorted(arms, key=lambda s: s["workers"]):
        k = s["knee"]["zero loss up to segments/s"]
        most = most_received(s)
        at = max((rate for rate, row in s["rates"].items() if row["offered segments/s"] == k), default=None)
        row = s["rates"][at] if at is not None else {}
        out.append({"workers": s["workers"], "CPU cap per worker, cores": s["CPU cap per worker, cores"],
                    "zero loss up to segments/s": k, "losses from segments/s": s["knee"]["losses from segments/s"],
                    "scaling": round(k / one_knee, 2) if k and one_knee else None,
                    "most received segments/s": most,
                    "most received scaling": round(most / one_most, 2) if one_most else None,
                    "CPU us per segment": row.get("CPU us per segment"),
                    "parent CPU us per segment": row.get("parent CPU us per segment"),
                    "workers CPU us per segment": row.get("workers CPU us per segment"),
                    "parent CPU cores": row.get("parent CPU cores"),
                    "throttled periods share": row.get("throttled periods share")})
    return out


def print_scaling(rows: list[dict]) -> None:
    """The scaling table: per worker count, the knee and its ratio to one worker's."""
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    print("  scaling of imaptap -i over its workers (figures at the highest rate without loss):")
    print(f"    {'workers':>7} {'cap/worker':>10} {'knee/s':>8} {'losses from':>11} {'scaling':>7}"
          f" {'most taken/s':>12} {'scaling':>7} {'us/segment':>10} {'parent us':>9} {'workers us':>10}"
          f" {'parent cores':>12} {'throttled':>9}")
    for r in rows:
        print(f"    {r['workers']:>7} {num(r['CPU cap per worker, cores'], 'g'):>10}"
              f" {num(r['zero loss up to segments/s'], ',.0f'):>8} {num(r['losses from segments/s'], ',.0f'):>11}"
              f" {num(r['scaling'], '.2f'):>7} {num(r['most received segments/s'], ',.0f'):>12}"
              f" {num(r['most received scaling'], '.2f'):>7} {num(r['CPU us per segment'], '.2f'):>10}"
              f" {num(r['parent CPU us per segment'], '.2f'):>9} {num(r['workers CPU us per segment'], '.2f'):>10}"
              f" {num(r['parent CPU cores'], '.3f'):>12} {num(r['throttled periods share'], '.2f'):>9}")


def curve(rows: dict, width: int = CURVE_WIDTH) -> list[str]:
    """The rows as bars: '#' the segments a second received, '.' those lost, up to what was offered."""
    top = max((row["offered segments/s"] or 0) for row in rows.values()) or 1
    lines = [f"{'offered/s':>10}  {'received (#) and lost (.) per second':{width}}  {'received/s':>10}  lost"]
    for rate in sorted(rows):
        row = rows[rate]
        offered, received = row["offered segments/s"] or 0, row["received segments/s"] or 0
        got = round(width * received / top)
        bar = "#" * got + "." * max(0, round(width * offered / top) - got)
        lines.append(f"{offered:>10,.0f}  {bar:{width}}  {received:>10,.0f}  {100 * row['lost share, median']:.0f}%")
    return lines


def print_summary(summary: dict) -> None:
    """The table and the curve of each arm."""
    for arm, figures in summary.items():
        rows = figures["rates"]
        print(f"  {arm}:")
        print(f"    {'asked/s':>8} {'offered/s':>10} {'received/s':>10} {'lost (median, most)':>20} {'us/segment':>10}"
              f" {'cores':>6} {'tcpreplay':>9} {'others':>6} {'steal':>6}")
        for rate, row in rows.items():
            print(f"    {rate:>8,} {row['offered segments/s']:>10,.0f} {row['received segments/s']:>10,.0f}"
                  f" {row['lost, median']:>10,.0f} {row['lost, most']:>9,}"
                  f" {row['CPU us per segment'] or 0:>10.2f} {row['CPU cores']:>6.2f}"
                  f" {row['tcpreplay CPU cores']:>9.2f}"
                  f" {row['rest of the machine, cores']:>6.2f} {row['steal, cores']:>6.2f}")
        k = figures["knee"]
        below, above = k["zero loss up to segments/s"], k["losses from segments/s"]
        print("    zero-loss knee: " + (f"no loss up to {below:,.0f} segments/s offered" if below else
                                       "losses at every rate") +
              (f", losses from {above:,.0f}" if above else ", no loss at any rate"))
        for line in curve(rows):
            print("    " + line)


# --- past the knee ------------------------------------------------------------------------------

def scrape(lab: Lab, side: Side, port: int) -> tuple[dict[str, float], float]:
    """(imaptap's capture metrics, seconds the scrape took) from its /metrics on the side's loopback;
    the metrics are {} unless it answered 200 (before its first snapshot, the families have no
    samples yet)."""
    t = time.monotonic()
    with _socket_in(lab.netns if side is Side.NS else None, socket.SOCK_STREAM) as sock:
        sock.settimeout(SCRAPE_TIMEOUT_S)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        body = b"".join(iter(lambda: sock.recv(65536), b""))
    seconds = time.monotonic() - t
    values: dict[str, float] = {}
    text = body.decode(errors="replace")
    if not text.startswith(("HTTP/1.0 200", "HTTP/1.1 200")):
        return values, seconds
    values[ANSWERED] = 1.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (LOST_METRIC, SUBMITTED_METRIC, RECEIVED_METRIC, LAG_METRIC):
            values[name] = float(value)
    return values, seconds


#: The key scrape() adds for a scrape answered with 200.
ANSWERED = "answered"
METRICS_PORT = re.compile(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics")


def overload(lab: Lab, capture: ReplayCapture, rate: int, seconds: float, side: Side, tmp: Path) -> dict:
    """imaptap -i --metrics flooded at ``rate``: its scrapes while it is, and its accounts after."""
    proc = ArmProcess(Arm.ANALYZER, lab, side, tmp, ("--metrics", "127.0.0.1:0"))
    try:
        found = METRICS_PORT.search(proc.err.read_text())
        if found is None:
            raise CeilingError(f"imaptap did not say where it serves metrics: {proc.err.read_text()[-500:]}")
        port = int(found.group(1))
        scrapes = []
        sender = subprocess.Popen(tcpreplay_cmd(lab.host_if, capture, capture.pps_for(rate), seconds),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while sender.poll() is None:
            values, took = scrape(lab, side, port)
            scrapes.append((values, took))
            time.sleep(SCRAPE_INTERVAL_S)
        out = sender.communicate()[0]
        sent_match = TCPREPLAY_SENT.search(out)
        if sent_match is None:
            raise CeilingError(f"tcpreplay failed: {out.strip()[-500:]}")
        proc.settle()
        time.sleep(METRICS_SNAPSHOT_S)   # the scrape shows the snapshot, renewed once a second
        final_scrape, _ = scrape(lab, side, port)
    except BaseException:
        proc.kill()
        raise
    stats, stop_seconds = proc.stop()
    sent = int(sent_match.group(1))
    offered = capture.segments_in(sent)
    lost_seen = [v.get(LOST_METRIC, 0.0) for v, _ in scrapes]
    return {"rate asked": rate, "offered segments/s": round(offered / float(sent_match.group(2))),
            "scrapes": len(scrapes), "scrape seconds, most": round(max((t for _, t in scrapes), default=0.0), 3),
            "scrape seconds, median": round(statistics.median(t for _, t in scrapes), 3) if scrapes else None,
            "lost, as scraped": lost_seen, "lag seconds, most": max((v.get(LAG_METRIC, 0.0) for v, _ in scrapes),
                                                                     default=0.0),
            "lost, last scrape": final_scrape.get(LOST_METRIC), "offered": offered,
            "stats: submitted": stats.get("submitted"), "stats: lost": stats.get("lost"),
            "stats: received": stats.get("received"),
            "checks": {
                "every scrape answered": len(scrapes) > 0 and all(ANSWERED in v for v, _ in scrapes),
                "the loss counter is exported": LOST_METRIC in final_scrape,
                "losses grow while flooded": lost_seen == sorted(lost_seen) and bool(lost_seen) and lost_seen[-1] > 0,
                "scraped losses are the stats record's": final_scrape.get(LOST_METRIC) == stats.get("lost"),
                "every segment offered was submitted or counted lost":
                    offered == int(stats.get("submitted", -1)) + int(stats.get("lost", 0)),
                "every segment submitted was received": stats.get("submitted") == stats.get("received"),
                "stopped by SIGINT": bool(stats.get("stopped_by_signal"))},
            "stop seconds": round(stop_seconds, 2)}


# --- the section --------------------------------------------------------------------------------

def ceiling(lab: Lab, tmp: Path, rates: list[int], seconds: float, rounds: int, side: Side,
            source: Path | None = None, workers: tuple[int, ...] = DEFAULT_WORKERS,
            worker_cpu: float | None = None) -> dict:
    """The runs of every rate and arm in rotated rounds, their summary, and the overload check
    (not with ``worker_cpu``, the cores each worker is capped to)."""
    missing = tools_missing()
    if missing:
        raise CeilingError(f"missing {', '.join(missing)} (Debian package tcpreplay); run scripts/setup")
    if worker_cpu is not None:
        reason = cpucap.unavailable()
        if reason:
            raise CeilingError(f"--ceiling-worker-cpu: {reason}")
        try:
            cpucap.quota_us(worker_cpu)
        except cpucap.CapError as err:
            raise CeilingError(str(err)) from None
        print(f"  each worker (--workers 1: the one process) capped to {worker_cpu:g} of a core by a cgroup"
              f" of its own; {max(workers)} workers take at most {max(workers) * worker_cpu:g} of the"
              f" {os.cpu_count()} cores, the parent and tcpreplay uncapped", flush=True)
    capture = prepare(source or bench_capture(), lab, tmp)
    print(f"  replaying {capture.path.name}: {capture.packets:,} frames, {capture.segments:,} IMAP segments,"
          f" {seconds:g} s per run, kernel program on {lab.ns_if if side is Side.NS else lab.host_if}"
          f" ({'XDP ingress' if side is Side.NS else 'TC egress'})", flush=True)
    runs: list[Run] = []
    arms = [(Arm.ANALYZER, n) for n in workers] + [(Arm.CAPTURE, 1)]
    cells = [(rate, arm, n) for rate in rates for arm, n in arms]
    for r in range(rounds):
        for rate, arm, n in rotated(cells, r * (len(cells) // rounds or 1)):
            run = run_once(lab, capture, arm, rate, seconds, side, tmp, n, worker_cpu)
            runs.append(run)
            f = run.figures()
            print(f"    round {r + 1} {run.label:26} {rate:>8,}/s asked: offered {f['offered segments/s']:>8,}/s,"
                  f" received {f['received segments/s']:>8,}/s, lost {f['lost']:>9,},"
                  f" {f['CPU us per segment'] or 0:6.2f} us/segment, others {f['rest of the machine, cores']:.2f}"
                  f" cores", flush=True)
    summary = summarize(runs)
    check = None
    tui_checks: list[dict] = []
    if worker_cpu is None:
        top = max(rates)
        print(f"  past the knee: imaptap -i --metrics at {top:,}/s asked, scraped every {SCRAPE_INTERVAL_S:g} s",
              flush=True)
        check = overload(lab, capture, top, seconds, side, tmp)
        for n in sorted({1, max(workers)}):
            print(f"  past the knee, the TUI: imaptap -i{f' --workers {n}' if n > 1 else ''} on a terminal at"
                  f" {top:,}/s asked, keys every {tui_overload.KEY_INTERVAL_S:g} s", flush=True)
            tui_checks.append(tui_overload.tui_overload(
                lab.ns_if if side is Side.NS else lab.host_if, lab.netns if side is Side.NS else None,
                tcpreplay_cmd(lab.host_if, capture, capture.pps_for(top), seconds), n))
    return {"capture": {"file": str(source or bench_capture()), "frames": capture.packets,
                        "segments": capture.segments},
            "side": str(side), "seconds per run": seconds, "rounds": rounds, "workers": list(workers),
            "CPU cap per worker, cores": worker_cpu, "summary": summary, "scaling": scaling(summary),
            "overload": check, "tui overload": tui_checks, "runs": [r.figures() for r in runs]}


def print_report(report: dict) -> None:
    """The summary of each arm and the overload check, as bench-live prints its sections."""
    print_summary(report["summary"])
    if len(report["scaling"]) > 1 or report["CPU cap per worker, cores"] is not None:
        print_scaling(report["scaling"])
    check = report["overload"]
    if check is None:
        print("  past the knee: not run with capped workers (it checks the uncapped analyzer)")
        return
    print(f"  past the knee ({check['offered segments/s']:,} segments/s offered, imaptap -i --metrics):"
          f" {check['scrapes']} scrapes, slowest {check['scrape seconds, most']} s; lost as scraped"
          f" {[int(v) for v in check['lost, as scraped']]}; stats record: submitted {check['stats: submitted']},"
          f" lost {check['stats: lost']}, received {check['stats: received']}; stopped {check['stop seconds']} s"
          f" after SIGINT")
    for what, ok in check["checks"].items():
        print(f"    {'ok  ' if ok else 'FAIL'} {what}")
    for tui in report.get("tui overload", ()):
        tui_overload.print_check(tui)


def main_error(err: Exception) -> int:
    """One line on stderr for a ceiling that could not be measured; the exit status."""
    print(f"bench-live: ceiling: {err}", file=sys.stderr)
    return 1
