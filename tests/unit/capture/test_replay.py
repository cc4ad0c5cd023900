"""Capture files in, Segments out: pcap and pcapng as dpkt writes them, cut and broken files,
and the public captures of other projects, whose counts were checked with tshark."""

import contextlib
import glob
import json
import os
import struct

import dpkt
import pytest
from dpkt.pcapng import (
    EnhancedPacketBlock,
    EnhancedPacketBlockLE,
    InterfaceDescriptionBlock,
    InterfaceDescriptionBlockLE,
    PcapngOption,
    PcapngOptionLE,
    SectionHeaderBlock,
    SectionHeaderBlockLE,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import imaptap.capture.replay as replay_module
from imaptap.capture.decode import Skip
from imaptap.capture.replay import CaptureFileError, ReplayStats, open_capture
from imaptap.segment import (
    DEFAULT_HANDSHAKE_SNAPLEN,
    DEFAULT_SNAPLEN,
    DEFAULT_TAILLEN,
    WHOLE_PAYLOAD_CAP,
    PayloadMode,
    PayloadPolicy,
    Segment,
    flow_key,
)
from test_decode import C4, C6, S4, S6, ethernet, ipv4, ipv6, null, sll, sll2, tcp
from testenv import OWN_PCAPS, accelerator, accelerator_params, public_pcap, public_pcap_paths

TS = 1_700_000_000.25


def write_pcap(path, frames, linktype=1, nano=False, ts=TS):
    """A pcap in host byte order, one frame per record, one second apart."""
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, linktype=linktype, nano=nano)
        for i, frame in enumerate(frames):
            w.writepkt(frame, ts=ts + i)
    return path


def write_pcap_be(path, frames, linktype=1):
    """A big-endian pcap, as written on SPARC or PowerPC."""
    records = [bytes(dpkt.pcap.PktHdr(tv_sec=int(TS) + i, tv_usec=250000, caplen=len(fr), len=len(fr))) + fr
               for i, fr in enumerate(frames)]
    header = dpkt.pcap.FileHdr(snaplen=65535, linktype=linktype)
    path.write_bytes(bytes(header) + b"".join(records))
    return path


def replay(path, ports=frozenset({143}), policy=None):
    stats = ReplayStats()
    with open_capture(path) as reader:
        segs = list(reader.segments(set(ports) if ports is not None else None, policy or PayloadPolicy(), stats))
    return segs, stats


def replay_until_error(path, ports=frozenset({143})):
    """The segments yielded before the CaptureFileError, and the error."""
    stats, segs = ReplayStats(), []
    reader = open_capture(path)
    with pytest.raises(CaptureFileError) as info:
        for seg in reader.segments(set(ports), PayloadPolicy(), stats):
            segs.append(seg)
    reader.close()
    return segs, stats, str(info.value)


def conversation(n=3):
    """n client lines to port 143, seq advancing."""
    return [ethernet(ipv4(tcp(b"a%d NOOP\r\n" % i, seq=1000 + 9 * i))) for i in range(n)]


# -- link types and formats -------------------------------------------------------------------

@pytest.mark.parametrize("linktype, frame, name", [
    (1, ethernet(ipv4()), "EN10MB"),
    (113, sll(ipv4()), "LINUX_SLL"),
    (276, sll2(ipv4()), "LINUX_SLL2"),
    (12, ipv4(), "RAW"),
    (14, ipv4(), "RAW"),
    (101, ipv4(), "RAW"),
    (228, ipv4(), "IPV4"),
    (0, null(ipv4(), 2), "NULL"),
    (108, null(ipv4(), 2, ">"), "LOOP"),
])
def test_each_link_type_replays(tmp_path, linktype, frame, name):
    segs, stats = replay(write_pcap(tmp_path / "c.pcap", [frame], linktype))
    assert segs == [Segment(TS, 4, C4, S4, 50123, 143, 1000, 2000, 0x18, 22, b"a1 LOGIN samir pfres\r\n")]
    assert stats.link_type == name and stats.packets == 1 and stats.segments == 1


@pytest.mark.parametrize("linktype, frame", [(229, ipv6()), (1, ethernet(ipv6(), 0x86DD)), (0, null(ipv6(), 30))])
def test_ipv6_replays(tmp_path, linktype, frame):
    (seg,), _ = replay(write_pcap(tmp_path / "c.pcap", [frame], linktype))
    assert (seg.ip_version, seg.src, seg.dst, seg.wire_len) == (6, "2001:db8::10", "2001:db8:0:1::20", 22)


