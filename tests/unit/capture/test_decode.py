"""Header decoding: frames are built with dpkt (or byte by byte from the RFC layout), not with
the decoder's own structs, so a wrong offset in the decoder cannot agree with the test."""

import socket
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaptap.capture.decode import LINK_TYPES, Skip, TcpPacket, decode_ipv4, decode_ipv6, decode_packet

C4, S4 = "192.0.2.10", "198.51.100.20"
C6, S6 = "2001:db8::10", "2001:db8:0:1::20"
MAC_A, MAC_B = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
LINE = b"a1 LOGIN samir pfres\r\n"


def tcp(payload=LINE, sport=50123, dport=143, seq=1000, ack=2000, flags=0x18, opts=b""):
    assert len(opts) % 4 == 0
    return dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=512,
                        off=5 + len(opts) // 4, opts=opts, data=payload)


def ipv4(segment=None, src=C4, dst=S4, proto=6, off=0, opts=b""):
    """An IPv4 packet (bytes) around ``segment`` (a dpkt TCP, or raw bytes)."""
    segment = tcp() if segment is None else segment
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64,
                    _flags_offset=off, opts=opts, data=segment)
    ip.hl = 5 + len(opts) // 4
    return bytes(ip)


def ipv6(segment=None, src=C6, dst=S6, ext=b"", nxt=6):
    """An IPv6 packet (bytes); ``ext`` are raw extension headers and ``nxt`` names the first."""
    body = ext + bytes(tcp() if segment is None else segment)
    ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src), dst=socket.inet_pton(socket.AF_INET6, dst),
                      nxt=nxt, hlim=64, plen=len(body), data=body)
    return bytes(ip)


def ethernet(packet, ethertype=0x0800, tags=()):
    """An Ethernet frame; ``tags`` are (TPID, VLAN id) from the outside in."""
    head = MAC_B + MAC_A
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", ethertype) + packet


def sll(packet, protocol=0x0800):
    # packet type 0 (to us), ARPHRD_ETHER, 6 address bytes padded to 8, protocol
    return struct.pack("!HHH8sH", 0, 1, 6, MAC_A, protocol) + packet


def sll2(packet, protocol=0x0800, ifindex=3):
    # protocol, reserved, ifindex, ARPHRD_ETHER, packet type, address length, address
    return struct.pack("!HHIHBB8s", protocol, 0, ifindex, 1, 4, 6, MAC_A) + packet


def null(packet, family, order="<"):
    return struct.pack(order + "I", family) + packet


def expect_v4(p, payload=LINE, wire_len=None, sport=50123, dport=143):
    assert isinstance(p, TcpPacket), p
    assert (p.ip_version, p.src, p.dst, p.sport, p.dport) == (4, C4, S4, sport, dport)
    assert (p.seq, p.ack, p.flags) == (1000, 2000, 0x18)
    assert p.payload == payload
    assert p.wire_len == (len(payload) if wire_len is None else wire_len)


def expect_v6(p, payload=LINE):
    assert isinstance(p, TcpPacket), p
    assert (p.ip_version, p.src, p.dst, p.sport, p.dport) == (6, C6, S6, 50123, 143)
    assert (p.seq, p.ack, p.flags) == (1000, 2000, 0x18)
    assert (p.payload, p.wire_len) == (payload, len(payload))


# -- link layers -----------------------------------------------------------------------------

@pytest.mark.parametrize("linktype, frame4, frame6", [
    (1, ethernet(ipv4()), ethernet(ipv6(), 0x86DD)),
    (113, sll(ipv4()), sll(ipv6(), 0x86DD)),
    (276, sll2(ipv4()), sll2(ipv6(), 0x86DD)),
    (12, ipv4(), ipv6()),
    (14, ipv4(), ipv6()),
    (101, ipv4(), ipv6()),
    (0, null(ipv4(), 2), null(ipv6(), 24)),
    (108, null(ipv4(), 2, ">"), null(ipv6(), 24, ">")),
])
def test_each_link_type_gives_the_same_tcp_fields(linktype, frame4, frame6):
    expect_v4(decode_packet(linktype, frame4))
    expect_v6(decode_packet(linktype, frame6))


