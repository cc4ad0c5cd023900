"""Where things are in the imaptap checkout this package was installed from (editable)."""

from __future__ import annotations

from pathlib import Path

#: The repository root: lab/imaptap_lab/checkout.py is two directories below it.
ROOT = Path(__file__).resolve().parents[2]
#: The captures of the lab, with facts.json and MANIFEST.md (scripts/make-captures).
PCAP_DIR = ROOT / "pcaps"
#: Benchmark captures, fuzz corpora and logs: made here, never committed.
OUT_DIR = ROOT / "out"
#: The virtual environment scripts/setup makes; child processes of the benchmarks run in it.
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
VENV_IMAPTAP = ROOT / ".venv" / "bin" / "imaptap"
#: imaptap's own sources, put on PYTHONPATH of the imaptap children some benchmarks start.
USERSPACE = ROOT / "userspace"

if not (USERSPACE / "imaptap").is_dir():
    # A copy in site-packages would look for pcaps/ and out/ beside site-packages.
    raise ImportError(f"imaptap_lab must be installed editable from an imaptap checkout (scripts/setup does);"
                      f" {ROOT} is not one")
