import tracemalloc
import zlib

from imaptap.imap.stream import LINE_CAP, ImapStream, Mode


class Collector:
    def __init__(self):
        self.lines = []
        self.anomalies = []
        self.tls = 0
        self.stream = ImapStream(self, Collector.on_line, Collector.on_anomaly, Collector.on_tls)

    def on_line(self, line):
        self.lines.append(line)

    def on_anomaly(self, anomaly, detail):
        self.anomalies.append(anomaly)

    def on_tls(self):
        self.tls += 1

    @property
    def heads(self):
        return [ln.head for ln in self.lines]


def test_lines_split_across_segments_are_joined():
    c = Collector()
    for piece in (b"a1 LO", b"GIN alice", b" pw\r", b"\na2 NOOP\r\na3", b" LOGOUT\r\n"):
        c.stream.feed(piece)
    assert c.heads == [b"a1 LOGIN alice pw", b"a2 NOOP", b"a3 LOGOUT"]


def test_bare_lf_ends_a_line_too():
    c = Collector()
    c.stream.feed(b"a1 NOOP\na2 NOOP\r\n")
    assert c.heads == [b"a1 NOOP", b"a2 NOOP"]


def test_literal_bytes_are_never_lines():
    body = b"a1 LOGIN mallory x\r\n* OK [CAPABILITY IMAP4rev1] Evil ready\r\n"
    c = Collector()
    c.stream.feed(b"a1 APPEND INBOX {%d}\r\n" % len(body) + body + b"\r\na2 NOOP\r\n")
    assert c.heads == [b"a1 APPEND INBOX {%d}" % len(body), b"a2 NOOP"]
    assert c.lines[0].chunks == [b"a1 APPEND INBOX {%d}" % len(body), b""]
    assert c.lines[0].literals[0].size == len(body)


def test_literal_split_anywhere_and_continued_line():
    c = Collector()
    data = b"a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\n"
    for i in range(len(data)):
        c.stream.feed(data[i : i + 1])
    (line,) = c.lines
    assert line.chunks == [b"a1 LOGIN {5}", b" {3+}", b""]
    assert [bytes(lit.data) for lit in line.literals] == [b"alice", b"pw!"]
    assert line.literals[1].sync is False


def test_gap_inside_literal_only_shortens_it():
    c = Collector()
    c.stream.feed(b"* 1 FETCH (BODY[] {1000}\r\n" + b"x" * 100)
    c.stream.gap(880)
    c.stream.feed(b"y" * 20 + b")\r\na5 OK done\r\n")
    assert c.heads == [b"* 1 FETCH (BODY[] {1000}", b"a5 OK done"]
    assert c.lines[0].literals[0].complete is False
    assert c.stream.resyncs == 0


def test_gap_outside_literal_truncates_and_resyncs_at_next_line():
    c = Collector()
    c.stream.feed(b"* LIST () \"/\" INBOX\r\n* LIST () \"/\" Dra")
    c.stream.gap(30)
    c.stream.feed(b"fts-rest-of-a-line\r\n* LIST () \"/\" Sent\r\n")
    assert c.heads == [b'* LIST () "/" INBOX', b'* LIST () "/" Dra', b'* LIST () "/" Sent']
    assert c.lines[1].truncated
    assert c.stream.resyncs == 1


def test_resync_accepts_a_segment_that_starts_with_a_line():
    c = Collector()
    c.stream.feed(b"* 1 FETCH (BODY[] {50}\r\n" + b"z" * 10)
    c.stream.gap(100)  # 40 body bytes and 60 more the capture did not copy
    c.stream.feed(b"a9 OK Fetch completed.\r\n")
    assert c.heads[-1] == b"a9 OK Fetch completed."


def test_resync_mid_segment_waits_for_a_line_feed():
    c = Collector()
    c.stream.feed(b"x")
    c.stream.gap(10)
    c.stream.feed(b"junk that is not a line start\r\na2 NOOP\r\n")
    assert c.heads[-1] == b"a2 NOOP"
    assert b"junk" not in b"".join(c.heads)


def test_overlong_line_is_cut_and_memory_stays_bounded():
    c = Collector()
    tracemalloc.start()
    for _ in range(2000):
        c.stream.feed(b"A" * 10_000)
    c.stream.feed(b"\r\na2 NOOP\r\n")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * LINE_CAP + 200_000
    assert len(c.lines[0].head) == LINE_CAP and c.lines[0].truncated
    assert c.heads[1] == b"a2 NOOP"
    assert c.anomalies == ["line_too_long"]


def test_literal_marker_after_the_cap_is_still_honoured():
    body = b"a1 LOGIN mallory x\r\n"
    c = Collector()
    c.stream.feed(b"a1 APPEND INBOX " + b"F" * (LINE_CAP * 2) + b" {%d}\r\n" % len(body) + body + b"\r\na2 NOOP\r\n")
    assert [h[:9] for h in c.heads] == [b"a1 APPEND", b"a2 NOOP"]