def test_ipv4_and_ipv6_only_link_types():
    expect_v4(decode_packet(228, ipv4()))
    expect_v6(decode_packet(229, ipv6()))
    # The link type promises the version; a packet that says otherwise is garbage.
    assert decode_packet(228, ipv6()) is Skip.UNDECODABLE
    assert decode_packet(229, ipv4()) is Skip.UNDECODABLE


@pytest.mark.parametrize("family", [10, 23, 24, 28, 30])
@pytest.mark.parametrize("order", ["<", ">"])
def test_null_accepts_every_af_inet6_in_either_byte_order(family, order):
    expect_v6(decode_packet(0, null(ipv6(), family, order)))
    expect_v6(decode_packet(108, null(ipv6(), family, order)))


def test_null_with_another_family_is_not_tcp():
    assert decode_packet(0, null(ipv4(), 7)) is Skip.NOT_TCP  # AF_APPLETALK...


@pytest.mark.parametrize("tags", [
    [(0x8100, 100)],
    [(0x88A8, 200), (0x8100, 100)],
    [(0x9100, 200), (0x8100, 100)],
    [(0x8100, 1), (0x8100, 2), (0x8100, 3)],
])
def test_vlan_tags_single_and_stacked(tags):
    expect_v4(decode_packet(1, ethernet(ipv4(), tags=tags)))
    expect_v6(decode_packet(1, ethernet(ipv6(), 0x86DD, tags=tags)))


def test_cooked_capture_of_a_tagged_frame():
    # An "any" capture of a frame whose tag was not offloaded: protocol 0x8100, then the tag.
    frame = struct.pack("!HHH8sH", 0, 1, 6, MAC_A, 0x8100) + struct.pack("!HH", 100, 0x0800) + ipv4()
    expect_v4(decode_packet(113, frame))


def test_vlan_tag_cut_short_is_undecodable():
    frame = MAC_B + MAC_A + b"\x81\x00\x00"
    assert decode_packet(1, frame) is Skip.UNDECODABLE


def test_not_ip_is_not_tcp():
    arp = ethernet(bytes(28), 0x0806)
    assert decode_packet(1, arp) is Skip.NOT_TCP
    assert decode_packet(113, sll(bytes(28), 0x0806)) is Skip.NOT_TCP


def test_ethernet_padding_and_fcs_are_not_payload():
    frame = ethernet(ipv4(tcp(b"ok")))
    assert len(frame) == 56
    padded = frame + bytes(60 - len(frame)) + b"\xde\xad\xbe\xef"  # minimum frame + FCS
    expect_v4(decode_packet(1, padded), payload=b"ok")
    # a FIN without payload, padded to the minimum frame: the padding is not payload
    fin = decode_packet(1, ethernet(ipv4(tcp(b"", flags=0x11))) + bytes(6))
    assert isinstance(fin, TcpPacket) and fin.payload == b"" and fin.wire_len == 0
    # a pure ACK is dropped as the kernel program drops it
    assert decode_packet(1, ethernet(ipv4(tcp(b"", flags=0x10))) + bytes(6)) is Skip.EMPTY


# -- IPv4 ------------------------------------------------------------------------------------

def test_ipv4_options_are_skipped():
    # Router Alert + padding: 8 option bytes, IHL 7.  Reading TCP at offset 20 would take the
    # option bytes for ports.
    expect_v4(decode_ipv4(ipv4(opts=b"\x94\x04\x00\x00\x01\x01\x01\x00")))


def test_tcp_options_are_skipped():
    mss_ts = b"\x02\x04\x05\xb4\x01\x01\x08\x0a" + struct.pack("!II", 7, 9)
    expect_v4(decode_ipv4(ipv4(tcp(opts=mss_ts))))


@pytest.mark.parametrize("off", [dpkt.ip.IP_MF, 185, dpkt.ip.IP_MF | 185])
def test_ipv4_fragments_first_and_later_are_skipped(off):
    assert decode_ipv4(ipv4(off=off)) is Skip.FRAGMENT


