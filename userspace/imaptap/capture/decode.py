"""Link, IP and TCP header decoding at fixed offsets, for capture files and the pcap writer.

One packet is decoded by a handful of ``struct.unpack_from`` calls on the captured bytes, with
no per-packet objects until a segment on a monitored port is found: replaying a capture is
mostly skipping packets on other ports, and that has to be cheap.  The kernel program
(bpf/imaptap.bpf.c) makes the same decisions, so a replayed capture and a live one give the
same segments.

Covered:

- link types in `LINK_TYPES`: Ethernet with any number of 802.1Q / 802.1ad / 0x9100 VLAN tags,
  Linux cooked v1 and v2, raw IP, IPv4-only and IPv6-only raw, BSD null and loopback;
- IPv4 with options; every fragment of a fragmented packet (first ones too) is reported as
  `Skip.FRAGMENT`, as nothing here reassembles;
- IPv6 with hop-by-hop, routing, destination-options and AH extension headers, and an atomic
  fragment header (offset 0, no more fragments); a real fragment is `Skip.FRAGMENT`;
- TCP with options (data offset).

Limits: no tunnels (GRE, VXLAN, IP-in-IP, MPLS, PPPoE are `Skip.NOT_TCP`), no ESP, no IPv6
jumbograms beyond "payload length 0 means up to the end of the capture", which is also how a
zero IPv4 total length (segmentation offload on the capturing host) is read.  Link type 12 is
read as raw IP, as everywhere but OpenBSD (where 12 is DLT_LOOP; its files say 108).
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Callable, Collection
from typing import NamedTuple, final

from imaptap.segment import TcpFlag


@final  # as every enum with members; said so that ``type(p) is Skip`` narrows both ways
class Skip(enum.IntEnum):
    """Why a packet gave no TCP segment; the replay counts each reason."""

    NOT_TCP = 1
    """Not IPv4 or IPv6 (ARP, LLC, MPLS...), or IP that does not carry TCP."""
    FRAGMENT = 2
    """A fragment (first or later) of a fragmented IP packet that carries TCP."""
    OTHER_PORT = 3
    """TCP, but neither port is monitored."""
    UNDECODABLE = 4
    """Headers that are cut short by the capture or contradict themselves."""
    EMPTY = 5
    """TCP without payload and without SYN, FIN or RST (a pure ACK): the kernel program never
    copies these, so replay drops them here, before it spends anything on them."""


class TcpPacket(NamedTuple):
    """The fields of one TCP packet that a `Segment` needs, less the capture time."""

    ip_version: int
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    """Byte 13 of the TCP header (FIN SYN RST PSH ACK URG ECE CWR), as the kernel reports it."""
    wire_len: int
    """TCP payload length according to the IP header; never negative."""
    payload: bytes
    """The captured part of the TCP payload (a snap length or a short record may cut it)."""


Decoded = TcpPacket | Skip
Ports = Collection[int] | None
"""Ports to keep (either end); None keeps every TCP packet."""

# -- Headers, declared once.  Network byte order; only the fields used are unpacked. --------

ETHERNET = struct.Struct("!12xH")
"""Destination and source MAC (skipped), EtherType."""
ETHERNET_LEN = 14
VLAN_TAG = struct.Struct("!2xH")
"""The rest of a VLAN tag after its TPID: TCI (skipped), the EtherType it encloses."""
VLAN_TAG_LEN = 4
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100})
"""802.1Q, 802.1ad (QinQ service tag), and the older 0x9100 QinQ."""
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD

SLL = struct.Struct("!14xH")
"""Linux cooked v1: packet type, ARPHRD, address length, 8 address bytes (skipped); protocol."""
SLL_LEN = 16
SLL2 = struct.Struct("!H")
"""Linux cooked v2 starts with the protocol; reserved, ifindex, ARPHRD, type, address follow."""
SLL2_LEN = 20

NULL_AF_LE = struct.Struct("<I")
NULL_AF_BE = struct.Struct(">I")
NULL_LEN = 4
AF_INET = 2
AF_INET6_VALUES = frozenset({10, 23, 24, 28, 30})
"""AF_INET6 as written by Linux (10), Windows/Npcap loopback (23), NetBSD/OpenBSD (24),
FreeBSD (28) and macOS (30): the null header holds the capturing host's value."""

