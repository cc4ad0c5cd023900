"""imaptap's terminal UI: the flow table, the details of one flow, filter, sort, pause.

The capture runs in a worker thread (`Feed.run`); the UI thread only sees the `FeedUpdate`s it
posts (see feed.py) and keeps its own bounded copy of the flows (`FlowStore`).  Redrawing is
cheap whatever the number of flows: the table draws only the rows on screen.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Hashable, Sequence

from rich.measure import Measurement
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import Resize
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, ProgressBar, Static
from textual.worker import Worker, WorkerState

from imaptap.output.jsonl import message_record
from imaptap.tui import display
from imaptap.tui.display import FLOW_COLUMNS, SORT_KEYS, TIMELINE_COLUMNS, safe
from imaptap.tui.feed import MAX_ENDED_FLOWS, CaptureStatus, FeedControl, FeedUpdate, Summary
from imaptap.tui.messages import CaptureUpdated, HeaderClicked, RowHighlighted, RowSelected
from imaptap.tui.query import Query, parse
from imaptap.tui.store import FlowStore
from imaptap.tui.summary import summary_renderable
from imaptap.tui.table import VirtualTable

#: The widest the summary is laid out (its widest table, cells capped at output.report.MAX_CELL).
MAX_SUMMARY_WIDTH = 1000
#: The width assumed before the screen has one.
MIN_SUMMARY_WIDTH = 80
#: Columns below which the details stack the facts above the timeline and the status line
#: puts its counts first: beside the timeline the facts column (a 22-character key, then a
#: 27-character UTC time) would wrap addresses and times over several lines.
NARROW_WIDTH = 120

#: Every key, as the help screen lists it (the bindings below and the tables' own).
KEYS: tuple[tuple[str, str], ...] = (
    ("↑ ↓  k j", "previous / next row"),
    ("PgUp PgDn  ctrl+b ctrl+f", "page up / down"),
    ("Home End  g G", "first / last row"),
    ("Enter", "details of the flow under the cursor (or click it again)"),
    ("Tab  shift+Tab", "move between the flows, the facts and the timeline"),
    ("Esc", "close the details; in the filter: clear it; else clear the filter"),
    ("/", "filter: text, user:alice port:143 status:NO cmd:SELECT host:10.0 software:dovecot"),
    ("", "  mailbox:INBOX mech:PLAIN finding:cleartext end:fin state:TLS"),
    ("", "  tls cleartext deflate failed open ended imap starttls findings ipv4 ipv6"),
    ("", '  -word or !word negates; "tls" in quotes searches for the text'),
    ("s  S", "sort by the next column / reverse the order (or click a header)"),
    ("p", "pause / resume the display (the capture goes on)"),
    ("r", "summary: findings, servers, clients, attacks, commands per second, latency per command"),
    ("?", "this help"),
    ("q  ctrl+c  ctrl+q", "quit (live: detaches the kernel programs first)"),
)


#: Signals that quit as q does (the terminal is raw, so ctrl+c is a key, not SIGINT).
QUIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


class HelpScreen(ModalScreen[None]):
    """Every key and what it does."""

    BINDINGS = [
        Binding("escape,q,question_mark,enter", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        table = Text()
        width = max(len(k) for k, _ in KEYS)
        for i, (keys, what) in enumerate(KEYS):
            if i:
                table.append("\n")
            table.append(keys.ljust(width + 2), "bold")
            table.append(what)
        with Vertical(id="help"):
            yield Static(Text("imaptap keys", style="bold"), id="help-title")
            yield Static(table, id="help-keys")
            yield Static(Text("Esc, q or ? closes this", style="dim"), id="help-close")


class SummaryScreen(Screen[None]):
    """The report's rows and the activity pictures, updated while the capture runs."""

    BINDINGS = [
        Binding("escape,r", "dismiss", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._body = Static(id="summary-body")

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="summary"):
            yield self._body
        yield Footer()

    def on_mount(self) -> None:
        app = self.app
        assert isinstance(app, ImaptapApp)
        app.feed.summary_wanted.set()
        self.show(app.summary)

    def on_unmount(self) -> None:
        app = self.app
        if isinstance(app, ImaptapApp):
            app.feed.summary_wanted.clear()

    def on_resize(self, event: Resize) -> None:
        app = self.app
        if isinstance(app, ImaptapApp):
            self.show(app.summary)

    def show(self, summary: Summary | None) -> None:
        width = self.size.width or MIN_SUMMARY_WIDTH
        body = summary_renderable(summary, width)
        # as wide as its widest table, so that a narrow terminal scrolls sideways instead of
        # cutting cells: rich would shorten them to fit
        console = self.app.console
        natural = Measurement.get(console, console.options.update_width(MAX_SUMMARY_WIDTH), body).maximum
        self._body.styles.width = max(natural, width - 2)
        self._body.update(body)


class ImaptapApp(App[int]):
    """Shows what a `Feed` captures; returns the exit status (2 when the capture failed)."""

    CSS_PATH = "imaptap.tcss"
    TITLE = "imaptap"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW_WIDTH, "-wide")]

    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort_next", "Sort"),
        Binding("S", "sort_reverse", "Reverse", show=False),
        Binding("p", "pause", "Pause"),
        Binding("r", "summary", "Summary"),
        Binding("escape", "back", "Back", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(self, feed: FeedControl, *, handle_signals: bool = False) -> None:
        super().__init__()
        self.feed = feed
        feed.emit = self._emit
        self.handle_signals = handle_signals
        self.store = FlowStore()
        self.flow_filter = Query("")
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.paused = False
        self.now = 0.0
        """The capture clock as last shown (frozen while paused)."""
        self.status: CaptureStatus | None = None
        self.summary: Summary | None = None
        """The worker's latest summary (sent while the summary is shown, and at the end)."""
        self.detail_id: int | None = None
        self.capture_complete = False
        """The worker's last update has been applied: the table shows everything it saw."""
        self.capture_error: str | None = None
        self._visible: set[int] = set()
        self._held: list[FeedUpdate] = []
        self._last_held = False
        self._notes_shown: set[str] = set()
        self._worker: Worker | None = None
        self._quitting = False
        # Built here, not looked up: updates from the worker may still arrive while the app
        # is being torn down, when a query would find nothing.
        self._filter_box = Input(placeholder="filter: alice  user:alice  port:143  status:NO  tls  cleartext  -ended"
                                 "   (Enter keeps it, Esc clears it)", id="filter")
        self._flows = VirtualTable(FLOW_COLUMNS, self._flow_cells, id="flows")
        self._details: Horizontal
        self._facts: VerticalScroll
        self._facts_body = Static(id="facts-body")
        self._timeline = VirtualTable(TIMELINE_COLUMNS, self._message_cells, id="timeline")
        self._status_line = Static(id="status")
        self._progress = ProgressBar(id="progress", show_eta=False)

    # --- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield self._filter_box
        yield self._flows
        with Horizontal(id="details") as self._details:
            with VerticalScroll(id="facts") as self._facts:
                yield self._facts_body
            yield self._timeline
        with Horizontal(id="statusbar"):
            yield self._status_line
            yield self._progress
        yield Footer()

    @property
    def flows_table(self) -> VirtualTable[int]:
        return self._flows

    @property
    def timeline(self) -> VirtualTable[int]:
        return self._timeline

    def on_mount(self) -> None:
        self.flows_table.focus()
        # a source that counts what it read shows it; of a pipe (-r -) the size is unknown, and
        # the bar only moves
        self._progress.display = self.feed.source.progress() != (None, None)
        self._details.border_title = "details"
        self._show_status()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in QUIT_SIGNALS:
                loop.add_signal_handler(sig, lambda: self.call_later(self.action_quit))
        self._worker = self._capture()

    def on_unmount(self) -> None:
        # Whatever ended the app, the worker must leave the capture (and its with block).
        self.feed.stop()
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in QUIT_SIGNALS:
                loop.remove_signal_handler(sig)

    @work(thread=True, name="capture", exit_on_error=True)
    def _capture(self) -> None:
        self.feed.run()

    def _emit(self, update: FeedUpdate) -> None:
        """Called by the worker thread."""
        self.post_message(CaptureUpdated(update))

    # --- updates from the worker ---------------------------------------------------------------

    def on_capture_updated(self, message: CaptureUpdated) -> None:
        if not self.is_running:
            return
        update = message.update
        self.status = update.status
        if update.summary is not None:
            self.summary = update.summary
            if isinstance(self.screen, SummaryScreen):
                self.screen.show(update.summary)
        for note in update.status.notes:
            if note not in self._notes_shown:
                self._notes_shown.add(note)
                self.notify(note, title="capture", severity="warning", timeout=10, markup=False)
        if update.status.error and self.capture_error is None:
            self.capture_error = update.status.error
            if update.status.live:
                # Nothing to show from a capture that could not run: say why on the terminal.
                self.exit(2, return_code=2)
                return
            self.notify(update.status.error, title="capture file", severity="error", timeout=30, markup=False)
        if update.batch:
            if self.paused:
                self._held.append(update)
            else:
                self._apply(update)
        elif update.last:
            if self.paused:
                self._last_held = True
            else:
                self.capture_complete = True
        if not self.paused and update.status.now != self.now:
            # Ages are shown in whole seconds: redraw for them only when one may have changed.
            if int(update.status.now) != int(self.now):
                self.flows_table.refresh()
            self.now = update.status.now
        self._show_status()

    def _apply(self, update: FeedUpdate) -> None:
        changed, removed = self.store.apply(update)
        self.feed.ready.set()  # the worker may send the next batch
        self._sync(changed, removed)
        if update.last:
            self.capture_complete = True

    def _sync(self, changed: set[int], removed: set[int]) -> None:
        flows = self.store.flows
        visible = self._visible
        visible -= removed
        matches = self.flow_filter.matches
        for fid in changed:
            if matches(flows[fid]):
                visible.add(fid)
            else:
                visible.discard(fid)
        self._reorder()
        if self.detail_id is not None and (self.detail_id in changed or self.detail_id in removed):
            self._show_details()

    def _reorder(self) -> None:
        ids = sorted(self._visible)
        flows = self.store.flows
        if self.sort_column is not None:
            key = SORT_KEYS[self.sort_column]
            now = self.now
            ids.sort(key=lambda fid: key(flows[fid].snap, now), reverse=self.sort_reverse)
        elif not self.feed.ids_in_start_order:  # the default order is the flows' start
            ids.sort(key=lambda fid: flows[fid].snap.facts.first_ts)
        self.flows_table.set_rows(ids)

    def _refilter(self) -> None:
        if self.flow_filter:
            matches = self.flow_filter.matches
            self._visible = {fid for fid, entry in self.store.flows.items() if matches(entry)}
        else:
            self._visible = set(self.store.flows)
        self._reorder()
        self._show_status()

    # --- cells -----------------------------------------------------------------------------------

    def _flow_cells(self, fid: int) -> tuple[Hashable, Sequence[Text]]:
        entry = self.store.flows.get(fid)
        if entry is None:
            return None, ()
        age = display.age_cell(entry.snap, self.now)
        return (entry.version, age.plain), [*entry.cells(), age]

    def _message_cells(self, index: int) -> tuple[Hashable, Sequence[Text]]:
        entry = self.store.flows.get(self.detail_id) if self.detail_id is not None else None
        if entry is None:
            return None, ()
        pos = index - entry.dropped
        if not 0 <= pos < len(entry.messages):
            return None, ()
        msg = entry.messages[pos]
        rec = message_record(entry.snap.ref, msg)
        return self.detail_id, display.message_cells(rec, entry.snap.facts.first_ts)

    # --- details ---------------------------------------------------------------------------------

    @on(RowSelected, "#flows")
    def _open_details(self, message: RowSelected[int]) -> None:
        self.detail_id = message.key
        self.screen.add_class("-details")
        self._show_details(new=True)

    @on(RowHighlighted, "#flows")
    def _follow_cursor(self, message: RowHighlighted[int]) -> None:
        if self.detail_id is not None and message.key is not None and message.key != self.detail_id:
            self.detail_id = message.key
            self._show_details(new=True)

    def _close_details(self) -> None:
        self.detail_id = None
        self.screen.remove_class("-details")
        self.flows_table.focus()

    def _show_details(self, new: bool = False) -> None:
        entry = self.store.flows.get(self.detail_id) if self.detail_id is not None else None
        body = self._facts_body
        details = self._details
        timeline = self.timeline
        if entry is None:
            body.update(Text(f"this flow is no longer kept: only the last {MAX_ENDED_FLOWS:,} ended flows are",
                             style="dim"))
            details.border_title = "details"
            timeline.set_rows([])
            return
        snap = entry.snap
        r = snap.facts
        details.border_title = Text.assemble(
            f"flow {r.flow}  ", r.client, " → ", r.server, "  ", display.state_text(snap))
        body.update(display.facts_table(snap, len(entry.messages), entry.dropped))
        first = entry.dropped
        keys = list(range(first, entry.received))
        at_end = timeline.cursor_row is None or timeline.cursor_row >= timeline.row_count - 1
        timeline.set_rows(keys)
        timeline.border_title = f"timeline: {len(keys):,} messages" + (
            f", {entry.dropped:,} older dropped" if entry.dropped else "")
        if keys and (new or at_end):
            timeline.move_to(keys[-1] if not new else keys[0])
        if new:
            self._facts.scroll_home(animate=False)

    # --- status bar ------------------------------------------------------------------------------

    def _show_status(self) -> None:
        st = self.status
        feed = self.feed
        out = Text(no_wrap=True, overflow="ellipsis")
        if self.paused:
            out.append(" PAUSED ", "bold black on yellow")
            out.append(" ")
        if st is None:
            out.append("LIVE " if feed.source.live else "REPLAY ", "bold")
            out.append_text(safe(feed.source.label))
            out.append(" · starting", "dim")
            self._status_line.update(out)
            return
        if self.narrow:
            self._status_line.update(self._narrow_status(st, out))
            self._show_progress(st)
            return
        if st.live:
            out.append("LIVE ", "bold green" if not st.done else "bold")
        else:
            out.append("REPLAY ", "bold cyan")
        out.append_text(safe(st.source))
        if self._quitting:
            out.append(" · stopping the capture…", "yellow")
        elif st.done and st.totals is not None and not st.live:
            t = st.totals
            out.append(" · finished ", "bold")
            out.append(f"in {t['seconds']:.2f} s: ")
            if "packets" in t:
                out.append(f"{t['packets']:,} packets, ")
            out.append(f"{t['segments']:,} segments, {_n(t['flows'], 'flow')} ({t['imap_flows']:,} IMAP")
            if t.get("non_imap_flows"):
                out.append(f", {t['non_imap_flows']:,} not IMAP")
            out.append(")")
        else:
            if not st.live and st.size is None and st.bytes_read is not None:
                out.append(f" · {display.size(st.bytes_read)} read")
            out.append(f" · {display.count(st.segments_per_s)} seg/s · {st.segments:,} segments")
            out.append(f" · {_n(st.flows_total, 'flow')}, {st.flows_open:,} open")
        shown = len(self._visible)
        if self.flow_filter:
            out.append(" · filter ", "bold")
            out.append_text(safe(self.flow_filter.text, "italic"))
            out.append(f" → {shown:,} shown")
        if self.sort_column is not None:
            out.append(f" · sorted by {self._column_label(self.sort_column)}{' ▼' if self.sort_reverse else ' ▲'}")
        c = st.counters
        if c is not None:
            out.append(" · kernel ")
            out.append(f"seen {display.count(c.get('seen', 0))} matched {display.count(c.get('matched', 0))} "
                       f"submitted {display.count(c.get('submitted', 0))} ")
            lost = c.get("lost", 0)
            out.append(f"lost {display.count(lost)}", "bold white on red" if lost else "green")
            for name in ("copy_failed", "malformed", "policy_errors"):
                if c.get(name):
                    out.append(f" {name} {display.count(c[name])}", "bold red")
            unavailable = c.get("interfaces_unavailable", 0)
            if unavailable:
                out.append(f" · {_n(unavailable, 'interface')} gone or down", "bold white on red")
        let_go = self.store.evicted + st.ended_dropped
        if let_go:
            out.append(f" · {let_go:,} old ended flows no longer kept", "dim")
        if self.capture_error:
            out.append(" · ")
            out.append_text(safe(self.capture_error, "bold red"))
        self._status_line.update(out)
        self._show_progress(st)

    def _show_progress(self, st: CaptureStatus) -> None:
        if not st.live and st.size:
            # ReplayStats.bytes counts packet bytes, not the file's record headers: a finished
            # replay has read the whole file.
            done = st.size if st.done else min(st.bytes_read or 0, st.size)
            self._progress.update(total=st.size, progress=done)
        elif not st.live and st.done:
            self._progress.update(total=1, progress=1)

    def _narrow_status(self, st: CaptureStatus, out: Text) -> Text:
        """The status line of a narrow terminal: the counts first, where they are never cut."""
        if st.live:
            out.append("LIVE", "bold green" if not st.done else "bold")
        else:
            out.append("REPLAY", "bold cyan")
        if self._quitting:
            out.append(" stopping…", "yellow")
        elif st.done and st.totals is not None and not st.live:
            t = st.totals
            out.append(" done ", "bold")
            out.append(f"{t['segments']:,} seg, {_n(t['flows'], 'flow')} ({t['imap_flows']:,} IMAP)")
        else:
            if not st.live and st.size:
                out.append(f" {min(100, 100 * (st.bytes_read or 0) // st.size)}%")
            elif not st.live and st.bytes_read is not None:
                out.append(f" {display.size(st.bytes_read)}")
            out.append(f" {display.count(st.segments_per_s)} seg/s · {st.segments:,} seg")
            out.append(f" · {_n(st.flows_total, 'flow')}, {st.flows_open:,} open")
        c = st.counters
        if c is not None:
            lost = c.get("lost", 0)
            out.append(" · ")
            out.append(f"lost {display.count(lost)}", "bold white on red" if lost else "green")
        if self.flow_filter:
            out.append(f" · {len(self._visible):,} shown", "bold")
        if self.capture_error:
            out.append(" · ")
            out.append_text(safe(self.capture_error, "bold red"))
        out.append(" · ")
        out.append_text(safe(st.source, "dim"))
        return out

    @staticmethod
    def _column_label(key: str) -> str:
        for column in FLOW_COLUMNS:
            if column.key == key:
                return column.label or "open/ended"
        return key

    # --- actions ---------------------------------------------------------------------------------

    def action_filter(self) -> None:
        box = self._filter_box
        box.add_class("-shown")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.flow_filter = parse(event.value)
        self._refilter()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.remove_class("-shown")
        self.flows_table.focus()

    def _clear_filter(self) -> None:
        box = self._filter_box
        box.value = ""  # Input.Changed refilters
        box.remove_class("-shown")
        self.flow_filter = Query("")
        self._refilter()
        self.flows_table.focus()

    async def action_back(self) -> None:  # async as the App action it replaces (pop a screen)
        focused = self.focused
        if focused is not None and focused.id == "filter":
            self._clear_filter()
        elif self.detail_id is not None:
            self._close_details()
        elif self.flow_filter:
            self._clear_filter()

    def action_sort_next(self) -> None:
        keys = [c.key for c in FLOW_COLUMNS]
        if self.sort_column is None:
            self._sort(keys[1], False)  # the first column is the open/ended mark
        else:
            i = keys.index(self.sort_column) + 1
            self._sort(keys[i] if i < len(keys) else None, False)

    def action_sort_reverse(self) -> None:
        self._sort(self.sort_column or FLOW_COLUMNS[1].key, not self.sort_reverse)

    @on(HeaderClicked, "#flows")
    def _header_clicked(self, message: HeaderClicked) -> None:
        if message.column == self.sort_column:
            self._sort(message.column, not self.sort_reverse)
        else:
            self._sort(message.column, False)

    def _sort(self, column: str | None, reverse: bool) -> None:
        self.sort_column = column
        self.sort_reverse = reverse
        self.flows_table.set_sort(column, reverse)
        self._reorder()
        self._show_status()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.screen.set_class(self.paused, "-paused")
        if not self.paused:
            held, self._held = self._held, []
            for update in held:
                self._apply(update)
            self.feed.ready.set()
            if self._last_held:
                self._last_held = False
                self.capture_complete = True
            if self.status is not None:
                self.now = self.status.now
            self.flows_table.refresh()
        else:
            self.feed.ready.clear()
        self._show_status()

    def action_summary(self) -> None:
        if not isinstance(self.screen, SummaryScreen):
            self.push_screen(SummaryScreen())

    def on_resize(self, event: Resize) -> None:
        self._show_status()  # the narrow form puts the counts first

    @property
    def narrow(self) -> bool:
        """The terminal is narrower than NARROW_WIDTH."""
        return self.size.width < NARROW_WIDTH

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Stop the capture, wait for the worker to leave it, then exit."""
        self.feed.stop()
        if self._quitting or self._worker is None or self._worker.is_finished:
            self.exit(self.exit_status, return_code=self.exit_status)
            return
        self._quitting = True
        self._show_status()

    @property
    def exit_status(self) -> int:
        return 2 if self.capture_error else 0

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is self._worker and event.state in (WorkerState.SUCCESS, WorkerState.ERROR,
                                                             WorkerState.CANCELLED):
            if self._quitting:
                self.exit(self.exit_status, return_code=self.exit_status)
