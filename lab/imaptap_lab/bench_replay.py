"""Benchmark: imaptap -r against tshark on one large capture of real Dovecot sessions.

Makes (once, cached in out/) a capture of thousands of real IMAP sessions between Python's
imaplib and the lab's Dovecot (imaptap_lab.lab): mostly clients syncing a mailbox of
realistic mails (1.5 KB to 150 KB, text and attachments), plus AUTHENTICATE, LIST/STATUS,
APPEND, STARTTLS and IPv6 sessions.  Then it times, interleaved, round after round:

  imaptap -r FILE --json /dev/null                  (every IMAP line and every flow as JSON)
  imaptap -r FILE --json /dev/null --flows-only     (flow records only)
  tshark -r FILE -Y imap -T fields -e imap.request_tag -e imap.request.command \
         -e imap.request.username -e imap.response.status
  ndpiReader -i FILE -q                             (nDPI: classify every flow, print nothing)
  tcpdump -r FILE -w /dev/null tcp port 143         (the floor: read the file, filter, write nothing)

With --ecs, also the same two imaptap commands with --json-format ecs (docs/ECS.md).
Wall-clock and CPU time of whole commands, start-up included, in an order rotated each round.
Prints medians and their ratios, every command's time against each of the three baselines
(tshark, ndpiReader, the tcpdump floor), and the spread of the ratios taken within each round.
``--metrics`` adds both imaptap commands again with ``--metrics 0`` (Prometheus metrics served
on a free loopback port), and prints what the metrics cost against the same command without;
``--report`` likewise adds both with ``--report`` (the audit report built and written at the end).
Run as root (the lab needs network namespaces):  scripts/bench-replay [--sessions N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import imaplib
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import time

from imaptap_lab.checkout import OUT_DIR, USERSPACE, VENV_PYTHON
from imaptap_lab.lab import Lab
from imaptap_lab.mail import MAILBOX_SIZES, filler_mail, realistic_mail
from imaptap_lab.rounds import medians, per_round_ratios, rotated

#: This checkout's imaptap (USERSPACE is put first on PYTHONPATH), with the .venv's Python.
IMAPTAP = [str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable, "-m", "imaptap"]
TSHARK = ["tshark", "-r", "{file}", "-Y", "imap", "-T", "fields", "-e", "imap.request_tag",
          "-e", "imap.request.command", "-e", "imap.request.username", "-e", "imap.response.status"]
#: nDPI's reader doing the least that still classifies every flow of the file: its IMAP
#: dissector runs on each flow's first packets until it decides (and takes the LOGIN user and
#: password on the way); -q prints nothing, not even the summary.  Without -q it prints the
#: summary (a few milliseconds more); -v 2 lists every flow.
NDPI_READER = ["ndpiReader", "-i", "{file}", "-q"]
#: The floor: reading the file with libpcap, the port filter on every packet, nothing written.
TCPDUMP_FLOOR = ["tcpdump", "-r", "{file}", "-w", "/dev/null", "tcp port 143"]
#: The arms every other command is compared with, and the tools they need.
TSHARK_ARM, NDPI_ARM, FLOOR_ARM = "tshark -Y imap -T fields", "ndpiReader -q", "tcpdump -w /dev/null (floor)"
BASELINES = {TSHARK_ARM: TSHARK, NDPI_ARM: NDPI_READER, FLOOR_ARM: TCPDUMP_FLOOR}
#: Debian package of each tool, for the message when one is missing (scripts/setup installs them).
TOOL_PACKAGES = {"tshark": "tshark", "ndpiReader": "libndpi-bin", "tcpdump": "tcpdump", "capinfos": "wireshark-common"}
#: Exit status when a tool is missing, as for bad arguments.
EXIT_SETUP = 2
#: Parallel client sessions while making the capture.
CLIENT_THREADS = 4
#: The mail APPENDed by one session in ten.
MAIL = filler_mail("bench")
#: Bound on any client operation while making the capture.
CLIENT_TIMEOUT = 30


def one_session(lab: Lab, i: int) -> None:
    """One real session; the kind varies with i so the capture has the usual mix."""
    users = sorted(lab.users)
    user = users[i % len(users)]
    pw = lab.users[user]
    server = lab.server6 if i % 10 == 9 else lab.server4
    imap = imaplib.IMAP4(server, 143, timeout=CLIENT_TIMEOUT)
    kind = i % 10
    try:
        if kind == 8:  # STARTTLS, then the login is encrypted
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            imap.starttls(ctx)
            imap.login(user, pw)
            imap.select("INBOX")
        elif kind in (5, 6):  # AUTHENTICATE PLAIN, LIST, STATUS
            imap.authenticate("PLAIN", lambda _: f"\0{user}\0{pw}".encode())
            imap.list()
            imap.status("INBOX", "(MESSAGES UNSEEN)")
        elif kind == 7:  # APPEND a mail
            imap.login(user, pw)
            imap.append("INBOX", None, None, MAIL)
        else:  # a client syncing: LOGIN, SELECT, list flags and sizes, download two mails
            imap.login(user, pw)
            _, data = imap.select("INBOX")
            count = int(data[0])
            if count:
                imap.fetch("1:*", "(UID FLAGS RFC822.SIZE)")
                imap.fetch(str(1 + i % count), "(BODY.PEEK[])")
                imap.fetch(str(1 + (i * 7 + 3) % count), "(BODY.PEEK[])")
        imap.logout()
    finally:
        try:
            imap.shutdown()
        except OSError:
            pass


def make_capture(path: str, sessions: int, offloads: bool) -> None:
    """Record ``sessions`` real sessions, CLIENT_THREADS at a time, against a fresh lab."""
    with Lab(offloads=offloads) as lab:
        for user in lab.users:
            for n, size in enumerate(MAILBOX_SIZES):
                lab.deliver(user, realistic_mail(n, size))
        with lab.capture(path):
            with concurrent.futures.ThreadPoolExecutor(CLIENT_THREADS) as pool:
                for fut in concurrent.futures.as_completed([pool.submit(one_session, lab, i) for i in range(sessions)]):
                    fut.result()


#: The environment of the timed commands.  Without PYTHONDONTWRITEBYTECODE: an installed
#: imaptap has its bytecode (pip compiles it at install, an editable install writes it on the
#: first run), but with that variable set, as on the lab VM, every timed run compiled all of
#: imaptap again, 112M instructions (2% of a replay) no user pays.  The warm-up run writes it.
RUN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
RUN_ENV["PYTHONPATH"] = os.pathsep.join([str(USERSPACE), *filter(None, [os.environ.get("PYTHONPATH")])])


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds: user + system) of one run of a command.

    CPU time is the steadier figure on a shared VM: time the host gives to other guests
    (steal) stretches the wall clock but is not charged to the process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=RUN_ENV)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-replay."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=21, help="rounds (21 for the README's figures)")
    ap.add_argument("--file", default=None, help="capture to use/make (default out/bench-replay-N.pcap)")
    ap.add_argument("--regen", action="store_true", help="make the capture again")
    ap.add_argument("--wire-frames", action="store_true",
                    help="record MTU-sized frames as on the wire (segmentation offload off on the lab's veth) "
                         "instead of the host's offloaded super-packets")
    ap.add_argument("--metrics", action="store_true",
                    help="also time both imaptap commands with --metrics, against themselves without")
    ap.add_argument("--ecs", action="store_true", help="also time --json-format ecs, against the default format")
    ap.add_argument("--report", action="store_true",
                    help="also time both imaptap commands with --report, against themselves without")
    return ap


def missing_tools() -> list[str]:
    """The external tools this benchmark runs that are not on PATH, with their Debian package."""
    return [f"{tool} (Debian package {package})" for tool, package in TOOL_PACKAGES.items()
            if shutil.which(tool) is None]


def ratios_against(samples: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float, float, float]]:
    """Per command but ``baseline``: (ratio of the medians, and the median, lowest and highest of
    the per-round ratios) of its time to the baseline's; above 1, the command takes longer."""
    base = samples[baseline]
    out = {}
    for name, values in samples.items():
        if name == baseline:
            continue
        per_round = per_round_ratios(values, base)
        out[name] = (statistics.median(values) / statistics.median(base), statistics.median(per_round),
                     per_round[0], per_round[-1])
    return out


