"""Network interfaces: the default route's, a tcpdump -D style list, a link's kind, gone or not.

Read from /proc and /sys (no privileges, no pyroute2), except `link_kind`, which asks an
open netlink socket; ``nested_attrs`` and ``attr_value`` read pyroute2's messages.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from imaptap.capture.live.errors import LiveError

# Route flags (include/uapi/linux/route.h) and interface flags (include/uapi/linux/if.h).
_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
_IFF_UP, _IFF_RUNNING, _IFF_LOOPBACK = 0x1, 0x40, 0x8

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
