#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris / libFuzzer) of the IMAP analyzer or the capture-file reader.

Targets live in tests/fuzz/targets.py:
  imap_stream   bytes -> an ImapSession, as feed/gap/segment operations on either side
  capture_file  bytes -> a pcap/pcapng file -> the replay reader -> a FlowTable

Seeds come from pcaps/, ../shared/pcaps-public/ and Zeek's IMAP fuzz corpus; new inputs are kept
in out/fuzz-corpus/TARGET, crashing inputs in out/fuzz-crashes/TARGET.  libFuzzer runs in a
child process so this one can print a summary even when it stops on a crash.  Exit status: 0 no
crash, 1 a crash, hang or out-of-memory, 2 bad arguments.

examples:
  scripts/fuzz imap_stream --seconds 300
  scripts/fuzz capture_file --seconds 20 --corpus /tmp/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FUZZ_DIR = os.path.join(ROOT, "tests", "fuzz")
sys.path[:0] = [FUZZ_DIR, os.path.join(ROOT, "userspace")]

TARGETS = ("imap_stream", "capture_file")
#: Seconds one input may take before libFuzzer calls it a hang (the slowest seed takes ~0.1 s).
HANG_SECONDS = 10
#: Resident memory at which libFuzzer stops with an out-of-memory report: the analyzer's own
#: bounds keep one flow far below this; the interpreter and coverage maps take ~150 MB.
RSS_LIMIT_MB = 1024
#: Largest input libFuzzer makes; big enough to exceed LINE_CAP (16 KB) several times over.
MAX_LEN = 65536


def write_seeds(target: str, directory: str) -> int:
    from seeds import SEEDS

    os.makedirs(directory, exist_ok=True)
    seeds = SEEDS[target]()
    for data in seeds:
        name = hashlib.sha1(data).hexdigest()
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
    return len(seeds)


def child(target: str, libfuzzer_args: list[str]) -> None:
    """Runs inside the child: instrument imaptap (and dpkt) and hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["imaptap", "dpkt", "targets"]):
        import targets
    atheris.Setup([sys.argv[0], *libfuzzer_args], getattr(targets, target))
    atheris.Fuzz()


def artifacts(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.startswith(("crash-", "timeout-", "oom-", "leak-")))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=int, default=60, help="total fuzzing time (default 60)")
    ap.add_argument("--corpus", help="where new inputs are kept (default out/fuzz-corpus/TARGET)")
    ap.add_argument("--jobs", type=int, default=1, help="libFuzzer workers (default 1)")
    args = ap.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        venv = os.path.join(ROOT, ".venv", "bin", "python")
        if os.path.exists(venv) and os.path.realpath(sys.executable) != os.path.realpath(venv):
            os.execv(venv, [venv, os.path.abspath(__file__), *sys.argv[1:]])
        print("scripts/fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2

    out = os.path.join(ROOT, "out")
    corpus = args.corpus or os.path.join(out, "fuzz-corpus", args.target)
    seeds = os.path.join(out, "fuzz-seeds", args.target)
    crashes = os.path.join(out, "fuzz-crashes", args.target)
    for d in (corpus, crashes):
        os.makedirs(d, exist_ok=True)
    n_seeds = write_seeds(args.target, seeds)
    before = set(artifacts(crashes))

    libfuzzer = [f"-max_total_time={args.seconds}", f"-timeout={HANG_SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}",
                 f"-max_len={MAX_LEN}", "-print_final_stats=1", f"-artifact_prefix={crashes}/", corpus, seeds]
    if args.jobs > 1:
        libfuzzer[:0] = [f"-jobs={args.jobs}", f"-workers={args.jobs}"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args.target, *libfuzzer],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    elapsed = time.monotonic() - started
    log = proc.stdout
    with open(os.path.join(out, f"fuzz-{args.target}.log"), "w") as f:
        f.write(log)

    def stat(name: str) -> str:
        found = re.findall(rf"stat::{name}:\s+(\d+)", log)
        return found[-1] if found else "?"

    new = sorted(set(artifacts(crashes)) - before)
    kinds = {k: sum(1 for a in new if a.startswith(k)) for k in ("crash-", "timeout-", "oom-", "leak-")}
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(f"target:     {args.target}")
    print(f"time:       {elapsed:.0f} s")
    print(f"executions: {stat('number_of_executed_units')}")
    print(f"crashes:    {kinds['crash-'] + kinds['leak-']}")
    print(f"hangs:      {kinds['timeout-']}")
    print(f"oom:        {kinds['oom-']}")
    print(f"peak RSS:   {stat('peak_rss_mb')} MB (libFuzzer), {peak_child} MB (ru_maxrss)")
    print(f"slowest:    {stat('slowest_unit_time_sec')} s per input (a hang is {HANG_SECONDS} s)")
    last = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if last:
        print(f"coverage:   {last[-1][0]} edges, {last[-1][1]} features, {last[-1][2]} inputs in libFuzzer's corpus")
    print(f"seeds:      {n_seeds}")
    print(f"corpus:     {len(os.listdir(corpus))} files in {os.path.relpath(corpus, ROOT)}")
    for a in new:
        print(f"artifact:   {os.path.relpath(os.path.join(crashes, a), ROOT)}")
    if proc.returncode != 0 or new:
        tail = "\n".join(log.splitlines()[-40:])
        print(f"libFuzzer exited {proc.returncode}; last lines of its log:\n{tail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
