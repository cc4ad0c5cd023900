"""The kernel's records turned into `Segment`s: ring or perf buffer callbacks, polling, counters.

A record is struct imaptap_event (`abi.EVENT_HEADER`), then ``cap_len`` bytes from the start of
the payload, then ``tail_len`` bytes from its end.  A record too short for what it announces is
counted as malformed and dropped, never raised.
"""

from __future__ import annotations

import ctypes
import socket
import time
from typing import TYPE_CHECKING

from imaptap.capture.live.abi import COUNTER_NAMES, EVENT_HEADER, MAP_COUNTERS, MAP_EVENTS
from imaptap.segment import Segment

if TYPE_CHECKING:  # imported only when a capture starts
    from bcc import BPF

#: Default ring buffer size: 4 MiB holds ~9,000 records of a long segment (72-byte header,
#: 256-byte head, 128-byte tail), a second or two of a busy server's IMAP segments while the
#: analyzer is slow; overflow is counted as ``lost``.  ``buffer_bytes`` changes it.
RING_PAGES = 1024
#: Largest ring buffer accepted (BPF ring buffers are limited to a few GiB; this is plenty).
MAX_RING_BYTES = 1 << 30
#: Perf buffer (kernels < 5.8) pages per CPU; ``buffer_bytes`` does not apply to it.
PERF_PAGES_PER_CPU = 256
#: Records handed out by one poll(); the rest stay in the buffer for the next one, so a burst
#: cannot starve the analyzer or grow memory without bound.
MAX_BATCH = 8192

#: poll() under load: while records arrive at BUSY_RATE per second or more (measured over
#: RATE_WINDOW_S), each poll waits LINGER_S after the wake-up and takes everything that came
#: meanwhile, since a wake-up per record or two costs more CPU than decoding them (measured:
#: ~17 us a segment without, ~7-10 with).  Below that rate nothing waits, so an interactive
#: session's STARTTLS or COMPRESS reaches the kernel's per-flow map without delay.
BUSY_RATE = 1000
RATE_WINDOW_S = 0.1
LINGER_S = 0.002

#: Address texts remembered by the decoder before it starts over.
ADDR_CACHE_MAX = 4096

#: Clock readings taken to pair CLOCK_MONOTONIC with the wall clock; the tightest pair wins.
CLOCK_SAMPLES = 3

_HEADER_LEN = EVENT_HEADER.size


def kernel_counters(bpf) -> dict[str, int]:
    """struct imaptap_counters summed over CPUs; all zero without a loaded program."""
    totals = dict.fromkeys(COUNTER_NAMES, 0)
    if bpf is not None:
        per_cpu = bpf[MAP_COUNTERS].getvalue(ctypes.c_int(0))
        for c in per_cpu:
            for name in totals:
                totals[name] += getattr(c, name)
    return totals