def test_big_endian_pcap(tmp_path):
    segs, stats = replay(write_pcap_be(tmp_path / "be.pcap", conversation()))
    assert [s.payload for s in segs] == [b"a0 NOOP\r\n", b"a1 NOOP\r\n", b"a2 NOOP\r\n"]
    assert [s.ts for s in segs] == [TS, TS + 1, TS + 2]


def test_nanosecond_timestamps(tmp_path):
    path = write_pcap(tmp_path / "ns.pcap", conversation(1), nano=True, ts=1_700_000_000.123456789)
    assert open(path, "rb").read(4) in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    (seg,), _ = replay(path)
    # Read as microseconds the fraction would be 123 seconds.
    assert abs(seg.ts - 1_700_000_000.123456789) < 1e-6


def test_link_type_in_the_high_bits_carries_fcs_info_and_is_masked(tmp_path):
    # pcap spec: bits 28-31 say an FCS of some length is present; the link type is the low 16.
    path = write_pcap(tmp_path / "fcs.pcap", [ethernet(ipv4()) + b"\x01\x02\x03\x04"], linktype=0x50000001)
    (seg,), stats = replay(path)
    assert seg.payload == b"a1 LOGIN samir pfres\r\n" and stats.link_type == "EN10MB"


# -- what a segment carries -------------------------------------------------------------------

def test_snap_length_64_keeps_the_wire_length(tmp_path):
    payload = b"* 1 FETCH (BODY[] {1000}\r\n".ljust(1000, b"x")
    frame = ethernet(ipv4(tcp(payload, sport=143, dport=50123)))
    (seg,), stats = replay(write_pcap(tmp_path / "s64.pcap", [frame[:64]]))
    assert seg.wire_len == 1000
    assert seg.payload == payload[:10]  # 64 - 14 Ethernet - 20 IP - 20 TCP
    assert seg.tail == b""  # the end of what was captured is not the end of the segment
    assert stats.bytes == 64


def test_ethernet_padding_is_not_payload(tmp_path):
    frame = ethernet(ipv4(tcp(b"ok")))
    (seg,), _ = replay(write_pcap(tmp_path / "pad.pcap", [frame + bytes(60 - len(frame))]))
    assert seg.payload == b"ok" and seg.wire_len == 2


def test_policy_cuts_each_flow_as_the_kernel_would(tmp_path):
    big = bytes(range(256)) * 4
    path = write_pcap(tmp_path / "p.pcap", [ethernet(ipv4(tcp(big)))])
    key = flow_key(C4, 50123, S4, 143)

    (seg,), _ = replay(path)
    assert seg.wire_len == 1024 < DEFAULT_HANDSHAKE_SNAPLEN
    assert (seg.payload, seg.tail) == (big, b"")  # a flow starts in its handshake: whole up to 2 KB

    policy = PayloadPolicy()
    policy.end_handshake(key)
    (seg,), _ = replay(path, policy=policy)
    assert (seg.payload, seg.tail) == (big[:DEFAULT_SNAPLEN], big[-DEFAULT_TAILLEN:])  # then the defaults
    (seg,), _ = replay(path, policy=PayloadPolicy(handshake_snaplen=0))
    assert (seg.payload, seg.tail) == (big[:DEFAULT_SNAPLEN], big[-DEFAULT_TAILLEN:])  # or from the start

    (seg,), _ = replay(path, policy=PayloadPolicy(snaplen=10, taillen=0, handshake_snaplen=100))
    assert (seg.payload, seg.tail) == (big[:100], b"")
    (seg,), _ = replay(path, policy=PayloadPolicy(snaplen=10, taillen=4, handshake_snaplen=100))
    assert (seg.payload, seg.tail) == (big[:100], big[-4:])
    (seg,), _ = replay(path, policy=PayloadPolicy(snaplen=10, taillen=0, handshake_snaplen=10))
    assert (seg.payload, seg.tail) == (big[:10], b"")  # not above the snap length: no handshake rule

    policy = PayloadPolicy()
    policy.set(key, PayloadMode.NONE)
    (seg,), _ = replay(path, policy=policy)
    assert (seg.payload, seg.tail, seg.wire_len) == (b"", b"", 1024)

    policy.set(key, PayloadMode.WHOLE)
    (seg,), _ = replay(path, policy=policy)
    assert (seg.payload, seg.tail) == (big, b"") and len(big) < WHOLE_PAYLOAD_CAP


