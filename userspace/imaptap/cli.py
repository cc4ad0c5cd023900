"""imaptap's command line: pick a capture source and an output, run the one pipeline.

Exit status: 0 on success and on a clean stop (SIGINT, SIGTERM, SIGHUP); 1 on an internal
error; 2 on bad arguments, an unreadable or corrupt capture file, an output that cannot be
written, or missing privileges or kernel support; 3 when a finding named by ``--fail-on``
occurred (2 wins over 3).  Errors are one line on stderr, never a traceback.  SIGUSR1 reopens
the output files (logrotate).  The TUI and bcc are imported only
when used, so replay to JSON starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
import time
from typing import IO, TYPE_CHECKING, NoReturn

from imaptap import __version__
from imaptap.findings import Finding, parse_finding_list
from imaptap.flows import IDLE_TIMEOUT, MAX_FLOWS, FlowStats
from imaptap.output import OutputError
from imaptap.pipeline import Pipeline, ReplaySource, Sink, Source, SourceError, build_source
from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_SNAPLEN, DEFAULT_TAILLEN, IMAP_PORT

if TYPE_CHECKING:
    from imaptap.capture.live.workers import LiveWorkers
    from imaptap.capture.pcapwrite import MaskingWriter
    from imaptap.imap.audit import PasswordFingerprint
    from imaptap.output.ecs import EcsSink
    from imaptap.output.jsonl import JsonlWriter
    from imaptap.output.metrics import MetricsSink
    from imaptap.report import Report
    from imaptap.workers import ReplayWorkers

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
#: ``--fail-on``: a finding it names occurred (the flows are named on stderr).
EXIT_FINDINGS = 3

#: The largest snap length accepted: a whole IP packet.
MAX_SNAPLEN = 65535
#: --json-format: imaptap's own records (README, "JSON Lines"), or the same as ECS documents.
JSON_FORMATS = ("imaptap", "ecs")
#: --format's choices (output.report.ReportFormat, not imported here: replay must start fast).
REPORT_FORMATS = ("text", "markdown", "json")

EXAMPLES = """\
examples:
  imaptap -i eth0                     watch IMAP on eth0 in the TUI
  imaptap -i eth0 --json - | jq .     JSON Lines to stdout
  imaptap -r capture.pcap --json out.jsonl
  imaptap -r capture.pcapng --port 143 --port 10143 --json -
  imaptap -r capture.pcap --json - --flows-only | jq 'select(.cleartext_credentials)'
  imaptap -i eth0 --json - --metrics 9464   also serve Prometheus metrics on 127.0.0.1:9464
  imaptap -r capture.pcap --report    audit report: servers, clients, findings, attacks
  imaptap -r capture.pcap --report --format markdown > ticket.md
  imaptap -r ci.pcap --fail-on cleartext_credentials,starttls_offered_not_used
  tcpdump -i eth0 -U -w - 'tcp port 143' | imaptap -r - --report
  imaptap -D                          list interfaces

exit status: 0 ok (also after SIGINT/SIGTERM/SIGHUP), 1 internal error,
             2 bad arguments, bad capture file, unwritable output, or missing privileges,
             3 a finding named by --fail-on occurred (its flows are named on stderr)