class RecordReader:
    """Reads the events map of a loaded program: records decoded into `Segment`s, in batches.

    ``received``, ``malformed`` and ``perf_lost`` count what userspace saw; the kernel counts
    the rest (`kernel_counters`).
    """

    def __init__(self) -> None:
        self._bpf: BPF | None = None
        self._ringbuf = True
        self._pending: list[Segment] = []
        self._addr4: dict[bytes, str] = {}
        self._addr6: dict[bytes, str] = {}
        self._offset_ns = 0
        self._draining = False
        self._busy = False
        self._window_start = time.monotonic()
        self._window_records = 0
        self.received = 0
        """Records decoded into segments."""
        self.malformed = 0
        """Records shorter than their header or than the lengths it announces."""
        self.perf_lost = 0
        """Records the perf buffer reported lost (a ring buffer counts them in the kernel)."""

    def open(self, bpf: BPF, ringbuf: bool, name: bytes = MAP_EVENTS) -> None:
        """Start reading ``bpf``'s events map ``name``, a ring buffer if ``ringbuf`` else a perf buffer."""
        table = bpf[name]
        if ringbuf:
            table.open_ring_buffer(self._on_ring_record)
        else:
            table.open_perf_buffer(self._on_perf_record, page_cnt=PERF_PAGES_PER_CPU, lost_cb=self._on_perf_lost)
        self._bpf, self._ringbuf = bpf, ringbuf

    def close(self) -> None:
        """Take what is left in the buffer for one last poll(), then stop reading it."""
        if self._bpf is not None:
            self._drain(self._bpf)
        self._bpf = None

    def refresh_clock(self) -> None:
        """bpf_ktime_get_ns() is CLOCK_MONOTONIC; keep the offset to the wall clock current."""
        best: tuple[int, int] | None = None
        for _ in range(CLOCK_SAMPLES):
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            wall = time.time_ns()
            t2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or t2 - t1 < best[0]:
                best = (t2 - t1, wall - (t1 + t2) // 2)
        assert best is not None, "CLOCK_SAMPLES is at least 1"
        self._offset_ns = best[1]

    def decode(self, raw: bytes) -> Segment | None:
        """One record as a `Segment`; None (and counted) if it is malformed."""
        if len(raw) < _HEADER_LEN:
            self.malformed += 1
            return None
        (ts_ns, saddr, daddr, seq, ack, wire_len, ifindex, cap_len, sport, dport, ipver, flags,
         _hook, _mode, tail_len) = EVENT_HEADER.unpack_from(raw)
        if cap_len + tail_len > len(raw) - _HEADER_LEN:
            self.malformed += 1
            return None
        names = self._addr4 if ipver == 4 else self._addr6
        src = names.get(saddr)
        if src is None:
            src = self._name(ipver, saddr)
        dst = names.get(daddr)
        if dst is None:
            dst = self._name(ipver, daddr)
        self.received += 1
        head_end = _HEADER_LEN + cap_len
        return Segment((ts_ns + self._offset_ns) / 1e9, ipver, src, dst, sport, dport, seq, ack, flags,
                       wire_len, raw[_HEADER_LEN:head_end], ifindex,
                       raw[head_end:head_end + tail_len] if tail_len else b"")

    def _name(self, ipver: int, addr: bytes) -> str:
        """Text of an address, remembered: a busy server has few peers, and inet_ntop per
        segment is a third of the decoding cost."""
        # One table per version: 10.0.0.1 and a00:1:: have the same 16 bytes.
        if ipver == 4:
            names, text = self._addr4, socket.inet_ntop(socket.AF_INET, addr[:4])
        else:
            names, text = self._addr6, socket.inet_ntop(socket.AF_INET6, addr)
        if len(names) >= ADDR_CACHE_MAX:
            names.clear()
        names[addr] = text
        return text

    def _on_ring_record(self, _ctx, data, size) -> int:
        seg = self.decode(ctypes.string_at(data, size))
        if seg is not None:
            self._pending.append(seg)
        # A negative return stops this poll after the current record (which is kept).
        return -1 if len(self._pending) >= MAX_BATCH and not self._draining else 0

    def _on_perf_record(self, _cpu, data, size) -> None:
        seg = self.decode(ctypes.string_at(data, size))
        if seg is not None:
            self._pending.append(seg)

    def _on_perf_lost(self, count) -> None:
        self.perf_lost += count

    def _drain(self, bpf: BPF) -> None:
        self._draining = True
        try:
            while True:
                before = len(self._pending)
                if self._ringbuf:
                    bpf.ring_buffer_consume()
                else:
                    bpf.perf_buffer_consume()
                if len(self._pending) == before:
                    break
        except Exception:
            pass  # never opened: nothing to read
        finally:
            self._draining = False
        if not self._ringbuf:
            self._pending.sort(key=lambda s: s.ts)

    def poll(self, timeout_ms: int) -> list[Segment]:
        """Segments received since the last call, in arrival order; waits up to timeout_ms for the first.

        After `close`, one more call returns the segments that were still in the buffer (then nothing)."""
        if self._bpf is None:
            out, self._pending = self._pending, []
            return out
        self.refresh_clock()
        if not self._pending:
            if self._ringbuf:
                self._bpf.ring_buffer_poll(timeout_ms)
                if self._busy and 0 < len(self._pending) < MAX_BATCH:
                    # Under load, wait a moment and take what came meanwhile: a wake-up per
                    # few records costs more CPU than decoding them.  Idle flows are not delayed.
                    time.sleep(LINGER_S)
                    self._bpf.ring_buffer_consume()
                self._measure_rate(len(self._pending))
            else:
                self._bpf.perf_buffer_poll(timeout_ms)
                # Per-CPU buffers: restore the order across CPUs.
                self._pending.sort(key=lambda s: s.ts)
        out, self._pending = self._pending, []
        return out

    def _measure_rate(self, records: int) -> None:
        """Decide whether poll() lingers: records per second over the last RATE_WINDOW_S."""
        self._window_records += records
        now = time.monotonic()
        if now - self._window_start >= RATE_WINDOW_S:
            self._busy = self._window_records >= BUSY_RATE * (now - self._window_start)
            self._window_start, self._window_records = now, 0
