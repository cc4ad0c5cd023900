"""The CPU caps of bench-live's ceiling (imaptap_lab.cpucap): the quota arithmetic, and that a
capped cgroup really holds a busy process to its share and is removed afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from imaptap_lab import bench_live, cpucap, live_ceiling

CAPS_MISSING = cpucap.unavailable()
needs_caps = pytest.mark.skipif(CAPS_MISSING is not None, reason=f"{CAPS_MISSING}")

#: The busy child's share of a core, and the seconds it is watched for.
BUSY_CAP = 0.1
BUSY_SECONDS = 1.0


def test_quota_is_a_share_of_the_period():
    assert cpucap.quota_us(0.15) == 15_000
    assert cpucap.quota_us(1.0) == cpucap.CFS_PERIOD_US
    assert cpucap.quota_us(0.5, period_us=20_000) == 10_000
    for bad in (0.0, -0.1, float("nan"), 0.001):   # 0.001 of 100 ms: under the kernel's 1 ms
        with pytest.raises(cpucap.CapError):
            cpucap.quota_us(bad)


def test_worker_cpu_argument():
    assert bench_live.parse_args(["--only", "ceiling"]).ceiling_worker_cpu is None
    assert bench_live.parse_args(["--ceiling-worker-cpu", "0.15"]).ceiling_worker_cpu == 0.15
    for bad in ("x", "0", "-1", "1.5", "0.001", "inf"):
        with pytest.raises(SystemExit):
            bench_live.parse_args(["--ceiling-worker-cpu", bad])


def capped_run(workers: int, rate: int, lost: int, cpu: float, parent: float | None) -> live_ceiling.Run:
    offered = rate * 10
    sent = live_ceiling.Sent(packets=offered, seconds=10.0, failed=0, cpu=0.5)
    counters = {"submitted": offered - lost, "lost": lost, "received": offered - lost}
    return live_ceiling.Run(live_ceiling.Arm.ANALYZER, rate, sent, offered, counters, cpu, 0.1, 0.0, 0.5,
                            workers, parent, 0.1, 0.5)


def test_scaling_is_each_knee_over_one_worker_s():
    runs = [capped_run(1, 10_000, 0, 1.0, None), capped_run(1, 20_000, 50, 1.0, None),
            capped_run(2, 10_000, 0, 1.0, 0.1), capped_run(2, 20_000, 0, 2.0, 0.4),
            capped_run(2, 40_000, 9, 2.0, 0.5),
            capped_run(4, 10_000, 0, 1.0, 0.1), capped_run(4, 20_000, 0, 2.0, 0.2),
            capped_run(4, 40_000, 0, 4.0, 0.8)]
    rows = live_ceiling.scaling(live_ceiling.summarize(runs))
    assert [(r["workers"], r["zero loss up to segments/s"], r["scaling"]) for r in rows] == \
        [(1, 10_000, 1.0), (2, 20_000, 2.0), (4, 40_000, 4.0)]
    assert rows[2]["losses from segments/s"] is None
    # taken at most: one worker 19,995/s (20,000 less 5 lost a second), two 39,999/s
    assert rows[1]["most received segments/s"] == 39_999
    assert rows[1]["most received scaling"] == pytest.approx(2.0, abs=0.01)
    # at the knee of two workers: 2 s of CPU for 200,000 segments, 0.4 s of it the parent's
    assert (rows[1]["CPU us per segment"], rows[1]["parent CPU us per segment"],
            rows[1]["workers CPU us per segment"], rows[1]["parent CPU cores"]) == (10.0, 2.0, 8.0, 0.04)
    assert rows[0]["parent CPU us per segment"] is None, "one process has no parent apart"


def test_no_scaling_without_a_knee_of_one_worker():
    runs = [capped_run(1, 10_000, 5, 1.0, None), capped_run(2, 10_000, 0, 1.0, 0.1)]
    rows = live_ceiling.scaling(live_ceiling.summarize(runs))
    assert [r["scaling"] for r in rows] == [None, None]


def test_leftover_names_are_the_benchmark_s_pid():
    assert cpucap.OWNED.match(f"{cpucap.CGROUP_PREFIX}123-4").group(1) == "123"
    assert cpucap.OWNED.match(f"{cpucap.CGROUP_PREFIX}123") is None
    assert cpucap.OWNED.match("user.slice") is None


def cpu_of(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_caps
def test_a_capped_busy_process_gets_its_quota_and_the_cgroup_goes():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with cpucap.CpuCaps(BUSY_CAP) as caps:
            group = caps.cap(busy.pid)
            assert str(busy.pid) in (group / "cgroup.procs").read_text().split()
            start = cpu_of(busy.pid)
            time.sleep(BUSY_SECONDS)
            used = cpu_of(busy.pid) - start
            throttled = caps.throttling()
        assert 0 < used < 2 * BUSY_CAP * BUSY_SECONDS, f"{used:.2f} s of CPU in {BUSY_SECONDS:g} s"
        assert throttled.throttled > 0, "the cap stopped it in some periods"
        assert not group.exists()
        assert str(busy.pid) in (cpucap.CPU_CGROUP_ROOT / "cgroup.procs").read_text().split()
    finally:
        busy.kill()
        busy.wait()


@needs_caps
def test_a_dead_benchmark_s_cgroup_is_emptied_and_removed():
    gone = subprocess.Popen(["true"])
    gone.wait()   # its pid names the dead benchmark
    leftover = cpucap.CPU_CGROUP_ROOT / f"{cpucap.CGROUP_PREFIX}{gone.pid}-1"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        leftover.mkdir()
        (leftover / "cgroup.procs").write_text(str(sleeper.pid))
        assert leftover.name in cpucap.remove_leftovers()
        assert not leftover.exists()
        assert str(sleeper.pid) in (cpucap.CPU_CGROUP_ROOT / "cgroup.procs").read_text().split()
    finally:
        sleeper.kill()
        sleeper.wait()
        if leftover.exists():
            cpucap.remove_leftovers()
