"""Benchmark: what live capture costs the host, on the Dovecot lab's veth (imaptap_lab.lab).

Six measurements, each reported as medians of interleaved rounds:

1. Non-IMAP traffic through the veth (iperf3 into and out of the lab's namespace) with nothing
   attached, a do-nothing XDP program ("null XDP"), ``imaptap -i VETH`` (XDP ingress + TC
   egress), do-nothing TC filters on ingress and egress ("null TC"), ``imaptap --no-xdp`` (TC
   both ways), and ``tcpdump -i VETH 'tcp port 143' -w /dev/null``.  Three loads, each into
   and out of the namespace:
     - TCP, segmentation offload as the kernel sets it (64 KB GSO packets);
     - TCP with GSO and TSO off on both veth ends in every arm (``ethtool -K IF gso off tso
       off``, restored afterwards): every frame crossing the veth is MTU-sized, so ingress hooks
       (XDP, TC ingress) run per frame in every arm.  TCP still builds 64 KB packets and the
       kernel cuts them after the clsact egress hook, so TC egress still runs per 64 KB;
     - UDP, 64-byte datagrams as fast as iperf3 sends them: the most packets per byte.  (At a
       fixed rate, iperf3's pacing loop costs more CPU than the packets do.)
   Per run: throughput, and the CPU the traffic cost (iperf3 client and server, ksoftirqd, and
   the capturing process: exact scheduler run time, so other load on the machine does not
   count).  Each arm is compared with "nothing" of the same round ("raw" ratio) and imaptap
   with the do-nothing program on the same hook ("isolated" ratio).  The isolated ratio is the
   one that measures imaptap's program: on a veth, *any* native XDP program takes TSO off the
   peer (veth_xdp_set, veth_fix_features), so the sender segments every packet in software,
   and the veth copies each cloned or short-headroom skb before XDP sees it (TCP's are clones,
   veth_convert_skb_to_xdp_buff); physical NICs with native XDP pay neither.
   kernel.bpf_stats_enabled is off during these rounds: its two clock reads per run would be
   charged to the BPF arms only.  Optional arms: ``imaptap --xdp-mode skb`` and its do-nothing
   baseline in generic mode (``--arms``).
   The "swap" section (``--only swap``) pairs runs more tightly: imaptap's programs and the
   do-nothing ones are loaded once and swapped on the hook between two runs seconds apart.
   On this kind of VM, throughput and CPU per byte both move 10-30% from run to run, so these
   ratios cannot resolve a few percent; the bpf_stats share below can.
2. The kernel program's own cost per packet: BPF_PROG_TEST_RUN (the kernel times a million
   runs at once) on crafted packets, minus the same for a program that does nothing; and, in
   separate rounds with kernel.bpf_stats_enabled=1 on the same loads, run_time_ns / run_cnt per
   attached program, less the do-nothing program's figure on the same hook (the clock reads),
   and the programs' run time as a share of the CPU the traffic cost.
3. imaptap's own CPU (user + system, from /proc) while the non-IMAP traffic runs: nothing
   should cross to userspace, so it should be ~0.
4. IMAP load: many concurrent real imaplib sessions (FETCH and NOOP in a loop) against
   Dovecot; segments per second handed over, segments lost, and imaptap's CPU per 1000
   segments per second.
5. The handshake's copy rule (``--only handshake``): real sessions (imaplib: LOGIN, ID, SELECT,
   FETCH of a 4 KB mail and of five mails' headers, LOGOUT) against Dovecot and against Cyrus,
   captured with the analyzer in the loop, once with the default handshake snap length and once
   with 0 (the snap length's cut from the start), in interleaved rounds: payload bytes the
   kernel copied per session against the session's wire bytes, records per session, resyncs.
   The cost section times the program on a 1326-byte segment in both modes.
6. The live ceiling (``--only ceiling``, imaptap_lab.live_ceiling): tcpreplay replays real
   Dovecot sessions onto the veth at rising rates, past what the analyzer takes; per rate the
   segments offered, submitted, received and lost, CPU per segment of ``imaptap -i`` and of the
   capture alone, the zero-loss knee, and a check that past it losses are counted, metrics
   still answer and SIGINT still stops imaptap.  With ``--ceiling-workers 1,2,4
   --ceiling-worker-cpu 0.1`` each worker is capped to a tenth of a core (imaptap_lab.cpucap),
   and the knee of N workers against one's shows the scaling on a machine without N free cores.

Nothing is timed in the test suite; this is for the README.  Run as root:
    scripts/bench-live [--rounds 15] [--iperf-seconds 2] [--seconds 5] [--sessions 40]
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imaptap_lab.checkout import USERSPACE, VENV_PYTHON
from imaptap_lab.lab import Lab
from imaptap_lab.mail import filler_mail
from imaptap_lab.programs import capturing
from imaptap_lab.rounds import format_quartiles, quartiles, rotated

PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
IPERF_PORT = 5201
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
BPF_PROG_TEST_RUN = 10
TICKS = os.sysconf("SC_CLK_TCK")
NULL_TC_HANDLE = 0x1A7AA   # not imaptap's TC_HANDLE: its stale-filter cleanup must not see ours
IPERF_ATTEMPTS = 3         # iperf3 now and then fails a run (UDP -R at full rate): run it again
UDP_PAYLOAD = 64           # bytes per datagram of the UDP load: per-packet costs dominate
CLONE_NEWNET = 0x40000000
SIOCETHTOOL = 0x8946
IFREQ_SIZE = 40
# Legacy ethtool get/set commands, as `ethtool -K IF tso|gso off` uses them.
ETHTOOL_GET = {"tso": 0x1E, "gso": 0x23}
ETHTOOL_SET = {"tso": 0x1F, "gso": 0x24}
SECTIONS = ("cost", "throughput", "stats", "swap", "load", "handshake", "ceiling")
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2

EPILOG = """examples:
  scripts/bench-live                      # 15 rounds of 2 s iperf3 runs, 40 IMAP sessions
  scripts/bench-live --rounds 3 --stats-rounds 1 --seconds 3 --sessions 10
  scripts/bench-live --only throughput,stats --rounds 25
  scripts/bench-live --only swap --pairs 40   # imaptap vs do-nothing programs, paired runs
  scripts/bench-live --only throughput --arms "nothing,null XDP skb,imaptap --xdp-mode skb"
  scripts/bench-live --json bench.json    # also write the figures as JSON
  scripts/bench-live --only cost,handshake --rounds 7   # what the handshake's copy rule costs
  scripts/bench-live --only ceiling --json ceiling.json # the zero-loss knee with tcpreplay (~15 min)
  scripts/bench-live --only ceiling --ceiling-rates 20000,80000 --ceiling-seconds 3 --ceiling-rounds 1
  scripts/bench-live --only ceiling --ceiling-workers 1,2   # the knee of one and of two live workers
  scripts/bench-live --only ceiling --ceiling-workers 1,2,4 --ceiling-worker-cpu 0.1 \
      --ceiling-rates 5000,7000,10000,14000,20000,28000,40000,56000   # scaling, each worker capped to 0.1 core
