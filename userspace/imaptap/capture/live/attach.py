"""Putting the kernel programs on interfaces with netlink (pyroute2), and taking them off again.

Ingress is XDP (native where the driver has it, else generic), egress a TC clsact filter; TC
takes ingress too when XDP is not used.  XDP programs and TC filters outlive the process that
added them, so every step is recorded in an undo log, one small record per kind of step, and
undone newest first on close, also after a start that failed half-way.  A start after a
SIGKILL finds the previous run's programs by name (``imaptap_*``) and removes them; another
tool's XDP program, qdisc or filters are never touched.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import ClassVar

from imaptap.capture.live.abi import PROG_PREFIX
from imaptap.capture.live.errors import LiveError
from imaptap.capture.live.interfaces import attr_value, interface_gone, nested_attrs
from imaptap.capture.live.kernel import imaptap_pids, prog_fd_by_id, prog_name_by_id, prog_owner

#: TC filter placement: priority 1 runs before filters added with tc's default priority, and the
#: program returns TC_ACT_UNSPEC so filters after it still run.
TC_PRIO = 1
TC_HANDLE = 0x1A7A9
TC_PARENT_INGRESS = 0xFFFFFFF2
TC_PARENT_EGRESS = 0xFFFFFFF3

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

#: --xdp-mode -> the XDP modes tried, in order (None: native where the driver has it).
XDP_MODES_TRIED = {"native": ["native"], "skb": ["skb"], None: ["native", "skb"]}

_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class SignalsHeld:
    """Hold SIGINT/SIGTERM/SIGHUP while attaching or detaching, so a signal cannot leave a
    program attached that we have not recorded; pending signals are delivered on exit."""

    def __enter__(self):
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        return self

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
        return False


# --- netlink requests ----------------------------------------------------------------------------


def set_xdp(ipr, index: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    """Attach XDP program ``fd`` (-1: detach), replacing only ``expected_fd`` if given."""
    attrs = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=index, xdp={"attrs": attrs})


def bpf_filters(ipr, index: int, parent: int) -> list:
    """The BPF filters on one side of interface ``index``'s clsact qdisc."""
    try:
        return [f for f in ipr.get_filters(index=index, parent=parent)
                if f.get_attr("TCA_KIND") == "bpf" and f["handle"]]
    except Exception:  # no clsact qdisc: no filters
        return []


def has_filters(ipr, index: int) -> bool:
    """Whether interface ``index``'s clsact qdisc holds any filter, of any tool."""
    try:
        return any(True for _ in ipr.get_filters(index=index, parent=TC_PARENT_INGRESS)) or \
            any(True for _ in ipr.get_filters(index=index, parent=TC_PARENT_EGRESS))
    except Exception:
        return False


def filter_name(prog: str, pid: int) -> str:
    """The TC filter's name: the pid tells a later start whether this run is alive."""
    return f"{prog} pid {pid}"


def filter_pid(name: str) -> int | None:
    """The pid in a filter name "imaptap_tc_eg pid 123"."""
    parts = name.split()
    if len(parts) == 3 and parts[1] == "pid" and parts[2].isdigit():
        return int(parts[2])
    return None


# --- the undo log --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XdpAttached:
    """Our XDP program on an interface, attached with ``flags``."""

    kind: ClassVar[str] = "xdp"
    name: str
    index: int
    flags: int
    prog_fd: int

    def undo(self, ipr) -> None:
        mode_flags = self.flags & (XDP_FLAGS_SKB_MODE | XDP_FLAGS_DRV_MODE)
        # REPLACE with our fd as the expected one: never remove a program that replaced ours meanwhile.
        set_xdp(ipr, self.index, -1, mode_flags | XDP_FLAGS_REPLACE, expected_fd=self.prog_fd)


@dataclass(frozen=True, slots=True)
class ClsactAdded:
    """A clsact qdisc we added because the interface had none."""

    kind: ClassVar[str] = "clsact"
    name: str
    index: int

    def undo(self, ipr) -> None:
        # Only an empty clsact: another tool may have added filters since.
        if not has_filters(ipr, self.index):
            ipr.tc("del", "clsact", self.index)


@dataclass(frozen=True, slots=True)
class TcFilterAdded:
    """Our TC filter on one side (``parent``) of an interface's clsact qdisc."""

    kind: ClassVar[str] = "tc"
    name: str
    index: int
    parent: int

    def undo(self, ipr) -> None:
        ipr.tc("del-filter", "bpf", self.index, TC_HANDLE, parent=self.parent, prio=TC_PRIO)


UndoStep = XdpAttached | ClsactAdded | TcFilterAdded


# --- what a killed run left behind ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaleXdp:
    """An imaptap XDP program that no live process holds: a killed run's."""

    name: str
    index: int
    prog_id: int
    mode: str
    """"xdp", "xdpgeneric" or "xdpoffload", as `ip link` names the slot it is in."""

    def remove(self, ipr) -> str | None:
        """Detach it; the note for the user, or None if it went away meanwhile."""
        try:
            fd = prog_fd_by_id(self.prog_id)
        except OSError:
            return None
        try:
            flags = XDP_FLAGS_REPLACE | (XDP_FLAGS_SKB_MODE if self.mode == "xdpgeneric" else XDP_FLAGS_DRV_MODE)
            set_xdp(ipr, self.index, -1, flags, expected_fd=fd)
        except Exception as exc:
            raise LiveError(f"could not remove imaptap's stale XDP program {self.prog_id} from {self.name}:"
                            f" {exc}") from None
        finally:
            os.close(fd)
        return f"removed a stale imaptap XDP program (id {self.prog_id}) from {self.name}"