def test_dont_fragment_is_not_a_fragment():
    expect_v4(decode_ipv4(ipv4(off=dpkt.ip.IP_DF)))


def test_a_fragment_of_udp_is_not_tcp_rather_than_a_lost_tcp_fragment():
    udp = bytes(dpkt.udp.UDP(sport=53, dport=53, data=b"x" * 8))
    assert decode_ipv4(ipv4(udp, proto=17, off=dpkt.ip.IP_MF)) is Skip.NOT_TCP


def test_udp_and_icmp_are_not_tcp():
    assert decode_ipv4(ipv4(bytes(dpkt.udp.UDP(sport=143, dport=143)), proto=17)) is Skip.NOT_TCP
    assert decode_ipv4(ipv4(b"\x08\x00\x00\x00\x00\x00\x00\x00", proto=1)) is Skip.NOT_TCP


def test_wire_len_comes_from_the_ip_header_not_the_capture():
    payload = bytes(range(256)) * 4  # 1024 bytes on the wire
    frame = ethernet(ipv4(tcp(payload)))
    cut = frame[:64]  # tcpdump -s 64
    p = decode_packet(1, cut)
    expect_v4(p, payload=payload[:64 - 54], wire_len=1024)


def test_zero_total_length_from_segmentation_offload_uses_the_capture():
    packet = bytearray(ipv4(tcp(b"x" * 3000)))
    packet[2:4] = b"\x00\x00"
    expect_v4(decode_ipv4(bytes(packet)), payload=b"x" * 3000)


def test_total_length_shorter_than_the_headers_gives_zero_not_negative():
    packet = bytearray(ipv4(tcp(b"hello", flags=0x19)))  # FIN: kept even without payload
    packet[2:4] = struct.pack("!H", 30)  # IP header 20 + 10: not even the TCP header
    p = decode_ipv4(bytes(packet))
    assert isinstance(p, TcpPacket) and p.wire_len == 0 and p.payload == b""


@pytest.mark.parametrize("mutate", [
    lambda b: b[:19],                                 # not even an IP header
    lambda b: bytes([0x44]) + b[1:],                  # IHL 4
    lambda b: bytes([0x65]) + b[1:],                  # version 6 in an IPv4 header
    lambda b: b[:2] + struct.pack("!H", 12) + b[4:],  # total length < IHL
    lambda b: b[:38],                                 # TCP header cut by the snap length
    lambda b: b[:32] + bytes([0x40]) + b[33:],        # TCP data offset 4
])
def test_garbage_headers_are_undecodable_not_exceptions(mutate):
    assert decode_ipv4(mutate(ipv4())) is Skip.UNDECODABLE


# -- IPv6 ------------------------------------------------------------------------------------

def hop_by_hop(nxt, pad_units=0):
    # next header, length in 8-byte units beyond the first 8, PadN filling the rest
    return bytes([nxt, pad_units, 1, 4]) + bytes(4 + 8 * pad_units)  # PadN options: contents unchecked


def fragment(nxt, offset=0, more=False):
    return struct.pack("!BBHI", nxt, 0, (offset << 3) | int(more), 0x1234)


def test_ipv6_hop_by_hop_and_destination_options_are_followed():
    ext = hop_by_hop(60, 1) + hop_by_hop(6)  # HBH (16 bytes) -> dest opts (8 bytes) -> TCP
    p = decode_ipv6(ipv6(ext=ext, nxt=0))
    expect_v6(p)  # wire_len is the TCP payload: extension headers are not counted


def test_ipv6_routing_header_and_ah_are_followed():
    routing = bytes([51, 0, 0, 0]) + bytes(4)  # type 0, segments left 0
    ah = bytes([6, 4, 0, 0]) + bytes(20)       # (4 + 2) * 4 = 24 bytes
    expect_v6(decode_ipv6(ipv6(ext=routing + ah, nxt=43)))