"""

# --- processes ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_ns(pids: list[int]) -> int:
    """Scheduler run time of processes (all threads), in ns: exact, unlike the tick-sampled
    /proc/PID/stat, and without CONFIG_IRQ_TIME_ACCOUNTING it includes the softirq work done in
    their context (the veth delivers the packet in the sender's softirq)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def ksoftirqd_pids() -> list[int]:
    """The ksoftirqd threads: softirq work not done in a process's own context runs there."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and Path(f"/proc/{pid}/comm").read_text().startswith("ksoftirqd/"):
                out.append(int(pid))
        except OSError:
            continue
    return out


class Nothing:
    """The baseline arm: nothing attached."""
    def __init__(self) -> None:
        self.pids: list[int] = []

    def programs(self) -> dict[str, tuple[int, int]]:
        return {}

    def stop(self) -> dict:
        return {}


class Imaptap:
    """The real command line, attached to the lab's veth until stopped with SIGINT."""

    def __init__(self, iface: str, extra: list[str], out: Path) -> None:
        self.out = out
        env = dict(os.environ, PYTHONPATH=str(USERSPACE))
        err = out.with_suffix(".stderr")
        with open(err, "w") as f:
            self.proc = subprocess.Popen([PYTHON, "-m", "imaptap", "-i", iface, "--json", str(out), *extra],
                                         stdin=subprocess.DEVNULL, stderr=f, text=True, env=env)
        self.pids = [self.proc.pid]
        deadline = time.monotonic() + 60
        # The egress program is attached last: once it is there, everything is.
        while not capturing(iface):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGINT)   # it detaches what it attached
                    self.proc.wait(timeout=30)
                raise SystemExit(f"imaptap did not start: {err.read_text()}")
            time.sleep(0.1)

    def programs(self) -> dict[str, tuple[int, int]]:
        return prog_stats_of(self.proc.pid)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        stats = {}
        for line in self.out.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "stats":
                stats = record
        return stats


class Tcpdump:
    """tcpdump on the veth with a port-143 filter and no output: the usual way to watch IMAP."""
    def __init__(self, iface: str) -> None:
        self.proc = subprocess.Popen(["tcpdump", "-i", iface, "-n", "-w", "/dev/null", "tcp port 143"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pids = [self.proc.pid]
        line = self.proc.stderr.readline()
        if b"listening on" not in line:
            self.stop()
            raise SystemExit(f"tcpdump did not start: {line!r}")

    def programs(self) -> dict[str, tuple[int, int]]:
        return {}

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        return {}


class NullXdp:
    """An XDP program that only returns XDP_PASS: what XDP on a veth costs by itself."""

    def __init__(self, iface: str, flags: int = XDP_FLAGS_DRV_MODE) -> None:
        import bcc

        self.pids: list[int] = []
        self.iface = iface.encode()
        self.flags = flags   # native by default, as imaptap's default on veth
        self.bpf = bcc.BPF(text=b"int null_xdp(struct xdp_md *ctx) { return XDP_PASS; }")
        self.fn = self.bpf.load_func(b"null_xdp", bcc.BPF.XDP)
        bcc.BPF.attach_xdp(self.iface, self.fn, flags)

    def programs(self) -> dict[str, tuple[int, int]]:
        from imaptap.capture import live

        _, ns, cnt = live.prog_info(self.fn.fd)
        return {"null_xdp": (ns, cnt)}

    def stop(self) -> dict:
        import bcc

        bcc.BPF.remove_xdp(self.iface, self.flags)
        self.bpf.cleanup()
        return {}


class NullTc:
    """Do-nothing TC filters (TC_ACT_UNSPEC, as imaptap's) on ingress and egress, in a clsact
    qdisc: what TC costs by itself, the baseline of ``imaptap --no-xdp``."""

    def __init__(self, iface: str) -> None:
        import bcc
        from imaptap.capture import live
        from pyroute2 import IPRoute

        self.pids: list[int] = []
        # One program per hook, so that each has its own run counts.
        self.bpf = bcc.BPF(text=b"int null_tc_in(struct __sk_buff *skb) { return -1; }\n"
                                b"int null_tc_eg(struct __sk_buff *skb) { return -1; }")
        self.fns = {parent: self.bpf.load_func(name, bcc.BPF.SCHED_CLS)
                    for parent, name in ((live.TC_PARENT_INGRESS, b"null_tc_in"),
                                         (live.TC_PARENT_EGRESS, b"null_tc_eg"))}
        self.ipr = IPRoute()
        self.index = socket.if_nametoindex(iface)
        self.added_clsact = False
        try:
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=self.index)):
                self.ipr.tc("add", "clsact", self.index)
                self.added_clsact = True
            for parent, fn in self.fns.items():
                self.ipr.tc("add-filter", "bpf", self.index, NULL_TC_HANDLE, fd=fn.fd, name=fn.name.decode(),
                            parent=parent, prio=live.TC_PRIO, classid=1, direct_action=True)
        except BaseException:
            self.stop()
            raise

    def programs(self) -> dict[str, tuple[int, int]]:
        from imaptap.capture import live

        out = {}
        for fn in self.fns.values():
            name, ns, cnt = live.prog_info(fn.fd)
            out[name] = (ns, cnt)
        return out

    def stop(self) -> dict:
        from imaptap.capture import live

        for parent in (live.TC_PARENT_INGRESS, live.TC_PARENT_EGRESS):
            with contextlib.suppress(Exception):   # absent after a failed start
                self.ipr.tc("del-filter", "bpf", self.index, NULL_TC_HANDLE, parent=parent, prio=live.TC_PRIO)
        if self.added_clsact:
            self.ipr.tc("del", "clsact", self.index)
        self.ipr.close()
        self.bpf.cleanup()
        return {}


