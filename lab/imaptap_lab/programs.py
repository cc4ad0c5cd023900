"""Which imaptap programs are on an interface, seen from outside the process that put them there.

XDP programs and classic TC filters as iproute2 shows them (``ip -d link``, ``tc filter show``),
TCX programs (BPF links, Linux 6.6+, which iproute2 before 6.7 does not list) by BPF_PROG_QUERY.
The benchmarks wait on it for a capture to be attached, and the live tests check with it that
nothing is left behind.  Needs root (CAP_NET_ADMIN for the query, CAP_SYS_ADMIN for the names).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import NamedTuple

from imaptap.capture.live.abi import PROG_PREFIX
from imaptap.capture.live.kernel import BPF_TCX_EGRESS, BPF_TCX_INGRESS, prog_fd_by_id, prog_name_by_id, tcx_prog_ids

#: ``ip -d link`` names an XDP program so: "prog/xdp id 123 name imaptap_xdp ...".
_XDP_RE = re.compile(r"prog/xdp\S* id (\d+) name (\S+)")
#: ``tc filter show``: "filter protocol all pref 1 bpf chain 0 handle 0x1a7a9 imaptap_tc_eg pid 42 ... id 124".
_TC_RE = re.compile(r" bpf .*? (imaptap_\S+)(?: pid \d+)? .*?\bid (\d+)")


class Program(NamedTuple):
    """One program on one hook: "xdp", "tc ingress" or "tc egress"; "tcx" or "netlink"; its name and id."""

    hook: str
    method: str
    name: str
    prog_id: int


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def programs_on(ifname: str) -> list[Program]:
    """Every program named imaptap_* on ``ifname`` now ([] if there is no such interface)."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return []
    out = [Program("xdp", "link or netlink", name, int(prog_id))
           for prog_id, name in _XDP_RE.findall(_run("ip", "-d", "link", "show", "dev", ifname))
           if name.startswith(PROG_PREFIX)]
    for hook, attach_type in (("tc ingress", BPF_TCX_INGRESS), ("tc egress", BPF_TCX_EGRESS)):
        for prog_id in tcx_prog_ids(index, attach_type):
            name = prog_name_by_id(prog_id) or ""
            if name.startswith(PROG_PREFIX):
                out.append(Program(hook, "tcx", name, prog_id))
        direction = hook.split()[1]
        for line in _run("tc", "filter", "show", "dev", ifname, direction).splitlines():
            m = _TC_RE.search(line)
            if m:
                out.append(Program(hook, "netlink", m.group(1), int(m.group(2))))
    return out


def capturing(ifname: str) -> bool:
    """Whether an imaptap capture is attached to ``ifname``: its egress program goes on last."""
    return any(p.hook == "tc egress" for p in programs_on(ifname))


def prog_loaded(prog_id: int) -> bool:
    """Whether program ``prog_id`` is still loaded in the kernel (held by a process or a hook)."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError:
        return False
    os.close(fd)
    return True
