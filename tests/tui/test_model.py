"""The UI's model without a terminal: the store's bounds, the filter language, safe text, cells."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from rich.text import Text

from harness import login, mixed_flows
from imaptap.imap.session import Kind, Message, Side
from imaptap.tui import display
from imaptap.tui.display import FLOW_COLUMNS, safe
from imaptap.tui.feed import Feed, FeedUpdate, MemorySource, MessageBatch
from imaptap.tui.query import parse
from imaptap.tui.store import FlowEntry, FlowStore
from imaptap.tui.table import fit_widths


def snapshots(segments, ports=(143, 10143), close=False) -> list:
    """The last snapshot of every flow, as the UI would have it; open flows stay open unless ``close``."""
    latest = {}

    def emit(update: FeedUpdate) -> None:
        latest.update((s.id, s) for s in update.flows)
        feed.ready.set()

    feed = Feed(MemorySource(segments, ports, open_at_end=not close), emit)
    feed.run()
    return [latest[k] for k in sorted(latest)]


def status():
    from imaptap.tui.feed import CaptureStatus

    return CaptureStatus("t", False, 0, 0.0, 0, 0, 0.0, 0.0)


def msg(i: int) -> Message:
    return Message(float(i), Side.CLIENT, Kind.REQUEST, tag=f"a{i}", command="NOOP")


# --- the store -----------------------------------------------------------------------------------


def test_ended_flows_go_oldest_first_beyond_the_bound_open_ones_stay():
    segments = [s for i in range(6) for s in login(f"u{i}", i)] + login("open", 99, close=False)
    snaps = snapshots(segments)
    assert [s.facts.end for s in snaps] == ["fin"] * 6 + [None]
    store = FlowStore(max_ended=4)
    changed, removed = store.apply(FeedUpdate(status(), tuple(snaps), batch=True))
    assert len(store.flows) == 5 and store.evicted == 2
    assert sorted(removed) == [s.id for s in snaps[:2]]  # the first two to end
    assert snaps[-1].id in store.flows
    assert not changed & removed


def test_timelines_are_bounded_per_flow_and_in_total():
    snaps = snapshots([s for i in range(3) for s in login(f"u{i}", i)], close=True)
    store = FlowStore(max_history=900)
    ids = [s.id for s in snaps]
    batch = {fid: MessageBatch(tuple(msg(i) for i in range(600)), 100) for fid in ids[:2]}
    store.apply(FeedUpdate(status(), tuple(snaps), batch, batch=True))
    first, second = (store.flows[f] for f in ids[:2])
    assert first.received == second.received == 700
    assert len(second.messages) == 500  # MAX_MESSAGES_PER_FLOW
    assert store.history <= 900
    assert len(first.messages) == 0 and first.dropped == 700  # the oldest ended flow gave its timeline up
    assert second.messages[-1].tag == "a599"


def test_messages_of_unknown_flows_and_gone_flows():
    snaps = snapshots(login("alice", 1), close=True)
    store = FlowStore()
    store.apply(FeedUpdate(status(), tuple(snaps), batch=True))
    changed, removed = store.apply(FeedUpdate(status(), (), {12345: MessageBatch((msg(1),), 0)},
                                              gone=(snaps[0].id,), batch=True))
    assert not store.flows and removed == {snaps[0].id} and not changed


# --- the filter ----------------------------------------------------------------------------------


def matching(text: str) -> list:
    q = parse(text)
    return sorted(s.facts.username or "-" for s in snapshots(mixed_flows()) if q.matches(FlowEntry(s)))


def test_filter_forms():
    assert matching("") == ["-", "alice", "bob", "dave", "erin"]
    assert matching("user:alice") == ["alice"]
    assert matching("user:ALI") == ["alice"]  # any case, any part
    assert matching("port:10143") == ["dave"]
    assert matching("port:1014") == []  # ports match whole
    assert matching("status:no") == ["bob"]
    assert matching("tls") == ["-"]
    assert len(matching("ended")) == 4
    assert matching('"ended"') == []  # quoted: the text, and no flow mentions it
    assert matching("cleartext") == ["alice", "bob", "dave", "erin"]
    assert matching("cleartext -user:bob !port:10143") == ["alice", "erin"]
    assert matching("cmd:select") == ["alice"]
    assert matching("mailbox:inbox") == ["alice"]
    assert matching("failed") == ["bob"]
    assert matching("state:failed") == ["bob"]
    assert matching("finding:cleartext") == ["alice", "bob", "dave", "erin"]
    assert matching("host:10.0.0.4") == ["-"]
    assert matching("10.1.0.1:10143") == ["dave"]  # unknown key: the whole word as text
    assert matching("dovecot user:r") == ["erin"]
    assert matching("user:") == matching("")  # a key still being typed filters nothing


@given(st.text(max_size=40))
def test_any_filter_text_parses_and_matches_without_error(text):
    q = parse(text)
    for snap in _SNAPS:
        q.matches(FlowEntry(snap))


_SNAPS = snapshots(mixed_flows())


# --- safe text and cells -------------------------------------------------------------------------


def test_markup_and_escapes_are_shown_literally():
    t = safe("[bold red]root[/]")
    assert t.plain == "[bold red]root[/]" and not t.spans
    t = safe("\x1b[31mevil\x1b[0m")
    assert t.plain == "\\x1b[31mevil\\x1b[0m"
    assert [t.plain[s.start:s.end] for s in t.spans] == ["\\x1b", "\\x1b"]
    assert safe("\x1b]0;pwned\x07ctl\x08\x7fuser").plain == "\\x1b]0;pwned\\x07ctl\\x08\\x7fuser"
    assert safe("a\u202eb\u200bc\r\n").plain == "a\\u202eb\\u200bc\\r\\n"
    assert safe("Entwürfe ✉ 日本").plain == "Entwürfe ✉ 日本"


_BAD = {"Cc", "Cs"}
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}


@given(st.text())
def test_safe_text_never_carries_a_control_or_bidi_character(s):
    out = safe(s).plain
    assert not [c for c in out if unicodedata.category(c) in _BAD or ord(c) in _BIDI]
    assert display.plain(s) == out


def test_state_column_words():
    by_user = {s.facts.username: display.state_plain(s) for s in snapshots(mixed_flows())}
    assert by_user["alice"] == "IMAP LOGIN (alice)"
    assert by_user["bob"] == "LOGIN FAILED (bob)"
    assert by_user[None] == "TLS"
    greeted = snapshots(login("x", 1)[:3])  # handshake and greeting only
    assert display.state_plain(greeted[0]) == "IMAP OK (Dovecot)"


def test_cells_are_text_never_markup():
    (s,) = snapshots(login("[b]x[/b]", 1))
    cells = display.flow_cells(s)
    assert all(isinstance(c, Text) for c in cells)
    assert cells[3].plain == "[b]x[/b]" and cells[5].plain == "IMAP LOGIN ([b]x[/b])"
    assert len(cells) + 1 == len(FLOW_COLUMNS)  # and the age


def test_durations_and_latencies():
    assert [display.duration(x) for x in (0, 59.9, 60, 3599, 3600, 86400 * 3 + 7200)] == \
        ["0s", "59s", "1m00s", "59m59s", "1h00m", "3d02h"]
    assert [display.latency(x) for x in (None, 0.123, 12.34, 123.4, 4321)] == \
        ["", "0.12ms", "12.3ms", "123ms", "4.32s"]


def test_column_widths_fill_the_width_then_shrink_then_drop():
    for total in (200, 160, 120):
        widths = fit_widths(FLOW_COLUMNS, total)
        assert sum(widths) + len(widths) - 1 == total
        assert widths[1] >= 21 and widths[2] >= 21  # client and server: a whole IPv4 address and port
    narrow = dict(zip((c.key for c in FLOW_COLUMNS), fit_widths(FLOW_COLUMNS, 90), strict=True))
    assert narrow["software"] == narrow["latency"] == narrow["last"] == 0  # dropped first
    assert narrow["state"] >= 12 and narrow["user"] >= 8 and narrow["failed"] == 4


def test_literal_sizes_are_shown_once():
    base = {"ts": 1.0, "from": "client", "kind": "request", "tag": "a2", "command": "APPEND",
            "status": None, "code": None, "text": None, "latency_ms": None}
    append = display.message_cells({**base, "args": "INBOX {3120}", "literals": [3120]}, 0.0)
    assert " ".join(c.plain for c in append).count("{3120}") == 1
    login = display.message_cells({**base, "command": "LOGIN", "args": "carol ***", "literals": [5, 13]}, 0.0)
    assert "{5} {13}" in " ".join(c.plain for c in login)