# --- segmentation offload on both veth ends ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _socket_in(netns: str | None, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket in network namespace ``netns`` (None: ours), for ethtool ioctls on its devices
    (or, ``kind`` SOCK_STREAM, to reach a server on its loopback)."""
    if netns is None:
        return socket.socket(socket.AF_INET, kind)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            return socket.socket(socket.AF_INET, kind)
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def _ethtool(sock: socket.socket, ifname: str, feature: str, value: bool | None = None) -> bool:
    cmd = ETHTOOL_GET[feature] if value is None else ETHTOOL_SET[feature]
    buf = array.array("I", [cmd, int(bool(value))])
    ifreq = struct.pack("16sP", ifname.encode(), buf.buffer_info()[0])
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq + b"\0" * (IFREQ_SIZE - len(ifreq)))
    except OSError as exc:
        raise OSError(exc.errno, f"ethtool {feature} {value} on {ifname}: {exc.strerror}") from None
    return bool(buf[1])


class Segmentation:
    """GSO and TSO on both ends of the lab's veth, as `ethtool -K IF gso on|off tso on|off`;
    restore() puts back what was there before."""

    def __init__(self, lab: Lab) -> None:
        self.ends = [(_socket_in(None), lab.host_if), (_socket_in(lab.netns), lab.ns_if)]
        # Read before anything is attached: with XDP on one end, the other shows GSO off.
        self.saved = [{f: _ethtool(sock, ifname, f) for f in ETHTOOL_GET} for sock, ifname in self.ends]

    def set(self, on: bool) -> None:
        for sock, ifname in self.ends:
            for feature in ("gso", "tso"):
                try:
                    _ethtool(sock, ifname, feature, on)
                except OSError as exc:
                    # XDP on one end takes TSO out of the other's hw_features (veth_xdp_set):
                    # it can be neither turned on nor off then, and is off; state() shows it.
                    if exc.errno != errno.EOPNOTSUPP:
                        raise

    def state(self) -> str:
        """What is in effect, e.g. "itap5h gso+tso, itap5n -"."""
        return ", ".join(f"{ifname} " + ("+".join(f for f in ("gso", "tso") if _ethtool(sock, ifname, f)) or "-")
                         for sock, ifname in self.ends)

    def restore(self) -> None:
        for (sock, ifname), saved in zip(self.ends, self.saved, strict=True):
            for feature, value in saved.items():
                _ethtool(sock, ifname, feature, value)
            sock.close()


# --- 1 and 3: non-IMAP traffic, and imaptap's CPU meanwhile ------------------------------------

# name -> (segmentation offload on?, iperf3 arguments)
LOADS = {
    "TCP, offloads on": (True, []),
    "TCP, GSO+TSO off": (False, []),
    f"UDP {UDP_PAYLOAD} B": (True, ["-u", "-l", str(UDP_PAYLOAD), "-b", "0"]),
}
DIRECTIONS = ("egress", "ingress")   # egress: into the namespace; ingress: -R, the namespace sends
ISOLATE = {"imaptap": "null XDP", "imaptap --xdp-mode skb": "null XDP skb", "imaptap --no-xdp": "null TC"}
ARM_NAMES = ("nothing", "null XDP", "imaptap", "null XDP skb", "imaptap --xdp-mode skb", "null TC", "imaptap --no-xdp",
             "tcpdump")
DEFAULT_ARMS = ("nothing", "null XDP", "imaptap", "null TC", "imaptap --no-xdp", "tcpdump")
BPF_ARMS = ("null XDP", "imaptap", "null XDP skb", "imaptap --xdp-mode skb", "null TC", "imaptap --no-xdp")


def arms(lab: Lab, tmp: Path) -> dict:
    """A factory per arm name; each call attaches a fresh arm."""
    return {
        "nothing": lambda: Nothing(),
        "null XDP": lambda: NullXdp(lab.host_if),
        "imaptap": lambda: Imaptap(lab.host_if, [], tmp / "t.jsonl"),
        "null XDP skb": lambda: NullXdp(lab.host_if, XDP_FLAGS_SKB_MODE),
        "imaptap --xdp-mode skb": lambda: Imaptap(lab.host_if, ["--xdp-mode", "skb"], tmp / "t.jsonl"),
        "null TC": lambda: NullTc(lab.host_if),
        "imaptap --no-xdp": lambda: Imaptap(lab.host_if, ["--no-xdp"], tmp / "t.jsonl"),
        "tcpdump": lambda: Tcpdump(lab.host_if),
    }


def iperf(lab: Lab, args: list[str], seconds: float, reverse: bool, pin: bool, watched: list[int], arm) -> dict:
    """One iperf3 run: Gbit/s received (TCP) or million datagrams sent per second (UDP), the CPU
    it cost, and the arm's BPF run counts.  A run iperf3 reports as failed is run again."""
    cmd = ["iperf3", "-c", lab.server4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *args]
    if reverse:
        cmd.append("-R")
    if pin:
        cmd = ["taskset", "-c", "0", *cmd]
    for attempt in range(IPERF_ATTEMPTS):
        progs0 = arm.programs()
        ns0, arm0 = run_ns(watched), run_ns(arm.pids)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        ns1, arm1 = run_ns(watched), run_ns(arm.pids)
        progs1 = arm.programs()
        try:
            result = json.loads(out)
        except ValueError:
            result = {"error": out[-300:]}
        end = result.get("end", {})
        if not proc.returncode and "error" not in result and ("sum" if "-u" in args else "sum_received") in end:
            break
        print(f"  iperf3 failed ({result.get('error', proc.returncode)}), attempt {attempt + 1}", file=sys.stderr)
        time.sleep(1)
    else:
        raise SystemExit(f"iperf3 failed {IPERF_ATTEMPTS} times: {' '.join(cmd)}")
    if "-u" in args:
        # Sent, not received: a datagram the receiving socket drops has been through the hooks.
        packets, size = end["sum"]["packets"], end["sum"]["bytes"]
        rate = packets / end["sum"]["seconds"] / 1e6
    else:
        packets, size = None, end["sum_received"]["bytes"]
        rate = end["sum_received"]["bits_per_second"] / 1e9
    return {"rate": rate, "bytes": size, "packets": packets, "wall": wall,
            "cpu": (ns1 - ns0 + arm1 - arm0) / 1e9 + usage.ru_utime + usage.ru_stime,
            "arm_cpu": (arm1 - arm0) / 1e9 / wall, "programs": {k: (progs1[k][0] - v[0], progs1[k][1] - v[1])
                                                                 for k, v in progs0.items() if k in progs1}}


def traffic(lab: Lab, server_pid: int, seg: Segmentation, names: list[str], rounds: int, seconds: float,
            pin: bool, tmp: Path) -> tuple[dict, dict]:
    """results[load][direction][arm] = one run per round, arms in a rotating order each round;
    and the segmentation offload in effect per load and arm."""
    setups = arms(lab, tmp)
    watched = [server_pid, *ksoftirqd_pids()]
    results = {load: {d: {name: [] for name in names} for d in DIRECTIONS} for load in LOADS}
    offloads: dict = {}
    for r in range(rounds):
        order = rotated(names, r)
        directions = rotated(DIRECTIONS, r)   # two of them: every other round reversed
        for name in order:
            arm = setups[name]()
            try:
                for load, (on, args) in LOADS.items():
                    seg.set(on)
                    if r == 0:
                        offloads.setdefault(load, {})[name] = seg.state()
                    for d in directions:
                        results[load][d][name].append(iperf(lab, args, seconds, d == "ingress", pin, watched, arm))
            finally:
                arm.stop()
                seg.set(True)
        print(f"  round {r + 1}/{rounds} done at {time.strftime('%H:%M:%S')}", file=sys.stderr)
    return results, offloads