def test_policy_changed_between_segments_applies_to_the_next_one(tmp_path):
    # The analyzer switches a flow to NONE after STARTTLS; the replay must honour it at once.
    frames = [ethernet(ipv4(tcp(b"secret%d" % i))) for i in range(3)]
    policy, stats = PayloadPolicy(), ReplayStats()
    got = []
    with open_capture(write_pcap(tmp_path / "t.pcap", frames)) as reader:
        for seg in reader.segments({143}, policy, stats):
            got.append(seg.payload)
            policy.set(flow_key(seg.src, seg.sport, seg.dst, seg.dport), PayloadMode.NONE)
    assert got == [b"secret0", b"", b""]


def test_ports_filter_and_counters(tmp_path):
    udp = ipv4(bytes(dpkt.udp.UDP(sport=5353, dport=5353, data=b"x")), proto=17)
    frames = [
        ethernet(ipv4(tcp(sport=50123, dport=143))),               # client -> server
        ethernet(ipv4(tcp(sport=143, dport=50123))),               # server -> client
        ethernet(ipv4(tcp(sport=40000, dport=80))),                # other port
        ethernet(ipv4(tcp(sport=40000, dport=993))),               # other port
        ethernet(ipv4(off=dpkt.ip.IP_MF)),               # first fragment
        ethernet(ipv4(off=100)),                         # later fragment
        ethernet(udp),                                             # not TCP
        ethernet(bytes(28), 0x0806),                               # ARP: not TCP
        ethernet(ipv4()[:30]),                                     # cut inside TCP
    ]
    path = write_pcap(tmp_path / "mix.pcap", frames)
    segs, stats = replay(path)
    assert [(s.sport, s.dport) for s in segs] == [(50123, 143), (143, 50123)]
    assert (stats.packets, stats.segments, stats.other_ports, stats.ip_fragments_skipped,
            stats.non_tcp, stats.undecodable) == (9, 2, 2, 2, 2, 1)
    assert stats.bytes == sum(map(len, frames))

    segs, stats = replay(path, ports={993, 80})
    assert [s.dport for s in segs] == [80, 993] and stats.other_ports == 2

    segs, stats = replay(path, ports=None)
    assert len(segs) == 4 and stats.other_ports == 0


def test_pure_acks_are_counted_not_yielded_as_the_kernel_does(tmp_path):
    frames = [ethernet(ipv4(tcp(b"", flags=f))) for f in (0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14)]
    frames.append(ethernet(ipv4(tcp(b"x", flags=0x10))))
    segs, stats = replay(write_pcap(tmp_path / "acks.pcap", frames))
    assert [s.flags for s in segs] == [0x02, 0x12, 0x11, 0x04, 0x14, 0x10]  # SYN, SYN-ACK, FIN, RST, data
    assert stats.pure_acks == 2 and stats.segments == 6 and stats.packets == 8


# -- pcapng -----------------------------------------------------------------------------------

def test_pcapng_as_dpkt_writes_it(tmp_path):
    path = tmp_path / "c.pcapng"
    with open(path, "wb") as f:
        w = dpkt.pcapng.Writer(f, snaplen=65535, linktype=1)
        for i, frame in enumerate(conversation()):
            w.writepkt(frame, ts=TS + i)
    segs, stats = replay(path)
    assert [s.payload for s in segs] == [b"a0 NOOP\r\n", b"a1 NOOP\r\n", b"a2 NOOP\r\n"]
    assert [s.ts for s in segs] == [TS, TS + 1, TS + 2] and stats.link_type == "EN10MB"


def idb(linktype, tsresol=None, le=True):
    opt = PcapngOptionLE if le else PcapngOption
    opts = [] if tsresol is None else [opt(code=dpkt.pcapng.PCAPNG_OPT_IF_TSRESOL, data=bytes([tsresol])), opt(code=0)]
    block = InterfaceDescriptionBlockLE if le else InterfaceDescriptionBlock
    return bytes(block(linktype=linktype, snaplen=0, opts=opts))


def epb(iface, ticks, frame, le=True):
    kind = EnhancedPacketBlockLE if le else EnhancedPacketBlock
    return bytes(kind(iface_id=iface, ts_high=ticks >> 32, ts_low=ticks & 0xFFFFFFFF, pkt_data=frame))


def spb(frame):
    body = frame + bytes(-len(frame) % 4)
    n = 16 + len(body)
    return struct.pack("<III", 3, n, len(frame)) + body + struct.pack("<I", n)


