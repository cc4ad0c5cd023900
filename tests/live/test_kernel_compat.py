"""The kernel program on kernels older than this one: what can be checked without booting them.

The real verifiers of older kernels run in tests/live/test_old_kernels.py (Debian's 5.10 and
6.1 in qemu).  This file checks, from the bytecode alone, what any older kernel is asked for: imaptap builds
one of three variants (capture/live.py picks it from the running kernel), and each may only
call BPF helpers, and create map types, that the oldest kernel given that variant has, and
none has a loop unless that kernel verifies bounded loops.  The
helpers are read from the compiled bytecode (the call instructions), the versions from the
kernel's history (bcc's docs/kernel-versions.md lists each helper's first release).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from imaptap.capture import live
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_SNAPLEN, DEFAULT_TAILLEN

#: First kernel release of each helper or map type the program may use.
HELPER_SINCE = {
    "map_lookup_elem": (3, 19), "ktime_get_ns": (4, 1), "perf_event_output": (4, 4),
    "skb_load_bytes": (4, 5), "skb_pull_data": (4, 9), "ringbuf_reserve": (5, 8),
    "ringbuf_submit": (5, 8), "ringbuf_discard": (5, 8), "ringbuf_output": (5, 8),
    "xdp_load_bytes": (5, 18), "xdp_get_buff_len": (5, 18),
}
MAP_SINCE = {"BPF_MAP_TYPE_ARRAY": (3, 19), "BPF_MAP_TYPE_PERCPU_ARRAY": (4, 6),
             "BPF_MAP_TYPE_LRU_HASH": (4, 10), "BPF_MAP_TYPE_PERF_EVENT_ARRAY": (4, 3),
             "BPF_MAP_TYPE_RINGBUF": (5, 8)}
#: (ring buffer, XDP) -> the oldest kernel live.py builds that variant for.
VARIANTS = {(True, True): (5, 18), (True, False): (5, 8), (False, False): live.MIN_KERNEL}
#: Bounded loops (a backward jump) pass the verifier from 5.3 on.
LOOPS_SINCE = (5, 3)
#: Before 5.2 a program could hold at most 4,096 instructions (BPF_MAXINSNS).
OLD_MAXINSNS = 4096
_CALL, _EXIT = 0x85, 0x95  # BPF_JMP | BPF_CALL, BPF_JMP | BPF_EXIT
_JMP_CLASSES = (0x05, 0x06)  # BPF_JMP, BPF_JMP32


def helper_names() -> list[str]:
    """Helper names by id, from the UAPI header the program is compiled against."""
    header = next(Path("/usr/src").glob("linux-headers-*-common/include/uapi/linux/bpf.h"), None)
    if header is None:
        header = Path(f"/lib/modules/{live.platform.release()}/build/include/uapi/linux/bpf.h")
    text = header.read_text()
    mapper = text[text.index("#define __BPF_FUNC_MAPPER"):]
    return re.findall(r"FN\((\w+)", mapper[: mapper.index("\n\n")])


def build(ringbuf: bool, xdp: bool):
    import bcc

    src = live.bpf_source_dir()
    # the default build: the snap, tail and handshake lengths imaptap uses unless told otherwise
    cflags = live.program_cflags(src, ringbuf=ringbuf, xdp=xdp, ring_pages=live.RING_PAGES, snaplen=DEFAULT_SNAPLEN,
                                 taillen=DEFAULT_TAILLEN, handshake_snaplen=DEFAULT_HANDSHAKE_SNAPLEN)
    return bcc.BPF(src_file=str(src / "imaptap.bpf.c").encode(), cflags=cflags)


@pytest.mark.parametrize(("ringbuf", "xdp"), sorted(VARIANTS))
def test_each_variant_uses_only_what_its_oldest_kernel_has(live_ready, ringbuf, xdp):
    import bcc

    oldest = VARIANTS[(ringbuf, xdp)]
    names = helper_names()
    b = build(ringbuf, xdp)
    try:
        used = set()
        for fn in (live.PROG_TC_EG, live.PROG_XDP if xdp else live.PROG_TC_IN):
            code = b.dump_func(fn.encode())
            if oldest < (5, 2):
                assert len(code) // 8 <= OLD_MAXINSNS, f"{fn}: {len(code) // 8} instructions"
            for i in range(0, len(code), 8):
                op, regs, off, imm = struct.unpack_from("<BBhi", code, i)
                if op == _CALL and regs >> 4 == 0:  # a helper call (not a BPF-to-BPF call)
                    used.add(names[imm])
                elif op & 0x07 in _JMP_CLASSES and op not in (_CALL, _EXIT) and off < 0:
                    assert oldest >= LOOPS_SINCE, f"{fn}: a loop at instruction {i // 8}"
        assert "map_lookup_elem" in used and ("ringbuf_submit" in used) == ringbuf  # the walk saw calls
        assert ("xdp_load_bytes" in used) == xdp
        for name in used:
            assert name in HELPER_SINCE, f"{name}: add its first kernel release to HELPER_SINCE"
            assert HELPER_SINCE[name] <= oldest, f"{name} needs {HELPER_SINCE[name]}, the variant runs on {oldest}"
        for table in (b"config", b"counters", b"flow_modes", b"events"):
            ttype = b[table].ttype
            name = next(k for k, v in vars(bcc.table).items() if k.startswith("BPF_MAP_TYPE_") and v == ttype)
            assert MAP_SINCE[name] <= oldest, (table, name)
    finally:
        b.cleanup()


def test_the_variant_follows_the_kernel():
    # live.py's own choice, at the boundaries the table above assumes
    assert live.has_xdp_load_bytes() == (live.kernel_version() >= (5, 18))
    assert live.MIN_KERNEL == LOOPS_SINCE


def test_a_kernel_too_old_is_refused_with_one_line(live_ready, monkeypatch):
    # Only the version is pretended: no older kernel exists on this machine.
    monkeypatch.setattr(live, "kernel_version", lambda: (4, 19))
    with pytest.raises(live.LiveError, match=r"needs Linux 5\.3 or later .*this is"):
        with live.LiveCapture(["lo"], {143}, 256):
            pass
