"""10,000 flows on screen: keys still answer at once (scripts/bench-tui measures more).

The flows are copies of two analyzed sessions (one login that worked, one that failed) with
their own ids, addresses and users, handed to the app as one batch from the worker: the
analyzer's own speed is measured elsewhere (scripts/bench-replay), this is about the UI.
"""

from __future__ import annotations

import time
from dataclasses import replace

from harness import SIZE, StepSource, login, run, step_app, wait_for
from imaptap.tui.feed import CaptureStatus, Feed, FeedUpdate, FlowRef, MemorySource
from imaptap.tui.messages import CaptureUpdated

FLOWS = 10_000
#: Seconds a key may take with 10,000 flows (Pilot itself waits ~0.1 s for the app to idle).
KEY_BUDGET = 1.0


def two_sessions():
    out = {}

    def emit(update: FeedUpdate) -> None:
        out.update((s.id, s) for s in update.flows)
        feed.ready.set()

    feed = Feed(MemorySource(login("ok", 1) + login("bad", 2, ok=False)), emit)
    feed.run()
    return out[1], out[2]


def many_flows(n: int) -> tuple:
    ok, bad = two_sessions()
    flows = []
    for i in range(n):
        base = bad if i % 7 == 0 else ok
        client = (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000 + i % 20000)
        facts = base.facts._replace(flow=i + 1, client=f"{client[0]}:{client[1]}", username=f"u{i}",
                                    first_ts=base.facts.first_ts + i)
        flows.append(replace(base, facts=facts, ref=FlowRef(i + 1, client, base.ref.server)))
    return tuple(flows)


def test_ten_thousand_flows_and_keys_still_answer():
    async def go():
        app = step_app(StepSource())
        async with app.run_test(size=SIZE) as pilot:
            flows = many_flows(FLOWS)
            status = CaptureStatus("synthetic", False, 0, 0.0, 0, FLOWS, flows[-1].facts.last_ts, 0.0)
            t0 = time.perf_counter()
            app.post_message(CaptureUpdated(FeedUpdate(status, flows, batch=True)))
            table = app.flows_table
            await wait_for(pilot, lambda: table.row_count == FLOWS)
            assert time.perf_counter() - t0 < 5 * KEY_BUDGET  # the batch of 10,000 new flows, once

            async def timed(*keys: str) -> float:
                t0 = time.perf_counter()
                await pilot.press(*keys)
                return time.perf_counter() - t0

            assert await timed("end") < KEY_BUDGET
            assert table.cursor_row == FLOWS - 1
            assert await timed("s") < KEY_BUDGET  # sort 10,000 rows by client
            assert await timed("S") < KEY_BUDGET
            assert table.cursor_key == FLOWS and table.cursor_row == 0  # the cursor stayed on its flow
            assert await timed("p") < KEY_BUDGET and app.paused
            assert await timed("p") < KEY_BUDGET and not app.paused

            for text, rows in (("user:u9999", 1), ("failed", len(range(0, FLOWS, 7))), ("", FLOWS)):
                t0 = time.perf_counter()
                app.query_one("#filter").value = text
                await pilot.pause()
                assert time.perf_counter() - t0 < KEY_BUDGET
                assert table.row_count == rows
            assert await timed("enter") < KEY_BUDGET and app.detail_id is not None
            assert await timed("j") < KEY_BUDGET

    run(go())


def syn_scan(n: int, t0: float) -> list:
    """``n`` SYNs to port 143, each from its own address and port: n flows that never talk."""
    from imaptap.segment import Segment, TcpFlag

    return [Segment(t0 + i * 1e-5, 4, f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", "10.1.0.1",
                    1024 + i % 60000, 143, i * 7919 & 0xFFFFFFFF, 0, int(TcpFlag.SYN), 0, b"")
            for i in range(n)]


def test_a_syn_flood_through_the_real_pipeline_leaves_the_ui_usable():
    """100,000 SYNs (issue 5's flood), then one real login: the analyzer's table evicts past
    --max-flows, the UI keeps a bounded number of rows, and the login is one filter away."""
    from imaptap.tui.feed import MAX_ENDED_FLOWS

    n, max_flows = 100_000, 32_768
    segs = syn_scan(n, 1_700_000_000.0) + login("alice", 1, close=False, ts=1_700_000_010.0)

    async def go():
        source = MemorySource(segs, open_at_end=True)
        feed = Feed(source, max_flows=max_flows, clock=lambda: 0.0, wallclock=lambda: 0.0)
        from imaptap.tui.app import ImaptapApp

        app = ImaptapApp(feed)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.capture_complete, timeout=120)
            await pilot.pause()
            table = app.flows_table
            # open flows are bounded by --max-flows, the evicted ones the UI keeps by MAX_ENDED_FLOWS
            assert table.row_count == max_flows + MAX_ENDED_FLOWS
            # every flow the UI let go is counted where the user sees it
            let_go = feed.table.stats.flows - table.row_count
            assert app.store.evicted + feed.ended_dropped == let_go > 50_000
            assert f"{let_go:,} old ended flows no longer kept" in app.query_one("#status").content.plain
            app.query_one("#filter").value = "user:alice"
            await pilot.pause()
            assert table.row_count == 1
            await pilot.press("enter")
            assert app.detail_id is not None and app.store.flows[app.detail_id].snap.facts.username == "alice"
            await pilot.press("escape", "escape")
            app.query_one("#filter").value = ""
            await pilot.pause()
            for keys in (("end",), ("s",), ("S",), ("home",)):
                t0 = time.perf_counter()
                await pilot.press(*keys)
                assert time.perf_counter() - t0 < KEY_BUDGET, keys
            await pilot.press("q")

    run(go())