def test_pcapng_interfaces_with_different_link_types_and_resolutions(tmp_path):
    # dpkt.pcapng.Reader would decode both interfaces with the first one's link type and clock.
    path = tmp_path / "multi.pcapng"
    path.write_bytes(
        bytes(SectionHeaderBlockLE())
        + idb(1)                               # 0: Ethernet, microseconds
        + idb(101, tsresol=9)                  # 1: raw IP, nanoseconds
        + idb(113, tsresol=0x80 | 20)          # 2: cooked, 2^-20 s
        + epb(0, 1_700_000_000_250_000, ethernet(ipv4(tcp(b"eth"))))
        + epb(1, 1_700_000_001_123_456_789, ipv4(tcp(b"raw")))
        + epb(2, 1_700_000_002 * 2**20 + 2**19, sll(ipv4(tcp(b"sll"))))
        + spb(ethernet(ipv4(tcp(b"simple"))))  # no timestamp: the last one stands
    )
    segs, stats = replay(path)
    assert [s.payload for s in segs] == [b"eth", b"raw", b"sll", b"simple"]
    assert [round(s.ts, 6) for s in segs] == [1_700_000_000.25, 1_700_000_001.123457, 1_700_000_002.5, 1_700_000_002.5]
    assert stats.link_type == "EN10MB,RAW,LINUX_SLL"


def test_pcapng_two_sections_of_opposite_byte_order(tmp_path):
    # Each section restarts interface numbering and may change byte order (cat of two files).
    path = tmp_path / "two.pcapng"
    path.write_bytes(
        bytes(SectionHeaderBlockLE()) + idb(1) + epb(0, 1_000_000, ethernet(ipv4(tcp(b"le"))))
        + bytes(SectionHeaderBlock()) + idb(101, le=False) + epb(0, 2_000_000, ipv4(tcp(b"be")), le=False)
    )
    segs, _ = replay(path)
    assert [(s.payload, s.ts) for s in segs] == [(b"le", 1.0), (b"be", 2.0)]


def test_pcapng_interface_with_an_unsupported_link_type_is_counted(tmp_path):
    path = tmp_path / "usb.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE()) + idb(1) + idb(189)  # 189: USB
                     + epb(1, 0, b"\x00" * 40) + epb(0, 0, ethernet(ipv4())))
    segs, stats = replay(path)
    assert len(segs) == 1 and stats.unsupported_link == 1 and stats.packets == 2


def test_pcapng_packet_on_an_undescribed_interface_is_an_error(tmp_path):
    path = tmp_path / "noif.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE()) + idb(1) + epb(0, 0, ethernet(ipv4())) + epb(4, 0, ethernet(ipv4())))
    segs, _, message = replay_until_error(path)
    assert len(segs) == 1 and "noif.pcapng" in message and "interface 4" in message


# -- cut and broken files ---------------------------------------------------------------------

@pytest.mark.parametrize("writer", [write_pcap, write_pcap_be])
@pytest.mark.parametrize("cut_into_last", [1, 8, 16, 17, 40])
def test_pcap_cut_in_the_last_record_yields_the_others_then_fails(tmp_path, writer, cut_into_last):
    frames = conversation(3)
    path = writer(tmp_path / "cut.pcap", frames)
    data = path.read_bytes()
    last = len(data) - (16 + len(frames[-1]))
    path.write_bytes(data[: last + cut_into_last])  # 1-15: in the record header; 16+: in the data
    segs, stats, message = replay_until_error(path)
    assert [s.payload for s in segs] == [b"a0 NOOP\r\n", b"a1 NOOP\r\n"]
    assert message.startswith(str(path) + ": ") and "truncated" in message and f"at byte {last}" in message
    assert stats.segments == 2


def test_pcap_one_byte_short_is_not_silently_dropped(tmp_path):
    path = write_pcap(tmp_path / "short.pcap", conversation(2))
    path.write_bytes(path.read_bytes()[:-1])
    segs, _, message = replay_until_error(path)
    assert len(segs) == 1 and "truncated packet record" in message


def test_pcap_record_with_absurd_length_is_corrupt(tmp_path):
    path = write_pcap(tmp_path / "bad.pcap", conversation(2))
    data = bytearray(path.read_bytes())
    second = 24 + 16 + len(conversation(1)[0])
    data[second + 8 : second + 12] = struct.pack("<I" if data[0] == 0xD4 else ">I", 0x7FFFFFFF)
    path.write_bytes(bytes(data))
    segs, _, message = replay_until_error(path)
    assert len(segs) == 1 and "corrupt" in message and f"byte {second}" in message