def prog_stats_of(pid: int) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of the BPF programs a process holds open."""
    from imaptap.capture import live

    out = {}
    for holder, prog_id in live._prog_holders():
        if holder != pid:
            continue
        try:
            fd = live.prog_fd_by_id(prog_id)
        except OSError:
            continue
        try:
            name, ns, cnt = live.prog_info(fd)
        finally:
            os.close(fd)
        out[name] = (ns, cnt)
    return out


def cost_of(run: dict, load: str) -> float:
    """CPU the traffic cost: ms per GB received (TCP), or us per datagram sent (UDP)."""
    if run["packets"] is not None:
        return 1e6 * run["cpu"] / run["packets"] if run["packets"] else float("nan")
    return 1e3 * run["cpu"] / (run["bytes"] / 1e9)


def summarize_traffic(results: dict) -> dict:
    """Medians and quartiles of throughput and CPU cost, and per-round ratios to "nothing" (raw)
    and to the do-nothing program on the same hook (isolated)."""
    out: dict = {}
    for load, by_dir in results.items():
        for d, by_arm in by_dir.items():
            rows = out.setdefault(load, {}).setdefault(d, {})
            for name, runs in by_arm.items():
                if not runs:
                    continue
                row = {"rounds": len(runs), "rate": quartiles([x["rate"] for x in runs]),
                       "cost": quartiles([cost_of(x, load) for x in runs])}
                base_names = [("raw", "nothing")] + ([("isolated", ISOLATE[name])] if name in ISOLATE else [])
                for kind, base in base_names:
                    if name == base or not by_arm.get(base):
                        continue
                    pairs = list(zip(runs, by_arm[base], strict=True))   # one run of each per round
                    row[f"{kind} throughput ratio"] = quartiles([a["rate"] / b["rate"] for a, b in pairs])
                    row[f"{kind} cost ratio"] = quartiles([cost_of(a, load) / cost_of(b, load) for a, b in pairs])
                if any(x["arm_cpu"] for x in runs):
                    row["capturing process CPU (cores)"] = quartiles([x["arm_cpu"] for x in runs])
                rows[name] = row
    return out


def summarize_stats(results: dict) -> dict:
    """Per attached program: ns per run, runs per second, and its run time as a share of the CPU
    the traffic cost; imaptap's less the do-nothing program's ns per run on the same hook."""
    hook_null = {"imaptap_xdp": "null_xdp", "imaptap_tc_in": "null_tc_in", "imaptap_tc_eg": "null_tc_eg"}
    out: dict = {}
    for load, by_dir in results.items():
        for d, by_arm in by_dir.items():
            rows = out.setdefault(load, {}).setdefault(d, {})
            null_ns = {}   # (arm, program) -> median ns per run of a do-nothing program
            for name in ("null XDP", "null XDP skb", "null TC"):
                for prog in {p for x in by_arm.get(name, []) for p in x["programs"]}:
                    per_run = [x["programs"][prog][0] / x["programs"][prog][1] for x in by_arm[name]
                               if x["programs"][prog][1]]
                    if per_run:
                        null_ns[name, prog] = statistics.median(per_run)

            def clock(arm: str, prog: str, null_ns: dict = null_ns) -> float | None:
                """The do-nothing program's ns per run on prog's hook: the clock reads."""
                base = ISOLATE.get(arm, "") if prog == "imaptap_xdp" else "null TC"
                return null_ns.get((base, hook_null.get(prog)))

            for name, runs in by_arm.items():
                progs = sorted({p for x in runs for p, (_, cnt) in x["programs"].items() if cnt})
                row = {}
                for prog in progs:
                    per_run = [x["programs"][prog][0] / x["programs"][prog][1] for x in runs if x["programs"][prog][1]]
                    row[prog] = {"ns/run": quartiles(per_run),
                                 "runs/s": statistics.median(x["programs"][prog][1] / x["wall"] for x in runs),
                                 "share of traffic CPU": quartiles([x["programs"][prog][0] / 1e9 / x["cpu"]
                                                                    for x in runs])}
                    c = clock(name, prog)
                    if c is not None:
                        row[prog]["ns/run less null"] = statistics.median(per_run) - c
                        row[prog]["share less null"] = statistics.median(
                            (x["programs"][prog][0] - c * x["programs"][prog][1]) / 1e9 / x["cpu"] for x in runs)
                if progs:
                    row["all programs: share of traffic CPU"] = quartiles(
                        [sum(ns for ns, _ in x["programs"].values()) / 1e9 / x["cpu"] for x in runs])
                    if name in ISOLATE and all(clock(name, prog) is not None for prog in progs):
                        row["all programs less null: share of traffic CPU"] = quartiles(
                            [sum(ns - (clock(name, prog) or 0) * cnt for prog, (ns, cnt) in x["programs"].items()
                                 if cnt) / 1e9 / x["cpu"] for x in runs])
                    rows[name] = row
    return out


def print_traffic(summary: dict) -> None:
    """The traffic section's tables, one per load and direction."""
    for load, by_dir in summary.items():
        udp = load.startswith("UDP")
        unit, rate = ("us CPU/datagram", "Mpps") if udp else ("ms CPU/GB", "Gbit/s")
        for d, rows in by_dir.items():
            print(f"\n  {load}, {d}  (median [IQR]; cost = {unit}; ratios per round, then median)")
            print(f"    {'arm':22s} {rate:>20s} {'raw thr. ratio':>20s} {'isolated thr.':>20s}"
                  f" {'cost':>20s} {'raw cost ratio':>20s} {'isolated cost':>20s}")
            for name, row in rows.items():
                def col(key, spec=".3f", row=row):
                    return format_quartiles(row[key], spec) if key in row else "-"
                print(f"    {name:22s} {col('rate', '.3f' if udp else '.2f'):>20s} {col('raw throughput ratio'):>20s}"
                      f" {col('isolated throughput ratio'):>20s} {col('cost', '.2f' if udp else '.0f'):>20s}"
                      f" {col('raw cost ratio'):>20s} {col('isolated cost ratio'):>20s}")


def print_stats(summary: dict) -> None:
    """ns per run and CPU share of every attached program, per load and direction."""
    for load, by_dir in summary.items():
        for d, rows in by_dir.items():
            print(f"\n  {load}, {d}")
            for name, row in rows.items():
                for prog, f in row.items():
                    if prog.startswith("all programs"):
                        print(f"    {name:22s} {prog.split(':')[0]}: {format_quartiles(f, '.4f')} of the traffic's CPU")
                        continue
                    less = (f"; less null {f['ns/run less null']:.0f} ns/run, share {f['share less null']:.4f}"
                            if "ns/run less null" in f else "")
                    share = format_quartiles(f["share of traffic CPU"], ".4f")
                    print(f"    {name:22s} {prog:14s} {format_quartiles(f['ns/run'], '.0f')} ns/run,"
                          f" {f['runs/s']:9.0f} runs/s, share {share}{less}")


# --- 1b: imaptap's programs against do-nothing ones, swapped in place between runs -------------