def test_gigantic_literal_is_counted_not_stored():
    c = Collector()
    c.stream.feed(b"a1 APPEND INBOX {99999999999}\r\n")
    for _ in range(100):
        c.stream.feed(b"a2 LOGIN x y\r\n" * 100)
    assert c.lines == []
    assert c.stream.mode is Mode.LITERAL
    assert len(c.stream.lit.data) <= 1024
    assert "large_literal" in c.anomalies


def test_cancelled_synchronising_literal_lets_commands_through():
    c = Collector()
    c.stream.feed(b"a1 APPEND INBOX {99999999999}\r\n")
    assert c.stream.waiting_for_literal and c.stream.pending_head == b"a1 APPEND INBOX {99999999999}"
    c.stream.cancel_literal()
    c.stream.feed(b"a2 LOGOUT\r\n")
    assert c.heads == [b"a1 APPEND INBOX {99999999999}", b"a2 LOGOUT"]


def test_encryption_switch_takes_effect_at_the_next_byte():
    c = Collector()

    def on_line(_, line):
        c.lines.append(line)
        if line.head.endswith(b"OK Begin TLS"):
            c.stream.start_encryption()

    c.stream.on_line = on_line
    c.stream.feed(b"a1 OK Begin TLS\r\n\x16\x03\x01\x00\x05hello\r\na2 OK fake\r\n")
    c.stream.feed(b"* BYE fake\r\n")
    assert c.heads == [b"a1 OK Begin TLS"]
    assert c.stream.bytes_encrypted > 0


def test_tls_from_the_first_byte():
    c = Collector()
    c.stream.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n* OK x\r\n")
    assert c.tls == 1 and c.lines == [] and c.stream.mode is Mode.ENCRYPTED


def deflate_chunks(*lines):
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return [comp.compress(ln) + comp.flush(zlib.Z_SYNC_FLUSH) for ln in lines]


def test_compression_switch_inflates_the_rest_of_the_same_segment():
    c = Collector()

    def on_line(_, line):
        c.lines.append(line)
        if line.head == b"a1 OK DEFLATE active":
            c.stream.start_compression()

    c.stream.on_line = on_line
    z = deflate_chunks(b"* 3 EXISTS\r\n", b"a2 OK done\r\n")
    c.stream.feed(b"a1 OK DEFLATE active\r\n" + z[0])
    c.stream.feed(z[1])
    assert c.heads == [b"a1 OK DEFLATE active", b"* 3 EXISTS", b"a2 OK done"]
    assert c.stream.bytes_inflated == len(b"* 3 EXISTS\r\na2 OK done\r\n")


def test_lost_compressed_bytes_stop_parsing_instead_of_printing_garbage():
    c = Collector()
    c.stream.start_compression()
    z = deflate_chunks(b"a1 NOOP\r\n", b"a2 NOOP\r\n" * 50, b"a3 NOOP\r\n")
    c.stream.feed(z[0])
    c.stream.feed(z[1][:5])
    c.stream.gap(len(z[1]) - 5)
    c.stream.feed(z[2])
    assert c.heads[0] == b"a1 NOOP" and b"a3 NOOP" not in c.heads
    assert set(c.heads) <= {b"a1 NOOP", b"a2 NOOP"}
    assert c.stream.mode is Mode.UNDECODABLE and c.anomalies == ["compressed_gap"]


def test_garbage_after_compress_is_an_anomaly_not_lines():
    c = Collector()
    c.stream.start_compression()
    c.stream.feed(b"\xff\xff\xff\xff a1 LOGIN x y\r\n")
    assert c.lines == [] and c.anomalies == ["inflate_error"]


def test_decompression_bomb_is_processed_in_bounded_steps():
    c = Collector()
    c.stream.start_compression()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = comp.compress(b"A" * 50_000_000) + comp.flush(zlib.Z_SYNC_FLUSH)
    tracemalloc.start()
    c.stream.feed(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert c.stream.bytes_inflated == 50_000_000
    assert peak < 2_000_000


def test_finish_delivers_a_pending_line_as_truncated():
    c = Collector()
    c.stream.feed(b"a1 LOGOUT")
    c.stream.finish()
    assert c.heads == [b"a1 LOGOUT"] and c.lines[0].truncated


def test_an_inflate_error_gives_the_same_stream_however_the_segments_were_cut():
    # Found by hypothesis: zlib drops what one call inflated before an error, so the byte the
    # first two input bytes make was counted when they came in their own segment, lost when
    # not.  The bytes before the bad one are now inflated again from a copy.
    from imaptap.testing import analyze, conversation

    parts = [("s", b"* OK\n"), ("c", b"\x00" * 5), ("c", b"\na4 COMPRESS\n"), ("s", b"a4 OK\n"),
             ("c", b"\n\x00\x05\x00")]
    whole = analyze(conversation(parts), snaplen=None).flow
    cut = analyze(conversation(parts, cuts=[[], [], [], [], [2]]), snaplen=None).flow
    assert whole["bytes_inflated"] == cut["bytes_inflated"] == 1
    assert whole["anomalies"] == cut["anomalies"] and "client_inflate_error" in whole["anomalies"]