SIGUSR1 reopens the --json and -w files (after logrotate moved them away)
"""


#: -Z's default, as privileges.DEFAULT_USER (not imported here: replay must start fast).
DEFAULT_USER = "nobody"


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    #: While arguments are being added: argparse then makes a formatter per argument only to
    #: check its metavar, and the terminal's width (looked up by importing shutil, 2% of a
    #: replay's start-up) matters only when help is printed.
    building = True
    # argparse's stubs allow any callable taking prog; this parser is given a HelpFormatter
    # class, whose width _get_formatter sets.
    formatter_class: type[argparse.HelpFormatter]

    def error(self, message: str) -> NoReturn:  # one line, not usage + line
        raise UsageError(f"{message} (see imaptap --help)")

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self.building:
            return self.formatter_class(prog=self.prog, width=80)
        return super()._get_formatter()


def _int_in(what: str, low: int, high: int):
    """An argparse type: a whole number from ``low`` to ``high``, else a one-line error."""

    def parse(value: str) -> int:
        try:
            n = int(value, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {what}: {value!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{what} out of range {low}-{high}: {n}")
        return n

    return parse


_port = _int_in("port", 1, 65535)
_snaplen = _int_in("snap length", 1, MAX_SNAPLEN)
_taillen = _int_in("tail length", 0, MAX_SNAPLEN)
_handshake_snaplen = _int_in("handshake snap length", 0, MAX_SNAPLEN)
#: As flowshare.MAX_WORKERS (not imported here: replay must start fast).
MAX_WORKERS = 64
#: As capture.live.abi.LIVE_MAX_WORKERS: one ring buffer each in the kernel program.
LIVE_MAX_WORKERS = 8
_workers = _int_in("worker count", 1, MAX_WORKERS)


def _positive(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return x


def _listen_address(value: str) -> tuple[str, int]:
    # parse_address lives with the metrics sink, which imports prometheus_client only when made
    from imaptap.output.metrics import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _findings(value: str) -> frozenset[Finding]:
    try:
        return parse_finding_list(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="imaptap",
        description="Watch plaintext IMAP with almost no overhead: an eBPF program copies only "
        "the first bytes of IMAP segments; imaptap follows each connection's commands, users, "
        "STARTTLS and COMPRESS, and shows them in a TUI or writes JSON Lines.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("source (one of)")
    src.add_argument("-i", "--interface", action="append", metavar="IFACE",
                     help="capture live on IFACE (repeatable; default: the default route's interface)")
    src.add_argument("-r", "--read", metavar="FILE", help="replay a pcap or pcapng file ('-' for standard input)")
    src.add_argument("-D", "--list-interfaces", action="store_true", help="list interfaces and exit")
    p.add_argument("--port", action="append", type=_port, metavar="N",
                   help=f"TCP port treated as IMAP (repeatable; default {IMAP_PORT})")
    p.add_argument("-s", "--snaplen", type=_snaplen, default=DEFAULT_SNAPLEN, metavar="BYTES",
                   help=f"payload bytes copied from the start of each segment (default {DEFAULT_SNAPLEN})")
    p.add_argument("--tail", type=_taillen, default=DEFAULT_TAILLEN, metavar="BYTES",
                   help=f"payload bytes also copied from the end of a longer segment, where the tagged "
                   f"completion is (default {DEFAULT_TAILLEN}; 0: none)")
    p.add_argument("--handshake-snaplen", type=_handshake_snaplen, default=DEFAULT_HANDSHAKE_SNAPLEN,
                   metavar="BYTES",
                   help=f"payload bytes copied from the start of each segment instead of -s while a flow's login"
                   f" and capabilities are still to come (default {DEFAULT_HANDSHAKE_SNAPLEN}; 0: -s from the"
                   f" start)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write JSON Lines to PATH ('-' for stdout); no TUI")
    out.add_argument("--flows-only", action="store_true", help="JSON: flow and stats records only, no message records")
    out.add_argument("--json-format", choices=JSON_FORMATS, default=JSON_FORMATS[0],
                     help="JSON: imaptap's own keys (default), or Elastic Common Schema documents (docs/ECS.md)")
    out.add_argument("-w", "--write", metavar="FILE",
                     help="also write the IMAP segments to a pcap, passwords and SASL secrets blanked")
    out.add_argument("--report", action="store_true",
                     help="at the end, write the audit report to stdout (no JSON unless --json names a file)")
    out.add_argument("--format", choices=REPORT_FORMATS, metavar="FORMAT",
                     help="the report's format: text (default), markdown or json; implies --report")
    out.add_argument("--fail-on", type=_findings, metavar="FINDING[,...]",
                     help=f"exit with status {EXIT_FINDINGS} if any of these findings occurred ('any': all),"
                          " naming the flows on stderr")
    out.add_argument("--password-key", metavar="FILE",
                     help="the key of the password fingerprints (default: see README, made on first use)")
    out.add_argument("--metrics", type=_listen_address, metavar="[ADDR:]PORT",
                     help="serve Prometheus metrics on http://ADDR:PORT/metrics (default address 127.0.0.1;"
                          " port 0: any free one)")
    out.add_argument("--metrics-label", action="append", choices=("server",), default=[],
                     help="add a label to the metrics: server (the server's address, a few at most)")
    out.add_argument("--append", action="store_true",
                     help="append to the --json and -w files instead of replacing them (a service that restarts)")
    tune = p.add_argument_group("limits")
    tune.add_argument("--max-flows", type=int, default=MAX_FLOWS, metavar="N",
                      help=f"flows tracked at once; the oldest idle one is evicted (default {MAX_FLOWS})")
    tune.add_argument("--idle-timeout", type=_positive, default=IDLE_TIMEOUT, metavar="SECONDS",
                      help=f"end a flow after this long without traffic (default {IDLE_TIMEOUT:.0f})")
    tune.add_argument("--workers", type=_workers, default=1, metavar="N",
                      help="analyse the flows in N processes, by a hash of their addresses and ports; the"
                           " same output as one (default 1; with -r FILE, and --json or --report; with -i, up to"
                           f" {LIVE_MAX_WORKERS})")
    out.add_argument("--flow-interval", type=_positive, metavar="SECONDS",
                     help="JSON: also a flow_update record of every open flow every SECONDS (capture time"
                          " in a replay, the wall clock live)")
    live = p.add_argument_group("live capture")
    live.add_argument("--xdp-mode", choices=("native", "skb"),
                      help="XDP attach mode (default: native where the driver has it, else skb)")
    live.add_argument("--no-xdp", action="store_true", help="use TC for ingress too")
    live.add_argument("-Z", "--user", default=DEFAULT_USER, metavar="USER",
                      help="once attached, run as USER with only the capabilities still needed"
                           f" (default {DEFAULT_USER}; 'root' keeps every privilege)")
    p.add_argument("-V", "--version", action="version", version=f"imaptap {__version__}")
    p.building = False
    return p


#: The signals received, in order.  The handler only records them and the pipeline looks at
#: them between segments: an exception raised wherever the signal lands could leave a flow
#: counted but never reported (between its creation and its entry in the table).
_stop: list[int] = []
#: What asks for the output files to be opened anew: nginx's signal for it (SIGHUP stops).
REOPEN_SIGNAL = signal.SIGUSR1
#: The reopen requests received; `ReopenSink` acts on them between records, as on _stop.
_reopen: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    _stop.append(signum)


def _on_reopen(signum: int, frame: object) -> None:
    _reopen.append(signum)


def _open_output(path: str, append: bool = False) -> tuple[IO[str], bool]:
    if path == "-":
        return sys.stdout, False
    try:
        if append:
            from imaptap.output.rotation import open_for_append

            return open_for_append(path), True
        return open(path, "w", encoding="utf-8", buffering=1 << 16), True
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _warn(line: str) -> None:
    print(f"imaptap: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return _main(args)
    except UsageError as exc:
        print(f"imaptap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as exc:
        print(f"imaptap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as tcpdump does.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        from imaptap.workers import WorkerFailed

        if not isinstance(exc, WorkerFailed):
            raise
        print(f"imaptap: {exc}", file=sys.stderr)
        return EXIT_INTERNAL


def open_source(args: argparse.Namespace, ports: frozenset[int]) -> tuple[Source, MaskingWriter | None]:
    """`pipeline.build_source` for the arguments; UsageError (one line) where it fails."""
    try:
        return build_source(read=args.read, interfaces=args.interface, ports=ports, snaplen=args.snaplen,
                            taillen=args.tail, xdp_mode=args.xdp_mode, use_xdp=not args.no_xdp, user=args.user,
                            write=args.write, append=args.append, handshake_snaplen=args.handshake_snaplen,
                            workers=args.workers)  # a replay's workers read the file each: it ignores them
    except SourceError as exc:
        raise UsageError(str(exc)) from None


def _main(args: argparse.Namespace) -> int:
    if args.list_interfaces:
        from imaptap.capture import live

        for index, name, desc in live.list_interfaces():
            print(f"{index}.{name}" + (f" ({desc})" if desc else ""))
        return EXIT_OK
    if args.read and args.interface:
        raise UsageError("give either -r FILE or -i IFACE, not both")
    if args.max_flows < 1:
        raise UsageError(f"--max-flows must be at least 1: {args.max_flows}")
    if args.format is not None:
        args.report = True
    if args.report and args.json == "-":
        raise UsageError("--report and --json - both write to standard output: give --json a file")
    if args.read == "-" and args.write == "-":
        raise UsageError("-r - reads standard input; -w - cannot write it")
    ports = frozenset(args.port or [IMAP_PORT])
    if args.workers > 1:
        _check_workers(args)
    if not args.read:
        from imaptap.privileges import PrivilegeError, lookup

        try:
            lookup(args.user)
        except PrivilegeError as exc:
            raise UsageError(f"-Z: {exc}") from None

    if args.metrics_label and args.metrics is None:
        raise UsageError("--metrics-label needs --metrics")
    fingerprint = password_fingerprint(args.password_key)
    metrics = _start_metrics(args)
    try:
        return _run(args, ports, metrics, fingerprint)
    finally:
        if metrics is not None:
            metrics.close()


def _check_workers(args: argparse.Namespace) -> None:
    """--workers above 1: what it does not (yet) work with is a usage error, not a surprise."""
    refused = None
    if not args.read:
        _check_live_workers(args)
        return
    if args.read == "-" or _is_pipe(args.read):
        refused = "a pipe: every worker reads the file itself"
    elif args.write:
        refused = "-w"
    elif args.metrics is not None:
        refused = "--metrics"
    elif args.json_format != "imaptap":
        refused = f"--json-format {args.json_format}"
    elif args.json is None and not args.report and sys.stdout.isatty():
        refused = "the TUI: give --json PATH"
    if refused is not None:
        raise UsageError(f"--workers {args.workers} does not work with {refused} (see README, Workers)")


def _check_live_workers(args: argparse.Namespace) -> None:
    """``-i --workers N``: the outputs the parent does not merge yet are refused, one line."""
    if args.workers > LIVE_MAX_WORKERS:
        raise UsageError(f"--workers {args.workers}: live capture takes at most {LIVE_MAX_WORKERS}"
                         " (one ring buffer each)")


def _is_pipe(path: str) -> bool:
    """Whether ``path`` is there and not a regular file (a named pipe, a device)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # the replay says why it cannot read it, as without workers
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))  # a directory: the replay's own error


