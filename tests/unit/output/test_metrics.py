"""The metrics sink: what it counts from whole conversations, its labels' bounds, and serving."""

import socket
import struct
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imaptap.imap.parse import KNOWN_COMMANDS  # noqa: E402
from imaptap.output import metrics  # noqa: E402
from imaptap.output.metrics import (  # noqa: E402
    FAMILIES,
    LATENCY_BUCKETS,
    MAX_SERVER_LABELS,
    MECHANISM_LABELS,
    MetricsError,
    MetricsSink,
    parse_address,
    series_bound,
)
from imaptap.pipeline import MemorySource, Pipeline  # noqa: E402
from imaptap.testing import CLIENT, SERVER, conversation  # noqa: E402

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"


def samples(sink: MetricsSink) -> dict:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    text = generate_latest(sink.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(sink, family, **labels) -> float:
    return samples(sink).get((family, tuple(sorted(labels.items()))), 0.0)


def total(sink, family, **labels) -> float:
    """The sum over every series of ``family`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(sink).items() if n == family and want <= set(ls))


def run(*conversations, server_label=False, snaplen=1 << 20):
    sink = MetricsSink(server_label=server_label)
    segments = [s for c in conversations for s in c]
    Pipeline(MemorySource(segments, snaplen=snaplen), [sink]).run()
    return sink


def session(parts, client=CLIENT, server=SERVER, **kw):
    return conversation([("s", GREETING), *parts], client=client, server=server, **kw)


def test_commands_by_command_and_status_with_unanswered_and_unmatched():
    sink = run(session([
        ("c", b"a1 LOGIN alice secret\r\n"), ("s", b"a1 OK Logged in\r\n"),
        ("c", b"a2 SELECT INBOX\r\n"), ("s", b"a2 NO no such mailbox\r\n"),
        ("c", b"a3 XFROB x\r\n"), ("s", b"a3 BAD what\r\n"),
        ("s", b"zz OK completion of a command never seen\r\n"),
        ("c", b"a4 UID FETCH 1 FLAGS\r\n"), ("s", b"a4 OK done\r\n"),
        ("c", b"a5 NOOP\r\n"),  # never answered
    ]))
    assert value(sink, "imaptap_commands_total", command="LOGIN", status="OK") == 1
    assert value(sink, "imaptap_commands_total", command="SELECT", status="NO") == 1
    assert value(sink, "imaptap_commands_total", command="other", status="BAD") == 1
    assert value(sink, "imaptap_commands_total", command="unknown", status="OK") == 1
    assert value(sink, "imaptap_commands_total", command="UID FETCH", status="OK") == 1
    assert value(sink, "imaptap_commands_total", command="NOOP", status="none") == 1
    assert total(sink, "imaptap_commands_total") == 6


def latencies(sink) -> dict:
    """command -> (count, sum) of the latency histogram."""
    s = samples(sink)
    return {dict(ls)["command"]: (v, s["imaptap_command_latency_seconds_sum", ls])
            for (n, ls), v in s.items() if n == "imaptap_command_latency_seconds_count"}


def test_latency_leaves_out_idle_and_sasl_exchanges_but_not_literals():
    # step=1 ms between segments: a command answered in the next segment took 1 ms.
    sink = run(session([
        ("c", b"a1 LOGIN {5}\r\n"), ("s", b"+ go ahead\r\n"), ("c", b"alice {6}\r\n"), ("s", b"+ go\r\n"),
        ("c", b"secret\r\n"), ("s", b"a1 OK Logged in\r\n"),
        ("c", b"a2 IDLE\r\n"), ("s", b"+ idling\r\n"), ("s", b"* 3 EXISTS\r\n"), ("c", b"DONE\r\n"),
        ("s", b"a2 OK Idle done\r\n"),
        ("c", b"a3 SELECT INBOX\r\n"), ("s", b"a3 OK\r\n"),
    ]), session([
        ("c", b"b1 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"AGJvYgBzZWNyZXQ=\r\n"),
        ("s", b"b1 OK Logged in\r\n"),
        ("c", b"b2 AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=\r\n"), ("s", b"b2 OK Logged in\r\n"),
        ("c", b"b3 APPEND INBOX {5}\r\n"), ("s", b"b3 NO [OVERQUOTA] refused\r\n"),
    ], client=("192.0.2.11", 40001)))
    got = latencies(sink)
    # The literal LOGIN is timed from its last byte; IDLE, the AUTHENTICATE that waited for a
    # SASL response and the refused literal are not timed at all.
    assert got["LOGIN"] == (1, pytest.approx(0.001))
    assert got["SELECT"] == (1, pytest.approx(0.001))
    assert got["AUTHENTICATE"] == (1, pytest.approx(0.001))  # b2 (SASL-IR) only
    assert "IDLE" not in got and "APPEND" not in got
    assert value(sink, "imaptap_commands_total", command="IDLE", status="OK") == 1
    assert value(sink, "imaptap_commands_total", command="APPEND", status="NO") == 1


def test_latency_buckets_span_100_microseconds_to_a_minute():
    assert LATENCY_BUCKETS[0] == 0.0001 and LATENCY_BUCKETS[-1] == 60.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    slow = session([("c", b"a1 SEARCH ALL\r\n"), ("s", b"a1 OK\r\n")], step=2.0)
    sink = run(slow)
    s = samples(sink)
    bucket = {dict(ls)["le"]: v for (n, ls), v in s.items() if n == "imaptap_command_latency_seconds_bucket"}
    assert bucket["1.0"] == 0 and bucket["2.5"] == 1 and bucket["+Inf"] == 1


def test_logins_by_mechanism_and_outcome_and_cleartext_once_per_flow():
    sink = run(session([
        ("c", b"a1 LOGIN alice wrong1\r\n"), ("s", b"a1 NO [AUTHENTICATIONFAILED] failed\r\n"),
        ("c", b"a2 LOGIN alice wrong2\r\n"), ("s", b"a2 NO [AUTHENTICATIONFAILED] failed\r\n"),
        ("c", b"a3 LOGIN alice right\r\n"), ("s", b"a3 OK Logged in\r\n"),
    ]), session([
        ("c", b"b1 AUTHENTICATE CRAM-MD5\r\n"), ("s", b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n"),
        ("c", b"Ym9iIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"), ("s", b"b1 OK Logged in\r\n"),
    ], client=("192.0.2.11", 40001)), session([
        ("c", b"c1 AUTHENTICATE PLAIN AGNhcm9sAHNlY3JldA==\r\n"),  # its completion never seen
    ], client=("192.0.2.12", 40002)))
    assert value(sink, "imaptap_logins_total", mechanism="LOGIN", outcome="failure") == 2
    assert value(sink, "imaptap_logins_total", mechanism="LOGIN", outcome="success") == 1
    assert value(sink, "imaptap_logins_total", mechanism="CRAM-MD5", outcome="success") == 1
    assert value(sink, "imaptap_logins_total", mechanism="PLAIN", outcome="unknown") == 1
    assert total(sink, "imaptap_logins_total") == 5
    # alice's three passwords and carol's PLAIN: two flows; CRAM-MD5 sends no password
    assert value(sink, "imaptap_cleartext_credentials_total") == 2


def test_starttls_outcomes():
    offered = session([("c", b"a1 LOGIN alice pw\r\n"), ("s", b"a1 OK\r\n")])
    refused = session([("c", b"a1 STARTTLS\r\n"), ("s", b"a1 NO not now\r\n")], client=("192.0.2.11", 40001))
    completed = session([("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK Begin TLS\r\n"), ("c", b"\x16\x03\x01\x02\x00")],
                        client=("192.0.2.12", 40002))
    sink = run(offered, refused, completed)
    assert value(sink, "imaptap_starttls_total", outcome="offered_unused") == 1
    assert value(sink, "imaptap_starttls_total", outcome="refused") == 1
    assert value(sink, "imaptap_starttls_total", outcome="completed") == 1


def test_flows_bytes_and_anomalies_are_counted_once_however_often_they_are_refreshed():
    parts = [("c", b"a1 NOOP\r\n"), ("s", b"a1 OK\r\n"), ("s", b"* FROB what\r\n"), ("c", b"lonelytag\r\n")]
    segments = session(parts) + conversation([("c", b"x1 NOOP\r\n")], client=("192.0.2.11", 40001), close=False)
    sink = MetricsSink()
    pipeline = Pipeline(MemorySource(segments, open_at_end=True), [sink])
    pipeline.run()
    sink.refresh(pipeline)
    sink.refresh(pipeline)
    assert value(sink, "imaptap_flows_active") == 1  # the one left open
    assert value(sink, "imaptap_flows_ended_total", end="fin", imap="true") == 1
    sent = sum(s.wire_len for s in segments if s.sport == CLIENT[1] or s.sport == 40001)
    assert value(sink, "imaptap_bytes_total", direction="c2s") == sent
    assert value(sink, "imaptap_bytes_total", direction="s2c") == len(GREETING) + len(b"a1 OK\r\n* FROB what\r\n")
    assert value(sink, "imaptap_anomalies_total", name="unknown_untagged") == 1
    assert value(sink, "imaptap_anomalies_total", name="bad_request") == 1
    pipeline.table.close_all()
    sink.refresh(pipeline)
    assert value(sink, "imaptap_bytes_total", direction="c2s") == sent  # not counted again at the end
    assert value(sink, "imaptap_flows_ended_total", end="end", imap="true") == 1
    assert value(sink, "imaptap_flows_active") == 0


def test_server_label_is_capped_and_the_overflow_counted():
    servers = [(f"192.0.2.{100 + i}", 143) for i in range(MAX_SERVER_LABELS + 3)]
    sink = run(*(session([("c", b"a1 LOGIN u p\r\n"), ("s", b"a1 NO\r\n")], client=("192.0.2.9", 41000 + i),
                         server=srv) for i, srv in enumerate(servers)), server_label=True)
    failures = {dict(ls)["server"]: v for (n, ls), v in samples(sink).items()
                if n == "imaptap_logins_total" and dict(ls)["outcome"] == "failure" and v}
    assert len(failures) == MAX_SERVER_LABELS + 1
    assert failures["other"] == 3 and failures["192.0.2.100:143"] == 1
    assert value(sink, "imaptap_metrics_server_overflow_total") == 3
    # without the option no series names a server
    plain = run(session([("c", b"a1 NOOP\r\n"), ("s", b"a1 OK\r\n")]))
    assert not any("server" in dict(ls) for _, ls in samples(plain))


def failed_logins(client_port: int, servers) -> list:
    return [session([("c", b"a1 LOGIN u p\r\n"), ("s", b"a1 NO\r\n")], client=("192.0.2.9", client_port + i),
                    server=srv) for i, srv in enumerate(servers)]


def test_live_workers_snapshots_merge_into_one_process_scrape_with_the_server_cap():
    servers = [(f"192.0.2.{100 + i}", 143) for i in range(MAX_SERVER_LABELS + 3)]
    # each worker under the cap (their union above it); each worker above it on its own
    for split, per_server in (((servers[0::2], servers[1::2]), 1), ((servers, servers), 2)):
        flows = [failed_logins(41000 + 100 * w, part) for w, part in enumerate(split)]
        workers = [run(*f, server_label=True) for f in flows]
        one = run(*(c for f in flows for c in f), server_label=True)
        merged = MetricsSink(server_label=True)
        for _ in range(2):  # merged again, as at every refresh: nothing counted twice
            merged.publish_merged([w.snapshot for w in workers], {"seen": 7, "received": 99})
        got, want = samples(merged), samples(one)
        failures = {dict(ls)["server"]: v for (n, ls), v in got.items()
                    if n == "imaptap_logins_total" and dict(ls)["outcome"] == "failure" and v}
        assert len(failures) == MAX_SERVER_LABELS + 1
        folded = len(flows[0]) + len(flows[1]) - MAX_SERVER_LABELS * per_server
        assert failures["other"] == folded == value(one, "imaptap_logins_total", server="other",
                                                    mechanism="LOGIN", outcome="failure")
        assert value(merged, "imaptap_metrics_server_overflow_total") == folded
        assert value(one, "imaptap_metrics_server_overflow_total") == folded
        assert total(merged, "imaptap_flows_ended_total") == total(one, "imaptap_flows_ended_total")

        def analysed(scrape: dict) -> int:
            return sum(1 for n, _ in scrape if n.startswith("imaptap_") and not n.startswith("imaptap_capture"))

        # as many series as one process's (which servers get a label follows the workers' order)
        assert analysed(got) == analysed(want)
        # the parent's kernel counters as given; a worker's own (received) only from the workers
        assert value(merged, "imaptap_capture_packets_seen_total") == 7
        assert value(merged, "imaptap_capture_records_received_total") == 0
        assert value(merged, "imaptap_build_info", version=metrics.__version__) == 1


def test_no_label_holds_a_user_a_client_address_or_a_mailbox():
    sink = run(session([
        ("c", b"a1 LOGIN mallory@example.org pw\r\n"), ("s", b"a1 OK\r\n"),
        ("c", b"a2 SELECT Secret-Projects\r\n"), ("s", b"a2 OK\r\n"),
    ], client=("198.51.100.77", 40000)), server_label=True)
    text = generate_latest(sink.registry).decode()
    for private in ("mallory", "198.51.100.77", "Secret-Projects", "pw"):
        assert private not in text.replace("process_", "")


def test_series_stay_within_the_stated_bound():
    names = sorted(KNOWN_COMMANDS) + ["UID FETCH", "UID FROB", "XYZZY", "X-ODD"]
    lines = b"".join(f"t{i} {name} x\r\n".encode() for i, name in enumerate(names))
    answers = b"".join(f"t{i} {st} x\r\n".encode() for i, _ in enumerate(names) for st in ["OK"])
    mechs = b"".join(f"m{i} AUTHENTICATE {m} =\r\nm{i} NO\r\n".encode()
                     for i, m in enumerate(sorted(MECHANISM_LABELS) + ["FOO", "BAR"]))
    convs = [session([("c", lines), ("s", answers), ("c", mechs), ("c", b"\x00\x01 junk\r\n")],
                     client=("192.0.2.9", 42000 + i), server=(f"192.0.2.{50 + i}", 143))
             for i in range(MAX_SERVER_LABELS + 4)]
    for server_label in (False, True):
        sink = run(*convs, server_label=server_label)
        own = [k for k in samples(sink) if k[0].startswith("imaptap_")]
        assert len(own) <= series_bound(server_label)
    assert series_bound(False) < 2000 and series_bound(True) < 20000


def test_every_family_is_prefixed_typed_and_named_for_its_unit():
    for f in FAMILIES:
        assert f.name.startswith("imaptap_")
        if f.kind is metrics.MetricKind.COUNTER:
            assert f.name.endswith("_total"), f.name
        else:
            assert not f.name.endswith("_total"), f.name
        assert "_ms" not in f.name and "milli" not in f.name


def test_served_over_http_with_what_the_pipeline_counted():
    sink = MetricsSink()
    host, port = sink.serve("127.0.0.1", 0)
    try:
        pipeline = Pipeline(MemorySource(session([("c", b"a1 NOOP\r\n"), ("s", b"a1 OK\r\n")])), [sink])
        pipeline.run()
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    finally:
        sink.close()
    assert 'imaptap_commands_total{command="NOOP",status="OK"} 1.0' in body
    assert "process_resident_memory_bytes" in body
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2)


#: Scrapers that hang up at once: enough that some resets reach the server before it answers.
HANGUPS = 30


def test_a_scraper_that_hangs_up_leaves_no_traceback(capsys):
    sink = MetricsSink()
    host, port = sink.serve("127.0.0.1", 0)
    try:
        sink.opened(Pipeline(MemorySource([]), [sink]))
        for _ in range(HANGUPS):
            with socket.create_connection((host, port), timeout=10) as c:
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                # close with a reset, as a client whose scrape timeout passed does
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
        time.sleep(0.5)  # the handler threads of the hung-up scrapes are done
    finally:
        sink.close()
    assert "imaptap_build_info" in body
    assert capsys.readouterr().err == ""


def test_a_scrape_that_fails_otherwise_is_one_line(capsys):
    sink = MetricsSink()
    sink.serve("127.0.0.1", 0)
    try:
        try:
            raise ValueError("bad request line")
        except ValueError:
            sink.httpd.handle_error(None, ("192.0.2.7", 5555))
    finally:
        sink.httpd.server_close()
    assert capsys.readouterr().err == ("imaptap: a metrics scrape from 192.0.2.7 failed:"
                                       " ValueError('bad request line')\n")


def test_a_busy_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=rf"^cannot serve metrics on 127.0.0.1:{port}: Address already in use$"):
            MetricsSink().serve("127.0.0.1", port)


@pytest.mark.parametrize("text, want", [
    ("9464", ("127.0.0.1", 9464)), ("0.0.0.0:9464", ("0.0.0.0", 9464)), ("[::1]:9464", ("::1", 9464)),
    ("localhost:0", ("localhost", 0)),
])
def test_listen_addresses(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "x", ":9464", "::1:9464", "127.0.0.1:", "127.0.0.1:65536", "1:-5"])
def test_bad_listen_addresses(text):
    with pytest.raises(ValueError):
        parse_address(text)


def test_unanswered_logins_beyond_what_a_session_keeps_are_unknown_at_once():
    from imaptap.imap.session import MAX_PENDING

    n = MAX_PENDING + 5
    flood = b"".join(f"t{i} LOGIN u{i} p\r\n".encode() for i in range(n))
    sink = MetricsSink()
    pipeline = Pipeline(MemorySource(session([("c", flood)], close=False), open_at_end=True, snaplen=1 << 20), [sink])
    pipeline.run()
    sink.refresh(pipeline)
    assert value(sink, "imaptap_logins_total", mechanism="LOGIN", outcome="unknown") == 5
    pipeline.table.close_all()
    sink.refresh(pipeline)
    assert value(sink, "imaptap_logins_total", mechanism="LOGIN", outcome="unknown") == n
