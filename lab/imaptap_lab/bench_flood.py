"""Benchmark: replay each hostile capture of scripts/make-flood and check memory stays bounded.

For each flood (a 100,000-flow SYN scan, 100,000 short sessions, a 50 MB line, a literal
announcing {99999999999} followed by 20 MB, a 10,000-character tag, NUL bytes, invalid UTF-8)
it runs  imaptap -r FILE --json /dev/null --flows-only  and prints the child's peak RSS, wall
time, flows and evictions, then checks them: exit 0, every flow counted, exactly the flows
beyond --max-flows evicted, peak RSS under the bound named in BOUNDS.  It also measures what
one idle flow costs (tracemalloc over 10,000 flows made by SYNs).  Exit 1 if a check fails.

Captures are cached in out/floods/.  Light: one replay at a time, no network, no root.

examples:
  scripts/bench-flood
  scripts/bench-flood --only syn --max-flows 10000
  scripts/bench-flood --idle-breakdown     # where the bytes of an idle flow go
  scripts/bench-flood --idle-breakdown --against /work/main   # bytes per idle flow, here and there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from imaptap.flows import MAX_FLOWS

from imaptap_lab.checkout import OUT_DIR, USERSPACE

FLOWS = 100_000
#: Peak RSS allowed per flood, in MB, with the default --max-flows 32768.  Measured on a
#: 2-core VM (Python 3, Nov 2026): SYN scan 223 MB (32,768 open flows at ~5 KB plus a ~20 MB
#: baseline; 108 MB since an idle flow holds ~1.8 KB, Dec 2026), short sessions 26 MB (each ends
#: with FIN before the next), single hostile sessions 19-24 MB.  The bounds leave at least 1.7x.
BOUNDS = {"syn": 400, "sessions": 100, "giant-line": 60, "literal": 60, "long-tag": 60, "nul": 60,
          "bad-utf8": 60}
#: Snap lengths replayed: the default, and whole packets so the stream itself must cut the line.
SNAPLENS = ("256", "65535")
IDLE_FLOWS = 10_000
#: Bytes read from the end of imaptap's output for its last line, the stats record (~600 bytes).
STATS_TAIL = 4096


def make(variant: str, n: int) -> str:
    """The capture of flood ``variant`` with ``n`` flows, made once into out/floods/."""
    d = os.path.join(OUT_DIR, "floods")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{variant}-{n}.pcap" if variant in ("syn", "sessions") else f"{variant}.pcap")
    if not os.path.exists(path):
        # A child of its own, as scripts/make-flood: its memory never counts in this process.
        subprocess.run([sys.executable, "-m", "imaptap_lab.make_flood", variant, "-n", str(n), "-o", path + ".tmp"],
                       check=True)
        os.rename(path + ".tmp", path)
    return path


def replay(path: str, *args: str) -> tuple[int, dict, float, int]:
    """Exit status, the stats record, wall seconds and peak RSS (bytes) of one imaptap run."""
    env = dict(os.environ, PYTHONPATH=str(USERSPACE))
    out = path + ".json"
    t = time.monotonic()
    with open(out, "wb") as f:
        # this process is small, so the RSS Linux carries across exec from the fork is too
        proc = subprocess.Popen([sys.executable, "-m", "imaptap", "-r", path, "--json", "-", "--flows-only", *args],
                                stdout=f, stdin=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - t
    stats: dict = {}
    with open(out, "rb") as f:
        f.seek(max(0, os.path.getsize(out) - STATS_TAIL))
        last = f.read().splitlines()[-1:]
    if last and last[0].startswith(b"{"):
        stats = json.loads(last[0])
    os.unlink(out)
    return proc.returncode, stats, seconds, usage.ru_maxrss * 1024


def bytes_per_flow(n: int = IDLE_FLOWS) -> float:
    """Python heap bytes one idle flow (a SYN, nothing after) holds in the flow table."""
    import tracemalloc

    from imaptap.flows import FlowTable
    from imaptap.segment import PayloadPolicy, Segment, TcpFlag

    syns = [Segment(1.0, 4, f"198.18.{i >> 8 & 255}.{i & 255}", "192.0.2.20", 1024 + i, 143, i, 0,
                    int(TcpFlag.SYN), 0, b"") for i in range(n)]
    table = FlowTable({143}, PayloadPolicy(), max_flows=n)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for s in syns:
        table.add(s)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert len(table.flows) == n
    return sum(st.size_diff for st in after.compare_to(before, "filename")) / n


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-flood."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(BOUNDS), help="run only this flood (repeatable)")
    p.add_argument("-n", "--flows", type=int, default=FLOWS, help=f"flows in syn and sessions (default {FLOWS})")
    p.add_argument("--max-flows", type=int, default=MAX_FLOWS, help=f"imaptap --max-flows (default {MAX_FLOWS})")
    p.add_argument("--idle-breakdown", action="store_true",
                   help="instead of the floods: where an idle flow's memory goes, by line, function and type"
                        " (imaptap_lab.flow_memory)")
    p.add_argument("--against", type=Path, metavar="CHECKOUT",
                   help="with --idle-breakdown: instead, bytes per idle flow of this checkout's imaptap and of"
                        " CHECKOUT's, in interleaved rounds")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of --against (default imaptap_lab.flow_memory.COMPARE_ROUNDS)")
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-flood: replay every flood, print and check the figures."""
    args = build_parser().parse_args(argv)
    if args.idle_breakdown:
        from imaptap_lab import flow_memory

        if args.against is not None:
            flow_memory.compare(args.against, args.rounds or flow_memory.COMPARE_ROUNDS)
        else:
            flow_memory.report()
        return 0
    failures = []
    print(f"{'flood':<12} {'snaplen':>7} {'flows':>8} {'evicted':>8} {'seconds':>8} {'peak RSS':>9} {'bound':>7}")
    for variant in args.only or BOUNDS:
        path = make(variant, args.flows)
        for snaplen in SNAPLENS if variant not in ("syn", "sessions") else SNAPLENS[:1]:
            code, stats, seconds, rss = replay(path, "-s", snaplen, "--max-flows", str(args.max_flows))
            flows, evicted = stats.get("flows"), stats.get("evicted")
            mb = rss / (1 << 20)
            print(f"{variant:<12} {snaplen:>7} {flows!s:>8} {evicted!s:>8} {seconds:>8.1f} {mb:>6.0f} MB "
                  f"{BOUNDS[variant]:>4} MB", flush=True)
            want_flows = args.flows if variant in ("syn", "sessions") else 1
            want_evicted = max(0, args.flows - args.max_flows) if variant == "syn" else 0
            for ok, what in ((code == 0, f"exit {code}"), (flows == want_flows, f"flows {flows} != {want_flows}"),
                             (evicted == want_evicted, f"evicted {evicted} != {want_evicted}"),
                             (mb < BOUNDS[variant], f"peak RSS {mb:.0f} MB over {BOUNDS[variant]} MB")):
                if not ok:
                    failures.append(f"{variant} -s {snaplen}: {what}")
    print(f"one idle flow (SYN only): {bytes_per_flow():,.0f} bytes of Python heap (tracemalloc, {IDLE_FLOWS:,} flows)")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
