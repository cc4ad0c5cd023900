"""Benchmark: imaptap -r FILE --workers N for N = 1 to 4 on the bench-replay captures.

Each capture (3,000 real Dovecot sessions, made by scripts/bench-replay: the host's capture
with segmentation offload, and frames as on the wire) is replayed to JSON Lines with 1, 2, 3
and 4 workers, round after round in a rotated order; the outputs are checked byte for byte
against one worker's first (the stats line's "seconds" aside).  Prints, per capture and worker
count, the median wall-clock and CPU time (user + system of the whole command, its workers
included, start-up too), the speed-up of the wall clock against one worker, the CPU time
against one worker, and the spread of the per-round speed-ups.  A machine with fewer cores
than workers shows where the scaling flattens.

A shared machine's other load takes cores from the workers, so the wall clock says little
there.  The script also times, in this process and interleaved, the CPU time of the one
pipeline of one process and of each worker's pipeline on its share (their JSON sent to
/dev/null): the busiest worker's time is the wall-clock floor with a core per worker, and one
process's time divided by it the speed-up that leaves (the parent's merge runs beside them).
Run:  scripts/bench-workers [--rounds N] [--file PATH ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time

from imaptap_lab.bench_replay import RUN_ENV, timed
from imaptap_lab.checkout import OUT_DIR, USERSPACE
from imaptap_lab.rounds import medians, per_round_ratios, rotated

#: The worker counts timed: 1 is the one-process baseline.
WORKER_COUNTS = (1, 2, 3, 4)
CAPTURES = ("bench-replay-3000-host.pcap", "bench-replay-3000-wire.pcap")
ENV = dict(RUN_ENV, PYTHONPATH=str(USERSPACE))


def command(path: str, workers: int, out: str = "/dev/null") -> list[str]:
    return [sys.executable, "-m", "imaptap", "-r", path, "--json", out, "--workers", str(workers)]


def output_digest(path: str, workers: int) -> str:
    """The digest of the JSON Lines of one run, its stats line without "seconds"."""
    out = subprocess.run(command(path, workers, "-"), capture_output=True, check=True, env=ENV).stdout
    lines = out.split(b"\n")
    stats = lines[-2]
    cut = stats.rindex(b',"seconds":')
    end = stats.find(b",", cut + 1)
    lines[-2] = stats[:cut] + (stats[end:] if end > 0 else b"}")
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def pipeline_cpu(path: str, workers: int, index: int) -> float:
    """CPU seconds of one worker's pipeline (``workers`` 1: one process's), in this process."""
    from imaptap.flowshare import FlowShare
    from imaptap.output.jsonl import JsonlSink, JsonlWriter
    from imaptap.pipeline import Pipeline, ReplaySource
    from imaptap.workers import WorkerSpec, run_worker

    start = time.process_time()
    with open(os.devnull, "w") as out:
        if workers == 1:
            writer = JsonlWriter(out)
            Pipeline(ReplaySource(path, [143]), [JsonlSink(writer)]).run()
            writer.flush()
        else:
            spec = WorkerSpec(path, frozenset({143}), 256, 128, 2048, json=True, messages=True, report=False,
                              pipeline={})
            run_worker(spec, FlowShare(workers, index), out.fileno())
    return time.process_time() - start


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-workers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11, help="rounds (11 for the README's figures)")
    ap.add_argument("--file", action="append", help="capture to replay (repeatable; default: the two"
                    " bench-replay captures in out/)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-workers: check the outputs alike, then time the worker counts round after round."""
    args = build_parser().parse_args(argv)
    files = args.file or [os.path.join(OUT_DIR, name) for name in CAPTURES]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        print(f"bench-workers: missing {', '.join(missing)} (scripts/bench-replay makes it; "
              "--wire-frames for the wire one)", file=sys.stderr)
        return 2
    for path in files:
        digests = {n: output_digest(path, n) for n in WORKER_COUNTS}
        if len(set(digests.values())) != 1:
            print(f"bench-workers: {path}: outputs differ by worker count: {digests}", file=sys.stderr)
            return 1
        print(f"{os.path.basename(path)}: output identical with {', '.join(map(str, WORKER_COUNTS))} workers")
    arms = [(path, n) for path in files for n in WORKER_COUNTS]
    names = [f"{os.path.basename(path)} {n}" for path, n in arms]
    walls: dict[str, list[float]] = {k: [] for k in names}
    cpus: dict[str, list[float]] = {k: [] for k in names}
    for path, n in arms:  # warm the page cache
        timed(command(path, n))
    for r in range(args.rounds):
        for (path, n), name in rotated(list(zip(arms, names, strict=True)), r):
            wall, cpu = timed(command(path, n))
            walls[name].append(wall)
            cpus[name].append(cpu)
    wall_med, cpu_med = medians(walls), medians(cpus)
    load = os.getloadavg()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()};"
          f" load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print(f"{args.rounds} rounds, medians; speed-up = wall of 1 worker / wall of N, per round: median [lowest,"
          " highest]")
    print(f"{'capture':30} {'workers':>7} {'wall s':>7} {'speed-up':>8} {'cpu s':>7} {'cpu/1':>6}  per-round speed-up")
    for path in files:
        base = f"{os.path.basename(path)} 1"
        for n in WORKER_COUNTS:
            k = f"{os.path.basename(path)} {n}"
            ratios = per_round_ratios(walls[base], walls[k])
            print(f"{os.path.basename(path):30} {n:7} {wall_med[k]:7.3f} {wall_med[base] / wall_med[k]:7.2f}x "
                  f"{cpu_med[k]:7.3f} {cpu_med[k] / cpu_med[base]:5.2f}x  {statistics.median(ratios):.2f}x "
                  f"[{ratios[0]:.2f}x, {ratios[-1]:.2f}x]")
    print(f"pipelines in one process, CPU s, medians of {args.rounds} rounds: one process; the busiest worker"
          " of N; the speed-up with a core per worker (one process / busiest)")
    pipeline_arms = [(path, n, i) for path in files for n in WORKER_COUNTS for i in range(n)]
    times: dict[tuple[str, int, int], list[float]] = {arm: [] for arm in pipeline_arms}
    sys.path.insert(0, str(USERSPACE))
    for r in range(args.rounds):
        for arm in rotated(pipeline_arms, r):
            times[arm].append(pipeline_cpu(*arm))
    for path in files:
        one = statistics.median(times[(path, 1, 0)])
        for n in WORKER_COUNTS:
            shares = [statistics.median(times[(path, n, i)]) for i in range(n)]
            print(f"{os.path.basename(path):30} {n:7} busiest {max(shares):6.3f} s, all {sum(shares):6.3f} s"
                  f" ({sum(shares) / one:.2f}x one process's {one:.3f} s), speed-up {one / max(shares):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
