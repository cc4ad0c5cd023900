"""Paths and helpers the test suite shares (a uniquely named module: every test directory may
have its own conftest.py, so `from conftest import ...` would be ambiguous)."""

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "userspace"))

#: A CI run must exercise everything: what a workstation may skip (root, the kernel, the
#: third-party captures) fails the run there.
IN_CI = os.environ.get("CI") == "true"
#: Third-party captures from other projects' test suites, used in place (read-only).  Not in
#: this repository: a user's clone has none, and the tests that need them skip there.
PUBLIC_PCAPS = os.environ.get("IMAPTAP_PUBLIC_PCAPS", os.path.join(os.path.dirname(ROOT), "shared", "pcaps-public"))
#: One of them, whose presence says the directory is there at all.
_PUBLIC_PROBE = os.path.join(PUBLIC_PCAPS, "ndpi", "imap.pcap")
PUBLIC_PCAPS_PRESENT = os.path.isfile(_PUBLIC_PROBE)
#: The reason of every skip for their absence; conftest.py sums them up in one line.
PUBLIC_PCAPS_ABSENT = (f"third-party captures not found in {PUBLIC_PCAPS}: put a copy of pcaps-public there"
                       " or set IMAPTAP_PUBLIC_PCAPS (README, Tests)")
#: Captures this project made from a real Dovecot and real clients (scripts/make-captures).
OWN_PCAPS = os.path.join(ROOT, "pcaps")
#: Lines a test wants printed at the end of the run (which accelerator booted a kernel, say).
SUMMARY: list[str] = []


def public_pcap(name: str) -> str:
    """The path of a third-party capture.  Where they are absent the test is skipped, and fails
    under CI=true; one that is missing from a directory that is there always fails."""
    import pytest

    path = os.path.join(PUBLIC_PCAPS, name)
    if not PUBLIC_PCAPS_PRESENT:
        if IN_CI:
            pytest.fail(f"CI=true and {PUBLIC_PCAPS_ABSENT}", pytrace=False)
        pytest.skip(PUBLIC_PCAPS_ABSENT)
    assert os.path.exists(path), f"missing third-party capture {path}"
    return path


def public_pcap_paths(pattern: str = "**/*.pcap*") -> list:
    """Parameters for a test run on every third-party capture matching ``pattern``: the paths,
    or where they are absent one parameter that skips (and under CI=true fails, being missing)."""
    import glob

    import pytest

    if PUBLIC_PCAPS_PRESENT:
        return sorted(p for p in glob.glob(os.path.join(PUBLIC_PCAPS, pattern), recursive=True)
                      if not p.endswith((".pkt", ".out")))
    marks = pytest.mark.third_party_captures_missing if IN_CI else pytest.mark.skip(reason=PUBLIC_PCAPS_ABSENT)
    return [pytest.param(_PUBLIC_PROBE, marks=marks, id="third-party-captures")]


#: Third-party captures with a login, and its password (the rest have none to leak).
PUBLIC_SECRETS = {"ndpi/imap.pcap": ["pfres"], "arkime/imap.pcap": ["XXXXXX"],
                  "suricata-verify/imap-detection.pcap": ["XXXXXX"]}


def captures_with_secrets() -> tuple[list, list[str]]:
    """pytest parameters (path, ports, secrets) of every capture with a login, and their ids:
    those of pcaps/ (secrets from facts.json) and the third-party ones (where present; else one
    parameter that skips, and fails under CI=true)."""
    import pytest

    with open(os.path.join(OWN_PCAPS, "facts.json")) as f:
        facts = json.load(f)
    params: list = [(os.path.join(OWN_PCAPS, name), spec["ports"], spec["secrets"])
                    for name, spec in sorted(facts.items())]
    ids = sorted(facts)
    if PUBLIC_PCAPS_PRESENT:
        params += [(os.path.join(PUBLIC_PCAPS, name), [143], secrets)
                   for name, secrets in sorted(PUBLIC_SECRETS.items())]
        ids += sorted(PUBLIC_SECRETS)
    else:
        params += [pytest.param(p, [143], [], marks=p.marks) for p in public_pcap_paths()]
        ids += ["third-party-captures"]
    return params, ids


def require_public_pcaps() -> None:
    """Fail under CI=true, skip elsewhere, where the third-party captures are absent."""
    public_pcap("ndpi/imap.pcap")


@contextlib.contextmanager
def accelerator(module, name: str, on: bool):
    """Run with ``module.<name>``, an optional C accelerator, as built (``on``) or as if it had
    not been built: the pure-Python path every accelerated path must agree with."""
    saved = getattr(module, name)
    if not on:
        setattr(module, name, None)
    try:
        yield
    finally:
        setattr(module, name, saved)


def accelerator_params(module, name: str) -> list:
    """pytest parameters for both paths; the C one is skipped where it was not built."""
    import pytest

    return [pytest.param(True, id="c", marks=pytest.mark.skipif(getattr(module, name) is None,
                                                                reason=f"{name} not built")),
            pytest.param(False, id="python")]


@dataclass
class CliRun:
    """One run of the real ``imaptap`` command and what it printed."""

    returncode: int
    stdout: str
    stderr: str
    records: list = field(default_factory=list)

    def of_type(self, kind: str) -> list:
        return [r for r in self.records if r["type"] == kind]

    @property
    def flows(self) -> list:
        return self.of_type("flow")

    @property
    def messages(self) -> list:
        return self.of_type("message")

    @property
    def stats(self) -> dict:
        (s,) = self.of_type("stats")
        return s


def run_imaptap(*args: str, timeout: float = 120) -> CliRun:
    """Run ``python -m imaptap ARGS`` as a user would and parse its JSON Lines on stdout."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    proc = subprocess.run([sys.executable, "-m", "imaptap", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return CliRun(proc.returncode, proc.stdout, proc.stderr, records)


def dashboard_metric_names(dashboard: dict) -> set:
    """Every metric name a Grafana dashboard's queries (panels and variables) use: the PromQL
    identifiers left once label values, matchers, grouping labels and ranges are taken out."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]
    names = set()
    for expr in exprs:
        bare = re.sub(r'"[^"]*"', '""', expr)
        bare = re.sub(r"\{[^}]*\}", "", bare)
        bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
        bare = re.sub(r"\[[^\]]*\]", "", bare)
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
            if word.startswith(("imaptap_", "process_")) or word == "up":
                names.add(word)
    assert exprs and names, "no queries found in the dashboard"
    return names
