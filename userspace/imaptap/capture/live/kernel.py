"""What the running kernel and this process can do, and the few raw bpf(2) calls imaptap makes.

Kernel headers: BCC compiles bpf/imaptap.bpf.c against /lib/modules/$(uname -r)/build.  The
program uses only UAPI structures, so on kernels without a header package (custom and cloud
kernels) the distribution's generic headers linked there are sound; scripts/setup does that.

The bpf(2) wrappers recognise programs by id without bpftool: which are loaded, by whom, under
what name.  That is how a start tells a running imaptap from the stale programs of a killed one.
They also create and detach BPF links (XDP from 5.9, TCX from 6.6), which bcc has no call for:
a link belongs to the file descriptor that created it, so the kernel takes the program off the
interface when the process ends, however it ends.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

from imaptap.capture.live.abi import PROG_PREFIX
from imaptap.privileges import CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN

#: The oldest kernel the program can run on: the compiler leaves bounded loops in it, which the
#: verifier accepts from 5.3 on (tests/live/test_kernel_compat.py checks what each variant uses).
MIN_KERNEL = (5, 3)
#: bpf_xdp_load_bytes and bpf_xdp_get_buff_len, which the XDP variant calls, arrived in 5.18.
XDP_LOAD_BYTES_KERNEL = (5, 18)
#: BPF links for XDP (BPF_LINK_CREATE with BPF_XDP) and BPF_LINK_DETACH arrived in 5.9.
XDP_LINK_KERNEL = (5, 9)
#: TCX, BPF links on a device's TC ingress and egress without a qdisc, arrived in 6.6.
TCX_KERNEL = (6, 6)


def missing_capabilities() -> list[str]:
    """Capabilities live capture needs that this process lacks (CAP_SYS_ADMIN stands in for BPF/PERFMON)."""
    eff = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    eff = int(line.split()[1], 16)
    except (OSError, ValueError):
        return [] if os.geteuid() == 0 else ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]

    def has(cap: int) -> bool:
        return bool(eff >> cap & 1)

    missing = []
    if not (has(CAP_BPF) or has(CAP_SYS_ADMIN)):
        missing.append("CAP_BPF")
    if not has(CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if not (has(CAP_PERFMON) or has(CAP_SYS_ADMIN)):
        missing.append("CAP_PERFMON")
    return missing


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel; suffixes such as -amd64 or +deb are ignored."""
    release = platform.release()
    nums = []
    for part in release.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) if not part.isdigit() else part
        nums.append(int(digits or 0))
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def has_xdp_load_bytes() -> bool:
    """Whether the kernel has bpf_xdp_load_bytes and bpf_xdp_get_buff_len (5.18+)."""
    return kernel_version() >= XDP_LOAD_BYTES_KERNEL


def has_xdp_link() -> bool:
    """Whether the kernel attaches XDP programs through BPF links (5.9+)."""
    return kernel_version() >= XDP_LINK_KERNEL


def has_tcx() -> bool:
    """Whether the kernel has TCX links for TC programs (6.6+)."""
    return kernel_version() >= TCX_KERNEL


def kernel_headers_present() -> bool:
    """Whether BCC will find headers to compile the program against."""
    release = platform.release()
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return True
    return ((Path("/lib/modules") / release / "build" / "include").is_dir()
            or Path("/sys/kernel/kheaders.tar.xz").exists())


# --- raw bpf(2) ----------------------------------------------------------------------------------

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "loongarch64": 280, "ppc64le": 361,
                "ppc64": 361, "s390x": 351, "armv7l": 386, "armv6l": 386, "i686": 357, "i386": 357}
_BPF_MAP_CREATE, _BPF_PROG_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD, _BPF_PROG_QUERY = 0, 13, 15, 16
_BPF_LINK_CREATE, _BPF_LINK_DETACH = 28, 34
_BPF_MAP_TYPE_RINGBUF = 27
#: enum bpf_attach_type values of the hooks imaptap links programs to.
BPF_XDP, BPF_TCX_INGRESS, BPF_TCX_EGRESS = 37, 46, 47
#: TCX: put the program before every other one on the hook (no relative program given), as the
#: classic filter's priority 1 put it before filters of tc's default priority.
BPF_F_BEFORE = 1 << 3
# LINK_CREATE: prog_fd, target_ifindex, attach_type, flags, then the per-type union (for TCX:
# relative_fd, expected_revision); LINK_DETACH: link_fd.  PROG_QUERY: target_ifindex,
# attach_type, query_flags, attach_flags, prog_ids (a pointer), prog_cnt (in: room, out: count),
# then prog_attach_flags, link_ids, link_attach_flags (pointers, left 0) and revision, which a
# TCX query writes back at offset 56 whatever length it is given: the attribute must hold it.
_LINK_CREATE_ATTR_LEN = 32
_LINK_DETACH_ATTR_LEN = 4
_PROG_QUERY_ATTR_LEN = 64
#: Program ids one query returns at most: a hook with more programs than this is not ours alone,
#: and only imaptap's own (named imaptap_*) are looked at.
PROG_QUERY_MAX = 64
# union bpf_attr as each command reads it: MAP_CREATE through map_extra; PROG_GET_FD_BY_ID
# (prog_id, next_id, open_flags) and OBJ_GET_INFO_BY_FD (bpf_fd, info_len, info) fit in 16 bytes.
_MAP_CREATE_ATTR_LEN = 72
_BY_ID_ATTR_LEN = 16
_INFO_ATTR_LEN = 16
#: The smallest ring buffer: one page.
_RINGBUF_PROBE_BYTES = 4096
# Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h); stable since the fields were added.
# run_cnt is the word after run_time_ns; both are read in one go.
_INFO_NAME, _INFO_RUN_TIME_NS, _INFO_LEN = 64, 192, 208
_BPF_OBJ_NAME_LEN = 16

