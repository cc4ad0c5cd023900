"""No password or SASL credential in any output: JSON, stderr, -w files, everything the TUI draws.

Every capture of pcaps/ (each with the secrets its session used, from facts.json) and every
public one with a login in it goes through the command line (JSON, flows only, stderr, the
file -w writes; with the kernel's cut and whole) and through the TUI: the flow table, the details and the timeline
of every flow as drawn, the status line, and the cells of every message, scrolled into view
or not.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from harness import SIZE, frozen, settle
from imaptap.output.jsonl import message_record
from imaptap.tui import display
from imaptap.tui.app import ImaptapApp
from imaptap.tui.feed import Feed, ReplaySource
from testenv import OWN_PCAPS, captures_with_secrets

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
CAPTURES, IDS = captures_with_secrets()
#: Captures of another protocol on a watched port: their secrets were sent, but to no IMAP server.
NO_IMAP = {name for name, spec in FACTS.items() if not any(f.get("imap", True) for f in spec["flows"])}
SNAPLENS = ("256", "65535")


def assert_clean(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} in {where}"


@pytest.mark.parametrize(("path", "ports", "secrets"), CAPTURES, ids=IDS)
def test_command_line_outputs_hold_no_secret(imaptap, path, ports, secrets, tmp_path):
    port_args = [a for p in ports for a in ("--port", str(p))]
    for snap in SNAPLENS:
        for extra in ((), ("--flows-only",)):
            r = imaptap("-r", path, "--json", "-", "-s", snap, *port_args, *extra)
            assert r.returncode == 0, r.stderr
            assert r.flows, "the capture gave no flow: nothing was checked"
            assert_clean(r.stdout, secrets, f"JSON -s {snap} {' '.join(extra)}")
            assert_clean(r.stderr, secrets, "stderr")
        # the sanitised copy -w writes: its bytes, and what it replays to
        written = tmp_path / f"w-{snap}.pcap"
        r = imaptap("-r", path, "--json", "-", "--flows-only", "-s", snap, "-w", str(written), *port_args)
        assert r.returncode == 0, r.stderr
        raw = written.read_bytes()
        assert raw and r.stats["written"] > 0
        for secret in secrets:
            assert secret.encode() not in raw, f"{secret!r} in the -w file at -s {snap}"


async def tui_text(path: str, ports: list[int], snaplen: int) -> str:
    """Everything the TUI shows of a capture: each flow's row, details and timeline as drawn."""
    app = ImaptapApp(Feed(ReplaySource(path, ports, snaplen), clock=frozen, wallclock=frozen))
    seen = []
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.flows_table
        rows = len(table.rows)
        assert rows, "no flow shown: nothing was checked"
        seen.append(app.query_one("#status").content.plain)
        seen += [table.render_line(y).text for y in range(table.scrollable_content_region.height)]
        await pilot.press("enter")
        for i in range(rows):
            await pilot.pause()
            details = app.query_one("#details")
            seen.append(str(details.border_title))
            seen.append(_plain(app.query_one("#facts-body").content))
            timeline = app.timeline
            seen += [timeline.render_line(y).text for y in range(timeline.scrollable_content_region.height)]
            entry = app.store.flows[app.detail_id]
            for msg in entry.messages:  # rows not scrolled into view too
                rec = message_record(entry.snap.ref, msg)
                seen += [cell.plain for cell in display.message_cells(rec, entry.snap.facts.first_ts)]
            if i + 1 < rows:
                await pilot.press("down")
        await pilot.press("q")
    return "\n".join(seen)


def _plain(renderable) -> str:
    from rich.console import Console

    with open(os.devnull, "w") as null:
        console = Console(width=200, record=True, file=null)
        console.print(renderable)
        return console.export_text()


@pytest.mark.parametrize("snaplen", [256, 65535])
@pytest.mark.parametrize(("path", "ports", "secrets"), CAPTURES, ids=IDS)
def test_the_tui_shows_no_secret(path, ports, secrets, snaplen):
    text = asyncio.run(tui_text(path, ports, snaplen))
    if os.path.basename(path) not in NO_IMAP:
        assert "LOGIN" in text or "AUTHENTICATE" in text or "STARTTLS" in text  # the logins were drawn
    else:
        assert "NOT IMAP" in text  # drawn as what they are, with nothing of what was sent
    assert_clean(text, secrets, "the TUI")
