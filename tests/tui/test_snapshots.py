"""What the screen looks like, compared with SVG snapshots (pytest-textual-snapshot).

Update after a deliberate change with ``pytest tests/tui --snapshot-update`` and look at the
SVGs in __snapshots__/ before committing them.  Every app here replays captures with a frozen
clock, so nothing on screen depends on when or how fast the test ran.
"""

from __future__ import annotations

from harness import SIZE, all_captures, all_ports, lab_run_app, replay_app, segments_app, settle


def all_captures_app():
    return segments_app(all_captures(), ports=all_ports(), label="pcaps/*.pcap")


async def settled(pilot):
    await settle(pilot)


async def failed_login_details(pilot):
    await settle(pilot)
    app = pilot.app
    fid = next(fid for fid in app.flows_table.rows if app.store.flows[fid].snap.facts.login_failures > 1)
    app.flows_table.move_to(fid)
    await pilot.press("enter")


def test_main_screen_all_captures(snap_compare):
    assert snap_compare(all_captures_app(), terminal_size=SIZE, run_before=settled)


def test_details_of_a_session_with_failed_logins(snap_compare):
    assert snap_compare(all_captures_app(), terminal_size=SIZE, run_before=failed_login_details)


def test_main_screen_hostile_strings(snap_compare):
    assert snap_compare(replay_app("hostile-strings.pcap"), terminal_size=SIZE, run_before=settled)


def test_details_hostile_strings_escape_sequence_user(snap_compare):
    async def second_flow(pilot):
        await settle(pilot)
        await pilot.press("down", "enter")

    assert snap_compare(replay_app("hostile-strings.pcap"), terminal_size=SIZE, run_before=second_flow)


def test_details_hostile_strings_osc_title_user(snap_compare):
    async def third_flow(pilot):
        await settle(pilot)
        await pilot.press("down", "down", "enter")

    assert snap_compare(replay_app("hostile-strings.pcap"), terminal_size=SIZE, run_before=third_flow)


def test_filter_and_sort(snap_compare):
    async def filtered(pilot):
        await settle(pilot)
        app = pilot.app
        await pilot.press("/")
        app.query_one("#filter").value = "cleartext -user:alice"
        await pilot.press("enter", "s", "s", "s")  # sorted by user

    assert snap_compare(all_captures_app(), terminal_size=SIZE, run_before=filtered)


def test_help_screen(snap_compare):
    async def helped(pilot):
        await settle(pilot)
        await pilot.press("question_mark")

    assert snap_compare(replay_app("login-atom.pcap"), terminal_size=SIZE, run_before=helped)


def test_narrow_terminal_drops_columns(snap_compare):
    assert snap_compare(all_captures_app(), terminal_size=(90, 24), run_before=settled)


async def summary(pilot):
    await settle(pilot)
    await pilot.press("r")
    await pilot.pause(0.3)


def test_summary_of_one_lab_run(snap_compare):
    assert snap_compare(lab_run_app(), terminal_size=SIZE, run_before=summary)


def test_summary_on_80x24_scrolls_sideways(snap_compare):
    assert snap_compare(lab_run_app(), terminal_size=(80, 24), run_before=summary)


def test_details_on_80x24_stack_the_facts_above_the_timeline(snap_compare):
    assert snap_compare(all_captures_app(), terminal_size=(80, 24), run_before=failed_login_details)


def test_main_screen_on_80x24_keeps_the_counts(snap_compare):
    assert snap_compare(all_captures_app(), terminal_size=(80, 24), run_before=settled)
