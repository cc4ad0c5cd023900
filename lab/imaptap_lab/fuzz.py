"""Coverage-guided fuzzing (atheris / libFuzzer) of the IMAP analyzer or the capture-file reader.

Targets live in imaptap_lab/fuzz_targets.py (tests/fuzz runs them too):
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
from pathlib import Path

# Nothing of imaptap may be imported here: the child imports it under atheris's instrumentation,
# and a module imported before that is not instrumented.
from imaptap_lab.checkout import OUT_DIR, ROOT, VENV_PYTHON

TARGETS = ("imap_stream", "capture_file")
#: This module, as the child runs it (python -m).
DRIVER_MODULE = "imaptap_lab.fuzz"
#: The module the child imports under instrumentation; its functions are TARGETS.
TARGETS_MODULE = "imaptap_lab.fuzz_targets"
#: What the child instruments: imaptap, the packet library under its reader, and the targets'
#: package (only modules imported after instrumentation starts are instrumented).
INSTRUMENTED = ["imaptap", "dpkt", "imaptap_lab"]
#: libFuzzer's artifact prefixes; "leak-" counts as a crash.
ARTIFACT_KINDS = ("crash-", "timeout-", "oom-", "leak-")
#: Lines of libFuzzer's log printed when it stops on something.
LOG_TAIL_LINES = 40
#: Seconds one input may take before libFuzzer calls it a hang (the slowest seed takes ~0.1 s).
HANG_SECONDS = 10
#: Resident memory at which libFuzzer stops with an out-of-memory report: the analyzer's own
#: bounds keep one flow far below this; the interpreter and coverage maps take ~150 MB.
RSS_LIMIT_MB = 1024
#: Largest input libFuzzer makes; big enough to exceed LINE_CAP (16 KB) several times over.
MAX_LEN = 65536


def write_seeds(target: str, directory: str) -> int:
    """Write every seed of ``target`` into ``directory``, named by its SHA-1; return their number."""
    from imaptap_lab.fuzz_seeds import SEEDS

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

    with atheris.instrument_imports(include=INSTRUMENTED):
        import importlib

        targets = importlib.import_module(TARGETS_MODULE)
    atheris.Setup([sys.argv[0], *libfuzzer_args], getattr(targets, target))
    atheris.Fuzz()


def artifacts(directory: str) -> list[str]:
    """libFuzzer's artifacts in ``directory`` (crash-, timeout-, oom-, leak- files), sorted."""
    return sorted(f for f in os.listdir(directory) if f.startswith(ARTIFACT_KINDS))


def count_kinds(new: list[str]) -> dict[str, int]:
    """How many of the artifacts ``new`` are of each kind of ARTIFACT_KINDS."""
    return {k: sum(1 for a in new if a.startswith(k)) for k in ARTIFACT_KINDS}


def libfuzzer_args(seconds: int, jobs: int, corpus: str, seeds: str, crashes: str) -> list[str]:
    """libFuzzer's command line: time, hang and memory bounds, input size, stats, directories."""
    args = [f"-max_total_time={seconds}", f"-timeout={HANG_SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-max_len={MAX_LEN}", "-print_final_stats=1", f"-artifact_prefix={crashes}/", corpus, seeds]
    if jobs > 1:
        args[:0] = [f"-jobs={jobs}", f"-workers={jobs}"]
    return args


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/fuzz."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=int, default=60, help="total fuzzing time (default 60)")
    ap.add_argument("--corpus", help="where new inputs are kept (default out/fuzz-corpus/TARGET)")
    ap.add_argument("--jobs", type=int, default=1, help="libFuzzer workers (default 1)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """scripts/fuzz: run libFuzzer on one target in a child process and print a summary."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 and argv[0] == "--child":
        child(argv[1], argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        # As root, #!/usr/bin/env python3 finds the system's Python; atheris is in the .venv's.
        if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve():
            os.execv(VENV_PYTHON, [str(VENV_PYTHON), "-m", DRIVER_MODULE, *argv])
        print("scripts/fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2

    out = str(OUT_DIR)
    corpus = args.corpus or os.path.join(out, "fuzz-corpus", args.target)
    seeds = os.path.join(out, "fuzz-seeds", args.target)
    crashes = os.path.join(out, "fuzz-crashes", args.target)
    for d in (corpus, crashes):
        os.makedirs(d, exist_ok=True)
    n_seeds = write_seeds(args.target, seeds)
    before = set(artifacts(crashes))

    libfuzzer = libfuzzer_args(args.seconds, args.jobs, corpus, seeds, crashes)
    started = time.monotonic()
    # The plain source, never mypyc's build of it: atheris guides the fuzzer by the coverage of
    # Python bytecode, which compiled modules have none of. tests/fuzz replays the seeds, the
    # mutations and the crashers through the compiled build as well.
    env = dict(os.environ, IMAPTAP_PURE_PYTHON="1")
    proc = subprocess.run([sys.executable, "-m", DRIVER_MODULE, "--child", args.target, *libfuzzer], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    elapsed = time.monotonic() - started
    log = proc.stdout
    with open(os.path.join(out, f"fuzz-{args.target}.log"), "w") as f:
        f.write(log)

    def stat(name: str) -> str:
        found = re.findall(rf"stat::{name}:\s+(\d+)", log)
        return found[-1] if found else "?"

    new = sorted(set(artifacts(crashes)) - before)
    kinds = count_kinds(new)
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
        print(f"coverage:   {last[-1][0]} edges, {last[-1][1]} features, {last[-1][2]} inputs in libFuzzer's"
              " corpus")
    print(f"seeds:      {n_seeds}")
    print(f"corpus:     {len(os.listdir(corpus))} files in {os.path.relpath(corpus, ROOT)}")
    for a in new:
        print(f"artifact:   {os.path.relpath(os.path.join(crashes, a), ROOT)}")
    if proc.returncode != 0 or new:
        tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        print(f"libFuzzer exited {proc.returncode}; last lines of its log:\n{tail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
