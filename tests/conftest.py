"""Shared fixtures; the shared paths and helpers live in testenv.py."""

import pytest

from testenv import run_imaptap


@pytest.fixture
def imaptap():
    """Run the real imaptap command: ``imaptap("-r", path, "--json", "-")``."""
    return run_imaptap