@pytest.mark.parametrize("cut_into_last", [4, 12, 30])
def test_pcapng_cut_in_the_last_block(tmp_path, cut_into_last):
    head = bytes(SectionHeaderBlockLE()) + idb(1)
    blocks = [epb(0, i, f) for i, f in enumerate(conversation(3))]
    path = tmp_path / "cut.pcapng"
    path.write_bytes(head + b"".join(blocks)[: -len(blocks[-1]) + cut_into_last])
    segs, _, message = replay_until_error(path)
    assert len(segs) == 2 and str(path) in message and "truncated" in message
    assert f"byte {len(head) + len(blocks[0]) * 2}" in message


def test_pcapng_corrupt_block_length(tmp_path):
    blocks = [epb(0, i, f) for i, f in enumerate(conversation(2))]
    bad = bytearray(blocks[1])
    bad[4:8] = struct.pack("<I", 6)  # less than a block header
    path = tmp_path / "corrupt.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE()) + idb(1) + blocks[0] + bytes(bad))
    segs, _, message = replay_until_error(path)
    assert len(segs) == 1 and "corrupt block" in message


def test_pcapng_block_whose_two_length_fields_differ(tmp_path):
    # What a block whose body was overwritten looks like: the trailing copy no longer matches.
    blocks = [epb(0, i, f) for i, f in enumerate(conversation(2))]
    bad = blocks[1][:-4] + struct.pack("<I", len(blocks[1]) + 4)
    path = tmp_path / "corrupt.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE()) + idb(1) + blocks[0] + bad + blocks[0])
    segs, _, message = replay_until_error(path)
    assert len(segs) == 1 and "length fields differ" in message


def test_pcap_cut_in_the_file_header(tmp_path):
    path = write_pcap(tmp_path / "hdr.pcap", conversation(1))
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CaptureFileError, match=r"hdr\.pcap: truncated file header"):
        open_capture(path)


def test_pcapng_cut_in_the_section_header(tmp_path):
    path = tmp_path / "hdr.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE())[:20])
    with pytest.raises(CaptureFileError, match=r"hdr\.pcapng: truncated"):
        open_capture(path)


def test_header_only_files_are_empty_captures_not_errors(tmp_path):
    assert replay(write_pcap(tmp_path / "none.pcap", [])) == ([], ReplayStats(link_type="EN10MB", position=24))
    path = tmp_path / "none.pcapng"
    path.write_bytes(bytes(SectionHeaderBlockLE()) + idb(1))
    assert replay(path)[0] == []


@pytest.mark.parametrize("content, words", [
    (b"", "empty file"),
    (b"From: someone\r\nSubject: not a capture\r\n\r\n" * 3, "not a pcap or pcapng file"),
    (b"\x1f\x8b\x08\x00" + bytes(40), "gzip"),
    (b"\xd4\xc3", "not a pcap or pcapng file"),
])
def test_not_a_capture(tmp_path, content, words):
    path = tmp_path / "x.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureFileError) as info:
        open_capture(path)
    message = str(info.value)
    assert message == f"{path}: {words}" or (message.startswith(f"{path}: ") and words in message)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CaptureFileError, match="nope.pcap: No such file"):
        open_capture(tmp_path / "nope.pcap")
    with pytest.raises(CaptureFileError, match=str(tmp_path)):
        open_capture(tmp_path)


@pytest.mark.parametrize("linktype", [147, 105, 9])  # DLT_USER0, 802.11, PPP
def test_unknown_link_type(tmp_path, linktype):
    path = write_pcap(tmp_path / "u.pcap", [b"\x00" * 40], linktype=linktype)
    with pytest.raises(CaptureFileError, match=f"u.pcap: unsupported link type {linktype}$"):
        open_capture(path)
    ng = tmp_path / "u.pcapng"
    ng.write_bytes(bytes(SectionHeaderBlockLE()) + idb(linktype) + epb(0, 0, b"\x00" * 40))
    with pytest.raises(CaptureFileError, match=f"u.pcapng: unsupported link type {linktype}$"):
        open_capture(ng)


def test_a_reader_reads_once_and_a_reopened_file_again(tmp_path):
    path = write_pcap(tmp_path / "twice.pcap", conversation(2))
    with open_capture(path) as reader:
        first = list(reader.segments({143}, PayloadPolicy(), ReplayStats()))
        with pytest.raises(RuntimeError, match="replayed already"):
            next(reader.segments({143}, PayloadPolicy(), ReplayStats()))
    with open_capture(path) as reader:
        assert list(reader.segments({143}, PayloadPolicy(), ReplayStats())) == first and len(first) == 2