class Swapped:
    """imaptap's kernel programs and do-nothing ones, loaded once; ``use()`` puts one set on the
    hook in place of the other (XDP: replaced atomically, so the veth's offloads do not flap;
    TC: filters deleted and added), so that pairs of runs are seconds apart, not a round apart."""

    def __init__(self, iface: str, hook: str) -> None:
        import bcc
        from imaptap.capture import live
        from pyroute2 import IPRoute

        self.pids: list[int] = []
        self.iface, self.hook = iface, hook
        self.index = socket.if_nametoindex(iface)
        self.ipr = IPRoute()
        self.cap = live.LiveCapture([iface], {143}, 256, use_xdp=hook == "XDP")
        self.cap.ringbuf = live.has_ringbuf()
        self.cap._load()   # compiled and loaded as a capture would be; attached here, by us
        self.null = bcc.BPF(text=b"int null_xdp(struct xdp_md *c) { return XDP_PASS; }\n"
                                 b"int null_tc_in(struct __sk_buff *s) { return -1; }\n"
                                 b"int null_tc_eg(struct __sk_buff *s) { return -1; }")
        if hook == "XDP":
            self.sets = {"imaptap": [self.cap._fns[live.PROG_XDP]],
                         "null": [self.null.load_func(b"null_xdp", bcc.BPF.XDP)]}
        else:
            self.sets = {"imaptap": [self.cap._fns[live.PROG_TC_IN], self.cap._fns[live.PROG_TC_EG]],
                         "null": [self.null.load_func(b"null_tc_in", bcc.BPF.SCHED_CLS),
                                  self.null.load_func(b"null_tc_eg", bcc.BPF.SCHED_CLS)]}
        self.current: str | None = None
        self.added_clsact = False

    def use(self, which: str) -> None:
        import bcc
        from imaptap.capture import live

        fns = self.sets[which]
        if self.hook == "XDP":
            bcc.BPF.attach_xdp(self.iface.encode(), fns[0], XDP_FLAGS_DRV_MODE)   # replaces
        else:
            if self.current is None and not any(q.get_attr("TCA_KIND") == "clsact"
                                                 for q in self.ipr.get_qdiscs(index=self.index)):
                self.ipr.tc("add", "clsact", self.index)
                self.added_clsact = True
            self._del_filters()
            for parent, fn in zip((live.TC_PARENT_INGRESS, live.TC_PARENT_EGRESS), fns, strict=True):
                self.ipr.tc("add-filter", "bpf", self.index, NULL_TC_HANDLE, fd=fn.fd, name=fn.name.decode(),
                            parent=parent, prio=live.TC_PRIO, classid=1, direct_action=True)
        self.current = which

    def _del_filters(self) -> None:
        from imaptap.capture import live

        for parent in (live.TC_PARENT_INGRESS, live.TC_PARENT_EGRESS):
            with contextlib.suppress(Exception):   # none there yet
                self.ipr.tc("del-filter", "bpf", self.index, NULL_TC_HANDLE, parent=parent, prio=live.TC_PRIO)

    def programs(self) -> dict[str, tuple[int, int]]:
        return {}

    def stop(self) -> None:
        import bcc
        from imaptap.capture.live import _close_bpf

        try:
            if self.hook == "XDP":
                if self.current is not None:
                    bcc.BPF.remove_xdp(self.iface.encode(), XDP_FLAGS_DRV_MODE)
            else:
                self._del_filters()
                if self.added_clsact:
                    self.ipr.tc("del", "clsact", self.index)
        finally:
            self.ipr.close()
            _close_bpf(self.cap._bpf)
            self.null.cleanup()


def swapped(lab: Lab, server_pid: int, seg: Segmentation, pairs: int, seconds: float, pin: bool) -> dict:
    """results[hook][load][direction] = [(imaptap run, null run)], the two a few seconds apart,
    in alternating order."""
    watched = [server_pid, *ksoftirqd_pids()]
    results: dict = {}
    for hook in ("XDP", "TC"):
        tap = Swapped(lab.host_if, hook)
        try:
            for load, (on, args) in LOADS.items():
                tap.use("null")
                seg.set(on)
                for d in DIRECTIONS:
                    out = results.setdefault(hook, {}).setdefault(load, {}).setdefault(d, [])
                    for i in range(pairs):
                        runs = {}
                        for which in (("imaptap", "null") if i % 2 == 0 else ("null", "imaptap")):
                            tap.use(which)
                            runs[which] = iperf(lab, args, seconds, d == "ingress", pin, watched, tap)
                        out.append((runs["imaptap"], runs["null"]))
                print(f"  {hook}, {load} done at {time.strftime('%H:%M:%S')}", file=sys.stderr)
        finally:
            tap.stop()
            seg.set(True)
    return results


def summarize_swapped(results: dict) -> dict:
    """Per hook, load and direction: the imaptap/null ratios of the pairs, median and quartiles."""
    out: dict = {}
    for hook, by_load in results.items():
        for load, by_dir in by_load.items():
            for d, pairs in by_dir.items():
                out.setdefault(hook, {}).setdefault(load, {})[d] = {
                    "pairs": len(pairs),
                    "throughput ratio": quartiles([a["rate"] / b["rate"] for a, b in pairs]),
                    "cost ratio": quartiles([cost_of(a, load) / cost_of(b, load) for a, b in pairs]),
                    "null rate": statistics.median(b["rate"] for _, b in pairs)}
    return out


def print_swapped(summary: dict) -> None:
    """The swap section's table."""
    print(f"    {'hook':5s} {'load':18s} {'direction':9s} {'pairs':>5s} {'imaptap/null throughput':>24s}"
          f" {'imaptap/null CPU cost':>24s}")
    for hook, by_load in summary.items():
        for load, by_dir in by_load.items():
            for d, row in by_dir.items():
                print(f"    {hook:5s} {load:18s} {d:9s} {row['pairs']:5d}"
                      f" {format_quartiles(row['throughput ratio']):>24s} {format_quartiles(row['cost ratio']):>24s}")


# --- 2: the program's own cost, BPF_PROG_TEST_RUN ------------------------------------------------


def test_run(fd: int, data: bytes, repeat: int) -> int:
    """Average ns per run over ``repeat`` runs, timed by the kernel."""
    from imaptap.capture import live

    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    attr = (ctypes.c_uint8 * 80)()
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(data), len(out), ctypes.addressof(buf),
                     ctypes.addressof(out), repeat, 0)
    live._bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("<I", attr, 36)[0]


