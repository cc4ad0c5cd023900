"""Shared fixtures; the shared paths and helpers live in testenv.py."""

import pytest

from testenv import PUBLIC_PCAPS_ABSENT, SUMMARY, require_public_pcaps, run_imaptap


@pytest.fixture
def imaptap():
    """Run the real imaptap command: ``imaptap("-r", path, "--json", "-")``."""
    return run_imaptap


def pytest_configure(config):
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
