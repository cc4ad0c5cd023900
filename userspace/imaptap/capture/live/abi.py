"""The kernel ABI: Python's mirror of bpf/imaptap.h and the names imaptap.bpf.c exports.

Each ctypes Structure mirrors one struct of imaptap.h field for field, and `MIRRORED_DEFINES`
the header's #defines that Python has values for.  tests/unit/capture/test_abi.py parses the
header and checks names, order, sizes, offsets and values against this module without a
kernel; at start LiveCapture also compares the sizes with the maps BCC compiled.

Imports neither bcc nor pyroute2, so the analyzer's tests and tools read it on any machine.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

from imaptap.capture.live.errors import LiveError
from imaptap.segment import WHOLE_PAYLOAD_CAP, PayloadMode

#: Bytes of an address in the kernel's structs: an IPv6 address, or IPv4 in the first 4, rest zero.
ADDR_BYTES = 16
#: Bytes of the monitored-ports bitmap: one bit per TCP port.
PORT_BITMAP_BYTES = 65536 // 8


class EventHeader(ctypes.Structure):
    """struct imaptap_event; ``cap_len`` head bytes, then ``tail_len`` tail bytes follow it."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("saddr", ctypes.c_uint8 * ADDR_BYTES),
        ("daddr", ctypes.c_uint8 * ADDR_BYTES),
        ("seq", ctypes.c_uint32),
        ("ack", ctypes.c_uint32),
        ("wire_len", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("cap_len", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("ip_version", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("tail_len", ctypes.c_uint32),
    ]


class KernelFlowKey(ctypes.Structure):
    """struct imaptap_flow_key: the per-flow mode map's key, in the kernel's canonical order."""

    _fields_ = [
        ("addr_a", ctypes.c_uint8 * ADDR_BYTES),
        ("addr_b", ctypes.c_uint8 * ADDR_BYTES),
        ("port_a", ctypes.c_uint16),
        ("port_b", ctypes.c_uint16),
        ("ip_version", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
    ]


class KernelConfig(ctypes.Structure):
    """struct imaptap_config."""

    _fields_ = [
        ("ports", ctypes.c_uint8 * PORT_BITMAP_BYTES),
    ]


class KernelCounters(ctypes.Structure):
    """struct imaptap_counters (one per CPU)."""

    _fields_ = [
        ("seen", ctypes.c_uint64),
        ("matched", ctypes.c_uint64),
        ("submitted", ctypes.c_uint64),
        ("lost", ctypes.c_uint64),
        ("unparsed", ctypes.c_uint64),
        ("copy_failed", ctypes.c_uint64),
    ]


#: C struct name in imaptap.h -> its mirror.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "imaptap_event": EventHeader,
    "imaptap_flow_key": KernelFlowKey,
    "imaptap_config": KernelConfig,
    "imaptap_counters": KernelCounters,
}

#: The same layout as `EventHeader`, for decoding records fast (struct beats ctypes fields).
EVENT_HEADER = struct.Struct("<Q16s16sIIIIIHHBBBBI")
assert EVENT_HEADER.size == ctypes.sizeof(EventHeader)

#: The kernel counters in the order of struct imaptap_counters.
COUNTER_NAMES = tuple(field[0] for field in KernelCounters._fields_)

#: #defines of imaptap.h and the Python values they must equal.
MIRRORED_DEFINES: dict[str, int] = {
    **{f"IMAPTAP_MODE_{mode.name}": int(mode) for mode in PayloadMode},
    "IMAPTAP_WHOLE_CAP": WHOLE_PAYLOAD_CAP,
    "IMAPTAP_MAX_WORKERS": 8,
}
#: The most live worker processes (--workers with -i): one ring buffer each, imaptap.h says why.
LIVE_MAX_WORKERS = MIRRORED_DEFINES["IMAPTAP_MAX_WORKERS"]

#: #defines of imaptap.h that userspace has no use for, and why.  test_abi.py fails on a define
#: in neither table, so a new one gets a decision.
KERNEL_ONLY_DEFINES: dict[str, str] = {
    "IMAPTAP_HOOK_XDP": "the record's hook field is carried but not read: the addresses tell the direction",
    "IMAPTAP_HOOK_TC_INGRESS": "as IMAPTAP_HOOK_XDP",
    "IMAPTAP_HOOK_TC_EGRESS": "as IMAPTAP_HOOK_XDP",
    "IMAPTAP_FLOW_MODES_MAX": "an LRU map evicts by itself; userspace never counts its entries",
    "IMAPTAP_MAX_EXT_HDRS": "a parse limit of the kernel program; replay has none",
}

#: Per-CPU map values are at most 32 KiB (PCPU_MIN_UNIT_SIZE); the perf buffer fallback builds
#: its records in one, so IMAPTAP_PERF_CAP in imaptap.bpf.c is this less the header.
PERCPU_VALUE_MAX = 32768
PERF_PAYLOAD_CAP = PERCPU_VALUE_MAX - ctypes.sizeof(EventHeader)

#: BPF program names (BPF_OBJ_NAME_LEN is 16); the prefix is how stale programs are recognised.
PROG_PREFIX = "imaptap_"
PROG_XDP, PROG_TC_IN, PROG_TC_EG = "imaptap_xdp", "imaptap_tc_in", "imaptap_tc_eg"

#: Map names in imaptap.bpf.c.
MAP_EVENTS, MAP_CONFIG, MAP_FLOW_MODES, MAP_COUNTERS = b"events", b"config", b"flow_modes", b"counters"


def ring_map(worker: int) -> bytes:
    """The ring buffer map of live worker ``worker`` (0-based): events, events_1, events_2, ..."""
    return MAP_EVENTS if worker == 0 else MAP_EVENTS + b"_%d" % worker


def kernel_config(ports: set[int]) -> KernelConfig:
    """struct imaptap_config for the monitored ``ports``: bit (port & 7) of byte port >> 3."""
    cfg = KernelConfig()
    for p in ports:
        cfg.ports[p >> 3] |= 1 << (p & 7)
    return cfg


def program_cflags(src: Path, *, ringbuf: bool, xdp: bool, ring_pages: int, snaplen: int, taillen: int,
                   handshake_snaplen: int, workers: int = 1) -> list[str]:
    """The compile options of imaptap.bpf.c (its header comment lists them), from ``src`` its directory."""
    flags = [f"-I{src}", f"-DIMAPTAP_RINGBUF={int(ringbuf)}", f"-DIMAPTAP_XDP={int(xdp)}",
             f"-DIMAPTAP_RING_PAGES={ring_pages}", f"-DIMAPTAP_SNAPLEN={snaplen}", f"-DIMAPTAP_TAILLEN={taillen}",
             f"-DIMAPTAP_HANDSHAKE_SNAPLEN={handshake_snaplen}"]
    if workers > 1:  # one worker: the program as it was, without the hash
        flags.append(f"-DIMAPTAP_WORKERS={workers}")
    return flags


def bpf_source_dir() -> Path:
    """The directory holding imaptap.bpf.c: inside the package if installed so, else the repo's bpf/."""
    here = Path(__file__).resolve()
    package = here.parents[2]          # imaptap/capture/live/abi.py -> imaptap
    for candidate in (package / "bpf", package.parents[1] / "bpf"):
        if (candidate / "imaptap.bpf.c").is_file():
            return candidate
    raise LiveError(f"the kernel program imaptap.bpf.c is missing (looked beside {package})")
