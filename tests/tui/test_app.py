"""The app driven with Pilot: what a user sees after each key."""

from __future__ import annotations

from harness import SIZE, StepSource, login, mixed_flows, replay_app, run, segments_app, settle, step_app, wait_for
from imaptap.tui.app import KEYS, HelpScreen, ImaptapApp
from imaptap.tui.table import VirtualTable


def users(app: ImaptapApp) -> list:
    """The user column of the rows shown, top to bottom."""
    return [app.store.flows[fid].snap.facts.username for fid in app.flows_table.rows]


def screen_text(app: ImaptapApp) -> str:
    """What the flow table shows, as plain text (the cells as drawn, escapes included)."""
    table = app.flows_table
    height = table.scrollable_content_region.height
    return "\n".join(table.render_line(y).text for y in range(height))


def status_text(app: ImaptapApp) -> str:
    return app.query_one("#status").content.plain


def test_replay_shows_one_row_per_flow_with_its_facts():
    async def go():
        app = replay_app("failed-login.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert app.flows_table.row_count == 2
            text = screen_text(app)
            assert "IMAP LOGIN (alice)" in text and "LOGIN FAILED (alice)" in text
            assert "Dovecot" in text and "LOGOUT OK" in text
            first = app.store.flows[app.flows_table.rows[0]].cells()
            assert first[8].plain == "2" and first[8].style == "red"  # two failed logins, in red
            assert first[3].style == "bold red"  # the user whose password crossed in clear
            assert "finished" in status_text(app)
            assert not [s for s in app.store.flows.values() if s.snap.facts.imap is False]

    run(go())


def test_another_protocol_on_the_port_is_shown_as_not_imap_with_nothing_it_sent():
    async def go():
        app = replay_app("http-on-imap-port.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert app.flows_table.row_count == 2
            entries = [app.store.flows[f] for f in app.flows_table.rows]
            assert [e.cells()[5].plain for e in entries] == ["NOT IMAP", "NOT IMAP"]
            assert all(not e.messages and e.snap.last_command is None for e in entries)
            text = screen_text(app)
            assert "GET" not in text and "LOGIN" not in text and "Http-Pw-4242" not in text
            assert "(0 IMAP, 2 not IMAP)" in status_text(app)

    run(go())


def test_tls_and_deflate_flows_are_marked():
    async def go():
        app = segments_app(mixed_flows(), ports=(143, 10143), close=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            states = {app.store.flows[f].snap.facts.client: app.store.flows[f].cells()[5]
                      for f in app.flows_table.rows}
            tls = states["10.0.0.4:40003"]
            assert tls.plain == "TLS" and tls.style == "bold green"
        app = replay_app("compress.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            (fid,) = app.flows_table.rows
            state = app.store.flows[fid].cells()[5]
            assert state.plain == "DEFLATE (dave)" and state.style == "bold magenta"

    run(go())


def test_filter_keyword_forms_and_escape():
    async def go():
        app = segments_app(mixed_flows(), ports=(143, 10143), close=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert len(users(app)) == 5

            async def filter_by(text: str) -> list:
                app.query_one("#filter").value = text  # as if typed: Input.Changed filters
                await pilot.pause()
                return users(app)

            # typed key by key, the table follows each key
            await pilot.press("/", *"user:al")
            assert users(app) == ["alice"]
            await pilot.press("backspace", "backspace")
            assert len(users(app)) == 5  # "user:" alone filters nothing yet
            await pilot.press("a", "l", "enter")
            assert users(app) == ["alice"] and app.focused is app.flows_table  # Enter keeps the filter
            assert await filter_by("user:alice") == ["alice"]
            assert await filter_by("status:NO") == ["bob"]
            assert await filter_by("port:10143") == ["dave"]
            assert await filter_by("tls") == [None]
            assert sorted(await filter_by("cleartext")) == ["alice", "bob", "dave", "erin"]
            assert await filter_by("cleartext -ended") == ["erin"]
            assert await filter_by("INBOX") == ["alice"]  # plain text: the mailbox
            assert "filter" in status_text(app) and "1 shown" in status_text(app)
            # Esc in the box clears the filter
            await pilot.press("/", "escape")
            assert len(users(app)) == 5 and not app.flow_filter
            # Esc in the table clears a kept filter too
            await filter_by("user:bob")
            assert app.focused is app.flows_table
            await pilot.press("escape")
            assert len(users(app)) == 5

    run(go())


def test_sort_by_key_and_by_header_click_keeps_the_cursor_on_its_flow():
    async def go():
        app = segments_app(mixed_flows(), ports=(143, 10143), close=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("down")  # bob
            assert users(app)[app.flows_table.cursor_row] == "bob"
            await pilot.press("s")  # client
            assert app.sort_column == "client"
            await pilot.press("s", "s")  # server, user
            assert app.sort_column == "user" and users(app) == ["alice", "bob", "dave", "erin", None]
            await pilot.press("S")
            assert app.sort_reverse and users(app) == [None, "erin", "dave", "bob", "alice"]
            assert users(app)[app.flows_table.cursor_row] == "bob"
            # the header knows: ▼ on the user column
            assert "user▼" in app.flows_table.render_line(0).text
            # click the "fail" header: bob (1 failure) last in ascending order, then first
            x = app.flows_table.render_line(0).text.index("fail")
            await pilot.click("#flows", offset=(x + 1, 0))
            assert app.sort_column == "failed" and not app.sort_reverse and users(app)[-1] == "bob"
            await pilot.click("#flows", offset=(x + 1, 0))
            assert app.sort_reverse and users(app)[0] == "bob"
            # s past the last column: back to the order flows were seen in
            for _ in range(3):
                await pilot.press("s")
            assert app.sort_column is None and users(app) == ["alice", "bob", None, "dave", "erin"]

    run(go())


def test_enter_opens_the_details_of_the_selected_flow_and_escape_closes_them():
    async def go():
        app = replay_app("login-quoted.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            details = app.query_one("#details")
            assert not details.display
            await pilot.press("enter")
            assert details.display and app.detail_id == app.flows_table.rows[0]
            entry = app.store.flows[app.detail_id]
            text = _plain(app.query_one("#facts-body").content)
            for key in entry.snap.facts._fields:
                if key != "type":
                    assert key in text, key  # every fact of the flow record is listed
            assert 'Say "Hi"' in text and "Entwürfe" in text  # mailboxes, decoded
            assert "Bob Pw" not in text  # never the password
            timeline = app.timeline
            assert timeline.row_count == len(entry.messages) > 5
            lines = [timeline.render_line(y).text for y in range(1, timeline.row_count + 1)]
            login = next(line for line in lines if "LOGIN" in line and "C→S" in line)
            assert "***" in login and "Bob" not in login
            assert any("S→C" in line and "OK" in line and "ms" in line for line in lines)
            await pilot.press("escape")
            assert not details.display and app.detail_id is None

    run(go())


def _plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_details_follow_the_cursor_while_open():
    async def go():
        app = segments_app(mixed_flows(), ports=(143, 10143), close=False)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("enter")
            assert app.store.flows[app.detail_id].snap.facts.username == "alice"
            await pilot.press("j")
            assert app.store.flows[app.detail_id].snap.facts.username == "bob"
            assert "LOGIN FAILED" in str(app.query_one("#details").border_title)
            await pilot.press("k")
            assert app.store.flows[app.detail_id].snap.facts.username == "alice"

    run(go())


def test_pause_freezes_the_table_while_the_capture_goes_on():
    async def go():
        source = StepSource()
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            source.queue.put(login("alice", 1, close=False))
            await wait_for(pilot, lambda: app.flows_table.row_count == 1)
            await pilot.press("p")
            assert app.paused and "PAUSED" in status_text(app)
            source.queue.put(login("bob", 2, close=False))
            await wait_for(pilot, lambda: app.status.flows_total == 2)  # the status line goes on
            await pilot.pause(0.1)
            assert app.flows_table.row_count == 1  # the table does not
            await pilot.press("p")
            await wait_for(pilot, lambda: app.flows_table.row_count == 2)
            assert "PAUSED" not in status_text(app)

    run(go())


def test_help_lists_every_key():
    async def go():
        app = segments_app(login("alice", 1))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = app.screen.query_one("#help-keys").content.plain
            listed = " ".join(k for k, _ in KEYS).split()
            names = {"slash": "/", "question_mark": "?", "escape": "Esc", "enter": "Enter", "up": "↑",
                     "down": "↓", "pageup": "PgUp", "pagedown": "PgDn", "home": "Home", "end": "End"}
            for cls in (ImaptapApp, VirtualTable):
                for binding in cls.BINDINGS:
                    for key in binding.key.split(","):
                        assert names.get(key, key) in listed, key
            assert "user:alice" in text and "cleartext" in text
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

    run(go())


def test_q_stops_the_worker_and_leaves_the_capture():
    async def go():
        source = StepSource()
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            source.queue.put(login("alice", 1, close=False))
            await wait_for(pilot, lambda: app.flows_table.row_count == 1)
            assert source.entered and not source.left
            await pilot.press("q")
            await wait_for(pilot, lambda: app._exit_renderables is not None or not app.is_running, timeout=5)
        assert source.left  # the with block of a live capture is left
        assert app.feed.done and app.return_code == 0

    run(go())


def test_q_in_the_filter_box_is_a_letter():
    async def go():
        app = segments_app(login("alice", 1))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("/", "q")
            assert app.is_running and app.query_one("#filter").value == "q"

    run(go())


def test_lost_segments_are_red_in_the_status_line():
    async def go():
        source = StepSource(counters={"seen": 100, "matched": 10, "submitted": 10, "lost": 3})
        source.live = True
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            source.queue.put(login("alice", 1, close=False))
            await wait_for(pilot, lambda: app.status is not None and app.status.counters is not None)
            await pilot.pause(0.05)
            status = app.query_one("#status").content
            text = status.plain
            assert "LIVE step" in text and "lost 3" in text and "seen 100" in text
            start = text.index("lost 3")
            spans = [s for s in status.spans if s.start <= start < s.end]
            assert any("red" in str(s.style) for s in spans)
            await pilot.press("q")

    run(go())


def test_an_interface_gone_shows_in_the_status_line():
    async def go():
        source = StepSource(counters={"seen": 100, "matched": 10, "submitted": 10, "lost": 0,
                                      "interface_gone": 1, "interfaces_unavailable": 1})
        source.live = True
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.status is not None and app.status.counters is not None)
            await pilot.pause(0.05)
            status = app.query_one("#status").content
            text = status.plain
            assert "1 interface gone or down" in text
            start = text.index("1 interface gone")
            assert any("red" in str(s.style) for s in status.spans if s.start <= start < s.end)
            source.fake_counters = dict(source.fake_counters, interfaces_unavailable=0)  # it came back
            await wait_for(pilot, lambda: "gone or down" not in app.query_one("#status").content.plain)
            await pilot.press("q")

    run(go())


def test_a_cut_capture_shows_what_it_read_and_exits_2(tmp_path):
    data = open(_pcap_path("login-atom.pcap"), "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - 30])

    async def go():
        from harness import frozen
        from imaptap.tui.feed import Feed, ReplaySource

        app = ImaptapApp(Feed(ReplaySource(str(cut), (143,)), clock=frozen, wallclock=frozen))
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert app.flows_table.row_count == 1
            assert "truncated" in status_text(app)
            await pilot.press("q")
        return app

    app = _result(go())
    assert app.return_code == 2 and "truncated" in app.capture_error


def _pcap_path(name):
    from harness import pcap

    return pcap(name)


def _result(coro):
    import asyncio

    return asyncio.run(coro)


class FakeCapture:
    """Stands in for `LiveCapture`: a context manager with poll() and counters()."""

    def __init__(self, segments) -> None:
        from imaptap.segment import PayloadPolicy

        self.interfaces = ["veth-test", "lo"]
        self.ports = {143}
        self.policy = PayloadPolicy()
        self.notes = ["kernel 5.10 lacks bpf_xdp_load_bytes (5.18+): capturing ingress with TC instead of XDP"]
        self.pending = list(segments)
        self.entered = self.exited = False
        self.lost = 0
        self.privileges = None

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc):
        self.exited = True
        return False

    def poll(self, timeout_ms):
        import time

        assert self.entered  # after exit: what was left in the buffer, as LiveCapture.poll
        out, self.pending = self.pending, []
        if self.exited:
            return out
        if not out:
            time.sleep(timeout_ms / 1000)
        return out

    def counters(self):
        return {"seen": 1000, "matched": 40, "submitted": 40, "lost": self.lost, "copy_failed": 0}


def test_live_capture_counters_notes_and_q_detaches():
    from harness import frozen
    from imaptap.tui.feed import Feed, LiveSource

    async def go():
        capture = FakeCapture(login("alice", 1, close=False))
        app = ImaptapApp(Feed(LiveSource(capture), wallclock=frozen, flush_interval=0.05))
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.flows_table.row_count == 1)
            text = status_text(app)
            assert text.startswith("LIVE veth-test,lo") and "lost 0" in text and "matched 40" in text
            assert "lacks bpf_xdp_load_bytes" in str([n.message for n in app._notifications])
            capture.lost = 7
            await wait_for(pilot, lambda: "lost 7" in status_text(app))
            assert capture.entered and not capture.exited
            await pilot.press("q")
            await wait_for(pilot, lambda: capture.exited, timeout=5)
        assert capture.exited and app.return_code == 0

    run(go())
