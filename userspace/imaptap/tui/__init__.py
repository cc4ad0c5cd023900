"""imaptap's terminal UI (Textual).  The only package that imports Textual, and only when used.

`run` is what the command line calls on a terminal; `available` says whether Textual is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys


def available() -> bool:
    """Textual is importable (the ``tui`` extra is installed)."""
    return importlib.util.find_spec("textual") is not None


def run(args: argparse.Namespace, ports: frozenset[int]) -> int:
    """Run the TUI on the capture the arguments name; the exit status as the JSON output's."""
    from imaptap.tui.feed import Feed, LiveSource, ReplaySource

    if args.read:
        from imaptap.capture.replay import CaptureFileError

        try:
            source = ReplaySource(args.read, ports, args.snaplen, args.tail)
        except CaptureFileError as exc:
            print(f"imaptap: {exc}", file=sys.stderr)
            return 2
    else:
        try:
            from imaptap.capture import live
        except ImportError as exc:  # pragma: no cover - depends on the machine
            print(f"imaptap: live capture unavailable: {exc}", file=sys.stderr)
            return 2
        from imaptap.cli import open_live

        try:
            capture, writer = open_live(args, ports)
        except live.LiveError as exc:
            print(f"imaptap: {exc}", file=sys.stderr)
            return 2
        source = LiveSource(capture, writer)

    from imaptap.tui.app import ImaptapApp

    feed = Feed(source, max_flows=args.max_flows, idle_timeout=args.idle_timeout)
    app = ImaptapApp(feed, handle_signals=True)
    try:
        status = app.run()
    finally:
        # However the app ended, the worker must end too: Python waits for it at exit, and a
        # live capture's programs are detached only when it leaves its with block.
        feed.stop()
    if app.capture_error:
        print(f"imaptap: {app.capture_error}", file=sys.stderr)
    return status if status is not None else app.exit_status
