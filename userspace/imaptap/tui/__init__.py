"""imaptap's terminal UI (Textual).  The only package that imports Textual, and only when used.

`run` is what the command line calls on a terminal; `available` says whether Textual is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imaptap.capture.pcapwrite import MaskingWriter
    from imaptap.output.metrics import MetricsSink
    from imaptap.output.report import ReportSink
    from imaptap.pipeline import Sink, Source
    from imaptap.tui.workerfeed import WorkersFeed


def available() -> bool:
    """Textual is importable (the ``tui`` extra is installed)."""
    return importlib.util.find_spec("textual") is not None


def keys_from_the_terminal() -> int:
    """For ``-r -``: move the capture on standard input to a descriptor of its own (returned)
    and put the terminal on standard input, where Textual reads the keys (as ``less`` does)."""
    tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    try:
        capture = os.dup(0)
        os.dup2(tty, 0)
    finally:
        os.close(tty)
    return capture


def run(args: argparse.Namespace, ports: frozenset[int], metrics: MetricsSink | None = None,
        password_fingerprint: Callable[[bytes], str] | None = None) -> int:
    """Run the TUI on the capture the arguments name (``metrics`` takes its events too, or the
    workers' snapshots); the exit status as the JSON output's (with ``--fail-on``, 3 when a
    finding it names occurred, the flows named on stderr)."""
    from imaptap.pipeline import SourceError, build_source

    read_fd = None
    if args.read == "-":
        try:
            read_fd = keys_from_the_terminal()
        except OSError as exc:
            print(f"imaptap: -r - with the TUI needs a terminal for the keys ({exc.strerror or exc});"
                  " use --json or --report", file=sys.stderr)
            return 2
    workers = 1 if args.read else args.workers
    try:
        source, pcap_writer = build_source(read=args.read, interfaces=args.interface, ports=ports,
                                           snaplen=args.snaplen, taillen=args.tail, xdp_mode=args.xdp_mode,
                                           use_xdp=not args.no_xdp, user=args.user, write=args.write,
                                           append=args.append, handshake_snaplen=args.handshake_snaplen,
                                           read_fd=read_fd, workers=workers)
        if args.read:
            source.open()  # a bad file fails before the UI starts; a live capture attaches in the worker
    except SourceError as exc:
        print(f"imaptap: {exc}", file=sys.stderr)
        return 2

    from imaptap.cli import REOPEN_SIGNAL
    from imaptap.output.rotation import ReopenSink
    from imaptap.tui.app import ImaptapApp
    from imaptap.tui.feed import Feed

    # SIGUSR1 reopens the -w file here too (logrotate), in the worker between records.  The
    # handler stays until exit: SIGUSR1's default action, even while the worker still detaches
    # after the app ended, would kill the process and leave the programs attached.

    requests: list[int] = []
    warnings: list[str] = []
    report_sink = None
    extra: list[Sink] = [] if metrics is None else [metrics]
    if getattr(args, "fail_on", None):
        from imaptap.output.report import ReportSink
        from imaptap.report import ReportBuilder

        report_sink = ReportSink(ReportBuilder())
        extra.append(report_sink)
    reopen = ReopenSink(requests.__len__, [], warnings.append)
    feed: Feed | WorkersFeed
    workers_feed = None
    if workers > 1:
        feed = workers_feed = _workers_feed(args, ports, source, pcap_writer, reopen, metrics, report_sink,
                                            password_fingerprint)
    else:
        feed = Feed(source, pcap_writer=pcap_writer, max_flows=args.max_flows, idle_timeout=args.idle_timeout,
                    sinks=[*extra, reopen], password_fingerprint=password_fingerprint)
    signal.signal(REOPEN_SIGNAL, lambda signum, frame: requests.append(signum))
    app = ImaptapApp(feed, handle_signals=True)
    try:
        status = app.run()
    finally:
        # However the app ended, the worker must end too: Python waits for it at exit, and a
        # live capture's programs are detached only when the pipeline closes its source.
        feed.stop()
    for line in warnings:
        print(f"imaptap: {line}", file=sys.stderr)
    if app.capture_error:
        print(f"imaptap: {app.capture_error}", file=sys.stderr)
    status = status if status is not None else app.exit_status
    if workers_feed is not None and workers_feed.failure is not None:
        return 1  # a worker died: the command line's status for it (LiveWorkerFailed)
    if status == 0 and report_sink is not None and report_sink.report is not None:
        from imaptap.cli import gate

        return gate(report_sink.report, args.fail_on)
    return status


def _workers_feed(args: argparse.Namespace, ports: frozenset[int], source: Source, pcap_writer: MaskingWriter | None,
                  reopen: Sink, metrics: MetricsSink | None, report_sink: ReportSink | None,
                  password_fingerprint: Callable[[bytes], str] | None) -> WorkersFeed:
    """``-i IFACE --workers N`` on a terminal: the app's feed merges what N workers analyse."""
    import time

    from imaptap.capture.live.workers import LiveWorkerSpec
    from imaptap.pipeline import LiveSource
    from imaptap.tui.workerfeed import workers_feed

    assert isinstance(source, LiveSource)
    spec = LiveWorkerSpec(json=False, messages=True,
                          pipeline={"max_flows": args.max_flows, "idle_timeout": args.idle_timeout,
                                    "flow_interval": None, "password_fingerprint": password_fingerprint},
                          metrics_server_label=None if metrics is None else metrics.server_label, report=True,
                          pcap_ports=ports if pcap_writer is not None else None, tui=time.time())
    return workers_feed(source, spec, reopen=reopen, metrics=metrics, report=report_sink, pcap_writer=pcap_writer)