def packets() -> dict[str, tuple[bytes, int]]:
    """Frames for the test runs, and how many runs (data frames fill the ring buffer)."""
    import socket

    def frame(ethertype: int, ip: bytes) -> bytes:
        return bytes.fromhex("02000000aa0102000000aa02") + struct.pack("!H", ethertype) + ip

    def tcp(dport: int, payload: bytes, flags: int = 0x18) -> bytes:
        return struct.pack("!HHIIBBHHH", 40000, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload

    def v4(body: bytes) -> bytes:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, 6, 0,
                           socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")) + body

    def v6(body: bytes) -> bytes:
        return struct.pack("!IHBB16s16s", 0x60000000, len(body), 6, 64, socket.inet_pton(socket.AF_INET6, "fd00::1"),
                           socket.inet_pton(socket.AF_INET6, "fd00::2")) + body

    data = b"* 1 FETCH (BODY[] {1200}\r\n" + b"x" * 1300
    return {
        "non-IMAP TCP, IPv4": (frame(0x0800, v4(tcp(5201, b"x" * 1400))), 1_000_000),
        "non-IMAP TCP, IPv6": (frame(0x86DD, v6(tcp(5201, b"x" * 1400))), 1_000_000),
        "IMAP pure ACK": (frame(0x0800, v4(tcp(143, b"", 0x10))), 1_000_000),
        COST_PREFIX: (frame(0x0800, v4(tcp(143, data))), 5_000),
        COST_HANDSHAKE: (frame(0x0800, v4(tcp(143, data))), 5_000),
    }


COST_PREFIX = "IMAP 1326-byte segment, PREFIX (head + tail copied)"
COST_HANDSHAKE = "IMAP 1326-byte segment, HANDSHAKE (copied whole)"
#: The flow of the crafted IMAP segments: PREFIX is set for it in the map, HANDSHAKE is no entry.
COST_FLOW = ("10.0.0.1", 40000, "10.0.0.2", 143)


def program_cost(rounds: int) -> dict:
    """Per hook and packet: (median ns of imaptap's program, median ns of a do-nothing one)."""
    import bcc
    from imaptap.capture import live

    # Compiled and loaded as a capture would be, never attached: test runs only.
    cap = live.LiveCapture(["lo"], {143}, 256)
    cap.ringbuf, cap.use_xdp = live.has_ringbuf(), live.has_xdp_load_bytes()
    cap._load()
    cap._open_output()
    null = bcc.BPF(text=b"int nx(struct xdp_md *c) { return XDP_PASS; }\n"
                        b"int nt(struct __sk_buff *s) { return -1; }")
    progs = {"XDP": (cap._fns[live.PROG_XDP].fd, null.load_func(b"nx", bcc.BPF.XDP).fd),
             "TC": (cap._fns[live.PROG_TC_EG].fd, null.load_func(b"nt", bcc.BPF.SCHED_CLS).fd)}
    out = {}
    for hook, (fd, null_fd) in progs.items():
        for name, (pkt, repeat) in packets().items():
            from imaptap.segment import PayloadMode

            if name == COST_PREFIX:
                cap.policy.set(COST_FLOW, PayloadMode.PREFIX)
            else:
                cap.policy.forget(COST_FLOW)   # the default mode: HANDSHAKE
            own, base = [], []
            for _ in range(rounds):
                base.append(test_run(null_fd, pkt, repeat))
                own.append(test_run(fd, pkt, repeat))
                cap.poll(0)   # drain the ring buffer between rounds
            out[f"{hook}: {name}"] = (statistics.median(own), statistics.median(base))
    from imaptap.capture.live import _close_bpf

    _close_bpf(cap._bpf)
    null.cleanup()
    return out


# --- 4: IMAP load --------------------------------------------------------------------------------

LOAD_CLIENT = r'''
import imaplib, sys, time
host, user, pw, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
m = imaplib.IMAP4(host, 143, timeout=60)
m.login(user, pw)
m.select("INBOX")
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    m.fetch("1", "(BODY.PEEK[])")
    m.noop()
    n += 1
m.logout()
print(n)
'''

MAIL = filler_mail("load")


def start_clients(lab: Lab, sessions: int, seconds: float, nice: int) -> list[subprocess.Popen]:
    """``sessions`` load clients, IPv4 and IPv6 mixed, each looping FETCH and NOOP for ``seconds``."""
    users = sorted(lab.users)
    return [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", LOAD_CLIENT,
                              lab.server4 if i % 4 else lab.server6, users[i % len(users)],
                              lab.users[users[i % len(users)]], str(seconds)],
                             stdout=subprocess.PIPE, text=True) for i in range(sessions)]


def load_figures(sessions: int, nice: int, wall: float, loops: int, cpu: float, stats: dict) -> dict:
    """The IMAP load section's figures of one run, from its wall and CPU time and imaptap's counters."""
    received = stats.get("received", 0)
    return {"sessions": sessions, "client nice": nice, "seconds": round(wall, 2), "fetch+noop loops": loops,
            "segments": received, "segments/s": round(received / wall), "lost": stats.get("lost"),
            "CPU (fraction of one core)": round(cpu / wall, 3),
            "% of a core per 1000 segments/s": round(1e5 * cpu / received, 2) if received else None,
            "CPU us per segment": round(1e6 * cpu / received, 1) if received else None,
            "kernel counters": {k: stats.get(k) for k in ("seen", "matched", "submitted", "lost", "unparsed")}}


def imap_load(lab: Lab, sessions: int, seconds: float, tmp: Path, nice: int) -> dict:
    """The whole CLI (capture, analyzer, JSON Lines), then the capture alone in this process.

    Clients run at ``nice``: on a small machine, dozens of busy load generators would otherwise
    starve imaptap of CPU and measure the scheduler, not imaptap."""
    from imaptap.capture.live import LiveCapture

    for user in lab.users:
        lab.deliver(user, MAIL)
    out = {}
    tap = Imaptap(lab.host_if, [], tmp / "load.jsonl")
    cpu0 = cpu_seconds(tap.proc.pid)
    t0 = time.monotonic()
    clients = start_clients(lab, sessions, seconds, nice)
    loops = sum(int(c.communicate()[0] or 0) for c in clients)
    wall = time.monotonic() - t0
    time.sleep(1)   # let imaptap drain
    cpu = cpu_seconds(tap.proc.pid) - cpu0
    out["imaptap -i (capture + analyzer + JSON Lines)"] = load_figures(sessions, nice, wall, loops, cpu, tap.stop())

    with LiveCapture([lab.host_if], {143}, 256) as cap:
        cpu0 = time.process_time()
        t0 = time.monotonic()
        clients = start_clients(lab, sessions, seconds, nice)
        check = 0.0
        while True:
            cap.poll(100)
            if time.monotonic() >= check:   # not every poll: 40 waitpid calls cost too
                if all(c.poll() is not None for c in clients):
                    break
                check = time.monotonic() + 0.5
        loops = sum(int(c.communicate()[0] or 0) for c in clients)
        cap.poll(200)
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
    out["capture alone (LiveCapture.poll, records decoded)"] = load_figures(sessions, nice, wall, loops, cpu,
                                                                            cap.counters())
    return out


# --- 5: the handshake's copy rule ----------------------------------------------------------------

HANDSHAKE_CLIENT = r'''
import imaplib, sys
host, user, pw, sessions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
for _ in range(sessions):
    m = imaplib.IMAP4(host, 143, timeout=60)
    m.login(user, pw)
    m._simple_command("ID", '("name" "bench-live")')
    m.select("INBOX")
    m.fetch("1", "(BODY.PEEK[])")
    m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER])")
    m.logout()
print("done")
'''
HANDSHAKE_MAIL = filler_mail("handshake")
HANDSHAKE_MAILS = 5
HANDSHAKE_DRAIN_S = 2.0
"""Seconds the capture is read on after the client exits, for the last FINs."""
#: Handshake snap lengths compared: the snap length's cut from the start, and the default (None).
HANDSHAKE_ARMS = (0, None)


