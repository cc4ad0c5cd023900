"""Commands over time and latencies per command (activity.py): bounded whatever the run's length."""

from imaptap.activity import (
    FIRST_BUCKET_SECONDS,
    LATENCY_EDGES_MS,
    MAX_COMMANDS,
    OTHER,
    TIME_BUCKETS,
    Activity,
)
from imaptap.imap.session import Message

T0 = 1_700_000_000.0


def request(ts, name="NOOP"):
    return Message.request(ts, "a1", name, None, (), False)


def response(ts, name, ms):
    return Message.response(ts, "a1", name, "OK", None, "done", ms, (), False)


def test_commands_are_counted_per_second():
    a = Activity()
    for ts in (0.1, 0.2, 0.9, 1.5, 4.0):
        a.message(request(T0 + ts))
    a.message(response(T0 + 4.1, "NOOP", 1.0))  # a completion is not a command
    snap = a.snapshot()
    assert snap.start == T0 + 0.1 and snap.bucket_seconds == FIRST_BUCKET_SECONDS
    assert snap.commands == (3, 1, 0, 1) and snap.per_second() == (3.0, 1.0, 0.0, 1.0)


def test_a_long_run_widens_the_buckets_and_keeps_every_command():
    a = Activity()
    n = 0
    for second in range(0, 10 * TIME_BUCKETS, 3):
        a.message(request(T0 + second))
        n += 1
    snap = a.snapshot()
    assert len(a.buckets) == TIME_BUCKETS and len(snap.commands) <= TIME_BUCKETS
    assert snap.bucket_seconds == FIRST_BUCKET_SECONDS * 16  # 10x the span: four doublings
    assert sum(snap.commands) == n


def test_latencies_fall_in_their_buckets():
    a = Activity()
    for ms in (0.05, 0.1, 0.3, 0.3, 3000.0):
        a.message(response(T0, "SELECT", ms))
    a.message(response(T0, "LOGIN", 500.0))
    a.message(Message.response(T0, "a9", None, "OK", None, "x", None, (), False))  # request unseen
    select, login = a.snapshot().latencies
    assert select.command == "SELECT" and select.total == 5
    assert select.counts[0] == 2 and select.counts[LATENCY_EDGES_MS.index(0.5)] == 2 and select.counts[-1] == 1
    assert select.median_ms == 0.5  # the third of five is in the bucket up to 0.5 ms
    assert login.counts[LATENCY_EDGES_MS.index(500.0)] == 1 and login.median_ms == 500.0


def test_command_names_are_bounded():
    a = Activity()
    for i in range(MAX_COMMANDS + 5):
        a.message(response(T0, f"X{i}", 1.0))
    rows = {r.command: r for r in a.snapshot().latencies}
    assert len(rows) == MAX_COMMANDS + 1 and rows[OTHER].total == 5
