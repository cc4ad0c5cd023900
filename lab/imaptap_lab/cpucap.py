"""CPU caps for benchmark processes: each capped process in a cgroup (v1, the cpu controller) of
its own with a CFS quota of a fraction of one core.

The ceiling's ``--ceiling-worker-cpu`` uses them to stand in for cores the 2-vCPU VM it is
developed on does not have: with every live worker held to the same small share of a core, the
knee of N workers can show N times the knee of one while N shares, the uncapped parent and
tcpreplay still fit in the machine.

A cgroup is named ``CGROUP_PREFIX<pid of the benchmark>-<n>``, so runs of several benchmarks at
once do not touch each other's, and the leftovers of a dead benchmark (whose pid is gone) are
found and removed by the next one.  Removing a cgroup first moves what is still in it back to
the root cgroup, which the kernel requires before rmdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import re
from pathlib import Path

#: Where Debian's cgroup v1 mounts the cpu controller (CI runs on the same machine image).
CPU_CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
#: The CFS period the quotas are shares of: the kernel's default, 100 ms, short enough that a
#: throttled worker waits at most a few tenths of a period behind its ring buffer.
CFS_PERIOD_US = 100_000
#: The smallest quota the kernel accepts (cpu.cfs_quota_us below 1 ms is EINVAL).
MIN_QUOTA_US = 1_000
#: The prefix of every cgroup made here, followed by the benchmark's pid and a counter.
CGROUP_PREFIX = "imaptap-lab-cap-"
OWNED = re.compile(re.escape(CGROUP_PREFIX) + r"(\d+)-\d+$")


class CapError(RuntimeError):
    """A cap could not be set (no cpu controller, a quota out of range); the message says why."""


def quota_us(fraction: float, period_us: int = CFS_PERIOD_US) -> int:
    """The cpu.cfs_quota_us that lets a cgroup run ``fraction`` of one core per period."""
    if not fraction > 0:
        raise CapError(f"a CPU cap of {fraction:g} of a core is not a cap: give a fraction above 0")
    quota = round(fraction * period_us)
    if quota < MIN_QUOTA_US:
        raise CapError(f"a CPU cap of {fraction:g} of a core is under the kernel's least quota,"
                       f" {MIN_QUOTA_US / period_us:g} of a core")
    return quota


def unavailable(root: Path = CPU_CGROUP_ROOT) -> str | None:
    """Why caps cannot be set here (no cgroup v1 cpu controller, not writable), or None."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root}"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (caps need root)"
    return None


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _empty_and_remove(path: Path, root: Path) -> None:
    """Move the processes still in cgroup ``path`` back to ``root``, then remove it."""
    for _ in range(3):   # a process forking while it is moved may leave a new task behind
        tasks = (path / "tasks").read_text().split() if (path / "tasks").exists() else []
        for task in tasks:
            with contextlib.suppress(ProcessLookupError, OSError):
                (root / "tasks").write_text(task)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
    raise CapError(f"cgroup {path} still has tasks after moving them out")


def remove_leftovers(root: Path = CPU_CGROUP_ROOT) -> list[str]:
    """Remove the cgroups of benchmarks that died before they removed theirs; their names."""
    removed = []
    for path in sorted(root.glob(CGROUP_PREFIX + "*")):
        owned = OWNED.match(path.name)
        if owned and path.is_dir() and not _pid_alive(int(owned.group(1))):
            _empty_and_remove(path, root)
            removed.append(path.name)
    return removed


@dataclasses.dataclass(frozen=True, slots=True)
class Throttling:
    """cpu.stat of one cgroup: CFS periods it ran in, those it was throttled in, and for how long."""

    periods: int
    throttled: int
    throttled_seconds: float


def throttling(path: Path) -> Throttling:
    """The cgroup's cpu.stat so far."""
    stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines() if line.strip())
    return Throttling(int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0)),
                      int(stat.get("throttled_time", 0)) / 1e9)


class CpuCaps:
    """Cgroups made for one benchmark, each holding processes to ``fraction`` of a core; a
    context manager that removes them all on exit."""

    _counter = itertools.count(1)

    def __init__(self, fraction: float, root: Path = CPU_CGROUP_ROOT, period_us: int = CFS_PERIOD_US) -> None:
        self.fraction = fraction
        self.quota = quota_us(fraction, period_us)
        self.period = period_us
        self.root = root
        self.groups: list[Path] = []
        reason = unavailable(root)
        if reason:
            raise CapError(reason)
        remove_leftovers(root)

    def cap(self, pid: int) -> Path:
        """Move process ``pid`` (all its threads, and the children it forks from now on) into a
        new cgroup of its own, capped; the cgroup."""
        path = self.root / f"{CGROUP_PREFIX}{os.getpid()}-{next(self._counter)}"
        path.mkdir()
        self.groups.append(path)
        (path / "cpu.cfs_period_us").write_text(str(self.period))
        (path / "cpu.cfs_quota_us").write_text(str(self.quota))
        try:
            (path / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            raise CapError(f"process {pid} exited before it was capped") from None
        return path

    def throttling(self) -> Throttling:
        """Periods, throttled periods and throttled time of all the cgroups made so far, summed."""
        parts = [throttling(path) for path in self.groups if path.exists()]
        return Throttling(sum(p.periods for p in parts), sum(p.throttled for p in parts),
                          sum(p.throttled_seconds for p in parts))

    def release(self) -> None:
        """Move every process back to the root cgroup and remove the cgroups."""
        while self.groups:
            _empty_and_remove(self.groups.pop(), self.root)

    def __enter__(self) -> CpuCaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def children(pid: int) -> list[int]:
    """The processes ``pid`` forked that are still running, from /proc (every thread's list)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return sorted(set(out))
