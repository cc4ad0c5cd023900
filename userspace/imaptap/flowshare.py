"""Which worker analyses which flow (``--workers N``): a symmetric hash of the 4-tuple.

The hash is FNV-1a (32 bits) over the two endpoints of the connection, the lower one first:
an endpoint is its address in network byte order (4 bytes for IPv4, 16 for IPv6) followed by
its port (2 bytes, big-endian), and the lower one is the one whose bytes compare lower.  Both
directions of a connection therefore hash alike, and the value depends on nothing but the
4-tuple (not on the run, the machine or Python's hash seed).  Worker ``i`` of ``N`` analyses the
flows whose hash, mixed by `share_of`, is ``i`` modulo ``N``.  The mixing matters: the low bits
of FNV-1a depend only on the low bits of the bytes, and Linux gives connect() even source ports
by preference, so one client host's connections all had one FNV-1a parity, and with two (or any
power-of-two) workers all went to one.  `_pcapfast.c` (replay) and bpf/imaptap.bpf.c (live
--workers) compute the same on the packet's bytes; this module is their reference
(tests/unit/test_flowshare.py, tests/live/test_live_workers.py compare them).

A worker still sees the time of every other worker's segment: a flow ends by idle timeout
when the capture clock moves, and that clock is every segment's time.  `FlowShare.wake` is the
time from which such a segment matters (the next idle sweep or round of ``--flow-interval``
records); the readers hand over the time of another worker's segment only from it on, and
count the rest.
"""

from __future__ import annotations

import math
import socket

#: The number of worker processes accepted at most: more than the cores of any machine this
#: runs on, each one reads the whole capture file.
MAX_WORKERS = 64

_FNV_OFFSET = 2166136261
_FNV_PRIME = 16777619
_MASK32 = 0xFFFFFFFF


def _endpoint(address: str, port: int) -> bytes:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return socket.inet_pton(family, address) + port.to_bytes(2, "big")


def flow_hash(src: str, sport: int, dst: str, dport: int) -> int:
    """The symmetric 32-bit hash of a connection (see the module's docstring)."""
    a, b = _endpoint(src, sport), _endpoint(dst, dport)
    if b < a:
        a, b = b, a
    h = _FNV_OFFSET
    for byte in a + b:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK32
    return h


def share_of(flow_hash: int, workers: int) -> int:
    """The worker (0-based) of ``workers`` that analyses a flow of this `flow_hash`: the hash
    through MurmurHash3's 32-bit finaliser, whose every output bit depends on every input bit,
    modulo ``workers``."""
    h = flow_hash
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    h ^= h >> 16
    return h % workers


class FlowShare:
    """The flows one worker analyses: worker ``index`` of ``workers``, and the state it shares
    with the C reader (`state`: the wake time as a double, then the count of other workers'
    segments passed over as an int64)."""

    __slots__ = ("workers", "index", "state", "_wake", "_skipped")

    def __init__(self, workers: int, index: int) -> None:
        if not 1 <= workers <= MAX_WORKERS or not 0 <= index < workers:
            raise ValueError(f"worker {index} of {workers}")
        self.workers = workers
        self.index = index
        self.state = bytearray(16)
        view = memoryview(self.state)
        self._wake = view[0:8].cast("d")
        self._skipped = view[8:16].cast("q")
        self._wake[0] = -math.inf  # before the first segment, any segment may move the clock

    def owns(self, src: str, sport: int, dst: str, dport: int) -> bool:
        """Whether this worker analyses the connection."""
        return share_of(flow_hash(src, sport, dst, dport), self.workers) == self.index

    @property
    def wake(self) -> float:
        """Another worker's segment at or after this time is handed over (its time only)."""
        return self._wake[0]

    @wake.setter
    def wake(self, ts: float) -> None:
        self._wake[0] = ts

    @property
    def skipped(self) -> int:
        """Other workers' segments seen so far, handed over or not."""
        return self._skipped[0]

    def skip(self) -> None:
        """Count one segment of another worker's flow (the Python readers; C counts its own)."""
        self._skipped[0] += 1

    def config(self) -> tuple[int, int, bytearray]:
        """What `_pcapfast.scan` takes of the share."""
        return (self.workers, self.index, self.state)