_libc = ctypes.CDLL(None, use_errno=True)


def bpf_syscall(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2) with ``attr`` as the union bpf_attr; OSError with the kernel's errno on failure."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """Attach program ``prog_fd`` to interface ``ifindex`` through a new BPF link; its fd (close-on-exec).

    For BPF_XDP ``flags`` are XDP_FLAGS_*_MODE, for TCX the BPF_F_* placement flags."""
    attr = (ctypes.c_uint8 * _LINK_CREATE_ATTR_LEN)()
    struct.pack_into("<IIII", attr, 0, prog_fd, ifindex, attach_type, flags)
    return bpf_syscall(_BPF_LINK_CREATE, attr)


def link_detach(link_fd: int) -> None:
    """Take a link's program off its hook now, whoever else still holds the link (5.9+)."""
    attr = (ctypes.c_uint8 * _LINK_DETACH_ATTR_LEN)()
    struct.pack_into("<I", attr, 0, link_fd)
    bpf_syscall(_BPF_LINK_DETACH, attr)


def tcx_prog_ids(ifindex: int, attach_type: int) -> list[int]:
    """Ids of the programs on one TCX hook of an interface, in the order they run; [] before 6.6."""
    ids = (ctypes.c_uint32 * PROG_QUERY_MAX)()
    attr = (ctypes.c_uint8 * _PROG_QUERY_ATTR_LEN)()
    struct.pack_into("<IIIIQI", attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(ids), PROG_QUERY_MAX)
    try:
        bpf_syscall(_BPF_PROG_QUERY, attr)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # more than PROG_QUERY_MAX: the first ones were filled in
            return list(ids)
        return []  # no TCX in this kernel (EINVAL), or no such interface
    count = struct.unpack_from("<I", attr, 24)[0]
    return list(ids[:min(count, PROG_QUERY_MAX)])


def has_ringbuf() -> bool:
    """Whether the kernel can create a BPF ring buffer (5.8+)."""
    attr = (ctypes.c_uint8 * _MAP_CREATE_ATTR_LEN)()
    struct.pack_into("<IIII", attr, 0, _BPF_MAP_TYPE_RINGBUF, 0, 0, _RINGBUF_PROBE_BYTES)
    try:
        fd = bpf_syscall(_BPF_MAP_CREATE, attr)
    except OSError:
        return False
    os.close(fd)
    return True


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd of loaded program ``prog_id`` (the caller closes it)."""
    attr = (ctypes.c_uint8 * _BY_ID_ATTR_LEN)()
    struct.pack_into("<I", attr, 0, prog_id)
    return bpf_syscall(_BPF_PROG_GET_FD_BY_ID, attr)


def prog_info(fd: int) -> tuple[str, int, int]:
    """(name, run_time_ns, run_cnt) of a loaded program; the counts need kernel.bpf_stats_enabled=1."""
    info = (ctypes.c_uint8 * _INFO_LEN)()
    attr = (ctypes.c_uint8 * _INFO_ATTR_LEN)()
    struct.pack_into("<IIQ", attr, 0, fd, _INFO_LEN, ctypes.addressof(info))
    bpf_syscall(_BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = bytes(info)
    name = raw[_INFO_NAME:_INFO_NAME + _BPF_OBJ_NAME_LEN].split(b"\0", 1)[0].decode("ascii", "replace")
    run_time_ns, run_cnt = struct.unpack_from("<QQ", raw, _INFO_RUN_TIME_NS)
    return name, run_time_ns, run_cnt


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of loaded program ``prog_id``, or None if it is gone or unreadable."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return prog_info(fd)[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def prog_holders() -> Iterator[tuple[int, int]]:
    """(pid, prog_id) for every BPF program fd open in any process."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            yield int(pid), int(line.split()[1])
                            break
            except (OSError, ValueError):
                continue


def prog_owner(prog_id: int) -> int | None:
    """A live process holding program ``prog_id`` open, or None (the program is orphaned)."""
    me = os.getpid()
    for pid, pid_prog in prog_holders():
        if pid_prog == prog_id and pid != me:
            return pid
    return None


def imaptap_pids() -> set[int]:
    """Processes that hold an imaptap program open: running captures."""
    names: dict[int, str | None] = {}
    pids = set()
    for pid, prog_id in prog_holders():
        if prog_id not in names:
            names[prog_id] = prog_name_by_id(prog_id)
        if (names[prog_id] or "").startswith(PROG_PREFIX):
            pids.add(pid)
    return pids
