"""Paths and helpers the test suite shares (a uniquely named module: every test directory may
have its own conftest.py, so `from conftest import ...` would be ambiguous)."""

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "userspace"))

#: Public captures from other projects' test suites, used in place (read-only).
PUBLIC_PCAPS = os.environ.get("IMAPTAP_PUBLIC_PCAPS", os.path.join(os.path.dirname(ROOT), "shared", "pcaps-public"))
#: Captures this project made from a real Dovecot and real clients (scripts/make-captures).
OWN_PCAPS = os.path.join(ROOT, "pcaps")


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