def handshake_round(lab: Lab, handshake: int, sessions: int) -> dict:
    """``sessions`` sessions captured live with the analyzer in the loop; totals per session."""
    from imaptap.capture.live import LiveCapture
    from imaptap.flows import FlowTable

    ended = []
    with LiveCapture([lab.host_if], {143}, 256, handshake_snaplen=handshake) as cap:
        table = FlowTable({143}, cap.policy, on_flow_end=ended.append)
        copied = wire = records = 0
        client = subprocess.Popen([sys.executable, "-c", HANDSHAKE_CLIENT, lab.server4, "alice", lab.users["alice"],
                                   str(sessions)], stdout=subprocess.PIPE, text=True)
        drained = None
        while True:
            done = client.poll() is not None
            for seg in cap.poll(20):
                records += 1
                copied += len(seg.payload) + len(seg.tail)
                wire += seg.wire_len
                table.add(seg)
            if done:
                drained = drained or time.monotonic() + HANDSHAKE_DRAIN_S
                if len(ended) >= sessions or time.monotonic() > drained:
                    break
        if client.wait() != 0 or "done" not in (client.stdout.read() if client.stdout else ""):
            raise RuntimeError("the handshake benchmark's client failed")
        lost = cap.counters()["lost"]
    resyncs = sum(f.session.client.resyncs + f.session.server.resyncs for f in ended)
    return {"bytes copied per session": copied / sessions, "wire bytes per session": wire / sessions,
            "records per session": records / sessions, "resyncs per session": resyncs / sessions, "lost": lost}


def replayed_round(pcap: Path, handshake: int, sessions: int) -> dict:
    """The same totals per session for a capture of the sessions replayed: the rule without the
    live capture's lag (the analyzer's switch applies from the very next segment)."""
    from imaptap.capture.replay import ReplayStats, open_capture
    from imaptap.flows import FlowTable
    from imaptap.segment import PayloadPolicy

    policy = PayloadPolicy(256, handshake_snaplen=handshake)
    ended: list = []
    table = FlowTable({143}, policy, on_flow_end=ended.append)
    copied = wire = records = 0
    with open_capture(pcap) as reader:
        for seg in reader.segments({143}, policy, ReplayStats()):
            if seg is None:
                continue
            if seg.wire_len or seg.flags & 0x07:
                records += 1
            copied += len(seg.payload) + len(seg.tail)
            wire += seg.wire_len
            table.add(seg)
    table.close_all()
    resyncs = sum(f.session.client.resyncs + f.session.server.resyncs for f in ended)
    return {"bytes copied per session": copied / sessions, "wire bytes per session": wire / sessions,
            "records per session": records / sessions, "resyncs per session": resyncs / sessions}


def handshake_cost(rounds: int, sessions: int) -> dict:
    """Per server: each arm's medians over interleaved rounds, and the copied bytes' ratio."""
    from imaptap_lab import cyrus
    from imaptap_lab.lab import Server

    out: dict = {}
    servers = [Server.DOVECOT]
    try:
        cyrus.debs()
        servers.append(Server.CYRUS)
    except cyrus.CyrusError as err:
        out["cyrus"] = f"not measured: {err}"
    from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN

    for server in servers:
        with Lab(server=server) as lab:
            for _ in range(HANDSHAKE_MAILS):
                lab.deliver("alice", HANDSHAKE_MAIL)
            runs: dict = {arm: [] for arm in HANDSHAKE_ARMS}
            for r in range(rounds):
                for arm in rotated(list(HANDSHAKE_ARMS), r):
                    runs[arm].append(handshake_round(lab, DEFAULT_HANDSHAKE_SNAPLEN if arm is None else arm, sessions))
            summary = {}
            for arm, results in runs.items():
                label = f"--handshake-snaplen {DEFAULT_HANDSHAKE_SNAPLEN if arm is None else arm}"
                summary[label] = {k: statistics.median(r[k] for r in results) for k in results[0]}
            off, on = (summary[f"--handshake-snaplen {a}"] for a in (0, DEFAULT_HANDSHAKE_SNAPLEN))
            summary["copied with the rule / without it"] = round(
                on["bytes copied per session"] / off["bytes copied per session"], 3)
            summary["bytes added per session"] = round(on["bytes copied per session"] - off["bytes copied per session"])
            with tempfile.TemporaryDirectory(prefix="bench-handshake-") as tmp:
                pcap = Path(tmp) / "sessions.pcap"
                with lab.capture(pcap, port_filter="tcp port 143"):
                    client = subprocess.run([sys.executable, "-c", HANDSHAKE_CLIENT, lab.server4, "alice",
                                             lab.users["alice"], str(sessions)], capture_output=True, text=True)
                if client.returncode != 0:
                    raise RuntimeError("the handshake benchmark's client failed: " + client.stderr)
                replayed = {f"replayed, --handshake-snaplen {arm}": replayed_round(pcap, arm, sessions)
                            for arm in (0, DEFAULT_HANDSHAKE_SNAPLEN)}
            summary.update(replayed)
            off, on = replayed.values()
            summary["replayed: bytes added per session"] = round(
                on["bytes copied per session"] - off["bytes copied per session"])
            out[str(server)] = summary
    return out


# --- main --------------------------------------------------------------------------------------


