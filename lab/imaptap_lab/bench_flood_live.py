"""Live SYN flood (issue 5): imaptap -i on a lab veth while N SYNs from 198.18.0.0/15 cross it.

Starts a throw-away lab namespace (imaptap_lab.lab), runs  imaptap -i <host end of the veth>
--port 2143 --json --flows-only  under a wrapper that reports the child's peak RSS, sends N
raw SYNs from the root namespace to the lab's address on port 2143 (nothing listens there),
waits until imaptap's output stops growing, sends SIGINT, and checks: exit 0, one flow record
per flow, evicted == flows - 32768, kernel-matched == N with ring-buffer losses counted.
The packets never leave the veth: the lab namespace has no default route, so its RSTs to
the spoofed 198.18/15 sources are dropped inside it (checked before sending).
Run as root (or with sudo):  scripts/bench-flood-live [-n 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from imaptap_lab.checkout import OUT_DIR, USERSPACE
from imaptap_lab.lab import Lab

PORT = 2143
#: imaptap's peak RSS under the flood, with the default --max-flows 32768: measured 336 MB
#: (bcc and its LLVM take a large part of it), so 500 MB leaves margin.
RSS_BOUND_MB = 500
MAX_FLOWS = 32768
#: SYNs sent unless told.
DEFAULT_FLOWS = 100_000
#: Seconds bcc takes to compile and attach before the flood may start.
ATTACH_SECONDS = 6
#: imaptap has drained the ring buffer once its output has not grown for this many seconds.
QUIET_SECONDS = 4
#: Seconds imaptap gets to write its records and exit after SIGINT.
STOP_TIMEOUT = 120
#: Runs imaptap as its child and prints the child's peak RSS on stderr, passing SIGINT on.
MEASURE = ("import resource,signal,subprocess,sys;p=subprocess.Popen(sys.argv[1:]);"
           "signal.signal(signal.SIGINT,lambda *a:p.send_signal(signal.SIGINT));c=p.wait();"
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);sys.exit(c)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-flood-live."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--flows", type=int, default=DEFAULT_FLOWS)
    return p


def send_and_drain(lab: Lab, out: str, syns: int) -> None:
    """Send the SYNs, then wait until imaptap's output stops growing."""
    t = time.monotonic()
    lab.syn_flood(syns, PORT)
    print(f"sent {syns} SYNs in {time.monotonic() - t:.1f} s")
    size, still = -1, 0
    while still < QUIET_SECONDS:  # wait until imaptap has drained the ring buffer (its output stops growing)
        time.sleep(1)
        now = os.path.getsize(out)
        still = still + 1 if now == size else 0
        size = now
    print(f"drained after {time.monotonic() - t:.1f} s")


def checks(returncode: int, flow_records: int, stats: dict, syns: int, rss_mb: float) -> dict[str, bool]:
    """Each check of the run by name: True where it passed."""
    return {"exit 0": returncode == 0, "one record per flow": flow_records == stats.get("flows"),
            "evicted = flows - cap": stats.get("evicted") == max(0, (stats.get("flows") or 0) - MAX_FLOWS),
            "every SYN matched or counted lost": stats.get("matched") == syns
            and stats.get("received", 0) + stats.get("lost", 0) == syns,
            "RSS bound": rss_mb < RSS_BOUND_MB}


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-flood-live: flood the lab's veth under imaptap -i and check what it reports."""
    syns = build_parser().parse_args(argv).flows
    with Lab() as lab:
        out = os.path.join(OUT_DIR, "flood-live.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(USERSPACE))
        with open(out, "wb") as f:
            tap = subprocess.Popen([sys.executable, "-c", MEASURE, sys.executable, "-m", "imaptap", "-i", lab.host_if,
                                    "--port", str(PORT), "--json", "-", "--flows-only"], stdout=f,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True)
            try:
                time.sleep(ATTACH_SECONDS)
                send_and_drain(lab, out, syns)
                tap.send_signal(signal.SIGINT)
                _, err = tap.communicate(timeout=STOP_TIMEOUT)
            finally:
                if tap.poll() is None:  # the wrapper and imaptap: their own session, so their own group
                    os.killpg(tap.pid, signal.SIGKILL)
                    tap.wait()
        print(err.decode()[-600:].strip())
        with open(out, "rb") as f:
            lines = f.read().splitlines()
        stats = [json.loads(line) for line in lines if line.startswith(b'{"type":"stats"')]
        flows = sum(1 for line in lines if line.startswith(b'{"type":"flow"'))
        print("flow records", flows, "exit", tap.returncode)
        st = stats[-1] if stats else {}
        print({k: st.get(k) for k in ("flows", "evicted", "expired", "segments", "lost")} if stats else "no stats")
        rss = int(err.decode().rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024
        print(f"peak RSS {rss:.0f} MB (bound {RSS_BOUND_MB} MB); matched {st.get('matched')},"
              f" lost in the ring {st.get('lost')}")
        results = checks(tap.returncode, flows, st, syns, rss)
        for name, ok in results.items():
            print("ok  " if ok else "FAIL", name)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
