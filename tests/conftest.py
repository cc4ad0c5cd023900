"""Shared fixtures; the shared paths and helpers live in testenv.py."""

import os
import signal

import pytest

from testenv import PUBLIC_PCAPS_ABSENT, SUMMARY, require_public_pcaps, run_imaptap


@pytest.fixture(autouse=True, scope="session")
def _own_password_key(tmp_path_factory):
    """Every imaptap the tests run keeps its password key in a directory of this test run, not
    in the machine's (passwordkey.py: $XDG_STATE_HOME comes before /var/lib/imaptap)."""
    saved = {name: os.environ.pop(name, None) for name in ("STATE_DIRECTORY", "XDG_STATE_HOME")}
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def imaptap():
    """Run the real imaptap command: ``imaptap("-r", path, "--json", "-")``."""
    return run_imaptap


def pytest_configure(config):
    # A shell without job control starts a background job (`scripts/test &`, nohup ... &) with
    # SIGINT ignored, and every process it starts inherits that: the tests that stop a capture
    # with SIGINT, as a user's Ctrl-C does, would then wait for nothing. A handler (not an
    # ignore) is reset to the default at exec, so the processes the tests start can be stopped.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "third_party_captures_missing: the parameter that stands for every"
                            " third-party capture where they are absent (fails under CI=true)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("third_party_captures_missing") is not None:
        require_public_pcaps()


def pytest_terminal_summary(terminalreporter):
    """One line for every test skipped for want of the third-party captures, and the lines
    tests asked for (testenv.SUMMARY)."""
    skipped = terminalreporter.stats.get("skipped", [])
    n = sum(1 for r in skipped if PUBLIC_PCAPS_ABSENT in str(r.longrepr))
    if n:
        terminalreporter.write_line(f"{n} tests skipped: {PUBLIC_PCAPS_ABSENT}", yellow=True)
    for line in SUMMARY:
        terminalreporter.write_line(line)