def machine() -> str:
    """Host name, CPUs, CPU model and kernel, for the report."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({model}), kernel {platform.release()}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-live."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds of the traffic arms, and of the test runs (default 15)")
    p.add_argument("--stats-rounds", type=int, default=5,
                   help="rounds with kernel.bpf_stats_enabled=1, for ns per run (default 5)")
    p.add_argument("--iperf-seconds", type=float, default=2, help="seconds per iperf3 run (default 2)")
    p.add_argument("--pairs", type=int, default=20,
                   help="pairs of runs per load and direction in the swap section (default 20)")
    p.add_argument("--pin", action="store_true",
                   help="pin the iperf3 client to CPU 0 and the server to CPU 1 (default: not pinned)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"traffic arms, comma-separated, of {','.join(ARM_NAMES)} (default {','.join(DEFAULT_ARMS)})")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"sections to run, comma-separated (default {','.join(SECTIONS)})")
    p.add_argument("--seconds", type=float, default=5, help="seconds of IMAP load (default 5)")
    p.add_argument("--sessions", type=int, default=40, help="concurrent IMAP sessions for the load (default 40)")
    p.add_argument("--client-nice", type=int, default=10, help="niceness of the IMAP load clients (default 10)")
    p.add_argument("--handshake-sessions", type=int, default=10,
                   help="sessions per round of the handshake section (default 10)")
    from imaptap_lab import live_ceiling

    p.add_argument("--ceiling-rates", type=_rates, default=list(live_ceiling.DEFAULT_RATES), metavar="N,N,...",
                   help="IMAP segments a second tcpreplay offers in the ceiling section, comma-separated"
                        f" (default {','.join(str(r) for r in live_ceiling.DEFAULT_RATES)})")
    p.add_argument("--ceiling-seconds", type=float, default=live_ceiling.DEFAULT_SECONDS,
                   help=f"seconds tcpreplay sends at each rate (default {live_ceiling.DEFAULT_SECONDS:g})")
    p.add_argument("--ceiling-rounds", type=int, default=live_ceiling.DEFAULT_ROUNDS,
                   help=f"rounds of every rate in the ceiling section (default {live_ceiling.DEFAULT_ROUNDS})")
    p.add_argument("--ceiling-side", choices=[str(s) for s in live_ceiling.Side], default=str(live_ceiling.Side.NS),
                   help="attach to the namespace end of the veth (ns: XDP ingress, the default) or the host end"
                        " (host: TC egress), where tcpreplay sends")
    p.add_argument("--ceiling-workers", type=_rates, default=list(live_ceiling.DEFAULT_WORKERS), metavar="N,N,...",
                   help="worker counts of the ceiling's imaptap -i arm (--workers), comma-separated, rising"
                        " (default 1)")
    p.add_argument("--ceiling-worker-cpu", type=_core_fraction, metavar="FRACTION",
                   help="cap each worker of the ceiling's imaptap -i arm (--workers 1: the one process) to"
                        " FRACTION of a core with a cgroup of its own, standing in for cores the machine lacks"
                        " (e.g. 0.1; the parent and tcpreplay stay uncapped; skips the overload check)")
    p.add_argument("--ceiling-pcap", type=Path, metavar="FILE",
                   help="capture tcpreplay sends (default: scripts/bench-replay's wire-frames capture,"
                        " made if missing)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    return p


def _rates(text: str) -> list[int]:
    """--ceiling-rates: positive integers, comma-separated, in rising order."""
    try:
        rates = sorted(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive: {text!r}")
    return rates


def _core_fraction(text: str) -> float:
    """--ceiling-worker-cpu: a share of one core the kernel can set as a CFS quota."""
    from imaptap_lab import cpucap

    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if fraction > 1:
        raise argparse.ArgumentTypeError(f"{fraction:g}: a worker is one thread of analysis; cap it to at most 1 core")
    try:
        cpucap.quota_us(fraction)
    except cpucap.CapError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return fraction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``sections`` and ``arm_names`` split from --only and --arms and checked;
    "nothing" is always an arm, since every ratio is taken against it."""
    p = build_parser()
    args = p.parse_args(argv)
    args.sections = args.only.split(",")
    args.arm_names = args.arms.split(",")
    bad = [s for s in args.sections if s not in SECTIONS] + [a for a in args.arm_names if a not in ARM_NAMES]
    if bad:
        p.error(f"unknown section or arm: {', '.join(bad)}")
    if "nothing" not in args.arm_names:
        args.arm_names.insert(0, "nothing")
    return args


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-live: the sections asked for, printed and optionally written as JSON."""
    args = parse_args(argv)
    sections, names = args.sections, args.arm_names
    if os.geteuid() != 0:
        print("bench-live: needs root (network namespaces, BPF)", file=sys.stderr)
        return 2

    report: dict = {"machine": machine(), "command": sys.argv}
    print(f"machine: {report['machine']}")
    old_stats = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("0")
    try:
        if "cost" in sections:
            print("\n## kernel program cost per packet (BPF_PROG_TEST_RUN, median of rounds; own = run - null)")
            cost = program_cost(args.rounds)
            report["program_cost_ns"] = {k: {"run": v[0], "null": v[1], "own": v[0] - v[1]} for k, v in cost.items()}
            for name, (own, base) in cost.items():
                print(f"  {name:55s} {own:5.0f} ns  (null program {base:3.0f} ns, own ~{own - base:.0f} ns)")
        if "handshake" in sections:
            print(f"\n## the handshake's copy rule: imaplib sessions (LOGIN, ID, SELECT, FETCH),"
                  f" {args.handshake_sessions} per round, {args.rounds} interleaved rounds, medians per session")
            report["handshake"] = handshake_cost(args.rounds, args.handshake_sessions)
            for server, summary in report["handshake"].items():
                print(f"  {server}:")
                for what, figures in (summary.items() if isinstance(summary, dict) else [("", summary)]):
                    print(f"    {what}: {figures}")
        if not {"throughput", "stats", "swap", "load", "ceiling"} & set(sections):
            return 0
        with tempfile.TemporaryDirectory(prefix="bench-live-") as tmpdir, Lab() as lab:
            tmp = Path(tmpdir)
            seg = Segmentation(lab)
            report["segmentation offload before"] = dict(zip((lab.host_if, lab.ns_if), seg.saved, strict=True))
            server_cmd = ["iperf3", "-s", "-p", str(IPERF_PORT)]
            server = lab.popen_in_ns((["taskset", "-c", "1"] if args.pin else []) + server_cmd,
                                     stdout=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                common = (args.iperf_seconds, args.pin, tmp)
                if "throughput" in sections:
                    print(f"\n## non-IMAP traffic, iperf3 {args.iperf_seconds:g} s x {args.rounds} interleaved rounds"
                          f" (bpf_stats off)")
                    tp, offloads = traffic(lab, server.pid, seg, names, args.rounds, *common)
                    report["segmentation offload in effect"] = offloads
                    for load, by_arm in offloads.items():
                        print(f"  {load}: " + "; ".join(f"{arm}: {state}" for arm, state in by_arm.items()))
                    report["traffic"] = summarize_traffic(tp)
                    print_traffic(report["traffic"])
                    report["traffic raw runs"] = tp
                if "stats" in sections:
                    bpf_arms = [n for n in names if n in BPF_ARMS]
                    print(f"\n## kernel.bpf_stats_enabled=1: run_time_ns / run_cnt, {args.stats_rounds} rounds")
                    STATS_SYSCTL.write_text("1")
                    try:
                        st, _ = traffic(lab, server.pid, seg, bpf_arms, args.stats_rounds, *common)
                    finally:
                        STATS_SYSCTL.write_text("0")
                    report["bpf_stats"] = summarize_stats(st)
                    print_stats(report["bpf_stats"])
                    report["bpf_stats raw runs"] = st
                if "swap" in sections:
                    print(f"\n## imaptap's programs against do-nothing ones on the same hooks, swapped in place;"
                          f" {args.pairs} pairs of {args.iperf_seconds:g} s runs, ratio per pair, median [IQR]")
                    sw = swapped(lab, server.pid, seg, args.pairs, args.iperf_seconds, args.pin)
                    report["swap"] = summarize_swapped(sw)
                    print_swapped(report["swap"])
                    report["swap raw runs"] = sw
            finally:
                server.kill()
                server.wait()
                seg.restore()
            if "load" in sections:
                print(f"\n## IMAP load: {args.sessions} concurrent imaplib sessions for {args.seconds:g} s")
                report["imap_load"] = imap_load(lab, args.sessions, args.seconds, tmp, args.client_nice)
                for what, figures in report["imap_load"].items():
                    print(f"  {what}:")
                    for k, v in figures.items():
                        print(f"    {k}: {v}")
            if "ceiling" in sections:
                from imaptap_lab import live_ceiling

                print(f"\n## the live ceiling: tcpreplay at {len(args.ceiling_rates)} rising rates,"
                      f" {args.ceiling_rounds} rotated rounds, load average {os.getloadavg()[0]:.2f} at the start")
                try:
                    report["ceiling"] = live_ceiling.ceiling(
                        lab, tmp, args.ceiling_rates, args.ceiling_seconds, args.ceiling_rounds,
                        live_ceiling.Side(args.ceiling_side), args.ceiling_pcap, tuple(args.ceiling_workers),
                        args.ceiling_worker_cpu)
                except live_ceiling.CeilingError as err:
                    return live_ceiling.main_error(err)
                live_ceiling.print_report(report["ceiling"])
    finally:
        STATS_SYSCTL.write_text(old_stats)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