IPV4 = struct.Struct("!BxHxxHxB")
"""Version and IHL, (TOS), total length, (id), flags and fragment offset, (TTL), protocol."""
IPV4_MIN_LEN = 20
IPV4_SRC = 12
IPV4_DST = 16
IPV4_FRAGMENT_MASK = 0x3FFF
"""More-fragments flag and fragment offset: any bit set means a fragment."""

IPV6 = struct.Struct("!IHB")
"""Version, traffic class and flow label; payload length; next header."""
IPV6_LEN = 40
IPV6_SRC = 8
IPV6_DST = 24
IPV6_EXT = struct.Struct("!BB")
"""Next header, header extension length (units depend on the header)."""
IPV6_FRAGMENT = struct.Struct("!BxH")
"""Next header, (reserved), offset (13 bits) + 2 reserved bits + more-fragments flag."""
IPV6_FRAGMENT_LEN = 8
IPV6_FRAGMENT_MASK = 0xFFF9
"""Offset and more-fragments bits: zero only in an atomic fragment (RFC 6946)."""
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_DSTOPTS = 60
IPV6_EXT_8 = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS})
"""Extension headers whose length field counts 8-byte units beyond the first 8."""

IPPROTO_TCP = 6
TCP = struct.Struct("!HHIIBB")
"""Source port, destination port, seq, ack, data offset (high nibble), flags."""
TCP_MIN_LEN = 20
TCP_PORTS = struct.Struct("!HH")
"""Source and destination port: all a packet on another port costs."""

ETHERNET_IPV4 = struct.Struct(ETHERNET.format + IPV4.format[1:])
"""`ETHERNET` and `IPV4` read at once."""

_ethernet = ETHERNET.unpack_from
_vlan_tag = VLAN_TAG.unpack_from
_sll = SLL.unpack_from
_sll2 = SLL2.unpack_from
_null_le = NULL_AF_LE.unpack_from
_null_be = NULL_AF_BE.unpack_from
_ipv4 = IPV4.unpack_from
_ipv6 = IPV6.unpack_from
_ipv6_ext = IPV6_EXT.unpack_from
_ipv6_fragment = IPV6_FRAGMENT.unpack_from
_tcp = TCP.unpack_from
_tcp_ports = TCP_PORTS.unpack_from
_ethernet_ipv4 = ETHERNET_IPV4.unpack_from
_ntoa = socket.inet_ntoa
_ntop = socket.inet_ntop
_AF_INET6 = socket.AF_INET6
_new_tuple = tuple.__new__

NOT_TCP = Skip.NOT_TCP
FRAGMENT = Skip.FRAGMENT
OTHER_PORT = Skip.OTHER_PORT
UNDECODABLE = Skip.UNDECODABLE
EMPTY = Skip.EMPTY
#: SYN, FIN and RST: the flags that drive a flow's life cycle even without payload.
_LIFECYCLE = int(TcpFlag.SYN | TcpFlag.FIN | TcpFlag.RST)


def _tcp_packet(buf: bytes, off: int, ip_end: int, version: int, addr: int) -> Decoded:
    """The TCP header at ``off`` (checked to be captured) of an IP packet that ends at ``ip_end``."""
    sport, dport, seq, ack, data_offset, flags = _tcp(buf, off)
    header_len = (data_offset >> 4) * 4
    if header_len < TCP_MIN_LEN:
        return UNDECODABLE
    start = off + header_len
    wire_len = ip_end - start
    if wire_len <= 0:
        if not flags & _LIFECYCLE:
            return EMPTY
        wire_len = 0
    # ip_end, not the end of the record: Ethernet padding and trailers are not payload.
    payload = buf[start:ip_end]
    if version == 4:
        src = _ntoa(buf[addr : addr + 4])
        dst = _ntoa(buf[addr + 4 : addr + 8])
    else:
        src = _ntop(_AF_INET6, buf[addr : addr + 16])
        dst = _ntop(_AF_INET6, buf[addr + 16 : addr + 32])
    # tuple.__new__ skips the NamedTuple's Python-level __new__: a third of the cost.
    return _new_tuple(TcpPacket, (version, src, dst, sport, dport, seq, ack, flags, wire_len, payload))


