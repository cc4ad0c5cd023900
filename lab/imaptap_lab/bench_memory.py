"""Memory of ``imaptap -i`` once attached: what compiling the kernel program leaves, and what giving it back saves.

Starts the real command line on a lab veth (JSON to /dev/null) in four variants, each in a
fresh process, in interleaved rounds (the order rotated each round), and reads its resident
memory from /proc/PID/status, anonymous and file-backed apart, a few seconds after it attached:

- ``kept``: nothing given back (as before: bcc's module, the free heap, the compiler's pages);
- ``trim``: only the free heap returned (malloc_trim);
- ``trim+module``: and bcc's module released;
- ``imaptap``: as shipped (and the compiler libraries' pages dropped too).

The variants are made by replacing `memory.give_back` and `LiveCapture._release_module` in the
child before it starts: the same code otherwise.  Medians per variant; run as root.
Run:  scripts/bench-memory [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from imaptap_lab.checkout import USERSPACE
from imaptap_lab.lab import Lab
from imaptap_lab.programs import capturing
from imaptap_lab.rounds import rotated

VARIANTS = ("kept", "trim", "trim+module", "imaptap")
#: Seconds after the capture is attached before memory is read: the drop of privileges and the
#: first polls are done by then.
SETTLE_SECONDS = 3.0
ATTACH_TIMEOUT = 120.0
DEFAULT_ROUNDS = 5

#: The child: patch the variant in, then run the command line as a user would.
CHILD = """
import ctypes, sys
import imaptap.capture.live as live
from imaptap.capture.live.memory import memory_use
variant = sys.argv[1]
def trim_only():
    before = memory_use()
    ctypes.CDLL(None).malloc_trim(0)
    return before, memory_use()
if variant == "kept":
    live.give_back = lambda: (memory_use(), memory_use())
if variant in ("kept", "trim"):
    live.LiveCapture._release_module = lambda self, bpf: None
if variant in ("trim", "trim+module"):
    live.give_back = trim_only
from imaptap.cli import main
sys.exit(main(sys.argv[2:]))
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-memory."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    return p


def status_kb(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, RssShmem and VmRSS of ``pid`` in KB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def mappings_kb(pid: int) -> dict[str, int]:
    """Resident KB by mapped file (anonymous mappings under "[anon]"), the largest few."""
    by: dict[str, int] = {}
    name = "[anon]"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                name = os.path.basename(fields[5]) if len(fields) > 5 else "[anon]"
            elif fields[0] == "Rss:":
                by[name] = by.get(name, 0) + int(fields[1])
    return dict(sorted(by.items(), key=lambda kv: -kv[1])[:8])


def measure(lab: Lab, variant: str) -> dict:
    """One run of the variant: its memory once attached."""
    env = dict(os.environ, PYTHONPATH=str(USERSPACE))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, variant, "-i", lab.host_if, "--json", "/dev/null"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while not capturing(lab.host_if):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"imaptap did not attach: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.1)
        time.sleep(SETTLE_SECONDS)
        result = {"variant": variant, **status_kb(proc.pid), "mappings": mappings_kb(proc.pid)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    return result


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-memory: memory after attach, per variant, in interleaved rounds."""
    args = build_parser().parse_args(argv)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with Lab() as lab:
        for r in range(args.rounds):
            for variant in rotated(list(VARIANTS), r):
                result = measure(lab, variant)
                runs[variant].append(result)
                print(json.dumps(result), flush=True)
    print(f"\nmedians of {args.rounds} rounds, MB (1 MB = 1024 KB), kernel {os.uname().release}")
    print(f"{'variant':<12} {'RSS':>7} {'anon':>7} {'file':>7}")
    for variant in VARIANTS:
        med = {k: statistics.median(r[k] for r in runs[variant]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
        print(f"{variant:<12} {med['VmRSS']:7.1f} {med['RssAnon']:7.1f} {med['RssFile']:7.1f}")
    print("largest mappings of the last run of each:")
    for variant in VARIANTS:
        top = ", ".join(f"{k} {v / 1024:.1f}" for k, v in list(runs[variant][-1]["mappings"].items())[:5])
        print(f"  {variant}: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
