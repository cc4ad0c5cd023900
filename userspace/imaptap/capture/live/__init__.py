"""Live capture: the kernel program in bpf/ attached with BCC, turned into `Segment`s.

The kernel parses every packet on the chosen interfaces and hands over only TCP segments of the
monitored ports, with at most the snap length of payload (none for flows the analyzer marked
encrypted, whole payloads for compressed ones).  Ingress is XDP (native where the driver has it,
else generic), egress is a TC clsact filter; ``use_xdp=False`` puts TC on ingress too.

This is the only package that imports bcc and pyroute2, and it does so when a capture starts,
so ``imaptap -D`` and everything else work on machines without them.  Its modules, one job each:

- `abi`: ctypes and struct mirrors of bpf/imaptap.h, program and map names;
- `interfaces`: the default route's interface, the interface list, link kinds, link events;
- `kernel`: kernel version and feature probes, capabilities, raw bpf(2) calls, program owners;
- `policy`: the per-flow payload policy written to the kernel's map;
- `attach`: attach and detach of XDP and TC (BPF links, else netlink), with the undo log;
- `ring`: records decoded into `Segment`s, ring and perf buffer polling, counters;
- `memory`: giving back what compiling the program left behind;

and `LiveCapture` below composes them.  It also follows its interfaces by name: one that goes
away (a container's veth deleted with it) is noticed from the kernel's link messages at the
next poll, and the programs are attached again when an interface of that name returns.

Every name other code used from the single module this package replaces is still importable
from here.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imaptap import privileges
from imaptap.capture.live.abi import (
    COUNTER_NAMES,
    EVENT_HEADER,
    LIVE_MAX_WORKERS,
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
    program_cflags,
    ring_map,
)
from imaptap.capture.live.attach import (
    ATTACH_ENV,
    TC_HANDLE,
    TC_PARENT_EGRESS,
    TC_PARENT_INGRESS,
    TC_PRIO,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    Attached,
    Attachments,
    AttachMethod,
    Hook,
    SignalsHeld,
)
from imaptap.capture.live.errors import LiveError
from imaptap.capture.live.interfaces import (
    IFF_USABLE,
    LinkChange,
    LinkMessage,
    LinkMonitor,
    default_interface,
    interface_index,
    interface_usable,
    link_kind,
    list_interfaces,
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
from imaptap.capture.live.memory import HeapTrim, MemoryUse, give_back
from imaptap.capture.live.policy import KernelPayloadPolicy, kernel_flow_key
from imaptap.capture.live.ring import (
    ADDR_CACHE_MAX,
    BUSY_RATE,
    LINGER_S,
    MAX_BATCH,
    MAX_RING_BYTES,
    PERF_PAGES_PER_CPU,
    RATE_WINDOW_S,
    RING_PAGES,
    RecordReader,
    kernel_counters,
)
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_TAILLEN, WHOLE_PAYLOAD_CAP, Segment

if TYPE_CHECKING:  # both are imported only when a capture starts
    from bcc import BPF
    from pyroute2 import IPRoute

__all__ = [
    "ADDR_CACHE_MAX", "ATTACH_ENV", "BUSY_RATE", "EVENT_HEADER", "LINGER_S", "MAX_BATCH", "MAX_RING_BYTES",
    "MIN_KERNEL", "PERF_PAGES_PER_CPU", "PERF_PAYLOAD_CAP", "PROG_PREFIX", "PROG_TC_EG", "PROG_TC_IN", "PROG_XDP",
    "RATE_WINDOW_S", "RING_PAGES", "TC_HANDLE", "TC_PARENT_EGRESS", "TC_PARENT_INGRESS", "TC_PRIO",
    "WHOLE_PAYLOAD_CAP", "XDP_FLAGS_DRV_MODE", "XDP_FLAGS_REPLACE", "XDP_FLAGS_SKB_MODE",
    "XDP_FLAGS_UPDATE_IF_NOEXIST", "AttachMethod", "Attached", "EventHeader", "Hook", "KernelConfig",
    "KernelCounters", "KernelFlowKey", "KernelPayloadPolicy", "LiveCapture", "LiveError", "MemoryUse", "ordinal",
    "bpf_source_dir", "bpf_syscall", "default_interface", "has_ringbuf", "has_xdp_load_bytes", "imaptap_pids",
    "kernel_flow_key", "kernel_headers_present", "kernel_version", "list_interfaces", "missing_capabilities",
    "prog_fd_by_id", "prog_holders", "prog_info", "prog_name_by_id", "prog_owner", "program_cflags",
]

# The old single module's private names that scripts/bench-live and tests/live call.
_bpf = bpf_syscall
_prog_holders = prog_holders

#: Notes kept of what happened after the start (an interface gone, back, down, up): the latest
#: ones, so a link that flaps for months cannot grow them; the counters keep the totals.
RECENT_NOTES = 32
#: The maps userspace reads or writes after the start; bcc's module goes once they are fetched.
MAPS_USED = (MAP_CONFIG, MAP_COUNTERS, MAP_FLOW_MODES, MAP_EVENTS)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st: the notes of recurring events differ by it."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(slots=True)
class WatchedInterface:
    """An interface captured on, followed by name: where it is now and whether traffic crosses it."""

    name: str
    index: int | None
    """Its index while our programs are on it; None while there is none of that name."""
    usable: bool
    """Up and running."""
    refused: int | None = None
    """An index the programs could not be attached to: not tried again until another comes."""


class LiveCapture:
    """A running kernel capture on some interfaces; a context manager that detaches everything.

    ``poll()`` returns the `Segment`s that arrived since the last call; ``policy`` is the
    `PayloadPolicy` the analyzer must use so its decisions reach the kernel.
    """

    def __init__(self, interfaces: list[str], ports: set[int], snaplen: int,
                 xdp_mode: str | None = None, use_xdp: bool = True, *,
                 taillen: int = DEFAULT_TAILLEN, handshake_snaplen: int = DEFAULT_HANDSHAKE_SNAPLEN,
                 buffer_bytes: int | None = None, output: str | None = None, user: str | None = None,
                 attach: str | None = None, workers: int = 1) -> None:
        """``taillen``: bytes also copied from the end of a segment longer than ``snaplen``
        (see `segment.split_payload`).  ``handshake_snaplen``: bytes copied from the start of
        a segment instead while the flow's handshake lasts (`PayloadMode.HANDSHAKE`; 0:
        never).  ``buffer_bytes``: ring buffer size (rounded up to a power-of-two number of
        pages; default RING_PAGES pages), like tcpdump's -B: room for bursts while the
        analyzer is busy.  ``output``: "ringbuf" or "perf" to force one
        (tests); default: the ring buffer where the kernel has it.  ``attach``: "link" (BPF links
        where the kernel has them, the default) or "netlink" (the fallback, forced); None reads
        the environment variable ATTACH_ENV.  ``workers``: above 1, the program spreads the
        records over that many ring buffers by flow (`workers.LiveWorkers` reads them, one
        forked process each); this object then reads none and `poll` only follows the links."""
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
        method = attach if attach is not None else os.environ.get(ATTACH_ENV) or AttachMethod.LINK.value
        try:
            self.attach_method = AttachMethod(method)
        except ValueError:
            raise LiveError(f"bad {ATTACH_ENV} {method!r}: use link or netlink") from None
        if not 0 <= snaplen <= WHOLE_PAYLOAD_CAP:
            raise LiveError(f"bad snap length {snaplen}: 0-{WHOLE_PAYLOAD_CAP}")
        if not 0 <= taillen <= WHOLE_PAYLOAD_CAP:
            raise LiveError(f"bad tail length {taillen}: 0-{WHOLE_PAYLOAD_CAP}")
        if not 0 <= handshake_snaplen <= WHOLE_PAYLOAD_CAP:
            raise LiveError(f"bad handshake snap length {handshake_snaplen}: 0-{WHOLE_PAYLOAD_CAP}")
        self.snaplen = snaplen
        self.taillen = taillen
        if not 1 <= workers <= LIVE_MAX_WORKERS:
            raise LiveError(f"bad worker count {workers}: live capture takes 1-{LIVE_MAX_WORKERS}")
        self.workers = workers
        page = os.sysconf("SC_PAGE_SIZE")
        if buffer_bytes is None:
            self.ring_pages = RING_PAGES
        elif not page <= buffer_bytes <= MAX_RING_BYTES:
            raise LiveError(f"bad buffer size {buffer_bytes}: {page}-{MAX_RING_BYTES} bytes")
        else:
            self.ring_pages = 1 << (-(-buffer_bytes // page) - 1).bit_length()
        self.policy = KernelPayloadPolicy(snaplen, taillen, handshake_snaplen)
        self.user = user
        self.privileges: privileges.Dropped | None = None
        """`privileges.Dropped` once ``user`` was applied."""
        self.notes: list[str] = []
        """Things the user should know about how the capture runs: fallbacks taken at the start,
        then the latest RECENT_NOTES of what happened since (interfaces gone, back, down, up)."""
        self._startup_notes = 0
        self.memory: tuple[MemoryUse, MemoryUse] | None = None
        """Resident memory once the programs were attached, before and after `memory.give_back`."""
        self.interface_gone = 0
        """Times an interface captured on went away (deleted, renamed)."""
        self.interface_down = 0
        """Times one went down (administratively, or lost its carrier or peer)."""
        self.reattached = 0
        """Times the programs were attached again to an interface that came back."""
        self._ups = 0
        self._watched: dict[str, WatchedInterface] = {}
        self._links: LinkMonitor | None = None
        self._veth_noted: set[str] = set()
        self._map_fds: list[int] = []
        self.ringbuf = True
        self.xdp_modes: dict[str, str] = {}
        """Interface -> "native" or "skb" for interfaces with XDP attached."""
        self._bpf: BPF | None = None
        self._ipr: IPRoute | None = None
        self._attachments: Attachments | None = None
        self._fns: dict[str, BPF.Function] = {}
        self._reader = RecordReader()
        self._final_counters: dict[str, int] | None = None
        self.heap_trim: HeapTrim | None = None
        """Gives the free heap back now and then while capturing (`memory.HeapTrim`)."""

    # --- start ---------------------------------------------------------------------------------

    def __enter__(self) -> LiveCapture:
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
        if self.workers > 1 and not self.ringbuf:
            raise LiveError(f"--workers {self.workers} with live capture needs the BPF ring buffer (Linux 5.8+);"
                            f" {platform.release()} has only the perf buffer: use one worker")
        longest_head = max(self.snaplen, self.policy.handshake_snaplen)
        if longest_head + self.taillen > self.max_copy():
            what = "snap length" if longest_head == self.snaplen else "handshake snap length"
            raise LiveError(f"{what} {longest_head} plus tail length {self.taillen} exceed what the"
                            f" kernel program copies with a perf buffer ({self.max_copy()})")

        self._ipr = IPRoute()
        self._attachments = Attachments(self._ipr, self.attach_method)
        try:
            # Listening first: an interface that goes while the programs are being attached is seen.
            self._links = LinkMonitor()
            stale = self._attachments.find_stale(indexes, self.use_xdp)
            if not kernel_headers_present():
                r = platform.release()
                raise LiveError(f"kernel headers for {r} are missing: install linux-headers-{r}, or on a"
                                f" kernel without a header package link the distribution's generic"
                                f" headers to /lib/modules/{r}/build and source (scripts/setup does this)")
            self._load()            # seconds of compiling: Ctrl-C stays possible here
            self._open_output()
            self._reader.refresh_clock()
            with SignalsHeld():
                for item in stale:
                    note = item.remove(self._ipr)
                    if note is not None:
                        self.notes.append(note)
                self.notes += self._attach(indexes)
            for name, index in indexes.items():
                usable = self._link_flags(index) & IFF_USABLE == IFF_USABLE
                self._watched[name] = WatchedInterface(name, index, usable)
                if not usable:
                    self.notes.append(f"{name} is down: nothing to capture on it until it is up")
            self.memory = give_back()
            self.heap_trim = HeapTrim(time.monotonic())
            if self.user is not None:
                self._drop_privileges(self.user)
            self._startup_notes = len(self.notes)
        except BaseException:
            try:
                self.close()
            except LiveError:
                pass  # the original error matters more
            raise
        return self

    def _drop_privileges(self, user: str) -> None:
        try:
            dropped = privileges.drop(user)
        except (privileges.PrivilegeError, OSError) as exc:
            raise LiveError(f"cannot drop privileges to {user}: {exc}") from None
        self.privileges = dropped
        if dropped.note:
            self.notes.append(dropped.note)

    def max_copy(self) -> int:
        """Most payload bytes one record carries: WHOLE mode is cut to it, snap + tail length may not exceed it."""
        return 2 * WHOLE_PAYLOAD_CAP if self.ringbuf else PERF_PAYLOAD_CAP

    def _load(self) -> None:
        import bcc

        src = bpf_source_dir()
        cflags = program_cflags(src, ringbuf=self.ringbuf, xdp=self.use_xdp, ring_pages=self.ring_pages,
                                snaplen=self.snaplen, taillen=self.taillen,
                                handshake_snaplen=self.policy.handshake_snaplen, workers=self.workers)
        try:
            bpf = bcc.BPF(src_file=str(src / "imaptap.bpf.c").encode(), cflags=cflags)
        except Exception as exc:
            raise LiveError(f"the kernel program did not compile ({exc}); the compiler's messages are"
                            f" above; kernel headers: /lib/modules/{platform.release()}/build") from None
        self._bpf = bpf
        wanted = [(PROG_TC_EG, bcc.BPF.SCHED_CLS)]
        wanted.append((PROG_XDP, bcc.BPF.XDP) if self.use_xdp else (PROG_TC_IN, bcc.BPF.SCHED_CLS))
        for fname, ptype in wanted:
            try:
                self._fns[fname] = bpf.load_func(fname.encode(), ptype)
            except Exception as exc:
                raise LiveError(f"the kernel refused the BPF program {fname} ({exc}); the verifier's log"
                                " is above") from None
        self._check_layout(bpf)
        bpf[MAP_CONFIG][ctypes.c_int(0)] = kernel_config(self.ports)
        self.policy.bind(bpf[MAP_FLOW_MODES])
        self._release_module(bpf)

    def _release_module(self, bpf: BPF) -> None:
        """Let bcc's module go: the compiled program and LLVM's state behind it.  It holds the
        map descriptors, so the tables used from now on get duplicates of theirs first."""
        from bcc import libbcc

        for name in MAPS_USED + tuple(ring_map(i) for i in range(1, self.workers)):
            table = bpf[name]
            table.map_fd = os.dup(table.map_fd)
            self._map_fds.append(table.map_fd)
        libbcc.lib.bpf_module_destroy(bpf.module)
        bpf.module = None

    @staticmethod
    def _check_layout(b: BPF) -> None:
        """The ctypes mirrors must match what BCC compiled (imaptap.h changed without abi.py?)."""
        sizes = [("config", b[MAP_CONFIG].Leaf, KernelConfig), ("flow_modes", b[MAP_FLOW_MODES].Key, KernelFlowKey),
                 ("counters", b[MAP_COUNTERS].sLeaf, KernelCounters)]
        for table, compiled, mirror in sizes:
            if ctypes.sizeof(compiled) != ctypes.sizeof(mirror):
                raise LiveError(f"internal error: bpf/imaptap.h and capture/live/abi.py disagree on {table}")

    def _open_output(self) -> None:
        if self.workers == 1:  # else each worker process opens its own ring
            self._reader.open(self._bpf, self.ringbuf)

    def _attach(self, indexes: dict[str, int]) -> list[str]:
        """Put the programs on each interface; the notes for the user (fallbacks taken)."""
        attachments = self._attachments
        assert attachments is not None, "__enter__ opens netlink before it attaches"
        attachments.notes.clear()
        veth_notes = []
        tc = [(Hook.TC_EGRESS, PROG_TC_EG)]
        if not self.use_xdp:
            tc.insert(0, (Hook.TC_INGRESS, PROG_TC_IN))
        for name, index in indexes.items():
            if self.use_xdp:
                mode = attachments.attach_xdp(name, index, self._fns[PROG_XDP].fd, self.xdp_mode)
                self.xdp_modes[name] = mode
                if mode == "native" and name not in self._veth_noted and link_kind(self._ipr, index) == "veth":
                    self._veth_noted.add(name)
                    veth_notes.append(f"{name} is a veth: with any XDP program on it the kernel turns off"
                                      " segmentation offload on its peer, which can cost most of the"
                                      " throughput into it; --no-xdp captures with TC instead")
            attachments.attach_tc(name, index, [(hook, prog, self._fns[prog].fd) for hook, prog in tc])
        return attachments.notes + veth_notes

    def _link_flags(self, index: int) -> int:
        """The interface's flags as rtnetlink reports them (IFF_RUNNING included); 0 if unknown."""
        try:
            assert self._ipr is not None, "__enter__ opens netlink first"
            return int(self._ipr.get_links(index)[0]["flags"])
        except Exception:  # any failure: only a note depends on it
            return 0

    def hooks(self) -> list[Attached]:
        """The programs on interfaces now: which hook of which interface, and how attached."""
        return self._attachments.attached() if self._attachments is not None else []

    # --- interfaces that come and go -----------------------------------------------------------

    def _note(self, text: str) -> None:
        """A note of something that happened while capturing; only the latest RECENT_NOTES stay."""
        self.notes.append(text)
        if len(self.notes) - self._startup_notes > RECENT_NOTES:
            del self.notes[self._startup_notes]

    def _watch_links(self) -> None:
        """Act on the kernel's link messages since the last poll."""
        if self._links is None or self._attachments is None:
            return
        messages = self._links.read()
        if messages is None:  # some were lost: look at every interface afresh
            self._look_again()
            return
        if not messages:
            return
        # A deleted link first goes down: its "down" is not worth a note of its own.
        deleted = {m.ifindex for m in messages if m.change is LinkChange.DEL}
        for message in messages:
            for watched in self._watched.values():
                self._follow(watched, message, deleted)

    def _follow(self, watched: WatchedInterface, message: LinkMessage, deleted: set[int]) -> None:
        if message.ifindex == watched.index:
            if message.change is LinkChange.DEL or (message.name is not None and message.name != watched.name):
                self._gone(watched)
            elif message.usable != watched.usable and message.ifindex not in deleted:
                self._usable(watched, message.usable)
        elif (message.change is LinkChange.NEW and message.name == watched.name
              and message.ifindex != watched.refused):
            if watched.index is not None:
                self._gone(watched)  # its own message was lost
            self._back(watched, message.ifindex, message.usable)

    def _look_again(self) -> None:
        for watched in self._watched.values():
            index = interface_index(watched.name)
            if index != watched.index:
                if watched.index is not None:
                    self._gone(watched)
                if index is not None and index != watched.refused:
                    self._back(watched, index, interface_usable(watched.name))
            elif index is not None and interface_usable(watched.name) != watched.usable:
                self._usable(watched, not watched.usable)

    def _gone(self, watched: WatchedInterface) -> None:
        index, watched.index = watched.index, None
        assert index is not None and self._attachments is not None
        with SignalsHeld():
            problems = self._attachments.undo_interface(index)
        self.xdp_modes.pop(watched.name, None)
        self.interface_gone += 1
        self._note(f"{watched.name} is gone (the {ordinal(self.interface_gone)} time): capturing on it again"
                   " when an interface of that name comes back; its flows stay open until they end as usual")
        if problems:
            self._note(f"could not take everything off {watched.name}: " + "; ".join(problems))

    def _back(self, watched: WatchedInterface, index: int, usable: bool) -> None:
        assert self._attachments is not None
        watched.usable = usable
        try:
            with SignalsHeld():
                notes = self._attach({watched.name: index})
        except LiveError as exc:
            watched.refused = index
            with SignalsHeld():
                self._attachments.undo_interface(index)  # what got on before the failure
            self.xdp_modes.pop(watched.name, None)
            self._note(f"{watched.name} is back, but imaptap cannot capture on it: {exc}")
            return
        for note in notes:
            self._note(note)
        watched.index, watched.refused = index, None
        self.reattached += 1
        self._note(f"{watched.name} is back (the {ordinal(self.reattached)} time, index {index}): capturing on"
                   " it again" + ("" if usable else " once it is up"))

    def _usable(self, watched: WatchedInterface, usable: bool) -> None:
        watched.usable = usable
        if usable:
            self._ups += 1
            self._note(f"{watched.name} is up (the {ordinal(self._ups)} time)")
        else:
            self.interface_down += 1
            self._note(f"{watched.name} is down (the {ordinal(self.interface_down)} time): nothing to capture on"
                       " it until it is up again")

    # --- stop ----------------------------------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach everything this capture attached; safe to call twice."""
        with SignalsHeld():
            self._teardown()

    def _teardown(self) -> None:
        if self._links is not None:
            self._links.close()
            self._links = None
        problems = self._attachments.undo_all() if self._attachments is not None else []
        if self._bpf is not None:
            self._reader.close()
            self._final_counters = kernel_counters(self._bpf)
            bpf, self._bpf = self._bpf, None
            self.policy.unbind()
            _close_bpf(bpf)
        while self._map_fds:
            os.close(self._map_fds.pop())
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if problems:
            raise LiveError("could not detach everything: " + "; ".join(problems))

    # --- records -------------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> list[Segment]:
        """Segments received since the last call, in arrival order; waits up to timeout_ms for the first.

        After the capture is closed, one more call returns the segments that were still in the
        buffer when it was detached (then nothing).  Interfaces that went or came back since the
        last call are dealt with first, and now and then the free heap is given back."""
        self.follow()
        return self._reader.poll(timeout_ms)

    def follow(self) -> None:
        """Deal with interfaces that went or came back, and now and then give the free heap back
        (what `poll` does first; the parent of live workers, which reads no ring, calls it alone)."""
        self._watch_links()
        if self.heap_trim is not None:
            self.heap_trim(time.monotonic())

    def counters(self) -> dict[str, int]:
        """Kernel counters summed over CPUs (seen, matched, submitted, lost, unparsed, copy_failed),
        userspace ones (received, malformed, perf_lost, policy_errors), and the interfaces'
        (interface_gone, interface_down, reattached; interfaces_unavailable: gone or down now)."""
        kernel = kernel_counters(self._bpf) if self._bpf is not None else self._final_counters
        out = dict(kernel or dict.fromkeys(COUNTER_NAMES, 0))
        reader = self._reader
        out["lost"] += reader.perf_lost
        out.update(received=reader.received, malformed=reader.malformed, perf_lost=reader.perf_lost,
                   policy_errors=self.policy.kernel_errors, interface_gone=self.interface_gone,
                   interface_down=self.interface_down, reattached=self.reattached,
                   interfaces_unavailable=sum(1 for w in self._watched.values() if w.index is None or not w.usable))
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