# -- other projects' captures, counts checked with tshark -Y 'tcp.port==N' ----------------------

public = public_pcap


def test_ndpi_imap(tmp_path):
    segs, stats = replay(public("ndpi/imap.pcap"))
    # tshark: 33 with tcp.port==143, of which 20 carry payload, SYN, FIN or RST
    assert (len(segs), stats.pure_acks, stats.packets) == (20, 13, 33)
    greeting = next(s for s in segs if s.payload)
    assert greeting.sport == 143 and greeting.payload.startswith(b"* OK IMAP4Rev1 Server Version 4.9.04.012")
    assert sum(s.wire_len for s in segs) == 1580  # tshark: sum of tcp.len


def test_ndpi_imaps_is_pcapng_on_993(tmp_path):
    segs, stats = replay(public("ndpi/imaps.pcap"))
    assert segs == [] and stats.other_ports == 28 and stats.link_type == "EN10MB"
    segs, stats = replay(public("ndpi/imaps.pcap"), ports={993})
    assert (len(segs), stats.pure_acks) == (20, 8)  # tshark: 28 with tcp.port==993, 20 not pure ACKs


def test_arkime_imap_with_unrelated_flows(tmp_path):
    segs, stats = replay(public("arkime/imap.pcap"))
    assert (len(segs), stats.pure_acks) == (76, 30)  # tshark: 106 with tcp.port==143, 76 not pure ACKs
    assert (stats.packets, stats.other_ports, stats.non_tcp, stats.undecodable) == (124, 15, 3, 0)


def test_suricata_asymmetric_capture_is_server_to_client_only(tmp_path):
    segs, stats = replay(public("suricata-verify/tcp-async-01.pcap"))
    # tshark: 139 with tcp.port==143, all tcp.srcport==143; 136 not pure ACKs
    assert (len(segs), stats.pure_acks) == (136, 3)
    assert {s.sport for s in segs} == {143}
    assert {(s.src, s.dst) for s in segs} == {("123.125.50.47", "10.0.1.150")}


@pytest.mark.parametrize("name", ["ndpi/imap.pcap", "ndpi/imaps.pcap"])
def test_position_reaches_the_file_size(name):
    path = public(name)
    stats = ReplayStats()
    reader = open_capture(path)
    list(reader.segments(None, PayloadPolicy(), stats))
    assert stats.position == os.path.getsize(path)


# -- the pcap fast path against the link decoder ----------------------------------------------

def _reference(frames, ports, policy):
    """What the generic path makes of Ethernet frames: decode_packet, then PayloadPolicy.cut."""
    from imaptap.capture.decode import decode_packet

    segs, skips = [], []
    for i, frame in enumerate(frames):
        p = decode_packet(1, frame, ports)
        if isinstance(p, Skip):
            skips.append(p)
            continue
        head, tail = policy.cut(flow_key(p.src, p.sport, p.dst, p.dport), p.payload, p.wire_len)
        segs.append(Segment(TS + i, p.ip_version, p.src, p.dst, p.sport, p.dport, p.seq, p.ack, p.flags,
                            p.wire_len, head, 0, tail))
    return segs, skips


def _mostly(usual, *odd):
    """``usual`` nine times in ten, else one of ``odd``: most frames must reach the fast path."""
    return st.one_of(*[st.just(usual)] * (9 * len(odd)), st.sampled_from(odd))


_frame_fields = st.fixed_dictionaries({
    "payload": st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=700)),
    "ip": st.sampled_from([4, 4, 6]),
    "ihl_opts": _mostly(b"", b"\x01\x01\x01\x00"),
    "v6_ext": _mostly(None, b"\x06\x00" + bytes(6)),  # a hop-by-hop header before TCP
    "v6_version": _mostly(6, 4),
    "tcp_opts": st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x01" * 40]),
    "flags": st.sampled_from([0x10, 0x18, 0x02, 0x12, 0x11, 0x04, 0x00]),
    "proto": _mostly(6, 17),
    "frag": _mostly(0, 0x2000, 0x0001, 0x4000),
    "total_len": _mostly(None, 0, 10, 30, 45),
    "data_offset": _mostly(None, 4),
    "sport": st.sampled_from([50123, 143]),
    "dport": _mostly(143, 993, 50124),
    "ethertype": _mostly(0x0800, 0x86DD, 0x8100),
    "pad": st.sampled_from([b"", b"\x00" * 6]),
    "cut": st.sampled_from([None, None, None, 10, 40, 53, 54, 60, 100, 300]),
})


