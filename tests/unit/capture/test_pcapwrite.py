"""-w: segments written as pcap come back from replay as the same segments (less the tail)."""

import base64
import struct

import pytest

from imaptap.capture.pcapwrite import HOLD_SEGMENTS, MaskingWriter, SegmentWriter, blank
from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.flows import FlowTable
from imaptap.pipeline import MemorySource, Pipeline
from imaptap.segment import PayloadPolicy, split_payload
from imaptap.testing import conversation

GREETING = b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n"


def test_written_segments_replay_to_the_same_segments(tmp_path):
    big = b"* 1 FETCH (BODY[] {3000}\r\n" + b"x" * 3000 + b")\r\na2 OK done\r\n"
    segs = []
    ends = ((("192.0.2.10", 40000), ("192.0.2.20", 143)), (("2001:db8::10", 40001), ("2001:db8::1", 143)))
    for client, server in ends:
        parts = [("s", GREETING), ("c", b"a1 LOGIN alice pw\r\n"), ("s", big)]
        segs += conversation(parts, client=client, server=server)
    captured = [s._replace(payload=split_payload(s.payload, 256, 128)[0], tail=split_payload(s.payload, 256, 128)[1])
                for s in segs]
    path = tmp_path / "live.pcap"
    w = SegmentWriter(str(path))
    for s in captured:
        w.write(s)
    w.close()
    back = list(open_capture(path).segments({143}, PayloadPolicy(65535, 0), ReplayStats()))
    assert len(back) == len(captured) == w.records
    for got, want in zip(back, captured, strict=True):
        assert got._replace(ts=0.0) == want._replace(ts=0.0, tail=b"")
        assert abs(got.ts - want.ts) < 1e-6


# --- -w blanks credentials (MaskingWriter) ---------------------------------------------------

