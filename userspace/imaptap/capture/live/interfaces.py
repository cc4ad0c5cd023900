"""Network interfaces: the default route's, a tcpdump -D style list, a link's kind, gone or not,
and the kernel's news of links coming, going, going down and up.

Read from /proc and /sys (no privileges, no pyroute2), except `link_kind`, which asks an
open netlink socket; ``nested_attrs`` and ``attr_value`` read pyroute2's messages.
`LinkMonitor` listens on rtnetlink's link group with a plain socket: it needs no privileges
and is read without blocking, between two polls of the ring buffer.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from pathlib import Path
from typing import NamedTuple

from imaptap.capture.live.errors import LiveError

# Route flags (include/uapi/linux/route.h) and interface flags (include/uapi/linux/if.h).
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
_IFF_UP, _IFF_RUNNING, _IFF_LOOPBACK = 0x1, 0x40, 0x8
#: Up and running: administratively up and operationally up (carrier, peer up for a veth).
IFF_USABLE = _IFF_UP | _IFF_RUNNING

# Fields of a line of /proc/net/route and /proc/net/ipv6_route that the lookups below read.
_ROUTE_FIELDS = 8
_IPV6_ROUTE_FIELDS = 10


def default_interface() -> str:
    """The interface of the default route (IPv4 first, then IPv6)."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/net/route") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < _ROUTE_FIELDS:
                    continue
                iface, dest, flags, metric, mask = fields[0], fields[1], int(fields[3], 16), int(fields[6]), fields[7]
                if dest == "00000000" and mask == "00000000" and flags & _RTF_UP and not flags & _RTF_REJECT:
                    if best is None or metric < best[0]:
                        best = (metric, iface)
    except OSError:
        pass
    if best is None:
        try:
            with open("/proc/net/ipv6_route") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) < _IPV6_ROUTE_FIELDS:
                        continue
                    dest, plen, iface = fields[0], fields[1], fields[9]
                    metric, flags = int(fields[5], 16), int(fields[8], 16)
                    if (dest == "0" * 32 and plen == "00" and flags & _RTF_UP and not flags & _RTF_REJECT
                            and iface != "lo"):
                        if best is None or metric < best[0]:
                            best = (metric, iface)
        except OSError:
            pass
    if best is None:
        raise LiveError("no default route: name an interface with -i (imaptap -D lists them)")
    return best[1]


