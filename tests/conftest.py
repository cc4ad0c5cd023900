"""Shared test set-up: the package is importable from the source tree as well as installed."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "userspace"))

#: Public captures from other projects' test suites, used in place (read-only).
PUBLIC_PCAPS = os.environ.get("IMAPTAP_PUBLIC_PCAPS", os.path.join(os.path.dirname(ROOT), "shared", "pcaps-public"))
#: Captures this project made from a real Dovecot and real clients (scripts/make-captures).
OWN_PCAPS = os.path.join(ROOT, "pcaps")