OK = b"a1 OK Logged in\r\n"
# RFC 5802 section 5's exchange, and an NTLM AUTHENTICATE_MESSAGE laid out as MS-NLMP 2.2.1.3 says
SCRAM_FINAL = base64.b64encode(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
SCRAM_SIGNATURE = base64.b64encode(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
SCRAM = [("c", b"a1 AUTHENTICATE SCRAM-SHA-1 " + base64.b64encode(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL") + b"\r\n"),
         ("s", b"+ " + base64.b64encode(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
          + b"\r\n"),
         ("c", SCRAM_FINAL + b"\r\n"), ("s", b"+ " + SCRAM_SIGNATURE + b"\r\n"), ("c", b"\r\n"), ("s", OK)]
NT_RESPONSE = b"\x22" * 16 + b"\x01\x01\x00\x00" + b"\x33" * 40
_NTLM_PAYLOAD = [b"\x11" * 24, NT_RESPONSE, "LAB".encode("utf-16-le"), "carol".encode("utf-16-le"),
                 "WS01".encode("utf-16-le"), b"\x44" * 16]
_NTLM_OFFSETS = [88 + sum(map(len, _NTLM_PAYLOAD[:i])) for i in range(6)]
NTLM_TYPE3 = (b"NTLMSSP\x00" + struct.pack("<I", 3)
              + b"".join(struct.pack("<HHI", len(p), len(p), o)
                         for p, o in zip(_NTLM_PAYLOAD, _NTLM_OFFSETS, strict=True))
              + struct.pack("<I", 1) + b"\x0a\x00\x63\x45\x00\x00\x00\x0f" + b"\x55" * 16 + b"".join(_NTLM_PAYLOAD))
NTLM = [("c", b"a1 AUTHENTICATE NTLM\r\n"), ("s", b"+ \r\n"),
        ("c", base64.b64encode(b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + b"\x00" * 16) + b"\r\n"),
        ("s", b"+ " + base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 40) + b"\r\n"),
        ("c", base64.b64encode(NTLM_TYPE3) + b"\r\n"), ("s", OK)]
SESSIONS = {
    # name: (parts, cuts, secrets that must not be written)
    "atom": ([("c", b"a1 LOGIN alice Alice-Pw-7391\r\n"), ("s", OK)], None, [b"Alice-Pw-7391"]),
    "quoted with escapes": ([("c", b'a1 LOGIN "bob" "Bob Pw \\"q\\" \\\\ 42"\r\n'), ("s", OK)], None,
                            [b'Bob Pw \\"q\\" \\\\ 42', b"Bob Pw"]),
    "literal": ([("c", b"a1 LOGIN {5}\r\n"), ("s", b"+ OK\r\n"), ("c", b"carol {13}\r\n"), ("s", b"+ OK\r\n"),
                 ("c", b"Carol-Pw-5520\r\n"), ("s", OK)], None, [b"Carol-Pw-5520"]),
    "split over segments, one byte at a time": ([("c", b"a1 LOGIN dave Dave-Pw-8812\r\n"), ("s", OK)],
                                                [list(range(1, 27))], [b"Dave-Pw-8812", b"Pw-88"]),
    "AUTHENTICATE PLAIN with initial response": (
        [("c", b"a1 AUTHENTICATE PLAIN AGFsaWNlAEFsaWNlLVB3LTczOTE=\r\n"), ("s", OK)], [[30]],
        [b"AGFsaWNlAEFsaWNlLVB3LTczOTE="]),
    "AUTHENTICATE LOGIN": ([("c", b"a1 AUTHENTICATE LOGIN\r\n"), ("s", b"+ VXNlcm5hbWU6\r\n"), ("c", b"YWxpY2U=\r\n"),
                            ("s", b"+ UGFzc3dvcmQ6\r\n"), ("c", b"QWxpY2UtUHctNzM5MQ==\r\n"), ("s", OK)], None,
                           [b"QWxpY2UtUHctNzM5MQ=="]),
    "LOGIN and FIN in the last segment": ([("c", b"a1 LOGIN erin Erin-Pw-1\r\n")], None, [b"Erin-Pw-1"]),
    # the proof, and the server's signature: it is held like a client segment until analysed
    "AUTHENTICATE SCRAM-SHA-1": (SCRAM, [[], [], [20]], [SCRAM_FINAL, SCRAM_SIGNATURE, SCRAM_SIGNATURE[:20]]),
    "AUTHENTICATE NTLM": (NTLM, None, [base64.b64encode(NTLM_TYPE3), base64.b64encode(NT_RESPONSE)[:40]]),
}


def write_live(tmp_path, segs, ports=(143,)):
    """As `imaptap -i -w`: the pipeline hands each segment to the writer, then to the table."""
    path = tmp_path / "w.pcap"
    w = MaskingWriter(str(path), ports)
    Pipeline(MemorySource(segs, ports, snaplen=1 << 30, taillen=0), pcap_writer=w).run()
    return path, w


def read_back(path):
    return list(open_capture(path).segments({143}, PayloadPolicy(65535, 0), ReplayStats()))


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_written_pcap_holds_no_credential_and_replays_to_the_same_user(tmp_path, name):
    parts, cuts, secrets = SESSIONS[name]
    cuts = [cuts[0] if i == 0 else () for i in range(len(parts) + 1)] if cuts else None
    segs = conversation([("s", GREETING), *parts], cuts=[(), *cuts] if cuts else None)
    path, w = write_live(tmp_path, segs)
    raw = path.read_bytes()
    for secret in secrets:
        assert secret not in raw, secret
    back = read_back(path)
    assert w.records == len(segs) == len(back)
    # same segments, in the same order, same lengths: only credential bytes became '*'
    assert [(b.seq, b.flags, len(b.payload)) for b in back] == [(s.seq, s.flags, len(s.payload)) for s in segs]
    changed = b"".join(b.payload for b in back)
    original = b"".join(s.payload for s in segs)
    assert changed != original
    assert len(changed) == len(original)
    # replayed, the same user as the live analysis saw
    live, again = FlowTable({143}), FlowTable({143})
    users = []
    for t, src in ((live, segs), (again, back)):
        t.on_flow_end = lambda f, users=users: users.append(f.session.username)
        for s in src:
            t.add(s)
        t.close_all()
    assert users[0] == users[1] and users[0]


def test_a_server_that_quotes_the_password_back_has_it_blanked_too(tmp_path):
    # a web server on the watched port answering "a1 LOGIN x Http-Pw-4242" with an error page
    segs = conversation([("c", b"a1 LOGIN x Http-Pw-4242\r\n"),
                         ("s", b"<p>Message: Bad request version ('Http-Pw-4242').</p>\n")])
    path, w = write_live(tmp_path, segs)
    raw = path.read_bytes()
    assert b"Http-Pw-4242" not in raw and raw.count(b"*" * 12) == 2
    assert w.records == len(segs)


def test_blank_finds_a_secret_across_segments():
    pair = (b"secret", b"******")
    assert blank([b"a1 LOGIN x se", b"cr", b"et\r\n"], [pair]) == [b"a1 LOGIN x **", b"**", b"**\r\n"]
    parts = [b"nothing", b"here"]
    assert blank(parts, [pair]) is parts


def test_a_client_that_never_hears_back_is_written_in_bounded_steps(tmp_path):
    lines = [("c", b"a%d NOOP\r\n" % i) for i in range(3 * HOLD_SEGMENTS)]
    segs = conversation([("s", GREETING), *lines], close=False)
    path, w = write_live(tmp_path, segs)
    assert w.records == len(segs) == len(read_back(path))


def test_a_gso_segment_longer_than_an_ip_length_field_is_written_with_its_true_length(tmp_path):
    """The kernel hands over segments of up to 64 KB of payload and more (segmentation
    offload): the 16-bit IP length fields are clamped, the record's original length keeps the size."""
    from imaptap.capture.pcapwrite import frame
    from imaptap.segment import Segment

    for src, dst, ip_header in (("2001:db8::1", "2001:db8::2", 40), ("192.0.2.1", "192.0.2.2", 20)):
        seg = Segment(1.0, 6 if ":" in src else 4, src, dst, 143, 40000, 1, 1, 0x18, 70_000, b"* OK" + b"x" * 252)
        data, wire = frame(seg)
        assert wire == ip_header + 20 + 70_000
        assert len(data) == ip_header + 20 + 256