def _read_sys(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def list_interfaces() -> list[tuple[int, str, str]]:
    """(index, name, description) of every interface, as tcpdump -D lists them."""
    out = []
    base = Path("/sys/class/net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return [(i, n, "") for i, n in socket.if_nameindex()]
    for name in names:
        d = base / name
        try:
            index = int(_read_sys(d / "ifindex"))
        except ValueError:
            continue
        try:
            flags = int(_read_sys(d / "flags"), 16)
        except ValueError:
            flags = 0
        parts = []
        if flags & _IFF_UP:
            parts.append("Up")
        if flags & _IFF_RUNNING:
            parts.append("Running")
        if flags & _IFF_LOOPBACK:
            parts.append("Loopback")
        else:
            if (d / "wireless").exists():
                parts.append("Wireless")
            state = _read_sys(d / "operstate")
            parts.append({"up": "Connected", "down": "Disconnected"}.get(state, "Connection status unknown"))
        out.append((index, name, ", ".join(parts)))
    out.sort()
    return out


def interface_gone(index: int) -> bool:
    """Whether interface ``index`` no longer exists (removed while we captured)."""
    try:
        socket.if_indextoname(index)
    except OSError:
        return True
    return False


def nested_attrs(msg, name):
    """The nested attribute ``name`` of a pyroute2 message, {} where it is absent."""
    attr = msg.get_attr(name)
    return attr if attr is not None else {}


def attr_value(nla, name, default=None):
    """The value of attribute ``name`` in a nested attribute as `nested_attrs` returns it."""
    for k, v in (nla or {}).get("attrs", []):
        if k == name:
            return v
    return default


def link_kind(ipr, index: int) -> str | None:
    """The link's kind as `ip -d link` shows it (veth, bridge, ...); None for a plain device."""
    try:
        (link,) = ipr.get_links(index)
    except Exception:  # any failure: only a note depends on the kind
        return None
    return attr_value(nested_attrs(link, "IFLA_LINKINFO"), "IFLA_INFO_KIND")


# --- link events ---------------------------------------------------------------------------------

# rtnetlink (include/uapi/linux/rtnetlink.h, if_link.h, netlink.h).
_RTMGRP_LINK = 0x1
RTM_NEWLINK, RTM_DELLINK = 16, 17
_IFLA_IFNAME = 3
_NLMSG_HEADER = struct.Struct("=IHHII")    # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")      # family, (pad), type, index, flags, change
_RTATTR = struct.Struct("=HH")             # len, type
#: Bytes one read takes: a netlink datagram of link messages is at most a page or two (each
#: message a few hundred bytes to a few kilobytes with its statistics); 64 KiB holds many.
#: Read into one buffer kept for the monitor's life: `read` runs before every poll, and
#: socket.recv() would allocate (and free) a fresh 64 KiB object each time even when nothing
#: came, a hundred times a second under load, which fragments glibc's heap (README, Soak).
LINK_READ_BYTES = 1 << 16
#: Datagrams read per `LinkMonitor.read`: a burst of link changes (a host starting a hundred
#: containers) is taken over several polls rather than stalling one.
LINK_READS_PER_POLL = 64
#: The socket's receive buffer: room for a burst of link messages between two polls.  When it
#: overflows anyway (ENOBUFS), `read` says so and the caller looks at its interfaces afresh.
LINK_RCVBUF_BYTES = 1 << 20


class LinkChange(enum.Enum):
    """What an rtnetlink link message says."""

    NEW = "new"
    """A link appeared or changed (flags, name, the XDP program on it)."""
    DEL = "del"
    """A link went away."""


class LinkMessage(NamedTuple):
    """One RTM_NEWLINK or RTM_DELLINK: the interface's index, name (when given) and flags."""

    change: LinkChange
    ifindex: int
    name: str | None
    flags: int

    @property
    def usable(self) -> bool:
        """Up and running: traffic can cross it."""
        return self.flags & IFF_USABLE == IFF_USABLE


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_link_messages(data: bytes) -> list[LinkMessage]:
    """The link messages in one netlink datagram; anything else, or a cut message, ends the list."""
    out = []
    off = 0
    while off + _NLMSG_HEADER.size <= len(data):
        length, mtype = _NLMSG_HEADER.unpack_from(data, off)[:2]
        end = off + length
        if length < _NLMSG_HEADER.size or end > len(data):
            break
        body = off + _NLMSG_HEADER.size
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFOMSG.size <= end:
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
            name = None
            attr = body + _IFINFOMSG.size
            while attr + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, attr)
                if alen < _RTATTR.size or attr + alen > end:
                    break
                if atype == _IFLA_IFNAME:
                    raw = data[attr + _RTATTR.size:attr + alen].split(b"\0", 1)[0]
                    name = raw.decode("utf-8", "replace")
                attr += _align4(alen)
            out.append(LinkMessage(LinkChange.NEW if mtype == RTM_NEWLINK else LinkChange.DEL, index, name, flags))
        off += _align4(length)
    return out


class LinkMonitor:
    """rtnetlink's link messages for this network namespace, read without blocking."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_RCVBUF_BYTES)
            sock.bind((0, _RTMGRP_LINK))
        except OSError:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self._buffer = bytearray(LINK_READ_BYTES)
        self._view = memoryview(self._buffer)

    def fileno(self) -> int:
        """The netlink socket, for a caller that waits on it."""
        return self._sock.fileno() if self._sock is not None else -1

    def read(self) -> list[LinkMessage] | None:
        """The messages that arrived since the last call; None if some were lost (the socket's
        buffer overflowed), when the caller must look at its interfaces afresh."""
        out: list[LinkMessage] = []
        if self._sock is None:
            return out
        for _ in range(LINK_READS_PER_POLL):
            try:
                size = self._sock.recv_into(self._buffer)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return None
                raise
            out += parse_link_messages(bytes(self._view[:size]))
        return out

    def close(self) -> None:
        """Stop listening; safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def interface_index(name: str) -> int | None:
    """The index of the interface called ``name`` now, or None if there is none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def interface_usable(name: str) -> bool:
    """Whether interface ``name`` is up and running, from /sys (False if unreadable).

    /sys's flags leave IFF_RUNNING out; the operational state stands in for it as the kernel
    derives it (up, or unknown for devices that do not report one)."""
    d = Path("/sys/class/net") / name
    try:
        flags = int(_read_sys(d / "flags"), 16)
    except ValueError:
        return False
    return bool(flags & _IFF_UP) and _read_sys(d / "operstate") in ("up", "unknown")