@dataclass(frozen=True, slots=True)
class StaleTcFilter:
    """An imaptap TC filter whose pid is no running imaptap: a killed run's."""

    name: str
    index: int
    parent: int
    prio: int
    handle: int

    def remove(self, ipr) -> str | None:
        """Delete it; the note for the user."""
        try:
            ipr.tc("del-filter", "bpf", self.index, self.handle, parent=self.parent, prio=self.prio)
        except Exception as exc:
            raise LiveError(f"could not remove imaptap's stale TC filter from {self.name}: {exc}") from None
        return f"removed a stale imaptap TC filter from {self.name}"


Stale = StaleXdp | StaleTcFilter


# --- one capture's attachments -------------------------------------------------------------------


class Attachments:
    """What one capture put on interfaces through ``ipr`` (a pyroute2 IPRoute), and its undo log."""

    def __init__(self, ipr) -> None:
        self.ipr = ipr
        self.undo_log: list[UndoStep] = []
        """Steps taken, newest last."""

    def find_stale(self, indexes: dict[str, int], use_xdp: bool) -> list[Stale]:
        """Refuse foreign XDP programs and running imaptaps; list our stale programs to remove."""
        stale: list[Stale] = []
        running: set[int] | None = None
        for name, index in indexes.items():
            link = self.ipr.get_links(index)[0]
            xdp = nested_attrs(link, "IFLA_XDP")
            attached = [(attr_value(xdp, key), mode) for key, mode in
                        (("IFLA_XDP_DRV_PROG_ID", "xdp"), ("IFLA_XDP_SKB_PROG_ID", "xdpgeneric"),
                         ("IFLA_XDP_HW_PROG_ID", "xdpoffload"))]
            for prog_id, mode in attached:
                if prog_id is None:
                    continue
                pname = prog_name_by_id(prog_id) or "?"
                if not pname.startswith(PROG_PREFIX):
                    if use_xdp:
                        raise LiveError(f"{name} already has an XDP program of another tool (id {prog_id},"
                                        f" name {pname}); imaptap does not replace it: detach it or use --no-xdp")
                else:
                    owner = prog_owner(prog_id)
                    if owner is not None:
                        raise LiveError(f"imaptap (pid {owner}) is already capturing on {name}")
                    stale.append(StaleXdp(name, index, prog_id, mode))
            for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
                for flt in bpf_filters(self.ipr, index, parent):
                    fname = attr_value(nested_attrs(flt, "TCA_OPTIONS"), "TCA_BPF_NAME") or ""
                    if not fname.startswith(PROG_PREFIX):
                        continue
                    pid = filter_pid(fname)
                    if running is None:
                        running = imaptap_pids()
                    if pid in running and pid != os.getpid():
                        raise LiveError(f"imaptap (pid {pid}) is already capturing on {name}")
                    stale.append(StaleTcFilter(name, index, parent, flt["info"] >> 16, flt["handle"]))
        return stale

    def attach_xdp(self, name: str, index: int, prog_fd: int, xdp_mode: str | None) -> str:
        """Attach XDP program ``prog_fd`` in the first mode that works; returns "native" or "skb"."""
        errors = []
        for mode in XDP_MODES_TRIED[xdp_mode]:
            flags = XDP_FLAGS_UPDATE_IF_NOEXIST | (XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE)
            try:
                set_xdp(self.ipr, index, prog_fd, flags)
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code in (errno.EBUSY, errno.EEXIST):
                    raise LiveError(f"{name} already has an XDP program of another tool; imaptap does not"
                                    " replace it: detach it or use --no-xdp") from None
                errors.append(f"{mode}: {exc}")
                continue
            self.undo_log.append(XdpAttached(name, index, flags, prog_fd))
            return mode
        hint = "; try --xdp-mode skb" if xdp_mode == "native" else "; try --no-xdp"
        raise LiveError(f"could not attach XDP to {name} ({', '.join(errors)}){hint}")

    def attach_tc(self, name: str, index: int, filters: list[tuple[int, str, int]]) -> None:
        """Add a clsact qdisc if there is none, then a filter per (parent, program name, fd)."""
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=index)):
            try:
                self.ipr.tc("add", "clsact", index)
            except Exception as exc:
                raise LiveError(f"could not add a clsact qdisc to {name}: {exc}") from None
            self.undo_log.append(ClsactAdded(name, index))
        pid = os.getpid()
        for parent, prog, fd in filters:
            try:
                self.ipr.tc("add-filter", "bpf", index, TC_HANDLE, fd=fd, name=filter_name(prog, pid),
                            parent=parent, prio=TC_PRIO, classid=1, direct_action=True)
            except Exception as exc:
                raise LiveError(f"could not add the TC filter on {name}: {exc}") from None
            self.undo_log.append(TcFilterAdded(name, index, parent))

    def undo_all(self) -> list[str]:
        """Undo every step, newest first; what could not be undone, one text each."""
        problems = []
        while self.undo_log:
            step = self.undo_log.pop()
            try:
                step.undo(self.ipr)
            except Exception as exc:
                if interface_gone(step.index):
                    continue  # removed while we captured: nothing of ours is left on it
                problems.append(f"{step.kind} on {step.name}: {exc}")
        return problems