def decode_ipv4(buf: bytes, off: int = 0, ports: Ports = None) -> Decoded:
    """The IPv4 packet at ``off`` of ``buf``."""
    if len(buf) < off + IPV4_MIN_LEN:
        return UNDECODABLE
    version_ihl, total_len, fragment, proto = _ipv4(buf, off)
    return _ipv4_fields(buf, off, version_ihl, total_len, fragment, proto, ports)


def _ipv4_fields(buf: bytes, off: int, version_ihl: int, total_len: int, fragment: int, proto: int,
                 ports: Ports) -> Decoded:
    """The IPv4 packet at ``off`` whose fixed header fields (captured) are given."""
    header_len = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header_len < IPV4_MIN_LEN:
        return UNDECODABLE
    if proto != IPPROTO_TCP:
        return NOT_TCP
    if fragment & IPV4_FRAGMENT_MASK:
        return FRAGMENT
    tcp = off + header_len
    if len(buf) < tcp + TCP_MIN_LEN:
        return UNDECODABLE
    if ports is not None:  # the early exit most packets of a capture take
        sport, dport = _tcp_ports(buf, tcp)
        if sport not in ports and dport not in ports:
            return OTHER_PORT
    if total_len == 0:  # segmentation offload on the capturing host: length not filled in
        ip_end = len(buf)
    elif total_len < header_len:
        return UNDECODABLE
    else:
        ip_end = off + total_len
    return _tcp_packet(buf, tcp, ip_end, 4, off + IPV4_SRC)


def decode_ipv6(buf: bytes, off: int = 0, ports: Ports = None) -> Decoded:
    """The IPv6 packet at ``off`` of ``buf``, through its extension headers."""
    if len(buf) < off + IPV6_LEN:
        return UNDECODABLE
    version_class_flow, payload_len, next_header = _ipv6(buf, off)
    if version_class_flow >> 28 != 6:
        return UNDECODABLE
    # 0: a jumbogram or segmentation offload; the capture is all there is to go by.
    ip_end = off + IPV6_LEN + payload_len if payload_len else len(buf)
    p = off + IPV6_LEN
    # Every extension header is at least 8 bytes, so the walk ends with the buffer.
    while next_header != IPPROTO_TCP:
        if next_header in IPV6_EXT_8:
            if len(buf) < p + 2:
                return UNDECODABLE
            next_header, ext_len = _ipv6_ext(buf, p)
            p += (ext_len + 1) * 8
        elif next_header == IPPROTO_FRAGMENT:
            if len(buf) < p + IPV6_FRAGMENT_LEN:
                return UNDECODABLE
            next_header, offset_flags = _ipv6_fragment(buf, p)
            if offset_flags & IPV6_FRAGMENT_MASK:
                # Later fragments may start with more extension headers, so anything but a
                # plain upper-layer protocol may still be TCP.
                if next_header == IPPROTO_TCP or next_header in IPV6_EXT_8 or next_header == IPPROTO_AH:
                    return FRAGMENT
                return NOT_TCP
            p += IPV6_FRAGMENT_LEN
        elif next_header == IPPROTO_AH:
            if len(buf) < p + 2:
                return UNDECODABLE
            next_header, ext_len = _ipv6_ext(buf, p)
            p += (ext_len + 2) * 4
        else:  # no next header (59), ESP (50), UDP, ICMPv6, ...
            return NOT_TCP
    if len(buf) < p + TCP_MIN_LEN:
        return UNDECODABLE
    if ports is not None:
        sport, dport = _tcp_ports(buf, p)
        if sport not in ports and dport not in ports:
            return OTHER_PORT
    return _tcp_packet(buf, p, ip_end, 6, off + IPV6_SRC)


def _by_ethertype(buf: bytes, off: int, ethertype: int, ports: Ports) -> Decoded:
    """Follow VLAN tags from ``off`` (just after an EtherType) to IPv4 or IPv6."""
    while ethertype in VLAN_TPIDS:
        if len(buf) < off + VLAN_TAG_LEN:
            return UNDECODABLE
        (ethertype,) = _vlan_tag(buf, off)
        off += VLAN_TAG_LEN
    if ethertype == ETHERTYPE_IPV4:
        return decode_ipv4(buf, off, ports)
    if ethertype == ETHERTYPE_IPV6:
        return decode_ipv6(buf, off, ports)
    return NOT_TCP


