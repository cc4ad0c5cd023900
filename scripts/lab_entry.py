"""What every lab script in this directory runs: the ``main`` of one module of imaptap_lab.

The package lives in lab/ and scripts/setup installs it (editable) into the checkout's .venv.
A script started with another Python (``#!/usr/bin/env python3`` as root finds the system's)
is run again with the .venv's.  A package installed from another checkout is refused: it would
run that checkout's code on this one's files.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
#: Exit status when the lab cannot run at all, as the scripts use for bad arguments.
EXIT_SETUP = 2


def run(module: str) -> int:
    """Run ``module``'s main() with this command line and return its exit status."""
    name = os.path.basename(sys.argv[0])
    spec = importlib.util.find_spec("imaptap_lab")
    if spec is None:
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(venv_python, [str(venv_python), os.path.abspath(sys.argv[0]), *sys.argv[1:]])
        print(f"{name}: the lab package (lab/) is not installed in this Python; run scripts/setup", file=sys.stderr)
        return EXIT_SETUP
    installed_from = Path(spec.origin).resolve().parents[2]
    if installed_from != ROOT:
        print(f"{name}: this Python's imaptap_lab is installed from {installed_from}, not from {ROOT};"
              " run scripts/setup here", file=sys.stderr)
        return EXIT_SETUP
    return importlib.import_module(module).main()
