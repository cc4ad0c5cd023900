"""scripts/*: each is a thin entry point into imaptap_lab with the command line it always had."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imaptap_lab import (
    bench_flood,
    bench_flood_live,
    bench_live,
    bench_memory,
    bench_replay,
    bench_soak,
    bench_tui,
    bench_workers,
    checkout,
    fuzz,
    lab,
    make_captures,
    make_flood,
    tui_screenshot,
    verifier_check,
)
from testenv import ROOT

SCRIPTS = Path(ROOT, "scripts")

#: script -> (module, options its --help must show)
ENTRY_POINTS = {
    "imaplab.py": (lab, ["start", "stop", "status"]),
    "make-captures": (make_captures, ["--only", "--output-dir"]),
    "make-flood": (make_flood, ["-o FILE", "--flows", "--size", "giant-line"]),
    "bench-replay": (bench_replay, ["--sessions", "--rounds", "--file", "--regen", "--wire-frames", "--metrics"]),
    "bench-live": (bench_live, ["--rounds", "--stats-rounds", "--iperf-seconds", "--pairs", "--arms", "--only",
                                "--json", "--ceiling-rates", "--ceiling-seconds", "--ceiling-rounds",
                                "--ceiling-side", "--ceiling-pcap"]),
    "bench-flood": (bench_flood, ["--only", "--flows", "--max-flows"]),
    "bench-flood-live": (bench_flood_live, ["--flows"]),
    "bench-workers": (bench_workers, ["--rounds", "--file"]),
    "bench-memory": (bench_memory, ["--rounds"]),
    "bench-soak": (bench_soak, ["--minutes", "--warmup"]),
    "bench-tui": (bench_tui, ["--flows", "--rate", "--seconds", "--syn-flood"]),
    "fuzz": (fuzz, ["imap_stream", "capture_file", "--seconds", "--corpus", "--jobs"]),
    "tui-screenshot": (tui_screenshot, ["OUT.svg"]),
    "verifier-check": (verifier_check, ["--kernel", "--variant", "--json", "--refresh", "--mirror", "--timeout",
                                        "--accel", "--logs"]),
}


def test_every_script_but_the_shell_ones_is_an_entry_point():
    shell = {"setup", "run", "test"}
    names = {p.name for p in SCRIPTS.iterdir() if p.is_file() and p.name != "lab_entry.py"}
    assert names - shell == set(ENTRY_POINTS)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help(script):
    module, options = ENTRY_POINTS[script]
    path = SCRIPTS / script
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert f'run("{module.__name__}")' in text
    assert len(text.splitlines()) <= 10, "an entry point, not an implementation"
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script}")
    for option in options:
        assert option in proc.stdout, option


def test_defaults_of_the_benchmarks_are_the_readme_s():
    replay = bench_replay.build_parser().parse_args([])
    assert (replay.sessions, replay.rounds, replay.file, replay.wire_frames) == (3000, 21, None, False)
    tui = bench_tui.build_parser().parse_args([])
    assert (tui.flows, tui.rate, tui.seconds, tui.syn_flood) == (10_000, 5000.0, 10.0, False)
    assert bench_flood_live.build_parser().parse_args([]).flows == 100_000
    assert bench_flood.build_parser().parse_args([]).max_flows == 32768
    soak = bench_soak.build_parser().parse_args([])
    assert (soak.minutes, soak.warmup) == (30.0, 5.0)  # the half hour, the README's warm-up


def test_make_captures_writes_into_pcaps_unless_told():
    assert make_captures.build_parser().parse_args([]).output_dir == checkout.PCAP_DIR
    args = make_captures.build_parser().parse_args(["--only", "idle", "curl", "--output-dir", "/tmp/x"])
    assert (args.only, args.output_dir) == (["idle", "curl"], Path("/tmp/x"))
    assert checkout.PCAP_DIR == Path(ROOT, "pcaps")


def test_every_scenario_has_its_own_capture():
    names = [sc.name for sc in make_captures.SCENARIOS]
    assert len(names) == len(set(names))
    assert {f"{n}.pcap" for n in names} == {p.name for p in checkout.PCAP_DIR.glob("*.pcap")}


def test_make_flood_arguments():
    args = make_flood.build_parser().parse_args(["literal", "-o", "f.pcap"])
    assert (args.variant, args.output, args.flows, args.size) == ("literal", "f.pcap", 100_000, None)
    with pytest.raises(SystemExit):
        make_flood.build_parser().parse_args(["syn"])  # -o is required


def test_fuzz_arguments():
    args = fuzz.build_parser().parse_args(["capture_file", "--seconds", "5"])
    assert (args.target, args.seconds, args.corpus, args.jobs) == ("capture_file", 5, None, 1)
    with pytest.raises(SystemExit):
        fuzz.build_parser().parse_args(["no_such_target"])


def test_verifier_check_arguments():
    args = verifier_check.build_parser().parse_args([])
    assert (args.kernel, args.variant, args.timeout, args.accel) == (None, None, verifier_check.BOOT_TIMEOUT, "auto")
    args = verifier_check.build_parser().parse_args(["--kernel", "5.10", "--variant", "perf+tc", "--variant",
                                                     "ringbuf+tc"])
    assert (args.kernel, args.variant) == (["5.10"], ["perf+tc", "ringbuf+tc"])
    with pytest.raises(SystemExit):
        verifier_check.build_parser().parse_args(["--kernel", "4.19"])


def test_lab_arguments():
    p = lab.build_parser()
    start = p.parse_args(["start", "--no-offloads", "--json"])
    assert (start.command, start.no_offloads, start.json, start.name) == ("start", True, True, None)
    stop = p.parse_args(["stop", "--all", "imaptap-lab-1-abc"])
    assert (stop.command, stop.all, stop.names) == ("stop", True, ["imaptap-lab-1-abc"])
    with pytest.raises(SystemExit):
        p.parse_args([])  # a command is required


def test_tui_screenshot_writes_the_docs_screenshot_unless_told():
    assert tui_screenshot.build_parser().parse_args([]).svg == os.path.join(ROOT, "docs", "screenshot.svg")
    assert tui_screenshot.build_parser().parse_args(["/tmp/s.svg"]).svg == "/tmp/s.svg"


# --- scripts/lab_entry.py -------------------------------------------------------------------------

def copy_of_scripts(tmp_path: Path) -> Path:
    """scripts/ in a directory that is not this checkout (no .venv, no lab/)."""
    other = tmp_path / "checkout"
    shutil.copytree(SCRIPTS, other / "scripts")
    return other / "scripts"


def test_a_python_without_the_lab_package_is_told_to_run_setup(tmp_path):
    scripts = copy_of_scripts(tmp_path)
    # -S: no site-packages, so no imaptap_lab; and no .venv beside the copy to switch to
    proc = subprocess.run([sys.executable, "-S", str(scripts / "make-flood"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "make-flood: the lab package (lab/) is not installed in this Python; run scripts/setup" in proc.stderr
    assert proc.stdout == ""


def test_a_lab_package_from_another_checkout_is_refused(tmp_path):
    scripts = copy_of_scripts(tmp_path)
    proc = subprocess.run([sys.executable, str(scripts / "make-flood"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"imaptap_lab is installed from {checkout.ROOT}, not from {scripts.parent}" in proc.stderr
