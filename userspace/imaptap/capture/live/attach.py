"""Putting the kernel programs on interfaces, and taking them off again.

Ingress is XDP (native where the driver has it, else generic), egress TC; TC takes ingress too
when XDP is not used.  Two ways, per hook:

- a BPF link (XDP from Linux 5.9, TCX from 6.6): the link is a file descriptor of this process,
  and the kernel takes the program off the interface when the last descriptor closes, so
  nothing is left behind when the process dies, however it dies (SIGKILL, the OOM killer);
- netlink (pyroute2), the fallback on older kernels or with ``IMAPTAP_ATTACH=netlink``: an XDP
  program set on the link and a filter on a clsact qdisc, which outlive the process.  A start
  after a SIGKILL finds the previous run's programs by name (``imaptap_*``) and removes them.

Either way every step is recorded in an undo log, one small record per kind of step, and undone
newest first on close, also after a start that failed half-way, or for one interface when it
went away.  Another tool's XDP program, qdisc, filters or TCX programs are never touched.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from imaptap.capture.live.abi import PROG_PREFIX
from imaptap.capture.live.errors import LiveError
from imaptap.capture.live.interfaces import attr_value, interface_gone, nested_attrs
from imaptap.capture.live.kernel import (
    BPF_F_BEFORE,
    BPF_TCX_EGRESS,
    BPF_TCX_INGRESS,
    BPF_XDP,
    has_tcx,
    has_xdp_link,
    imaptap_pids,
    link_create,
    link_detach,
    prog_fd_by_id,
    prog_name_by_id,
    prog_owner,
    tcx_prog_ids,
)

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

#: The environment variable that picks the attach method: ``netlink`` forces the fallback
#: (tests; a kernel whose BPF links misbehave), ``link`` (the default) uses BPF links where the
#: kernel has them.
ATTACH_ENV = "IMAPTAP_ATTACH"


class AttachMethod(enum.Enum):
    """How a program was put on a hook."""

    LINK = "link"
    """A BPF link owned by this process: gone with it."""
    NETLINK = "netlink"
    """An XDP program or TC filter set by netlink: stays until removed."""


class Hook(enum.Enum):
    """Where on an interface a program runs."""

    XDP = "xdp"
    TC_INGRESS = "tc ingress"
    TC_EGRESS = "tc egress"


#: The TC hooks: the clsact parent of a classic filter, the TCX attach type of a link.
TC_PARENTS = {Hook.TC_INGRESS: TC_PARENT_INGRESS, Hook.TC_EGRESS: TC_PARENT_EGRESS}
TCX_ATTACH_TYPES = {Hook.TC_INGRESS: BPF_TCX_INGRESS, Hook.TC_EGRESS: BPF_TCX_EGRESS}


class Attached(NamedTuple):
    """One program on one hook of one interface, and how it got there."""

    interface: str
    ifindex: int
    hook: Hook
    method: AttachMethod

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
class Linked:
    """Our program on a hook through a BPF link: detached, then its descriptor closed."""

    kind: ClassVar[str] = "link"
    name: str
    index: int
    hook: Hook
    link_fd: int

    def undo(self, ipr) -> None:
        try:
            link_detach(self.link_fd)  # at once, even if a forked child still holds the link
        finally:
            os.close(self.link_fd)

    def attached(self) -> Attached:
        return Attached(self.name, self.index, self.hook, AttachMethod.LINK)


@dataclass(frozen=True, slots=True)
class XdpAttached:
    """Our XDP program on an interface, attached with ``flags`` by netlink."""

    kind: ClassVar[str] = "xdp"
    name: str
    index: int
    flags: int
    prog_fd: int

    def attached(self) -> Attached:
        return Attached(self.name, self.index, Hook.XDP, AttachMethod.NETLINK)

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

    def attached(self) -> None:
        return None  # no program: only a place for filters

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

    def attached(self) -> Attached:
        hook = Hook.TC_INGRESS if self.parent == TC_PARENT_INGRESS else Hook.TC_EGRESS
        return Attached(self.name, self.index, hook, AttachMethod.NETLINK)

    def undo(self, ipr) -> None:
        ipr.tc("del-filter", "bpf", self.index, TC_HANDLE, parent=self.parent, prio=TC_PRIO)


UndoStep = Linked | XdpAttached | ClsactAdded | TcFilterAdded


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
    """What one capture put on interfaces, and its undo log.

    ``ipr`` is a pyroute2 IPRoute for the netlink steps; ``method`` the one asked for: LINK
    takes links on each hook where the kernel has them, NETLINK never does.
    """

    def __init__(self, ipr, method: AttachMethod = AttachMethod.LINK) -> None:
        self.ipr = ipr
        self.undo_log: list[UndoStep] = []
        """Steps taken, newest last."""
        self.xdp_links = method is AttachMethod.LINK and has_xdp_link()
        self.tcx_links = method is AttachMethod.LINK and has_tcx()
        self.notes: list[str] = []
        """Fallbacks taken while attaching, for the user."""

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
            for attach_type in TCX_ATTACH_TYPES.values():
                # A TCX program goes with its process: an imaptap one here belongs to a running capture.
                for prog_id in tcx_prog_ids(index, attach_type):
                    if (prog_name_by_id(prog_id) or "").startswith(PROG_PREFIX):
                        owner = prog_owner(prog_id)
                        if owner is not None:
                            raise LiveError(f"imaptap (pid {owner}) is already capturing on {name}")
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
            mode_flag = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
            if self.xdp_links:
                try:
                    link_fd = link_create(prog_fd, index, BPF_XDP, mode_flag)
                except OSError as exc:
                    if exc.errno in (errno.EBUSY, errno.EEXIST):
                        raise LiveError(f"{name} already has an XDP program of another tool; imaptap does not"
                                        " replace it: detach it or use --no-xdp") from None
                    if exc.errno != errno.EINVAL:
                        errors.append(f"{mode}: {exc.strerror}")
                        continue
                    # EINVAL: a kernel (or a device) that does not link XDP programs: netlink below.
                else:
                    self.undo_log.append(Linked(name, index, Hook.XDP, link_fd))
                    return mode
            flags = XDP_FLAGS_UPDATE_IF_NOEXIST | mode_flag
            try:
                set_xdp(self.ipr, index, prog_fd, flags)
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code in (errno.EBUSY, errno.EEXIST):
                    raise LiveError(f"{name} already has an XDP program of another tool; imaptap does not"
                                    " replace it: detach it or use --no-xdp") from None
                errors.append(f"{mode}: {exc}")
                continue
            if self.xdp_links:
                self.notes.append(f"{name}: the kernel refused a BPF link for XDP, attached with netlink instead"
                                  " (a killed imaptap leaves it there; the next start removes it)")
            self.undo_log.append(XdpAttached(name, index, flags, prog_fd))
            return mode
        hint = "; try --xdp-mode skb" if xdp_mode == "native" else "; try --no-xdp"
        raise LiveError(f"could not attach XDP to {name} ({', '.join(errors)}){hint}")

    def attach_tc(self, name: str, index: int, filters: list[tuple[Hook, str, int]]) -> None:
        """Put each (hook, program name, fd) on its TC hook: a TCX link where the kernel has them,
        else a filter on the clsact qdisc (added if there is none)."""
        if self.tcx_links:
            left = []
            for hook, prog, fd in filters:
                try:
                    link_fd = link_create(fd, index, TCX_ATTACH_TYPES[hook], BPF_F_BEFORE)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise LiveError(f"could not attach {prog} to {hook.value} of {name}: {exc.strerror}") from None
                    self.tcx_links = False  # this kernel has no TCX after all: filters from now on
                    self.notes.append(f"{name}: the kernel refused a TCX link, attached TC filters with netlink"
                                      " instead (a killed imaptap leaves them there; the next start removes them)")
                    left.append((hook, prog, fd))
                else:
                    self.undo_log.append(Linked(name, index, hook, link_fd))
            filters = left
            if not filters:
                return
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=index)):
            try:
                self.ipr.tc("add", "clsact", index)
            except Exception as exc:
                raise LiveError(f"could not add a clsact qdisc to {name}: {exc}") from None
            self.undo_log.append(ClsactAdded(name, index))
        pid = os.getpid()
        for hook, prog, fd in filters:
            parent = TC_PARENTS[hook]
            try:
                self.ipr.tc("add-filter", "bpf", index, TC_HANDLE, fd=fd, name=filter_name(prog, pid),
                            parent=parent, prio=TC_PRIO, classid=1, direct_action=True)
            except Exception as exc:
                raise LiveError(f"could not add the TC filter on {name}: {exc}") from None
            self.undo_log.append(TcFilterAdded(name, index, parent))

    def attached(self) -> list[Attached]:
        """The programs on hooks now, oldest first."""
        return [a for step in self.undo_log if (a := step.attached()) is not None]

    def undo_all(self) -> list[str]:
        """Undo every step, newest first; what could not be undone, one text each."""
        return self._undo(self.undo_log)

    def undo_interface(self, index: int) -> list[str]:
        """Undo the steps on interface ``index`` (gone, or renamed away), newest first."""
        mine = [step for step in self.undo_log if step.index == index]
        self.undo_log = [step for step in self.undo_log if step.index != index]
        return self._undo(mine)

    def _undo(self, steps: list[UndoStep]) -> list[str]:
        problems = []
        while steps:
            step = steps.pop()
            try:
                step.undo(self.ipr)
            except Exception as exc:
                if interface_gone(step.index):
                    continue  # removed while we captured: nothing of ours is left on it
                problems.append(f"{step.kind} on {step.name}: {exc}")
        return problems
