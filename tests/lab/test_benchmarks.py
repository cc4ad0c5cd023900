"""The figures the benchmarks compute from their runs, without running anything: bench-live's
ratios and shares, bench-replay's ratios against its baselines, bench-flood's bounds,
bench-flood-live's checks, the fuzz driver's summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imaptap_lab import (
    bench_flood,
    bench_flood_live,
    bench_live,
    bench_replay,
    flow_memory,
    fuzz,
    live_ceiling,
    make_flood,
)


def run(rate: float, cpu: float, gb: float = 1.0, packets: int | None = None, programs: dict | None = None,
        wall: float = 2.0) -> dict:
    """One iperf3 run as bench_live.iperf returns it."""
    return {"rate": rate, "bytes": gb * 1e9, "packets": packets, "wall": wall, "cpu": cpu, "arm_cpu": 0.0,
            "programs": programs or {}}


def test_traffic_ratios_are_taken_within_each_round():
    # round 1 ran on a fast machine, round 2 on a slow one: per-round ratios are 0.9 both times
    results = {"TCP, offloads on": {"egress": {
        "nothing": [run(10.0, 0.5), run(5.0, 1.0)],
        "null XDP": [run(9.5, 0.5), run(4.75, 1.0)],
        "imaptap": [run(9.0, 0.55), run(4.5, 1.1)]}}}
    rows = bench_live.summarize_traffic(results)["TCP, offloads on"]["egress"]
    assert rows["imaptap"]["raw throughput ratio"] == pytest.approx((0.9, 0.9, 0.9))
    assert rows["imaptap"]["raw cost ratio"] == pytest.approx((1.1, 1.1, 1.1))
    assert rows["imaptap"]["isolated throughput ratio"] == pytest.approx((9 / 9.5,) * 3)
    # cost: ms of CPU per GB received
    assert rows["nothing"]["cost"][1] == pytest.approx(750.0)
    assert "raw throughput ratio" not in rows["nothing"], "no ratio of the baseline against itself"
    assert "isolated throughput ratio" not in rows["null XDP"]


def test_udp_cost_is_per_datagram():
    r = run(0.4, cpu=2.0, packets=1_000_000)
    assert bench_live.cost_of(r, "UDP 64 B") == pytest.approx(2.0)  # us per datagram
    assert bench_live.cost_of(run(1.0, cpu=0.5, gb=2.0), "TCP, offloads on") == pytest.approx(250.0)


def test_program_share_less_the_do_nothing_program():
    # imaptap's XDP program: 50 ns a run; the do-nothing one on the same hook: 30 ns (the clock reads)
    results = {"TCP, offloads on": {"ingress": {
        "null XDP": [run(5.0, 1.0, programs={"null_xdp": (30_000_000, 1_000_000)})],
        "imaptap": [run(5.0, 1.0, programs={"imaptap_xdp": (50_000_000, 1_000_000), "imaptap_tc_eg": (0, 0)})]}}}
    row = bench_live.summarize_stats(results)["TCP, offloads on"]["ingress"]["imaptap"]
    assert row["imaptap_xdp"]["ns/run"][1] == pytest.approx(50.0)
    assert row["imaptap_xdp"]["ns/run less null"] == pytest.approx(20.0)
    assert row["imaptap_xdp"]["share of traffic CPU"][1] == pytest.approx(0.05)
    assert row["imaptap_xdp"]["share less null"] == pytest.approx(0.02)
    assert "imaptap_tc_eg" not in row, "a program that never ran has no figures"


def test_swapped_pairs():
    pairs = [(run(9.0, 1.0), run(10.0, 1.0)), (run(11.0, 1.2), run(10.0, 1.0))]
    got = bench_live.summarize_swapped({"XDP": {"TCP, offloads on": {"egress": pairs}}})
    row = got["XDP"]["TCP, offloads on"]["egress"]
    assert row["pairs"] == 2
    assert row["throughput ratio"][1] == pytest.approx(1.0)
    assert row["null rate"] == 10.0


def test_load_figures():
    f = bench_live.load_figures(4, 10, wall=2.0, loops=100, cpu=0.2, stats={"received": 20_000, "lost": 0})
    assert f["segments/s"] == 10_000
    assert f["% of a core per 1000 segments/s"] == 1.0
    assert f["CPU us per segment"] == 10.0
    assert bench_live.load_figures(4, 10, 2.0, 0, 0.1, {})["CPU us per segment"] is None


def test_bench_live_arguments():
    args = bench_live.parse_args([])
    assert args.arm_names == list(bench_live.DEFAULT_ARMS)
    assert args.sections == list(bench_live.SECTIONS)
    assert (args.rounds, args.stats_rounds, args.pairs, args.sessions) == (15, 5, 20, 40)
    # every ratio is taken against "nothing": it is always run
    assert bench_live.parse_args(["--arms", "imaptap,tcpdump"]).arm_names == ["nothing", "imaptap", "tcpdump"]
    with pytest.raises(SystemExit):
        bench_live.parse_args(["--only", "throughput,speed"])
    with pytest.raises(SystemExit):
        bench_live.parse_args(["--arms", "imaptap,wireshark"])
    assert set(bench_live.ISOLATE.values()) <= set(bench_live.ARM_NAMES)
    assert set(bench_live.DEFAULT_ARMS) <= set(bench_live.ARM_NAMES)


def test_every_flood_has_a_memory_bound():
    assert set(bench_flood.BOUNDS) == set(make_flood.VARIANTS)
    args = bench_flood.build_parser().parse_args(["--only", "syn", "--only", "nul"])
    assert (args.only, args.flows) == (["syn", "nul"], 100_000)


def test_flood_live_checks():
    good = {"flows": 100_000, "evicted": 100_000 - bench_flood_live.MAX_FLOWS, "matched": 100_000,
            "received": 83_000, "lost": 17_000}
    assert all(bench_flood_live.checks(0, 100_000, good, 100_000, 335.0).values())
    failed = bench_flood_live.checks(1, 99_999, dict(good, lost=16_000), 100_000, 600.0)
    assert [name for name, ok in failed.items() if not ok] == [
        "exit 0", "one record per flow", "every SYN matched or counted lost", "RSS bound"]
    assert not bench_flood_live.checks(0, 100_000, {}, 100_000, 1.0)["one record per flow"]


def test_fuzz_artifacts_by_kind(tmp_path):
    for name in ("crash-1", "crash-2", "timeout-3", "oom-4", "leak-5", "seed-6", "notes"):
        (tmp_path / name).write_bytes(b"")
    found = fuzz.artifacts(str(tmp_path))
    assert found == ["crash-1", "crash-2", "leak-5", "oom-4", "timeout-3"]
    assert fuzz.count_kinds(found) == {"crash-": 2, "timeout-": 1, "oom-": 1, "leak-": 1}


def test_libfuzzer_arguments():
    args = fuzz.libfuzzer_args(20, 1, "/c", "/s", "/x")
    assert args[-2:] == ["/c", "/s"], "the corpus first: libFuzzer writes new inputs to the first directory"
    assert f"-timeout={fuzz.HANG_SECONDS}" in args and f"-rss_limit_mb={fuzz.RSS_LIMIT_MB}" in args
    assert "-max_total_time=20" in args and "-artifact_prefix=/x/" in args
    assert not any(a.startswith("-jobs") for a in args)
    assert fuzz.libfuzzer_args(20, 2, "/c", "/s", "/x")[:2] == ["-jobs=2", "-workers=2"]


def test_the_fuzz_driver_imports_nothing_of_imaptap():
    """The child instruments imaptap on import: were it imported with the driver, it would not be."""
    import subprocess
    import sys

    code = "import sys, imaptap_lab.fuzz; print(sorted(m for m in sys.modules if m.split('.')[0] == 'imaptap'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from imaptap_lab import fuzz_seeds, fuzz_targets

    assert set(fuzz.TARGETS) == set(fuzz_targets.TARGETS) == set(fuzz_seeds.SEEDS)


def test_replay_ratios_against_each_baseline():
    cpus = {"imaptap": [1.0, 3.0, 2.0], "tshark": [4.0, 6.0, 4.0], "floor": [0.1, 0.1, 0.2]}
    of_tshark = bench_replay.ratios_against(cpus, "tshark")
    assert set(of_tshark) == {"imaptap", "floor"}
    # ratio of the medians 2/4, per round 0.25, 0.5, 0.5: median 0.5, lowest 0.25, highest 0.5
    assert of_tshark["imaptap"] == pytest.approx((0.5, 0.5, 0.25, 0.5))
    # above 1: the command takes longer than the baseline
    assert bench_replay.ratios_against(cpus, "floor")["imaptap"] == pytest.approx((20.0, 10.0, 10.0, 30.0))


def test_replay_baselines_read_the_file_and_name_their_package():
    assert set(bench_replay.BASELINES) == {bench_replay.TSHARK_ARM, bench_replay.NDPI_ARM, bench_replay.FLOOR_ARM}
    for cmd in bench_replay.BASELINES.values():
        assert "{file}" in cmd and cmd[0] in bench_replay.TOOL_PACKAGES
    assert bench_replay.NDPI_READER == ["ndpiReader", "-i", "{file}", "-q"]
    assert bench_replay.TCPDUMP_FLOOR[-1] == "tcp port 143" and "/dev/null" in bench_replay.TCPDUMP_FLOOR


# --- bench-live's ceiling (imaptap_lab.live_ceiling) ------------------------------------------------

def test_segments_offered_by_a_looped_capture():
    # 5 frames, of which frames 0, 2 and 3 are segments
    capture = live_ceiling.ReplayCapture(Path("x.pcap"), (0, 1, 1, 2, 3, 3))
    assert (capture.packets, capture.segments) == (5, 3)
    assert [capture.segments_in(n) for n in (0, 1, 2, 5, 6, 9, 10, 11)] == [0, 1, 1, 3, 4, 6, 6, 7]
    assert capture.pps_for(300) == pytest.approx(500)


def test_segment_counts_are_imaptap_s_replay_counts():
    """The frames counted as offered are the ones a replay (and the kernel) turns into segments."""
    from imaptap.capture.replay import ReplayStats, open_capture
    from imaptap.segment import PayloadPolicy
    from testenv import OWN_PCAPS

    for name in ("idle.pcap", "compress.pcap", "ipv6.pcap"):
        path = Path(OWN_PCAPS, name)
        stats = ReplayStats()
        with open_capture(str(path)) as reader:
            segments = sum(seg is not None for seg in reader.segments({143}, PayloadPolicy(), stats))
        capture = live_ceiling.replay_capture(path)
        assert (capture.packets, capture.segments) == (stats.packets, segments), name
        assert stats.pure_acks and capture.segments < capture.packets, "pure ACKs are frames, not segments"


def ceiling_run(arm, rate: int, offered: int, received: int, lost: int, cpu: float = 1.0) -> live_ceiling.Run:
    sent = live_ceiling.Sent(packets=offered * 3 // 2, seconds=10.0, failed=0, cpu=0.5)
    counters = {"seen": sent.packets, "matched": sent.packets, "submitted": offered - lost, "lost": lost,
                "received": received}
    return live_ceiling.Run(arm, rate, sent, offered, counters, cpu, machine_busy=0.1, steal=0.0, stop_seconds=0.5)


def test_ceiling_summary_and_knee():
    A, C = live_ceiling.Arm.ANALYZER, live_ceiling.Arm.CAPTURE
    runs = [ceiling_run(A, 10_000, 100_000, 100_000, 0), ceiling_run(A, 10_000, 100_000, 100_000, 0),
            ceiling_run(A, 50_000, 500_000, 500_000, 0), ceiling_run(A, 50_000, 500_000, 490_000, 10_000),
            ceiling_run(A, 100_000, 1_000_000, 600_000, 400_000, cpu=6.0),
            ceiling_run(C, 100_000, 1_000_000, 1_000_000, 0)]
    summary = live_ceiling.summarize(runs)
    rows = summary["imaptap -i"]["rates"]
    assert rows[50_000]["lost, most"] == 10_000, "one round's loss is a loss at that rate"
    assert rows[100_000]["CPU us per segment"] == pytest.approx(10.0)
    assert rows[100_000]["received segments/s"] == 60_000
    assert rows[100_000]["lost share, median"] == pytest.approx(0.4)
    assert rows[10_000]["not accounted, most"] == 0
    assert summary["imaptap -i"]["knee"] == {"zero loss up to segments/s": 10_000, "losses from segments/s": 50_000}
    assert summary["capture alone"]["knee"] == {"zero loss up to segments/s": 100_000, "losses from segments/s": None}
    lines = live_ceiling.curve(rows, width=20)
    assert lines[-1].split()[:2] == ["100,000", "#" * 12 + "." * 8]
    assert lines[1].split()[1] == "#" * 2 and lines[-1].endswith("40%")


def test_segments_neither_submitted_nor_lost_are_shown():
    run = ceiling_run(live_ceiling.Arm.ANALYZER, 10_000, 100_000, 99_000, 0)
    run.counters["submitted"] = 99_000
    assert run.figures()["not accounted"] == 1000


def test_ceiling_arguments():
    args = bench_live.parse_args(["--only", "ceiling"])
    assert args.ceiling_rates == list(live_ceiling.DEFAULT_RATES)
    assert (args.ceiling_seconds, args.ceiling_rounds, args.ceiling_side) == (10.0, 3, "ns")
    assert bench_live.parse_args(["--ceiling-rates", "50000,10000"]).ceiling_rates == [10_000, 50_000]
    for bad in ("10000,x", "0", "-5,10"):
        with pytest.raises(SystemExit):
            bench_live.parse_args(["--ceiling-rates", bad])
    with pytest.raises(SystemExit):
        bench_live.parse_args(["--ceiling-side", "both"])


# --- bench-flood --idle-breakdown (imaptap_lab.flow_memory) ------------------------------------------

def test_the_idle_sessions_are_logged_in_and_idling():
    segments = flow_memory.idle_session_segments(3)
    table = flow_memory.new_table(3)
    for seg in segments:
        table.add(seg)
    assert len(table.flows) == 3, "each copy is a flow of its own, still open"
    for flow in table.flows.values():
        s = flow.session
        assert (s.username, s.login_ok, s.last_command) == ("alice", True, "IDLE")
        assert flow.client[0].startswith("198.18.") and flow.end_reason is None


BY_LINE_CHILD = """
import json
from imaptap_lab import flow_memory
print(json.dumps(flow_memory.by_line("syn", 200)))
"""


def test_idle_flow_memory_by_line_and_function():
    # the plain source: a compiled analyzer's allocations have no Python line of their own
    env = dict(os.environ, IMAPTAP_PURE_PYTHON="1")
    proc = subprocess.run([sys.executable, "-c", BY_LINE_CHILD], capture_output=True, text=True, env=env, check=True)
    rows, total = json.loads(proc.stdout)
    assert total == pytest.approx(sum(r["bytes per flow"] for r in rows))
    functions = dict(flow_memory.by_function(rows))
    assert functions["ImapSession.__init__"] > 0 and functions["FlowTable._new_flow"] > 0
    assert sum(functions.values()) == pytest.approx(total)
    assert all(r["line"].startswith("imaptap/") for r in rows if r["bytes per flow"] > 1), "imaptap's own lines"


def test_enclosing_names_the_innermost_function():
    import imaptap.flows

    path = str(Path(imaptap.flows.__file__).with_name("flows.py"))  # the source, also beside a compiled module
    source = Path(path).read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if "self.next_seq = (seq + 1) % _SEQ_MOD" in text)
    assert flow_memory.enclosing(path, line) == "_Direction.syn"
    assert flow_memory.enclosing(path, 1) == "<module>"


def test_two_checkouts_compared_in_the_same_rounds(capsys):
    from imaptap_lab.checkout import ROOT

    out = flow_memory.compare(ROOT, rounds=2, kinds=("syn",), n=200, rss_n=2000)
    arms = out["syn"]["arms"]
    assert list(arms) == ["this checkout", str(ROOT)] and all(len(v["heap"]) == 2 for v in arms.values())
    assert out["syn"]["ratio"]["heap"] == pytest.approx(1.0, rel=0.02), "the same code holds the same bytes"
    assert "this checkout / " in capsys.readouterr().out


def test_objects_one_flow_holds_alone():
    held, shared = flow_memory.by_type("syn", 50)
    names = {name for name, _, _ in held}
    assert {"Flow", "ImapSession", "ImapStream", "_Direction"} <= names
    assert ("ImapStream", 2) in {(name, count) for name, count, _ in held}, "one stream per direction"
    assert "FlowTable" not in names and "PayloadPolicy" not in names, "shared by every flow"
    assert shared["flows with a policy entry"] == 0, "a SYN-only flow is still in its handshake: no entry"
