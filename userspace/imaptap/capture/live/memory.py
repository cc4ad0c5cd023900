"""Giving back what compiling the kernel program left behind, once the programs are loaded.

bcc compiles the program with clang and LLVM in this process: afterwards the heap holds tens
of megabytes that the compiler freed but glibc kept, and clang's and LLVM's shared libraries
(about 100 MB of code) are resident although they never run again.  `give_back` returns the
free heap to the kernel (malloc_trim), drops the libraries' code pages from this process
(MADV_DONTNEED: code is never written, so a page touched again is read back from the file as it
was, as LLVM's destructors do at exit) and asks the kernel to reclaim their other pages
(MADV_PAGEOUT, Linux 5.4+; a page written to, such as relocated data, is kept or swapped, never
lost).  Nothing is unmapped.  The bcc module itself is released by
`LiveCapture` (it knows which maps it still reads).
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

#: The shared objects bcc compiles with: once the programs are loaded, nothing runs their code.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
#: Seconds between two `HeapTrim` runs while capturing.  The compiler leaves a heap of ~48 MB,
#: most of it free in hundreds of pieces; the churn of flows wanders through them, and glibc
#: keeps each page it touched resident until malloc_trim returns it.  Under the soak's load
#: that is ~1.2-1.5 MB a minute, all given back at the next trim: a saw of that height with a
#: trim a minute, 0.4 MB with one every 10 s (an hour's soak, README).  One trim of this heap took
#: 0.44 ms there (funclatency), 0.004% of a core at this interval.
HEAP_TRIM_INTERVAL_S = 10.0
#: madvise(2) advice.  DONTNEED drops the pages from this process, also ones other processes
#: share (another bcc tool's); on a private mapping a written page would lose what was written,
#: so it is given only for code (r-x).  PAGEOUT reclaims pages only this process maps, keeping
#: their content (a written page goes to swap, if any).
MADV_DONTNEED, MADV_PAGEOUT = 4, 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


class MemoryUse(NamedTuple):
    """A process's resident memory in bytes: anonymous (heap, stacks) and file-backed (code, mapped
    files, the ring buffer's pages), as /proc/PID/status counts them."""

    anonymous: int
    file: int

    @property
    def resident(self) -> int:
        """Both together: the RSS."""
        return self.anonymous + self.file


def memory_use(pid: int | str = "self") -> MemoryUse:
    """The resident memory of process ``pid`` now (zeros where /proc does not say)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return MemoryUse(fields.get("RssAnon", 0), fields.get("RssFile", 0) + fields.get("RssShmem", 0))


def compiler_mappings() -> list[tuple[int, int, str]]:
    """(start, end, permissions as /proc/PID/maps shows them) of this process's mappings of
    `COMPILER_LIBRARIES`."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or not os.path.basename(fields[5]).startswith(COMPILER_LIBRARIES):
                    continue
                start, _, end = fields[0].partition("-")
                out.append((int(start, 16), int(end, 16), fields[1]))
    except (OSError, ValueError):
        pass
    return out


def give_back() -> tuple[MemoryUse, MemoryUse]:
    """Trim the heap and page the compiler's libraries out; the memory use before and after."""
    before = memory_use()
    _libc.malloc_trim(0)
    for start, end, perms in compiler_mappings():
        code = perms.startswith("r-x")
        _libc.madvise(start, end - start, MADV_DONTNEED if code else MADV_PAGEOUT)  # PAGEOUT: EINVAL before 5.4
    return before, memory_use()


class HeapTrim:
    """Return the free heap to the kernel at most every ``interval`` seconds while capturing."""

    __slots__ = ("interval", "due", "done")

    def __init__(self, now: float, interval: float = HEAP_TRIM_INTERVAL_S) -> None:
        self.interval = interval
        self.due = now + interval
        self.done = 0
        """Trims so far."""

    def __call__(self, now: float) -> None:
        """Trim if the interval has passed since the last one (``now``: time.monotonic())."""
        if now >= self.due:
            _libc.malloc_trim(0)
            self.done += 1
            self.due = now + self.interval
