"""Regenerate docs/screenshot.svg and docs/screenshot.png: the TUI over every capture in pcaps/.

    scripts/tui-screenshot [OUT.svg]

The app runs headless (Textual's test driver) at 160x40, replaying all of
pcaps/ as one time line, the details of the flow with failed logins open.  The PNG needs
rsvg-convert (Debian: librsvg2-bin) and the Fira Code font Textual's SVG names (fonts-firacode).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.pipeline import MemorySource
from imaptap.segment import PayloadPolicy
from imaptap.tui.app import ImaptapApp
from imaptap.tui.feed import Feed

from imaptap_lab.checkout import PCAP_DIR, ROOT

SIZE = (160, 40)


def all_captures() -> tuple[list, set[int]]:
    """Every segment of pcaps/ in time order, and every server port."""
    pcaps = str(PCAP_DIR)
    with open(os.path.join(pcaps, "facts.json")) as f:
        facts = json.load(f)
    segments, ports = [], set()
    for name in sorted(facts):
        ports.update(facts[name]["ports"])
        reader = open_capture(os.path.join(pcaps, name))
        try:  # whole payloads here; the app's source cuts them as a replay would
            segments.extend(reader.segments(set(facts[name]["ports"]), PayloadPolicy(1 << 30), ReplayStats()))
        finally:
            reader.close()
    segments.sort(key=lambda s: s.ts)
    return segments, ports


async def shoot(svg_path: str) -> None:
    """Run the app headless, open the flow with failed logins, save the SVG."""
    segments, ports = all_captures()
    app = ImaptapApp(Feed(MemorySource(segments, ports, label="pcaps/*.pcap")))
    async with app.run_test(size=SIZE) as pilot:
        while not app.capture_complete:
            await pilot.pause(0.05)
        rows = app.flows_table.rows
        target = next(i for i, fid in enumerate(rows) if app.store.flows[fid].snap.facts.login_failures > 1)
        await pilot.press(*["down"] * target, "enter")
        await pilot.pause()
        app.save_screenshot(os.path.basename(svg_path), os.path.dirname(os.path.abspath(svg_path)))


_TEXT = re.compile(r'(<text\b[^>]*?\bx=")([\d.]+)("[^>]*?\btextLength=")([\d.]+)("[^>]*>)([^<]*)(</text>)')


def for_rsvg(svg: str) -> str:
    """rsvg-convert ignores textLength and drops leading spaces: a run of text drifts against
    the cell grid (its font's advance is not quite a cell) and one that starts with a space
    shifts by a cell.  So draw every character on its own, at its cell."""

    def fix(m: re.Match) -> str:
        text = html.unescape(m.group(6)).replace("\xa0", " ")
        if not text:
            return ""
        x0, step = float(m.group(2)), float(m.group(4)) / len(text)
        return "".join(f"{m.group(1)}{x0 + i * step:.1f}{m.group(3)}{step:.1f}{m.group(5)}"
                       f"{html.escape(ch, quote=False)}{m.group(7)}"
                       for i, ch in enumerate(text) if ch != " ")

    return _TEXT.sub(fix, svg)


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/tui-screenshot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("svg", nargs="?", default=os.path.join(ROOT, "docs", "screenshot.svg"), metavar="OUT.svg",
                   help="where to write the SVG; the PNG goes beside it (default docs/screenshot.svg)")
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/tui-screenshot: write the SVG, and the PNG where rsvg-convert is installed."""
    svg_path = build_parser().parse_args(argv).svg
    os.makedirs(os.path.dirname(os.path.abspath(svg_path)), exist_ok=True)
    asyncio.run(shoot(svg_path))
    print(svg_path)
    if shutil.which("rsvg-convert") is None:
        print("no rsvg-convert (apt install librsvg2-bin fonts-firacode): PNG not made", file=sys.stderr)
        return 0
    png_path = svg_path[:-4] + ".png" if svg_path.endswith(".svg") else svg_path + ".png"
    with tempfile.NamedTemporaryFile("w", suffix=".svg", delete=False) as tmp:
        tmp.write(for_rsvg(open(svg_path, encoding="utf-8").read()))
    try:
        subprocess.run(["rsvg-convert", tmp.name, "-o", png_path], check=True)
    finally:
        os.unlink(tmp.name)
    print(png_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