def _frame(f):
    segment = tcp(f["payload"], sport=f["sport"], dport=f["dport"], flags=f["flags"], opts=f["tcp_opts"])
    if f["ip"] == 4:
        packet = ipv4(segment, proto=f["proto"], off=f["frag"], opts=f["ihl_opts"])
        length_at, tcp_at = 14 + 2, 14 + 20 + len(f["ihl_opts"])
        ethertype = f["ethertype"]
    else:
        ext = f["v6_ext"] or b""
        packet = ipv6(segment, ext=ext, nxt=0 if ext else (6 if f["proto"] == 6 else 17))
        length_at, tcp_at = 14 + 4, 14 + 40 + len(ext)
        ethertype = {0x0800: 0x86DD, 0x86DD: 0x0800}.get(f["ethertype"], f["ethertype"])
    frame = bytearray(ethernet(packet, ethertype=ethertype) + f["pad"])
    if f["total_len"] is not None:
        struct.pack_into("!H", frame, length_at, f["total_len"])
    if f["data_offset"] is not None:
        frame[tcp_at + 12] = f["data_offset"] << 4
    if f["ip"] == 6:
        frame[14] = f["v6_version"] << 4 | frame[14] & 0x0F
    return bytes(frame[: f["cut"]])


#: The pcap loop with its C accelerator (when built) and without it: both must replay alike.
LOOPS = accelerator_params(replay_module, "_pcapfast")


def _loop(accelerated):
    return accelerator(replay_module, "_pcapfast", accelerated)


@pytest.mark.parametrize("accelerated", LOOPS)
@settings(max_examples=500, deadline=None)
@given(st.lists(_frame_fields, min_size=1, max_size=8), st.sampled_from([{143}, None]),
       st.sampled_from([(256, 128, 0), (64, 0, 0), (8, 600, 0), (65535, 128, 2048), (256, 128, 2048),
                        (64, 0, 300), (8, 16, 100)]),
       st.sampled_from([None, *PayloadMode]))
def test_pcap_fast_path_gives_what_the_decoder_gives(tmp_path_factory, accelerated, fields, ports, cut, mode):
    """The classic pcap reader decodes the usual Ethernet frame in place; whatever the frame,
    its segments and counters must be those of decode_packet and PayloadPolicy.cut."""
    frames = [_frame(f) for f in fields]
    policy = PayloadPolicy(*cut)
    if mode is not None:
        # a payload mode for the flow of the usual client port, as the session would set it
        for c, s in ((C4, S4), (C6, S6)):
            policy.set(flow_key(c, 50123, s, 143), mode)
    path = write_pcap(tmp_path_factory.mktemp("fast") / "c.pcap", frames)
    with _loop(accelerated):
        segs, stats = replay(path, ports, policy)
    want, skips = _reference(frames, ports, policy)
    assert segs == want
    assert stats.packets == len(frames) and stats.bytes == sum(map(len, frames))
    assert stats.segments == len(want)
    assert (stats.pure_acks, stats.other_ports, stats.non_tcp, stats.ip_fragments_skipped, stats.undecodable) == (
        skips.count(Skip.EMPTY), skips.count(Skip.OTHER_PORT), skips.count(Skip.NOT_TCP),
        skips.count(Skip.FRAGMENT), skips.count(Skip.UNDECODABLE))


@pytest.mark.parametrize("accelerated", LOOPS)
@pytest.mark.parametrize("snap, handshake", [(8, 0), (64, 0), (300, 0), (8, 64), (64, 2048)])
def test_pcap_fast_path_segment_cut_by_the_file(tmp_path, accelerated, snap, handshake):
    """A record shorter than its frame: the head up to the snap length (the handshake's, while
    it lasts), and no tail, since the record's end is not the segment's end."""
    frame = ethernet(ipv4(tcp(bytes(range(200)) * 3)))[:400]
    policy = PayloadPolicy(snap, 128, handshake)
    with _loop(accelerated):
        segs, _ = replay(write_pcap(tmp_path / "cut.pcap", [frame]), {143}, policy)
    assert segs == _reference([frame], {143}, policy)[0]
    head = max(snap, handshake)
    assert (segs[0].wire_len, len(segs[0].payload), segs[0].tail) == (600, min(head, 400 - 54), b"")


