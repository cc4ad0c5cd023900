"""-w: segments written as pcap come back from replay as the same segments (less the tail)."""

from imaptap.capture.pcapwrite import SegmentWriter
from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.segment import PayloadPolicy, split_payload
from imaptap.testing import conversation

GREETING = b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n"


def test_written_segments_replay_to_the_same_segments(tmp_path):
    big = b"* 1 FETCH (BODY[] {3000}\r\n" + b"x" * 3000 + b")\r\na2 OK done\r\n"
    segs = []
    for client, server in ((("192.0.2.10", 40000), ("192.0.2.20", 143)), (("2001:db8::10", 40001), ("2001:db8::1", 143))):
        segs += conversation([("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", big)], client=client, server=server)
    captured = [s._replace(payload=split_payload(s.payload, 256, 128)[0], tail=split_payload(s.payload, 256, 128)[1])
                for s in segs]
    path = tmp_path / "live.pcap"
    w = SegmentWriter(str(path))
    for s in captured:
        w.write(s)
    w.close()
    back = list(open_capture(path).segments({143}, PayloadPolicy(65535, 0), ReplayStats()))
    assert len(back) == len(captured) == w.records
    for got, want in zip(back, captured):
        assert got._replace(ts=0.0) == want._replace(ts=0.0, tail=b"")
        assert abs(got.ts - want.ts) < 1e-6
