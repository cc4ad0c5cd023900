"""Live capture: the kernel program in bpf/ attached with BCC, turned into `Segment`s.

The kernel parses every packet on the chosen interfaces and hands over only TCP segments of the
monitored ports, with at most the snap length of payload (none for flows the analyzer marked
encrypted, whole payloads for compressed ones).  Ingress is XDP (native where the driver has it,
else generic), egress is a TC clsact filter; ``use_xdp=False`` puts TC on ingress too.

This is the only module that imports bcc and pyroute2, and it does so when a capture starts,
so ``imaptap -D`` and everything else work on machines without them.

Attach and detach are careful because XDP programs and TC filters outlive the process that
added them: everything added is removed in ``__exit__`` (signals held off meanwhile), and a
start after a SIGKILL finds the previous run's programs by name (``imaptap_*``) and replaces
them.  Another tool's XDP program is never touched.

Kernel headers: BCC compiles bpf/imaptap.bpf.c against /lib/modules/$(uname -r)/build.  The
program uses only UAPI structures, so on kernels without a header package (custom and cloud
kernels) the distribution's generic headers linked there are sound; scripts/setup does that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from imaptap import privileges
from imaptap.capture.live.abi import (
    COUNTER_NAMES,
    EVENT_HEADER,
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_FLOW_MODES,
    PERF_PAYLOAD_CAP,
    PROG_PREFIX,
    PROG_TC_EG,
    PROG_TC_IN,
    PROG_XDP,
    EventHeader,
    KernelConfig,
    KernelCounters,
    KernelFlowKey,
    bpf_source_dir,
    kernel_config,
)
from imaptap.capture.live.attach import (
    TC_HANDLE,
    TC_PARENT_EGRESS,
    TC_PARENT_INGRESS,
    TC_PRIO,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    Attachments,
    SignalsHeld,
)
from imaptap.capture.live.errors import LiveError
from imaptap.capture.live.interfaces import (
    attr_value,
    default_interface,
    interface_gone,
    link_kind,
    list_interfaces,
    nested_attrs,
)
from imaptap.capture.live.kernel import (
    MIN_KERNEL,
    bpf_syscall,
    has_ringbuf,
    has_xdp_load_bytes,
    imaptap_pids,
    kernel_headers_present,
    kernel_version,
    missing_capabilities,
    prog_fd_by_id,
    prog_holders,
    prog_info,
    prog_name_by_id,
    prog_owner,
)
from imaptap.capture.live.policy import KernelPayloadPolicy, kernel_flow_key
from imaptap.segment import DEFAULT_TAILLEN, WHOLE_PAYLOAD_CAP, Segment


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

_HEADER_LEN = EVENT_HEADER.size

# The old single module's private names that scripts/bench-live and tests/live call.
_bpf = bpf_syscall
_prog_holders = prog_holders


# --- the capture ---------------------------------------------------------------------------------


class LiveCapture:
    """A running kernel capture on some interfaces; a context manager that detaches everything.

    ``poll()`` returns the `Segment`s that arrived since the last call; ``policy`` is the
    `PayloadPolicy` the analyzer must use so its decisions reach the kernel.
    """

    def __init__(self, interfaces: list[str], ports: set[int], snaplen: int,
                 xdp_mode: str | None = None, use_xdp: bool = True, *,
                 taillen: int = DEFAULT_TAILLEN, buffer_bytes: int | None = None,
                 output: str | None = None, user: str | None = None) -> None:
        """``taillen``: bytes also copied from the end of a segment longer than ``snaplen``
        (see `segment.split_payload`).  ``buffer_bytes``: ring buffer size (rounded up to a
        power-of-two number of pages; default RING_PAGES pages), like tcpdump's -B: room for
        bursts while the analyzer is busy.  ``output``: "ringbuf" or "perf" to force one
        (tests); default: the ring buffer where the kernel has it."""
        if not interfaces:
            raise LiveError("no interface to capture on")
        self.interfaces = list(dict.fromkeys(interfaces))
        bad = sorted(p for p in ports if not 0 < p < 65536)
        if bad or not ports:
            raise LiveError(f"bad port {bad[0] if bad else '(none given)'}: ports are 1-65535")
        self.ports = set(ports)
        if xdp_mode not in (None, "native", "skb"):
            raise LiveError(f"bad XDP mode {xdp_mode!r}: use native or skb")
        self.xdp_mode = xdp_mode
        self.use_xdp = use_xdp
        if output not in (None, "ringbuf", "perf"):
            raise ValueError(output)
        self._output = output
        if not 0 <= snaplen <= WHOLE_PAYLOAD_CAP:
            raise LiveError(f"bad snap length {snaplen}: 0-{WHOLE_PAYLOAD_CAP}")
        if not 0 <= taillen <= WHOLE_PAYLOAD_CAP:
            raise LiveError(f"bad tail length {taillen}: 0-{WHOLE_PAYLOAD_CAP}")
        self.snaplen = snaplen
        self.taillen = taillen
        page = os.sysconf("SC_PAGE_SIZE")
        if buffer_bytes is None:
            self.ring_pages = RING_PAGES
        elif not page <= buffer_bytes <= MAX_RING_BYTES:
            raise LiveError(f"bad buffer size {buffer_bytes}: {page}-{MAX_RING_BYTES} bytes")
        else:
            self.ring_pages = 1 << (-(-buffer_bytes // page) - 1).bit_length()
        self.policy = KernelPayloadPolicy(snaplen, taillen)
        self.user = user
        self.privileges = None
        """`privileges.Dropped` once ``user`` was applied."""
        self.notes: list[str] = []
        """Things the user should know about how the capture runs (fallbacks taken)."""
        self.ringbuf = True
        self.xdp_modes: dict[str, str] = {}
        """Interface -> "native" or "skb" for interfaces with XDP attached."""
        self._bpf = None
        self._ipr = None
        self._fns: dict[str, object] = {}
        self._attachments: Attachments | None = None
        self._pending: list[Segment] = []
        self._addr4: dict[bytes, str] = {}
        self._addr6: dict[bytes, str] = {}
        self._offset_ns = 0
        self._received = 0
        self._malformed = 0
        self._perf_lost = 0
        self._draining = False
        self._busy = False
        self._window_start = time.monotonic()
        self._window_records = 0

    # --- start ---------------------------------------------------------------------------------

    def __enter__(self) -> "LiveCapture":
        indexes = {}
        for name in self.interfaces:
            try:
                indexes[name] = socket.if_nametoindex(name)
            except OSError:
                raise LiveError(f"no such interface: {name} (imaptap -D lists them)") from None
        missing = missing_capabilities()
        if missing:
            raise LiveError("live capture needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
                            f" (missing {', '.join(missing)})")
        if kernel_version() < MIN_KERNEL:
            raise LiveError(f"live capture needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or later (bounded loops in"
                            f" BPF); this is {platform.release()}")
        try:
            import bcc  # noqa: F401
        except ImportError:
            raise LiveError("bcc is missing: install python3-bpfcc (Debian/Ubuntu) and run imaptap with"
                            " a Python that sees system packages") from None
        try:
            from pyroute2 import IPRoute
        except ImportError:
            raise LiveError("pyroute2 is missing: pip install pyroute2 (or install python3-pyroute2)") from None

        use_xdp = self.use_xdp
        if use_xdp and not has_xdp_load_bytes():
            if self.xdp_mode is not None:
                raise LiveError(f"XDP capture needs kernel 5.18+ (bpf_xdp_load_bytes); this is "
                                f"{platform.release()}: use --no-xdp")
            use_xdp = False
            self.notes.append(f"kernel {platform.release()} lacks bpf_xdp_load_bytes (5.18+): "
                              "capturing ingress with TC instead of XDP")
        self.use_xdp = use_xdp
        self.ringbuf = has_ringbuf() if self._output is None else self._output == "ringbuf"
        if self.snaplen + self.taillen > self.max_copy():
            raise LiveError(f"snap length {self.snaplen} plus tail length {self.taillen} exceed what the"
                            f" kernel program copies with a perf buffer ({self.max_copy()})")

        self._ipr = IPRoute()
        self._attachments = Attachments(self._ipr)
        try:
            stale = self._attachments.find_stale(indexes, self.use_xdp)
            if not kernel_headers_present():
                r = platform.release()
                raise LiveError(f"kernel headers for {r} are missing: install linux-headers-{r}, or on a"
                                f" kernel without a header package link the distribution's generic"
                                f" headers to /lib/modules/{r}/build and source (scripts/setup does this)")
            self._load()            # seconds of compiling: Ctrl-C stays possible here
            self._open_output()
            self._refresh_clock()
            with SignalsHeld():
                for item in stale:
                    note = item.remove(self._ipr)
                    if note is not None:
                        self.notes.append(note)
                self._attach(indexes)
            if self.user is not None:
                self._drop_privileges()
        except BaseException:
            try:
                self.close()
            except LiveError:
                pass  # the original error matters more
            raise
        return self

    def _drop_privileges(self) -> None:
        try:
            self.privileges = privileges.drop(self.user)
        except (privileges.PrivilegeError, OSError) as exc:
            raise LiveError(f"cannot drop privileges to {self.user}: {exc}") from None
        if self.privileges.note:
            self.notes.append(self.privileges.note)

    def max_copy(self) -> int:
        """Most payload bytes one record carries: WHOLE mode is cut to it, snap + tail length may not exceed it."""
        return 2 * WHOLE_PAYLOAD_CAP if self.ringbuf else PERF_PAYLOAD_CAP

    def _load(self) -> None:
        import bcc

        src = bpf_source_dir()
        cflags = [f"-I{src}", f"-DIMAPTAP_RINGBUF={int(self.ringbuf)}", f"-DIMAPTAP_XDP={int(self.use_xdp)}",
                  f"-DIMAPTAP_RING_PAGES={self.ring_pages}", f"-DIMAPTAP_SNAPLEN={self.snaplen}",
                  f"-DIMAPTAP_TAILLEN={self.taillen}"]
        try:
            self._bpf = bcc.BPF(src_file=str(src / "imaptap.bpf.c").encode(), cflags=cflags)
        except Exception as exc:
            raise LiveError(f"the kernel program did not compile ({exc}); the compiler's messages are"
                            f" above; kernel headers: /lib/modules/{platform.release()}/build") from None
        wanted = [(PROG_TC_EG, bcc.BPF.SCHED_CLS)]
        wanted.append((PROG_XDP, bcc.BPF.XDP) if self.use_xdp else (PROG_TC_IN, bcc.BPF.SCHED_CLS))
        for fname, ptype in wanted:
            try:
                self._fns[fname] = self._bpf.load_func(fname.encode(), ptype)
            except Exception as exc:
                raise LiveError(f"the kernel refused the BPF program {fname} ({exc}); the verifier's log"
                                " is above") from None
        self._check_layout()
        self._bpf[MAP_CONFIG][ctypes.c_int(0)] = kernel_config(self.ports)
        self.policy.bind(self._bpf[MAP_FLOW_MODES])

    def _check_layout(self) -> None:
        """The ctypes mirrors must match what BCC compiled (imaptap.h changed without abi.py?)."""
        b = self._bpf
        sizes = [("config", b[MAP_CONFIG].Leaf, KernelConfig), ("flow_modes", b[MAP_FLOW_MODES].Key, KernelFlowKey),
                 ("counters", b[MAP_COUNTERS].sLeaf, KernelCounters)]
        for table, compiled, mirror in sizes:
            if ctypes.sizeof(compiled) != ctypes.sizeof(mirror):
                raise LiveError(f"internal error: bpf/imaptap.h and capture/live/abi.py disagree on {table}")

    def _open_output(self) -> None:
        table = self._bpf[MAP_EVENTS]
        if self.ringbuf:
            table.open_ring_buffer(self._on_ring_record)
        else:
            table.open_perf_buffer(self._on_perf_record, page_cnt=PERF_PAGES_PER_CPU, lost_cb=self._on_perf_lost)

    def _attach(self, indexes: dict[str, int]) -> None:
        tc = [(TC_PARENT_EGRESS, PROG_TC_EG)]
        if not self.use_xdp:
            tc.insert(0, (TC_PARENT_INGRESS, PROG_TC_IN))
        for name, index in indexes.items():
            if self.use_xdp:
                mode = self._attachments.attach_xdp(name, index, self._fns[PROG_XDP].fd, self.xdp_mode)
                self.xdp_modes[name] = mode
                if mode == "native" and link_kind(self._ipr, index) == "veth":
                    self.notes.append(f"{name} is a veth: with any XDP program on it the kernel turns off"
                                      " segmentation offload on its peer, which can cost most of the"
                                      " throughput into it; --no-xdp captures with TC instead")
            self._attachments.attach_tc(name, index, [(parent, prog, self._fns[prog].fd) for parent, prog in tc])

    # --- stop ----------------------------------------------------------------------------------

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Detach everything this capture attached; safe to call twice."""
        with SignalsHeld():
            self._teardown()

    def _teardown(self) -> None:
        problems = self._attachments.undo_all() if self._attachments is not None else []
        if self._bpf is not None:
            self._drain()
            self._final_counters = self._read_counters()
            bpf, self._bpf = self._bpf, None
            self.policy.unbind()
            _close_bpf(bpf)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if problems:
            raise LiveError("could not detach everything: " + "; ".join(problems))

    # --- records -------------------------------------------------------------------------------

    def _refresh_clock(self) -> None:
        """bpf_ktime_get_ns() is CLOCK_MONOTONIC; keep the offset to the wall clock current."""
        best = None
        for _ in range(3):
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            wall = time.time_ns()
            t2 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or t2 - t1 < best[0]:
                best = (t2 - t1, wall - (t1 + t2) // 2)
        self._offset_ns = best[1]

    def _decode(self, raw: bytes) -> Segment | None:
        if len(raw) < _HEADER_LEN:
            self._malformed += 1
            return None
        (ts_ns, saddr, daddr, seq, ack, wire_len, ifindex, cap_len, sport, dport, ipver, flags,
         _hook, _mode, tail_len) = EVENT_HEADER.unpack_from(raw)
        if cap_len + tail_len > len(raw) - _HEADER_LEN:
            self._malformed += 1
            return None
        names = self._addr4 if ipver == 4 else self._addr6
        src = names.get(saddr)
        if src is None:
            src = self._name(ipver, saddr)
        dst = names.get(daddr)
        if dst is None:
            dst = self._name(ipver, daddr)
        self._received += 1
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
        seg = self._decode(ctypes.string_at(data, size))
        if seg is not None:
            self._pending.append(seg)
        # A negative return stops this poll after the current record (which is kept).
        return -1 if len(self._pending) >= MAX_BATCH and not self._draining else 0

    def _on_perf_record(self, _cpu, data, size) -> None:
        seg = self._decode(ctypes.string_at(data, size))
        if seg is not None:
            self._pending.append(seg)

    def _on_perf_lost(self, count) -> None:
        self._perf_lost += count

    def _drain(self) -> None:
        """After detaching: read what is left in the buffer, for one last poll()."""
        self._draining = True
        try:
            while True:
                before = len(self._pending)
                if self.ringbuf:
                    self._bpf.ring_buffer_consume()
                else:
                    self._bpf.perf_buffer_consume()
                if len(self._pending) == before:
                    break
        except Exception:
            pass  # never opened: nothing to read
        finally:
            self._draining = False
        if not self.ringbuf:
            self._pending.sort(key=lambda s: s.ts)

    def poll(self, timeout_ms: int) -> list[Segment]:
        """Segments received since the last call, in arrival order; waits up to timeout_ms for the first.

        After the capture is closed, one more call returns the segments that were still in the
        buffer when it was detached (then nothing)."""
        if self._bpf is None:
            out, self._pending = self._pending, []
            return out
        self._refresh_clock()
        if not self._pending:
            if self.ringbuf:
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

    def _read_counters(self) -> dict[str, int]:
        totals = dict.fromkeys(COUNTER_NAMES, 0)
        if self._bpf is not None:
            per_cpu = self._bpf[MAP_COUNTERS].getvalue(ctypes.c_int(0))
            for c in per_cpu:
                for name in totals:
                    totals[name] += getattr(c, name)
        return totals

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs (seen, matched, submitted, lost, unparsed, copy_failed)
        and userspace ones (received, malformed, perf_lost, policy_errors)."""
        kernel = self._read_counters() if self._bpf is not None else getattr(self, "_final_counters", None)
        out = dict(kernel or dict.fromkeys(COUNTER_NAMES, 0))
        out["lost"] += self._perf_lost
        out.update(received=self._received, malformed=self._malformed, perf_lost=self._perf_lost,
                   policy_errors=self.policy.kernel_errors)
        return out

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """Program name -> (run_time_ns, run_cnt); non-zero only with kernel.bpf_stats_enabled=1."""
        out = {}
        for name, fn in self._fns.items():
            if self._bpf is not None:
                _, ns, cnt = prog_info(fn.fd)
                out[name] = (ns, cnt)
        return out


def _close_bpf(bpf) -> None:
    """Free what BCC holds: program and map fds, the ring buffer reader, the module."""
    from bcc import libbcc

    mgr = getattr(bpf, "_ringbuf_manager", None)
    if mgr:
        libbcc.lib.bpf_free_ringbuf(mgr)
        bpf._ringbuf_manager = None
    try:
        bpf.cleanup()
    except Exception:
        pass