def test_accelerator_is_built_in_ci():
    """scripts/setup installs a C compiler and Python's headers: CI must test the C loop too."""
    if os.environ.get("CI"):
        assert replay_module._pcapfast is not None


def _cli_records(path, args):
    """imaptap -r PATH --json ARGS, run in this process, as records without the run time."""
    import io
    import tempfile

    from imaptap import cli

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.jsonl")
        with contextlib.redirect_stderr(io.StringIO()) as err:
            code = cli.main(["-r", path, "--json", out, *args])
        with open(out) as f:
            records = [json.loads(line) for line in f]
    for r in records:
        r.pop("seconds", None)
    return code, err.getvalue(), records


@pytest.mark.skipif(replay_module._pcapfast is None, reason="C accelerator not built")
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(OWN_PCAPS, "*.pcap")))
                                        + public_pcap_paths("**/*.pcap"),
                         ids=os.path.basename)
@pytest.mark.parametrize("args", [[], ["-s", "65535"], ["--port", "10143", "--port", "143", "-s", "40", "--tail", "0"],
                                  ["-s", "64", "--handshake-snaplen", "300"], ["--handshake-snaplen", "0"]])
def test_accelerator_and_python_loop_give_the_same_records(path, args):
    """The whole analysis, payload modes of STARTTLS, COMPRESS and the handshake included, on
    every capture."""
    with _loop(True):
        accelerated = _cli_records(path, args)
    with _loop(False):
        python = _cli_records(path, args)
    assert accelerated == python


# --- ticks: a caller sees control in a long stretch without segments --------------------------

def other_port_frames(n):
    frame = ethernet(ipv4(tcp(b"GET / HTTP/1.1\r\n", sport=40000, dport=80)))
    return [frame] * n


def test_ticks_come_every_read_buffer_of_a_pcap_without_segments(tmp_path):
    frames = conversation(2) + other_port_frames(3 * replay_module.READ_BUFFER // 70) + conversation(1)
    path = write_pcap(tmp_path / "long.pcap", frames)
    with contextlib.closing(open_capture(path)) as reader:
        got = list(reader.segments({143}, PayloadPolicy(), ReplayStats(), ticks=True))
    segs = [s for s in got if s is not None]
    first, last = got.index(segs[1]), got.index(segs[2])
    assert last - first - 1 >= path.stat().st_size // replay_module.READ_BUFFER - 1  # ticks in the stretch
    with contextlib.closing(open_capture(path)) as reader:
        assert segs == list(reader.segments({143}, PayloadPolicy(), ReplayStats()))  # ticks change nothing else


def test_ticks_come_every_few_thousand_records_of_a_pcapng(tmp_path):
    path = tmp_path / "long.pcapng"
    with open(path, "wb") as f:
        w = dpkt.pcapng.Writer(f, snaplen=65535, linktype=1)
        for i, frame in enumerate(other_port_frames(3 * replay_module.TICK_RECORDS) + conversation(1)):
            w.writepkt(frame, ts=TS + i)
    with contextlib.closing(open_capture(path)) as reader:
        got = list(reader.segments({143}, PayloadPolicy(), ReplayStats(), ticks=True))
    assert got[:3] == [None, None, None] and [s.payload for s in got[3:]] == [b"a0 NOOP\r\n"]
    with contextlib.closing(open_capture(path)) as reader:
        assert list(reader.segments({143}, PayloadPolicy(), ReplayStats())) == got[3:]


@pytest.mark.skipif(replay_module._pcapfast is None, reason="C accelerator not built")
def test_read_buffers_are_reused_not_faulted_in_again(tmp_path):
    """With the accelerator, glibc keeps the freed read buffers (keep_buffers): reading 48 MB
    costs a few hundred page faults instead of one per page of every buffer (12,000 and more)."""
    import subprocess
    import sys

    frame = bytes(ethernet(ipv4(tcp(b"x" * 1400, sport=40000, dport=8080))))
    path = write_pcap(tmp_path / "big.pcap", [frame] * (48 * 1024 * 1024 // (len(frame) + 16)))
    script = (
        "import resource, sys\n"
        "from imaptap.capture.replay import ReplayStats, open_capture\n"
        "from imaptap.segment import PayloadPolicy\n"
        "reader = open_capture(sys.argv[1]); stats = ReplayStats()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "assert not list(reader.segments({143}, PayloadPolicy(256, 128), stats))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, stats.other_ports)\n"
    )
    faults, other = map(int, subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                                            text=True, check=True).stdout.split())
    assert other > 30_000
    assert faults < 3_000