def decode_ethernet(buf: bytes, ports: Ports = None) -> Decoded:
    """DLT_EN10MB (1)."""
    if len(buf) >= ETHERNET_LEN + IPV4_MIN_LEN:
        # Untagged IPv4, the common case, in one unpack and two calls fewer.
        ethertype, version_ihl, total_len, fragment, proto = _ethernet_ipv4(buf, 0)
        if ethertype == ETHERTYPE_IPV4:
            return _ipv4_fields(buf, ETHERNET_LEN, version_ihl, total_len, fragment, proto, ports)
    elif len(buf) >= ETHERNET_LEN:
        (ethertype,) = _ethernet(buf, 0)
    else:
        return UNDECODABLE
    return _by_ethertype(buf, ETHERNET_LEN, ethertype, ports)


def decode_sll(buf: bytes, ports: Ports = None) -> Decoded:
    """DLT_LINUX_SLL (113), Linux "any" device captures."""
    if len(buf) < SLL_LEN:
        return UNDECODABLE
    (protocol,) = _sll(buf, 0)
    return _by_ethertype(buf, SLL_LEN, protocol, ports)


def decode_sll2(buf: bytes, ports: Ports = None) -> Decoded:
    """DLT_LINUX_SLL2 (276)."""
    if len(buf) < SLL2_LEN:
        return UNDECODABLE
    (protocol,) = _sll2(buf, 0)
    return _by_ethertype(buf, SLL2_LEN, protocol, ports)


def decode_raw(buf: bytes, ports: Ports = None) -> Decoded:
    """Raw IP (12, 14, 101): the version nibble says which."""
    if not buf:
        return UNDECODABLE
    version = buf[0] >> 4
    if version == 4:
        return decode_ipv4(buf, 0, ports)
    if version == 6:
        return decode_ipv6(buf, 0, ports)
    return UNDECODABLE


def decode_ipv4_link(buf: bytes, ports: Ports = None) -> Decoded:
    """LINKTYPE_IPV4 (228)."""
    return decode_ipv4(buf, 0, ports)


def decode_ipv6_link(buf: bytes, ports: Ports = None) -> Decoded:
    """LINKTYPE_IPV6 (229)."""
    return decode_ipv6(buf, 0, ports)


def decode_null(buf: bytes, ports: Ports = None) -> Decoded:
    """BSD null (0, host byte order) and loopback (108, network byte order) encapsulation."""
    if len(buf) < NULL_LEN:
        return UNDECODABLE
    # Either byte order is accepted for both: files move between hosts, and a family
    # number never needs more than the low 16 bits.
    (family,) = _null_le(buf, 0)
    if family > 0xFFFF:
        (family,) = _null_be(buf, 0)
    if family == AF_INET:
        return decode_ipv4(buf, NULL_LEN, ports)
    if family in AF_INET6_VALUES:
        return decode_ipv6(buf, NULL_LEN, ports)
    return NOT_TCP


LinkDecoder = Callable[[bytes, Ports], Decoded]
"""Decodes one captured frame of a link type, keeping only TCP packets on the given ports."""


class LinkType(NamedTuple):
    name: str
    """libpcap's name for it, as ``tcpdump -L`` prints."""
    decode: LinkDecoder


LINK_TYPES: dict[int, LinkType] = {
    0: LinkType("NULL", decode_null),
    1: LinkType("EN10MB", decode_ethernet),
    12: LinkType("RAW", decode_raw),
    14: LinkType("RAW", decode_raw),
    101: LinkType("RAW", decode_raw),
    108: LinkType("LOOP", decode_null),
    113: LinkType("LINUX_SLL", decode_sll),
    228: LinkType("IPV4", decode_ipv4_link),
    229: LinkType("IPV6", decode_ipv6_link),
    276: LinkType("LINUX_SLL2", decode_sll2),
}
"""Link-layer header types (https://www.tcpdump.org/linktypes.html) that can be decoded."""


def decode_packet(linktype: int, buf: bytes, ports: Ports = None) -> Decoded:
    """Decode one captured frame of ``linktype``: a `TcpPacket`, or why there is none.

    A link type not in `LINK_TYPES` is `Skip.UNDECODABLE`; a capture reader checks the link type
    once and calls ``LINK_TYPES[linktype].decode`` itself instead.
    """
    link = LINK_TYPES.get(linktype)
    if link is None:
        return UNDECODABLE
    return link.decode(buf, ports)
