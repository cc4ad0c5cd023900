"""imaptap_lab.make_flood: the hostile captures of the flood tests, read back with dpkt."""

from __future__ import annotations

import io

import dpkt
import pytest

from imaptap_lab import make_flood


def packets(variant: str, flows: int, size: int | None = None) -> list[tuple[float, dpkt.ethernet.Ethernet]]:
    buf = io.BytesIO()
    make_flood.write_flood(variant, buf, flows, size)
    buf.seek(0)
    return [(ts, dpkt.ethernet.Ethernet(frame)) for ts, frame in dpkt.pcap.Reader(buf)]


def test_a_syn_scan_is_one_syn_per_flow_each_from_its_own_address():
    pkts = packets("syn", 1000)
    assert len(pkts) == 1000
    sources = set()
    for _, eth in pkts:
        ip, tcp = eth.data, eth.data.data
        assert tcp.flags == dpkt.tcp.TH_SYN
        assert (ip.dst, tcp.dport) == (make_flood.SERVER, make_flood.IMAP_PORT)
        assert ip.src[:2] in (bytes([198, 18]), bytes([198, 19]))  # 198.18.0.0/15
        sources.add((ip.src, tcp.sport))
    assert len(sources) == 1000


def test_short_sessions_are_complete_logins_with_consistent_sequence_numbers():
    pkts = packets("sessions", 3)
    assert len(pkts) == 3 * 7  # SYN, SYN-ACK, greeting, LOGIN, OK, FIN, FIN
    first = [eth.data.data for _, eth in pkts[:7]]
    syn, synack, greeting, login, ok, fin_c, fin_s = first
    assert syn.flags == dpkt.tcp.TH_SYN and synack.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert greeting.data.startswith(b"* OK") and login.data == b"a1 LOGIN alice secret\r\n"
    assert ok.data == b"a1 OK logged in\r\n"
    # each side's data starts right after its SYN and goes on without holes
    assert greeting.seq == synack.seq + 1 and login.seq == syn.seq + 1
    assert fin_c.seq == login.seq + len(login.data)
    assert fin_s.seq == ok.seq + len(ok.data)
    assert fin_c.flags & dpkt.tcp.TH_FIN and fin_s.flags & dpkt.tcp.TH_FIN


def client_segments(pkts) -> list[dpkt.tcp.TCP]:
    return [eth.data.data for _, eth in pkts if eth.data.data.dport == make_flood.IMAP_PORT]


def test_the_giant_line_has_no_line_feed_and_its_segments_follow_each_other():
    segs = client_segments(packets("giant-line", 1, 100_000))
    payload = b"".join(t.data for t in segs)
    assert payload.startswith(b"a1 NOOP giant line without a line feed ")
    line, rest = payload.split(b"\r\n", 1)
    assert b"\n" not in line and len(line) > 99_000
    assert rest.startswith(b"a2 LOGIN alice")
    assert max(len(t.data) for t in segs) <= make_flood.MSS
    data = [t for t in segs if t.data]
    for prev, seg in zip(data, data[1:], strict=False):  # no hole, no overlap: the stream is whole
        assert seg.seq == prev.seq + len(prev.data)


# Session.stream() cuts its block of repeated fill to a multiple of the fill's length (1,457 bytes
# of the giant line's 31-byte fill) but counts MSS (1,460) bytes sent per segment, so a stream is
# about 0.2% shorter than asked: the "50 MB line" is 49.9 MB.  Left as it is (the captures and
# figures were made with it); these turn into failures once it is fixed.
@pytest.mark.xfail(strict=True, reason="Session.stream() counts MSS bytes per segment of a shorter block")
def test_the_giant_line_is_the_size_asked():
    payload = b"".join(t.data for t in client_segments(packets("giant-line", 1, 100_000)))
    assert len(payload.split(b"\r\n", 1)[0]) == len(b"a1 NOOP ") + 100_000


@pytest.mark.xfail(strict=True, reason="Session.stream() counts MSS bytes per segment of a shorter block")
def test_the_literal_data_is_the_size_asked():
    client = b"".join(t.data for t in client_segments(packets("literal", 1, 50_000)))
    assert len(client.split(b"a4 APPEND INBOX {99999999999+}\r\n")[1]) == 50_000


def test_the_literal_flood_announces_more_than_it_sends():
    client = b"".join(t.data for t in client_segments(packets("literal", 1, 50_000)))
    assert b"a2 APPEND INBOX {99999999999}\r\n" in client
    data = client.split(b"a4 APPEND INBOX {99999999999+}\r\n")[1]
    assert 49_000 < len(data) < 99_999_999_999
    assert set(data.split()[:-1]) == {b"literal", b"data"}  # the last block may end in a word


def test_timestamps_increase():
    stamps = [ts for ts, _ in packets("nul", 1)]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


def test_more_flows_than_addresses_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_flood.main(["syn", "-n", str(make_flood.SCAN_ADDRESSES + 1), "-o", str(tmp_path / "x.pcap")])
    assert exit_.value.code == 2
    assert "at most 131072 flows" in capsys.readouterr().err
    assert not (tmp_path / "x.pcap").exists()


def test_main_writes_the_file(tmp_path):
    out = tmp_path / "long-tag.pcap"
    assert make_flood.main(["long-tag", "-o", str(out)]) == 0
    with open(out, "rb") as f:
        frames = [dpkt.ethernet.Ethernet(frame) for _, frame in dpkt.pcap.Reader(f)]
    assert any(eth.data.data.data.startswith(b"t" * 1460) for eth in frames)
