"""The summary view (r): the report's rows while the capture runs, the pictures, and the layout of
a narrow terminal (facts above the timeline, the counts kept in the status line)."""

from __future__ import annotations

import asyncio

from harness import (
    FINGERPRINT,
    LAB_RUN,
    SIZE,
    StepSource,
    all_captures,
    all_ports,
    lab_run_app,
    login,
    mixed_flows,
    replay_app,
    settle,
    step_app,
    wait_for,
)
from imaptap.output.report import ReportSink, client_table, server_table
from imaptap.report import ReportBuilder
from imaptap.testing import analyze
from imaptap.tui.app import NARROW_WIDTH, HelpScreen, SummaryScreen


def body_text(app) -> str:
    body = app.screen.query_one("#summary-body")
    return "\n".join(s.text for s in body.render_lines(body.region.reset_offset))


def test_r_opens_the_summary_and_esc_closes_it():
    async def go():
        app = replay_app("failed-login.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await pilot.press("r")
            await pilot.pause()
            assert isinstance(app.screen, SummaryScreen) and app.feed.summary_wanted.is_set()
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, SummaryScreen) and not app.feed.summary_wanted.is_set()
            await pilot.press("question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            keys = app.screen.query_one("#help-keys").content.plain
            assert "summary: findings, servers, clients" in keys

    asyncio.run(go())


def test_the_summary_shows_the_reports_rows_and_attacks():
    async def go():
        app = lab_run_app()
        async with app.run_test(size=(240, 60)) as pilot:
            await settle(pilot)
            await pilot.press("r")
            await pilot.pause(0.3)
            text = body_text(app)
            report = app.summary.report
            # the same rows as --report writes, cell for cell
            for _head, rows in (server_table(report), client_table(report)):
                for row in rows:
                    line = next(line for line in text.splitlines() if line.strip().startswith(row[0] + " "))
                    assert [cell for cell in row if cell not in line] == []
            assert "brute_force, password_spraying" in text and "logged in after failing" in text
            assert "login_despite_logindisabled" in text and "commands_after_starttls" in text
            for secret in ("Guess-Pw-01", "Spring-2026!", "Leak-Pw-a1x", "Injected-Pw-6502"):
                assert secret not in text
            assert "commands per second" in text and "peak " in text
            assert "LOGIN" in text.split("latency per command")[1] and "≤500ms" in text  # Dovecot's failure delay

    asyncio.run(go())


def test_the_summary_follows_a_running_capture():
    async def go():
        source = StepSource()
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("r")
            source.queue.put(login("alice", 1))
            await wait_for(pilot, lambda: app.summary is not None and app.summary.report.flows == 1, timeout=10)
            assert "alice" in body_text(app)
            source.queue.put(login("bob", 2, ok=False, close=False))
            await wait_for(pilot, lambda: app.summary.open_flows == 1 and "bob" in body_text(app), timeout=10)
            assert app.summary.report.flows == 2  # the open flow is counted in

    asyncio.run(go())


def test_the_worker_makes_no_summary_nobody_looks_at():
    async def go():
        source = StepSource()
        app = step_app(source)
        async with app.run_test(size=SIZE) as pilot:
            source.queue.put(mixed_flows())
            await wait_for(pilot, lambda: len(app.store.flows) == 5)
            await pilot.pause(1.5)
            assert app.summary is None

    asyncio.run(go())


def test_a_narrow_terminal_stacks_the_facts_and_keeps_the_counts():
    async def go():
        app = replay_app("failed-login.pcap")
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot)
            assert app.screen.has_class("-narrow") and 80 < NARROW_WIDTH
            status = app.query_one("#status").content.plain
            assert status.startswith("REPLAY done") and "2 flows (2 IMAP)" in status
            await pilot.press("enter")
            await pilot.pause()
            facts, timeline = app.query_one("#facts"), app.timeline
            assert facts.region.width > 70 and timeline.region.y > facts.region.y  # above, the whole width
            body = app.query_one("#facts-body")
            lines = [s.text for s in body.render_lines(body.region.reset_offset)]
            client = app.store.flows[app.detail_id].snap.facts.client
            assert any(client in line for line in lines)  # whole, not cut over lines
            assert any("UTC" in line and line.count(":") >= 2 for line in lines)
        app = replay_app("failed-login.pcap")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            assert not app.screen.has_class("-narrow")

    asyncio.run(go())


def test_the_tuis_summary_and_the_report_agree():
    """The summary counts what --report counts: the report sink over the same segments and key."""
    async def go():
        app = lab_run_app()
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            return app.summary

    final = asyncio.run(go())
    assert final is not None and final.open_flows == 0
    sink = ReportSink(ReportBuilder("pcaps/ of one lab run"))
    analyze(all_captures(LAB_RUN), ports=all_ports(), snaplen=None, password_fingerprint=FINGERPRINT, sinks=[sink])
    assert sink.report == final.report
    assert {k for row in final.report.attacks for k in row.kinds} == {"brute_force", "password_spraying"}