def test_ipv6_atomic_fragment_is_followed():
    expect_v6(decode_ipv6(ipv6(ext=fragment(6), nxt=44)))


@pytest.mark.parametrize("offset, more", [(0, True), (100, True), (100, False)])
def test_ipv6_real_fragments_are_skipped(offset, more):
    assert decode_ipv6(ipv6(ext=fragment(6, offset, more), nxt=44)) is Skip.FRAGMENT
    assert decode_ipv6(ipv6(ext=fragment(17, offset, more), nxt=44)) is Skip.NOT_TCP


@pytest.mark.parametrize("nxt", [17, 50, 58, 59])
def test_ipv6_udp_esp_icmp_and_no_next_header_are_not_tcp(nxt):
    assert decode_ipv6(ipv6(ext=b"", nxt=nxt)) is Skip.NOT_TCP


def test_ipv6_extension_header_running_off_the_capture_is_undecodable():
    packet = ipv6(ext=hop_by_hop(6, 200), nxt=0)  # claims 1608 bytes
    assert decode_ipv6(packet[:100]) is Skip.UNDECODABLE


def test_ipv6_addresses_are_in_compressed_form():
    p = decode_ipv6(ipv6(src="2001:0db8:0000:0000:0000:0000:0000:0001", dst="::ffff:192.0.2.1"))
    assert (p.src, p.dst) == ("2001:db8::1", "::ffff:192.0.2.1")


def test_ipv6_snap_length_keeps_wire_len():
    payload = b"y" * 1000
    cut = ethernet(ipv6(tcp(payload)), 0x86DD)[:100]
    p = decode_packet(1, cut)
    assert p.wire_len == 1000 and p.payload == payload[: 100 - 14 - 40 - 20]


# -- ports -----------------------------------------------------------------------------------

def test_ports_filter_either_end():
    assert decode_ipv4(ipv4(tcp(sport=40000, dport=80)), ports={143}) is Skip.OTHER_PORT
    assert decode_ipv6(ipv6(tcp(sport=40000, dport=80)), ports={143}) is Skip.OTHER_PORT
    expect_v4(decode_ipv4(ipv4(tcp(sport=143, dport=50123)), ports={143}), sport=143, dport=50123)
    expect_v4(decode_ipv4(ipv4(tcp(sport=40000, dport=80)), ports=None), sport=40000, dport=80)
    expect_v4(decode_packet(1, ethernet(ipv4(tcp(dport=993))), ports={143, 993}), dport=993)


def test_every_flag_bit_is_kept():
    p = decode_ipv4(ipv4(tcp(flags=0xC2)))  # SYN + ECE + CWR
    assert p.flags == 0xC2


def test_unknown_link_type_is_undecodable():
    assert 147 not in LINK_TYPES
    assert decode_packet(147, ethernet(ipv4())) is Skip.UNDECODABLE


# -- garbage never raises --------------------------------------------------------------------

VALID = [(1, ethernet(ipv4())), (1, ethernet(ipv6(ext=hop_by_hop(6), nxt=0), 0x86DD, tags=[(0x8100, 5)])),
         (113, sll(ipv4())), (276, sll2(ipv6(), 0x86DD)), (101, ipv4(opts=b"\x01\x01\x01\x00")),
         (0, null(ipv6(ext=fragment(6), nxt=44), 24))]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(LINK_TYPES)), st.binary(max_size=200), st.sampled_from([None, {143}]))
def test_random_bytes_never_raise(linktype, buf, ports):
    p = decode_packet(linktype, buf, ports)
    assert isinstance(p, (Skip, TcpPacket))
    if isinstance(p, TcpPacket):
        assert p.wire_len >= 0 and len(p.payload) <= len(buf)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_corrupted_real_headers_never_raise(valid, data):
    linktype, frame = valid
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    buf = bytes(buf[: data.draw(st.integers(0, len(buf)))])
    p = decode_packet(linktype, buf, None)
    assert isinstance(p, (Skip, TcpPacket))
    if isinstance(p, TcpPacket):
        assert p.wire_len >= 0 and len(p.payload) <= len(buf)
