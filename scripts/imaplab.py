#!/usr/bin/env python3
"""A real Dovecot in a throw-away network namespace: start, stop, status (imaptap_lab.lab)."""

import sys

from lab_entry import run

sys.exit(run("imaptap_lab.lab"))