def _start_metrics(args: argparse.Namespace) -> MetricsSink | None:
    """The metrics sink, already serving, for ``--metrics``; UsageError (one line) where it cannot."""
    if args.metrics is None:
        return None
    from imaptap.output.metrics import MetricsError, MetricsSink

    try:
        sink = MetricsSink(server_label="server" in args.metrics_label)
        host, port = sink.serve(*args.metrics)
    except MetricsError as exc:
        raise UsageError(str(exc)) from None
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    print(f"imaptap: serving metrics on http://{shown}/metrics", file=sys.stderr)
    return sink


def _run(args: argparse.Namespace, ports: frozenset[int], metrics: MetricsSink | None,
         fingerprint: PasswordFingerprint) -> int:
    extra_sinks: list[Sink] = [] if metrics is None else [metrics]
    json_path = args.json
    if json_path is None and not args.report and not sys.stdout.isatty():
        json_path = "-"
    if json_path is None and not args.report:
        from imaptap import tui  # imports Textual only inside tui.run

        if tui.available():
            return tui.run(args, ports, metrics, fingerprint)
        print("imaptap: the TUI needs Textual (pip install 'imaptap[tui]'); writing JSON Lines (use --json PATH)",
              file=sys.stderr)
        json_path = "-"

    writer: JsonlWriter | None = None
    output: JsonlSink | EcsSink | None = None
    close_out = False
    sinks: list[Sink] = []
    if json_path is not None:
        from imaptap.output.jsonl import JsonlSink, JsonlWriter

        out, close_out = _open_output(json_path, args.append)
        opener = None
        if close_out:
            from functools import partial

            from imaptap.output.rotation import open_for_append

            opener = partial(open_for_append, json_path)
        writer = JsonlWriter(out, "standard output" if json_path == "-" else json_path, opener)
        if args.json_format == "ecs":
            from imaptap.output.ecs import EcsSink

            output = EcsSink(writer, messages=not args.flows_only)
        else:
            output = JsonlSink(writer, messages=not args.flows_only)
        sinks.append(output)
    if args.read and _is_terminal(sys.stderr) and not (json_path == "-" and _is_terminal(sys.stdout)):
        # a long replay shows it is alive; not where JSON lines go to the same terminal
        from imaptap.output.progress import StderrProgress

        sinks.append(StderrProgress(sys.stderr))
    report_sink = None
    if args.report or args.fail_on:
        from imaptap.output.report import ReportFormat, ReportSink
        from imaptap.report import ReportBuilder

        report_out = sys.stdout if args.report else None
        report_sink = ReportSink(ReportBuilder(), report_out, ReportFormat(args.format or "text"),
                                 color=report_out is not None and wants_colour(report_out))
        sinks.append(report_sink)
    source: Source | None
    pcap_writer: MaskingWriter | None
    early_error: str | None = None
    try:
        source, pcap_writer = open_source(args, ports)
    except UsageError as exc:
        # Said on stderr and in the stats record, as any failure of the input.
        source, pcap_writer, early_error = None, None, str(exc)
    pipeline: Pipeline | ReplayWorkers | LiveWorkers | None = None
    if source is not None and args.workers > 1 and source.live:
        from imaptap.capture.live.workers import LiveWorkers, LiveWorkerSpec
        from imaptap.output.rotation import ReopenSink
        from imaptap.pipeline import LiveSource

        assert isinstance(source, LiveSource)
        _reopen.clear()
        live_spec = LiveWorkerSpec(json=writer is not None, messages=not args.flows_only,
                                   pipeline={"max_flows": args.max_flows, "idle_timeout": args.idle_timeout,
                                             "flow_interval": args.flow_interval,
                                             "password_fingerprint": fingerprint},
                                   metrics_server_label=None if metrics is None else metrics.server_label,
                                   ecs=args.json_format == "ecs", report=report_sink is not None,
                                   pcap_ports=ports if pcap_writer is not None else None)
        pipeline = LiveWorkers(source, live_spec, writer,
                               ReopenSink(_reopen.__len__, [] if writer is None else [writer], _warn), metrics,
                               report_sink, pcap_writer)
    elif source is not None and args.workers > 1:
        from imaptap.workers import ReplayWorkers, WorkerSpec

        assert args.read
        policy = source.policy
        spec = WorkerSpec(args.read, ports, policy.snaplen, policy.taillen, args.handshake_snaplen,
                          json=writer is not None, messages=not args.flows_only, report=report_sink is not None,
                          pipeline={"max_flows": args.max_flows, "idle_timeout": args.idle_timeout,
                                    "flow_interval": args.flow_interval, "password_fingerprint": fingerprint})
        assert isinstance(source, ReplaySource)
        pipeline = ReplayWorkers(args.workers, spec, writer, source, report_sink)
        gc.freeze()  # what the workers share stays shared: the collector would touch every page
    elif source is not None:
        from imaptap.output.rotation import ReopenSink

        _reopen.clear()
        sinks += [*extra_sinks, ReopenSink(_reopen.__len__, [] if writer is None else [writer], _warn)]
        pipeline = Pipeline(source, sinks, pcap_writer=pcap_writer, max_flows=args.max_flows,
                            idle_timeout=args.idle_timeout, flow_interval=args.flow_interval,
                            password_fingerprint=fingerprint)
        if args.read:
            # Everything made so far (modules, classes, functions) lives until exit: kept out of
            # the collector's generations, it is not traversed again at each collection of the
            # replay, whose flows are cyclic garbage by the thousand (2% of a replay's work).
            gc.freeze()
    _stop.clear()
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, _on_signal) for s in stop_signals}
    old[REOPEN_SIGNAL] = signal.signal(REOPEN_SIGNAL, _on_reopen)
    started = time.monotonic()
    try:
        if pipeline is not None:
            notes = _NotesEcho(pipeline.source)
            pipeline.run(stop=_stop.__len__, on_open=notes.opened, on_tick=notes.tick)
    except KeyboardInterrupt:  # before the handlers were in place
        _stop.append(signal.SIGINT)
    finally:
        # Everything seen so far is reported, whatever stopped the input; a second signal
        # must not cut that short, so they wait until it is written.
        for s in stop_signals:
            signal.signal(s, signal.SIG_IGN)
        if source is not None and source.live:
            from imaptap.sdnotify import notify

            notify("STOPPING=1")
        try:
            if output is not None and writer is not None:
                if pipeline is not None:
                    record = pipeline.stats()
                else:
                    record = {"source": args.read or ",".join(args.interface or []) or "live",
                              **dataclasses.asdict(FlowStats()), "seconds": round(time.monotonic() - started, 3),
                              "error": early_error}
                output.stats(record)
                writer.flush()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if close_out and writer is not None:
                try:
                    writer.out.close()  # the file opened last, when SIGUSR1 reopened it
                except OSError:
                    if writer.failed is None:
                        raise
    error = early_error if pipeline is None else pipeline.error
    if error:
        print(f"imaptap: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.fail_on and report_sink is not None and report_sink.report is not None:
        return gate(report_sink.report, args.fail_on)
    return EXIT_OK


def gate(report: Report, chosen: frozenset[Finding]) -> int:
    """``--fail-on``: name on stderr each flow that shows a chosen finding; the exit status."""
    from imaptap.output.report import fail_on_lines

    lines = fail_on_lines(report, chosen)
    for line in lines:
        print(f"imaptap: {line}", file=sys.stderr)
    return EXIT_FINDINGS if lines else EXIT_OK


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def wants_colour(stream: IO[str]) -> bool:
    """Colour only on a terminal, and not where NO_COLOR is set (no-color.org) or TERM is dumb."""
    return _is_terminal(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def password_fingerprint(path: str | None) -> PasswordFingerprint:
    """The fingerprint function under this installation's key (passwordkey.py).

    A key named by ``--password-key`` must be usable (UsageError otherwise); where the default
    place cannot hold one (a read-only home), this run fingerprints under a key of its own, and
    says so: its fingerprints match among themselves only.
    """
    from pathlib import Path

    from imaptap import passwordkey
    from imaptap.imap.audit import PasswordFingerprint

    try:
        if path is not None:
            key = passwordkey.load(Path(path))
        else:
            key, _made = passwordkey.load_or_create(passwordkey.default_path())
    except passwordkey.PasswordKeyError as exc:
        if path is not None:
            raise UsageError(str(exc)) from None
        print(f"imaptap: {exc}; password fingerprints of this run match only among themselves", file=sys.stderr)
        key = os.urandom(passwordkey.KEY_BYTES)
    return PasswordFingerprint(key)


class _NotesEcho:
    """Says each of the source's notes once on stderr: those of the start when it opens, then
    the readiness line (live), which the service manager hears too; and what happens later (an
    interface gone, back, down, up) at the tick after it happened."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._last: tuple[str, ...] = ()
        """The notes at the last call: those said (only what the source still keeps, so bounded)."""

    def opened(self, source: Source) -> None:
        """The source is open: its notes so far, then the readiness line."""
        self.tick()
        listening = source.listening()
        if listening is not None:
            print(f"imaptap: {listening}", file=sys.stderr, flush=True)
            from imaptap.sdnotify import notify

            notify(f"READY=1\nSTATUS={listening}")

    def tick(self) -> None:
        """The notes that came since the last call."""
        notes = self.source.notes()
        if notes == self._last:  # nearly every tick: nothing new
            return
        for note in notes:
            if note not in self._last:
                print(f"imaptap: {note}", file=sys.stderr, flush=True)
        self._last = notes