#: Width of a column of the ratio matrix.
RATIO_COLUMN = 24


def print_ratio_matrix(what: str, samples: dict[str, list[float]], rounds: int) -> None:
    """Every command's ``what`` time against each baseline: the per-round ratios' median [lowest-highest]."""
    print(f"{what} time / each baseline's (above 1: takes longer), median of the per-round ratios "
          f"[lowest-highest] of {rounds} rounds:")
    columns = {b: ratios_against(samples, b) for b in BASELINES}
    print(f"  {'command':32}" + "".join(f"{'/ ' + b.split()[0]:>{RATIO_COLUMN}}" for b in BASELINES))
    for name in samples:
        cells = []
        for b in BASELINES:
            if name == b:
                cells.append(f"{'1':>{RATIO_COLUMN}}")
                continue
            _, med, low, high = columns[b][name]
            cells.append(f"{f'{med:.3g} [{low:.3g}-{high:.3g}]':>{RATIO_COLUMN}}")
        print(f"  {name:32}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-replay: make the capture once, then time the commands round after round."""
    args = build_parser().parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"bench-replay: missing {', '.join(missing)}; run scripts/setup", file=sys.stderr)
        return EXIT_SETUP
    kind = "wire" if args.wire_frames else "host"
    path = args.file or os.path.join(OUT_DIR, f"bench-replay-{args.sessions}-{kind}.pcap")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.regen or not os.path.exists(path):
        t = time.perf_counter()
        make_capture(path, args.sessions, offloads=not args.wire_frames)
        print(f"made {path} with {args.sessions} real Dovecot sessions in {time.perf_counter() - t:.1f} s")
    packets = int(subprocess.run(["capinfos", "-c", "-M", path], capture_output=True, text=True).stdout.split()[-1])
    size = os.path.getsize(path)
    commands = {
        "imaptap --json": [*IMAPTAP, "-r", path, "--json", "/dev/null"],
        "imaptap --json --flows-only": [*IMAPTAP, "-r", path, "--json", "/dev/null", "--flows-only"],
        **{name: [a.format(file=path) for a in cmd] for name, cmd in BASELINES.items()},
    }
    #: with --metrics or --report: arm -> the arm it is compared with
    with_metrics = {}
    for option, extra in (("--metrics", ["--metrics", "0"]), ("--report", ["--report"])):
        if not getattr(args, option[2:]):
            continue
        for k in ("imaptap --json", "imaptap --json --flows-only"):
            commands[f"{k} {option}"] = [*commands[k], *extra]
            with_metrics[f"{k} {option}"] = k
    if args.ecs:
        commands["imaptap --json ECS"] = [*commands["imaptap --json"], "--json-format", "ecs"]
        commands["imaptap --json --flows-only ECS"] = [*commands["imaptap --json --flows-only"], "--json-format", "ecs"]
    walls: dict[str, list[float]] = {k: [] for k in commands}
    cpus: dict[str, list[float]] = {k: [] for k in commands}
    for cmd in commands.values():  # warm the page cache and check each command runs
        timed(cmd)
    names = list(commands)
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        # Rotated, so that no command always runs right after the same one.
        for k in rotated(names, r):
            wall, cpu = timed(commands[k])
            walls[k].append(wall)
            cpus[k].append(cpu)
    wall_med = medians(walls)
    cpu_med = medians(cpus)
    base = TSHARK_ARM
    print(f"capture: {packets} packets, {size / 1e6:.1f} MB, {args.sessions} sessions, "
          f"{'frames as on the wire' if args.wire_frames else 'host capture with segmentation offload'}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}; "
          f"load average {load_before:.2f} before the rounds, {os.getloadavg()[0]:.2f} after")
    print(f"{'command':32} {'wall s':>7} {'vs tshark':>9} {'cpu s':>7} {'vs tshark':>9} {'packets/s':>10}")
    for k in commands:
        print(f"{k:32} {wall_med[k]:7.3f} {wall_med[base] / wall_med[k]:8.2f}x {cpu_med[k]:7.3f} "
              f"{cpu_med[base] / cpu_med[k]:8.2f}x {packets / wall_med[k]:10.0f}")
    # The same ratio taken within each round, where both commands met the same machine: the
    # VM's speed drifts between rounds, and this shows how far the ratio moves with it.
    print(f"per-round CPU-time ratios (tshark / imaptap), median [lowest, highest] of {args.rounds} rounds:")
    for k in commands:
        if k in BASELINES:
            continue
        ratios = per_round_ratios(cpus[base], cpus[k])
        print(f"  {k:30} {statistics.median(ratios):5.2f}x [{ratios[0]:.2f}x, {ratios[-1]:.2f}x]")
    print_ratio_matrix("CPU", cpus, args.rounds)
    print_ratio_matrix("wall-clock", walls, args.rounds)
    if with_metrics:
        print(f"the option's cost: time with it / without, median [lowest, highest] of {args.rounds} rounds:")
        for k, plain in with_metrics.items():
            wall_ratios = per_round_ratios(walls[k], walls[plain])
            cpu_ratios = per_round_ratios(cpus[k], cpus[plain])
            print(f"  {k:40} wall {statistics.median(wall_ratios):5.3f} [{wall_ratios[0]:.3f}, "
                  f"{wall_ratios[-1]:.3f}]  cpu {statistics.median(cpu_ratios):5.3f} [{cpu_ratios[0]:.3f}, "
                  f"{cpu_ratios[-1]:.3f}]  medians {cpu_med[k] / cpu_med[plain]:.3f}")
    if args.ecs:
        print(f"per-round CPU-time cost of ECS documents (ECS / default), median [lowest, highest] of {args.rounds}"
              " rounds:")
        for k in ("imaptap --json", "imaptap --json --flows-only"):
            ratios = per_round_ratios(cpus[f"{k} ECS"], cpus[k])
            print(f"  {k:30} {statistics.median(ratios):5.2f}x [{ratios[0]:.2f}x, {ratios[-1]:.2f}x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
