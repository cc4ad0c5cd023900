"""Prometheus metrics of what the analyzer sees: a pipeline sink, served over HTTP.

`MetricsSink` counts on the pipeline's thread, in plain dicts: one dict increment per IMAP
line, where a prometheus_client Counter would take a lock per call.  On the source's ticks,
at most every `REFRESH_SECONDS`, it brings the open flows' bytes and anomalies up to date,
reads the source's own counters and the flow table's size, and publishes a new immutable
`_Snapshot`.  The HTTP server that prometheus_client runs on a thread of its own only reads the
newest snapshot (`_SnapshotCollector`): never the flow table, which is not thread-safe.

The families, their types and labels are declared once, in `FAMILIES` (README, "Metrics").
No label holds a user, a client address or a mailbox, and every label has a bounded set of
values: commands from the IMAP command set (`COMMAND_LABELS`) and ``other``, SASL mechanisms
from `MECHANISM_LABELS` and ``other``, the closed sets of statuses, outcomes and end reasons,
and, only with ``--metrics-label server``, at most `MAX_SERVER_LABELS` server addresses, the
rest counted under ``other`` and in ``imaptap_metrics_server_overflow_total``.  `series_bound`
is the resulting upper bound of series.

prometheus_client is imported only when the sink is made, so imaptap runs without it.
"""

from __future__ import annotations

import bisect
import enum
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from imaptap import __version__
from imaptap.facts import FlowFacts, endpoint
from imaptap.flows import EndReason, Flow
from imaptap.imap.anomalies import ALL_KEYS as ANOMALY_NAMES
from imaptap.imap.parse import KNOWN_COMMANDS
from imaptap.imap.session import MAX_PENDING, Kind, Message, Side
from imaptap.pipeline import Sink

if TYPE_CHECKING:
    from imaptap.pipeline import Pipeline

#: Where ``--metrics PORT`` listens without an address: this host only.  Anything else is the
#: user's explicit choice.
DEFAULT_ADDRESS = "127.0.0.1"
#: Seconds between two snapshots.  Prometheus scrapes every 15 s or so, and each refresh walks
#: the open flows (32,768 of them take a few milliseconds), so once a second is fresh enough.
REFRESH_SECONDS = 1.0
#: Upper bounds of the latency buckets, in seconds: from 100 µs (a server answering from memory
#: on the LAN) to a minute (a SEARCH over a large mailbox); slower completions land in +Inf.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Server addresses given a ``server`` label of their own (``--metrics-label server``).  A mail
#: host serves IMAP on one address or a few; past this, flows are counted under ``other``, so
#: that a scan of many addresses cannot multiply the series.
MAX_SERVER_LABELS = 8
OVERFLOW_SERVER = "other"

#: Label of a command outside `COMMAND_LABELS` (an extension, an X- command, a typo).
OTHER = "other"
#: Label of a completion whose command was never seen (the capture began after it).
UNKNOWN_COMMAND = "unknown"
#: Status of a command whose completion was never seen when its flow ended.
NO_STATUS = "none"

#: UID forms of commands (RFC 3501, 9051, 4315, 6851, 5256), labelled as ``UID FETCH`` etc.
UID_COMMANDS = ("COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE", "SORT", "THREAD")
COMMAND_LABELS = frozenset(KNOWN_COMMANDS - {"UID"}) | {"UID " + c for c in UID_COMMANDS}
#: SASL mechanisms labelled by name (IANA's registry, those in use); ``LOGIN`` also stands for
#: the LOGIN command, as in a flow record's ``auth_mechanism``.
MECHANISM_LABELS = frozenset({"LOGIN", "PLAIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS",
                              "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512", "GSSAPI", "GS2-KRB5",
                              "NTLM", "XOAUTH2", "OAUTHBEARER", "EXTERNAL", "ANONYMOUS", "OTP"})
TAGGED_STATUSES = ("OK", "NO", "BAD")
_LOGIN_COMMANDS = frozenset({"LOGIN", "AUTHENTICATE"})
# Members read per message, as module constants (an enum member lookup costs more).
_RESPONSE = Kind.RESPONSE
_REQUEST = Kind.REQUEST
_SERVER = Side.SERVER


class LoginOutcome(enum.StrEnum):
    """How a login attempt ended, as far as the capture saw it."""

    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"
    """Its completion was never seen (a flow record may still infer the outcome)."""


class StartTlsOutcome(enum.StrEnum):
    COMPLETED = "completed"
    REFUSED = "refused"
    OFFERED_UNUSED = "offered_unused"
    """The server offered STARTTLS and the flow ended without the client asking for it."""


class Direction(enum.StrEnum):
    C2S = "c2s"
    S2C = "s2c"


class MetricKind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Family(NamedTuple):
    """One metric family as served: its full name, type, help text and labels."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    per_server: bool = False
    """Takes the ``server`` label first, under ``--metrics-label server``."""


_C, _G, _H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM

#: Every family imaptap serves besides prometheus_client's process_* ones: the metrics contract.
FAMILIES = (
    Family("imaptap_commands_total", _C, "Tagged completions by the command they complete and their status; "
           "status none: commands still unanswered when their flow ended", ("command", "status"), True),
    Family("imaptap_command_latency_seconds", _H, "Time from a command to its tagged completion, for commands "
           "that did not wait on the client (IDLE, SASL exchanges excluded)", ("command",), True),
    Family("imaptap_logins_total", _C, "LOGIN and AUTHENTICATE attempts by mechanism and outcome",
           ("mechanism", "outcome"), True),
    Family("imaptap_cleartext_credentials_total", _C, "Flows that sent a password or SASL secret in clear text, "
           "counted when the first one crossed", (), True),
    Family("imaptap_starttls_total", _C, "STARTTLS outcomes: completed, refused, offered but unused (at flow end)",
           ("outcome",), True),
    Family("imaptap_flows_active", _G, "TCP connections on the IMAP ports being followed", (), True),
    Family("imaptap_flows_ended_total", _C, "TCP connections ended, by how they ended (end as in the JSON flow "
           "record; evicted: the table was full) and whether IMAP was confirmed", ("end", "imap"), True),
    Family("imaptap_bytes_total", _C, "TCP payload bytes on the wire by direction", ("direction",), True),
    Family("imaptap_anomalies_total", _C, "Anomalies by name (the keys of a flow record's anomalies)", ("name",),
           True),
    Family("imaptap_analyzer_segments_total", _C, "Segments the analyzer took from the capture"),
    Family("imaptap_capture_lag_seconds", _G, "Live: how far the analyzer is behind the capture: now less the "
           "capture time of the newest segment analysed, the worst over the last refresh; 0 when idle"),
    Family("imaptap_capture_packets_seen_total", _C, "Live: packets the kernel program ran on"),
    Family("imaptap_capture_packets_matched_total", _C, "Live: TCP packets to or from a monitored port"),
    Family("imaptap_capture_segments_submitted_total", _C, "Live: segments the kernel put in the ring buffer"),
    Family("imaptap_capture_segments_lost_total", _C, "Live: segments lost because the ring or perf buffer "
           "was full"),
    Family("imaptap_capture_packets_unparsed_total", _C, "Live: packets the kernel program could not parse"),
    Family("imaptap_capture_copy_failures_total", _C, "Live: payload copies the kernel refused"),
    Family("imaptap_capture_records_received_total", _C, "Live: records read from the ring buffer"),
    Family("imaptap_capture_records_malformed_total", _C, "Live: records too short for what they announce"),
    Family("imaptap_capture_policy_errors_total", _C, "Live: per-flow copy modes the kernel map refused"),
    Family("imaptap_capture_interface_gone_total", _C, "Live: times an interface captured on went away (deleted, "
           "renamed)"),
    Family("imaptap_capture_interface_down_total", _C, "Live: times an interface captured on went down"),
    Family("imaptap_capture_interface_reattached_total", _C, "Live: times the programs were attached again to an "
           "interface of the same name that came back"),
    Family("imaptap_capture_interfaces_unavailable", _G, "Live: interfaces captured on that are gone or down now"),
    Family("imaptap_replay_packets_total", _C, "Replay: packet records read"),
    Family("imaptap_replay_segments_total", _C, "Replay: segments on the monitored ports"),
    Family("imaptap_replay_packets_skipped_total", _C, "Replay: records that gave no segment, by reason",
           ("reason",)),
    Family("imaptap_metrics_server_overflow_total", _C, "Flows counted under server=\"other\": more servers were "
           f"seen than the {MAX_SERVER_LABELS} labelled"),
    Family("imaptap_build_info", _G, "Always 1: the imaptap version", ("version",)),
)
FAMILY = {f.name: f for f in FAMILIES}

#: The source's counters (`Source.counters`, `Source.totals`) -> (family, label values).
SOURCE_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "seen": ("imaptap_capture_packets_seen_total", ()),
    "matched": ("imaptap_capture_packets_matched_total", ()),
    "submitted": ("imaptap_capture_segments_submitted_total", ()),
    "lost": ("imaptap_capture_segments_lost_total", ()),
    "unparsed": ("imaptap_capture_packets_unparsed_total", ()),
    "copy_failed": ("imaptap_capture_copy_failures_total", ()),
    "received": ("imaptap_capture_records_received_total", ()),
    "malformed": ("imaptap_capture_records_malformed_total", ()),
    "policy_errors": ("imaptap_capture_policy_errors_total", ()),
    "interface_gone": ("imaptap_capture_interface_gone_total", ()),
    "interface_down": ("imaptap_capture_interface_down_total", ()),
    "reattached": ("imaptap_capture_interface_reattached_total", ()),
    "interfaces_unavailable": ("imaptap_capture_interfaces_unavailable", ()),
    "packets": ("imaptap_replay_packets_total", ()),
    "segments": ("imaptap_replay_segments_total", ()),
    "ip_fragments_skipped": ("imaptap_replay_packets_skipped_total", ("ip_fragment",)),
    "non_tcp": ("imaptap_replay_packets_skipped_total", ("non_tcp",)),
    "other_ports": ("imaptap_replay_packets_skipped_total", ("other_port",)),
    "undecodable": ("imaptap_replay_packets_skipped_total", ("undecodable",)),
    "unsupported_link": ("imaptap_replay_packets_skipped_total", ("unsupported_link",)),
    "pure_acks": ("imaptap_replay_packets_skipped_total", ("pure_ack",)),
}

#: Series made at zero as soon as their server label exists, so that ``increase()`` in an alert
#: sees the first failed login, cleartext login, refused STARTTLS or anomaly, not only the second.
_ZERO_SERIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("imaptap_cleartext_credentials_total", ()),
    *(("imaptap_anomalies_total", (name,)) for name in ANOMALY_NAMES),
    *(("imaptap_starttls_total", (o.value,)) for o in StartTlsOutcome),
    *(("imaptap_logins_total", (m, o.value)) for m in ("LOGIN", "PLAIN") for o in LoginOutcome),
)


class MetricsError(Exception):
    """--metrics cannot be served (no prometheus_client, a bad or busy address): one line."""


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[IPV6]:PORT`` as (address, port); ValueError (one line) if not.
    Port 0 takes any free port (the one taken is printed)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = DEFAULT_ADDRESS
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets: [{host}]:{port_text}")
    if not host:
        raise ValueError(f"no address before ':' in {text!r} (to listen everywhere say 0.0.0.0 or [::])")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"not a port: {port_text!r}")
    return host, int(port_text)


def command_label(command: str | None) -> str:
    """The ``command`` label of a command name (None: a completion of an unseen command)."""
    if command is None:
        return UNKNOWN_COMMAND
    return command if command in COMMAND_LABELS else OTHER


def mechanism_label(mechanism: str | None) -> str:
    """The ``mechanism`` label of a flow's auth mechanism."""
    return mechanism if mechanism in MECHANISM_LABELS else OTHER


def series_bound(server_label: bool = False) -> int:
    """The most series imaptap's own families can hold (prometheus_client's process_* aside)."""
    commands = len(COMMAND_LABELS) + 2  # other, unknown
    per_server = (commands * (len(TAGGED_STATUSES) + 1)                     # commands_total
                  + (commands - 1) * (len(LATENCY_BUCKETS) + 3)             # buckets, +Inf, sum, count
                  + (len(MECHANISM_LABELS) + 1) * len(LoginOutcome)
                  + 1 + len(StartTlsOutcome) + 1                             # cleartext, starttls, active
                  + len(EndReason) * 2 + len(Direction) + len(ANOMALY_NAMES))
    servers = MAX_SERVER_LABELS + 1 if server_label else 1
    unlabelled = sum(1 for f in FAMILIES if not f.per_server and not f.labels)
    skip_reasons = sum(1 for family, labels in SOURCE_COUNTERS.values() if labels)
    return per_server * servers + unlabelled + skip_reasons + 1  # build_info


class _FlowState:
    """What the sink remembers of one open flow: enough to count each thing exactly once."""

    __slots__ = ("server", "unanswered", "logins", "cleartext", "bytes_c2s", "bytes_s2c", "anomalies")

    def __init__(self, server: str | None) -> None:
        self.server = server
        self.unanswered: dict[str, int] = {}
        """Command label -> commands sent less completions matched to them."""
        self.logins: dict[str | None, str] = {}
        """Tag -> mechanism label of a login attempt whose completion is not yet seen (at most
        MAX_PENDING, as the session keeps)."""
        self.cleartext = False
        self.bytes_c2s = 0
        """Bytes already counted."""
        self.bytes_s2c = 0
        self.anomalies: dict[str, int] | None = None


class _Snapshot(NamedTuple):
    """What a scrape serves: copies made on the pipeline's thread, never changed afterwards."""

    values: dict[str, dict[tuple[Any, ...], float]]
    """Counter and gauge family -> label values (server first, None without server labels) -> value."""
    latency: dict[tuple[Any, ...], tuple[list[int], float]]
    """(server, command) -> (count per bucket, +Inf last; sum of seconds)."""


class MetricsSink(Sink):
    """Counts commands, logins, STARTTLS, flows, bytes and anomalies as the pipeline reports them,
    and the source's counters on its ticks; `serve` exposes them to Prometheus."""

    def __init__(self, *, server_label: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise MetricsError("--metrics needs the prometheus_client library: pip install 'imaptap[metrics]'"
                               " (Debian: python3-prometheus-client)") from None
        self.server_label = server_label
        self.clock = clock
        self._servers: set[str] = set()
        self._open: dict[int, _FlowState] = {}
        # defaultdict(int): a missing key costs no Python-level call, as Counter's would.
        self._values: dict[str, defaultdict[tuple[Any, ...], float]] = {
            f.name: defaultdict(int) for f in FAMILIES if f.kind is not _H}
        self._latency: dict[tuple[Any, ...], list[int]] = {}
        self._latency_sum: defaultdict[tuple[Any, ...], float] = defaultdict(float)
        self._next_refresh = 0.0
        self._newest_ts = 0.0
        self._worst_lag = 0.0
        self._values["imaptap_build_info"][(__version__,)] = 1
        if server_label:
            self._values["imaptap_metrics_server_overflow_total"][()] += 0
        else:
            self._zero_series(None)
        self.snapshot = self._take_snapshot()
        self._merged_servers: dict[str, str] = {}
        """`publish_merged`: a worker's server label -> the label served (itself, or ``other``
        past the cap), decided once, so that every counter stays monotonic."""
        self.httpd: Any = None
        self._serving: Any = None
        """The thread answering scrapes, once the source is open."""
        self.registry = self._registry()

    # --- the pipeline's events --------------------------------------------------------------------

    def flow_started(self, flow: Flow) -> Callable[[Message], None]:
        state = _FlowState(self._server_of(flow) if self.server_label else None)
        self._open[flow.id] = state
        server = state.server
        session = flow.session
        commands = self._values["imaptap_commands_total"]
        logins = self._values["imaptap_logins_total"]
        starttls = self._values["imaptap_starttls_total"]
        cleartext = self._values["imaptap_cleartext_credentials_total"]
        unanswered = state.unanswered
        latency = self._latency
        latency_sum = self._latency_sum
        buckets = LATENCY_BUCKETS
        labels = COMMAND_LABELS
        bucket = bisect.bisect_left

        def on_message(msg: Message) -> None:
            kind = msg.kind
            if kind is _RESPONSE:
                command = msg.command
                if command is None:
                    commands[server, UNKNOWN_COMMAND, msg.status] += 1
                    return
                label = command if command in labels else OTHER
                commands[server, label, msg.status] += 1
                unanswered[label] = unanswered.get(label, 0) - 1
                if msg.latency_ms is not None and session.latency_timed_server:
                    key = (server, label)
                    counts = latency.get(key)
                    if counts is None:
                        counts = latency[key] = [0] * (len(buckets) + 1)
                    seconds = msg.latency_ms / 1000.0
                    counts[bucket(buckets, seconds)] += 1
                    latency_sum[key] += seconds
                if command in _LOGIN_COMMANDS:
                    mechanism = state.logins.pop(msg.tag, None)
                    if mechanism is not None and not session.completion_out_of_state:
                        outcome = LoginOutcome.SUCCESS if msg.status == "OK" else LoginOutcome.FAILURE
                        logins[server, mechanism, outcome.value] += 1
                elif command == "STARTTLS":
                    outcome_tls = StartTlsOutcome.COMPLETED if msg.status == "OK" else StartTlsOutcome.REFUSED
                    starttls[server, outcome_tls.value] += 1
                return
            if msg.side is _SERVER:
                return
            if kind is _REQUEST:
                command = msg.command
                assert command is not None, "a request always names its command"
                label = command if command in labels else OTHER
                unanswered[label] = unanswered.get(label, 0) + 1
                if command in _LOGIN_COMMANDS:
                    pending = state.logins
                    if len(pending) >= MAX_PENDING:  # as the session, which forgets the oldest
                        logins[server, pending.pop(next(iter(pending))), LoginOutcome.UNKNOWN.value] += 1
                    pending[msg.tag] = mechanism_label(session.auth_mechanism)
            if not state.cleartext and session.cleartext_credentials:
                state.cleartext = True
                cleartext[(server,)] += 1

        return on_message

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        state = self._open.pop(flow.id)
        server = state.server
        self._account(flow, state)
        values = self._values
        values["imaptap_flows_ended_total"][server, facts.end, "true" if facts.imap else "false"] += 1
        commands = values["imaptap_commands_total"]
        for label, n in state.unanswered.items():
            if n > 0:
                commands[server, label, NO_STATUS] += n
        for mechanism in state.logins.values():
            values["imaptap_logins_total"][server, mechanism, LoginOutcome.UNKNOWN.value] += 1
        if facts.starttls == "offered":
            values["imaptap_starttls_total"][server, StartTlsOutcome.OFFERED_UNUSED.value] += 1

    def tick(self, pipeline: Pipeline) -> None:
        if pipeline.source.live:
            # The newest segment's capture time against the clock, right after its batch was
            # analysed: how far behind the kernel the analysis runs.
            newest = pipeline.table.now
            if newest != self._newest_ts:
                self._newest_ts = newest
                lag = pipeline.wallclock() - newest
                if lag > self._worst_lag:
                    self._worst_lag = lag
        now = self.clock()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_SECONDS
            self.refresh(pipeline)

    def finished(self, pipeline: Pipeline) -> None:
        self.refresh(pipeline)

    # --- counting -----------------------------------------------------------------------------------

    def _server_of(self, flow: Flow) -> str:
        name = endpoint(flow.server)
        if name in self._servers:
            return name
        if len(self._servers) < MAX_SERVER_LABELS:
            self._servers.add(name)
            self._zero_series(name)
            return name
        self._values["imaptap_metrics_server_overflow_total"][()] += 1
        if OVERFLOW_SERVER not in self._servers:
            self._servers.add(OVERFLOW_SERVER)  # beyond the cap: shares the one extra label
            self._zero_series(OVERFLOW_SERVER)
        return OVERFLOW_SERVER

    def _zero_series(self, server: str | None) -> None:
        for family, labels in _ZERO_SERIES:
            self._values[family][(server, *labels)] += 0

    def _account(self, flow: Flow, state: _FlowState) -> None:
        """Bring the flow's bytes and anomalies up to date in the counters."""
        server = state.server
        if flow.bytes_c2s != state.bytes_c2s or flow.bytes_s2c != state.bytes_s2c:
            counted = self._values["imaptap_bytes_total"]
            counted[server, Direction.C2S.value] += flow.bytes_c2s - state.bytes_c2s
            counted[server, Direction.S2C.value] += flow.bytes_s2c - state.bytes_s2c
            state.bytes_c2s, state.bytes_s2c = flow.bytes_c2s, flow.bytes_s2c
        # what the IMAP parser made of another protocol's bytes is no anomaly of IMAP's
        anomalies = flow.session.anomalies if flow.session.is_imap else None
        if anomalies:
            seen = state.anomalies
            if seen is None:
                seen = state.anomalies = {}
            counted = self._values["imaptap_anomalies_total"]
            for name, n in anomalies.items():
                if n != seen.get(name, 0):
                    counted[server, name] += n - seen.get(name, 0)
                    seen[name] = n

    def refresh(self, pipeline: Pipeline) -> None:
        """Count what open flows did since the last refresh, read the source's counters and the
        table's size, and publish a new snapshot."""
        active: defaultdict[tuple[Any, ...], float] = defaultdict(int)
        if not self.server_label:
            active[(None,)] = 0
        for flow in pipeline.table.flows.values():
            state = self._open.get(flow.id)
            if state is not None:
                self._account(flow, state)
                active[(state.server,)] += 1
        values = self._values
        values["imaptap_flows_active"] = active
        values["imaptap_analyzer_segments_total"][()] = pipeline.table.stats.segments
        source = pipeline.source
        counters = source.counters()
        if counters is None:
            counters = source.totals()
        for name, value in counters.items():
            target = SOURCE_COUNTERS.get(name)
            if target is not None and type(value) is int:
                family, labels = target
                values[family][labels] = value
        if source.live:
            values["imaptap_capture_lag_seconds"][()] = max(0.0, self._worst_lag)
            self._worst_lag = 0.0
        self.snapshot = self._take_snapshot()

    def publish_merged(self, snapshots: Iterable[_Snapshot], counters: dict[str, int] | None) -> None:
        """Serve the sum of live workers' snapshots as one process's (`merge_snapshots`), with the
        parent's capture ``counters`` (kernel and interfaces), which it alone reads."""
        self.snapshot = merge_snapshots(snapshots, counters, self._merged_servers, self.snapshot)

    def _take_snapshot(self) -> _Snapshot:
        return _Snapshot({name: dict(counts) for name, counts in self._values.items()},
                         {key: (list(counts), self._latency_sum[key]) for key, counts in self._latency.items()})

    # --- serving -------------------------------------------------------------------------------------

    def _registry(self) -> Any:
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        registry.register(_SnapshotCollector(self))
        return registry

    def serve(self, address: str, port: int) -> tuple[str, int]:
        """Bind /metrics on ``address``:``port`` now (so a busy port or a bad address is said
        before the capture starts) and answer scrapes from the moment the pipeline opens its
        source (`opened`): a live capture has dropped its privileges by then, and the serving
        thread, made afterwards, gives up even what the capturing thread kept.  Returns the
        address bound."""
        import socket
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler

        class _Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                """A scrape that failed: one line on stderr, never socketserver's traceback; nothing
                for a scraper that hung up first (its timeout passed on a busy host)."""
                exc = sys.exc_info()[1]
                if not isinstance(exc, ConnectionError):
                    print(f"imaptap: a metrics scrape from {client_address[0]} failed: {exc!r}", file=sys.stderr)

        try:
            self.httpd = _Server((address, port), MetricsHandler.factory(self.registry))
        except OSError as exc:
            shown = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            raise MetricsError(f"cannot serve metrics on {shown}: {exc.strerror or exc}") from None
        bound = self.httpd.server_address
        return bound[0], bound[1]

    def opened(self, pipeline: Pipeline) -> None:
        """The source is open: start answering scrapes (see `serve`)."""
        if self.httpd is not None and self._serving is None:
            import threading

            self._serving = threading.Thread(target=self._serve, args=(self.httpd,), name="imaptap-metrics",
                                             daemon=True)
            self._serving.start()

    @staticmethod
    def _serve(httpd: Any) -> None:
        """The serving thread: it answers scrapes with no capability at all (it was made by the
        capturing thread, which keeps two to detach; the threads per request are made by this one)."""
        from imaptap.privileges import PrivilegeError, drop_thread_capabilities

        try:
            drop_thread_capabilities()
        except PrivilegeError:
            return  # serve nothing rather than serve with privileges
        httpd.serve_forever()

    def close(self) -> None:
        """Stop serving (the run is over); idempotent."""
        if self.httpd is not None:
            httpd, self.httpd = self.httpd, None
            if self._serving is not None:
                httpd.shutdown()
                self._serving = None
            httpd.server_close()


#: `SOURCE_COUNTERS` a live worker counts for itself (its ring's records, its flows' map
#: writes): summed over the workers, in the scrape and the stats record (in this order);
#: every other capture counter is the parent's alone.
WORKER_SOURCE_COUNTERS = ("received", "malformed", "policy_errors")
#: Families summed over workers but for these: one build, and the worst worker's lag.
_MAX_FAMILIES = frozenset({"imaptap_capture_lag_seconds"})
_PARENT_FAMILIES = frozenset({"imaptap_build_info"} | {family for name, (family, _labels) in SOURCE_COUNTERS.items()
                                                       if name not in WORKER_SOURCE_COUNTERS})
_OVERFLOW_FAMILY = "imaptap_metrics_server_overflow_total"


def merge_snapshots(snapshots: Iterable[_Snapshot], counters: dict[str, int] | None,
                    servers: dict[str, str], previous: _Snapshot) -> _Snapshot:
    """Live workers' snapshots as the one snapshot of one process: counts and histograms summed
    over workers, the lag the worst, build_info and the capture's counters from ``previous`` and
    ``counters`` (the parent's); with server labels, ``servers`` (kept between calls) holds
    the first `MAX_SERVER_LABELS` the workers named, the rest are folded into ``other`` and their
    flows added to the overflow count, as one process would have counted them."""
    values: dict[str, dict[tuple[Any, ...], float]] = {f.name: {} for f in FAMILIES if f.kind is not _H}
    latency: dict[tuple[Any, ...], tuple[list[int], float]] = {}

    def label(server: Any) -> Any:
        if server is None or server == OVERFLOW_SERVER:
            return server
        served = servers.get(server)
        if served is None:
            labelled = sum(1 for name, shown in servers.items() if name == shown)
            served = servers[server] = server if labelled < MAX_SERVER_LABELS else OVERFLOW_SERVER
        return served

    for snapshot in snapshots:
        folded: dict[Any, float] = {}
        for name, counts in snapshot.values.items():
            if name in _PARENT_FAMILIES:
                continue
            merged = values[name]
            per_server = FAMILY[name].per_server
            for key, value in counts.items():
                if per_server:
                    served = label(key[0])
                    if served != key[0] and name in ("imaptap_flows_ended_total", "imaptap_flows_active"):
                        folded[key[0]] = folded.get(key[0], 0) + value  # each flow once: open or ended
                    key = (served, *key[1:])
                if name in _MAX_FAMILIES:
                    merged[key] = max(merged.get(key, value), value)
                else:
                    merged[key] = merged.get(key, 0) + value
        if folded:
            overflow = values[_OVERFLOW_FAMILY]
            overflow[()] = overflow.get((), 0) + sum(folded.values())
        for key, (buckets, total) in snapshot.latency.items():
            key = (label(key[0]), *key[1:])
            have = latency.get(key)
            if have is None:
                latency[key] = (list(buckets), total)
            else:
                latency[key] = ([a + b for a, b in zip(have[0], buckets, strict=True)], have[1] + total)
    for name in _PARENT_FAMILIES:
        values[name] = dict(previous.values.get(name, {}))
    for name, value in (counters or {}).items():
        target = SOURCE_COUNTERS.get(name)
        if target is not None and name not in WORKER_SOURCE_COUNTERS and type(value) is int:
            family, labels = target
            values[family][labels] = value
    return _Snapshot({name: counts for name, counts in values.items() if counts}, latency)


class _SnapshotCollector:
    """prometheus_client's view of the sink: families built from its newest snapshot."""

    def __init__(self, sink: MetricsSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snapshot = self.sink.snapshot  # one read: the pipeline thread only ever replaces it
        with_server = self.sink.server_label
        for family in FAMILIES:
            labels = list(family.labels)
            if family.per_server and with_server:
                labels.insert(0, "server")
            metric: Any
            if family.kind is _H:
                metric = HistogramMetricFamily(family.name, family.help, labels=labels)
                for key, (counts, total) in sorted(snapshot.latency.items(), key=_sort_key):
                    cumulative = 0
                    buckets = []
                    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                        cumulative += n
                        buckets.append((_bound_text(bound), cumulative))
                    metric.add_metric(_label_values(key, family, with_server), buckets, total)
                yield metric
                continue
            values = snapshot.values.get(family.name)
            if not values:
                continue
            kind = CounterMetricFamily if family.kind is _C else GaugeMetricFamily
            metric = kind(family.name, family.help, labels=labels)
            for key, value in sorted(values.items(), key=_sort_key):
                metric.add_metric(_label_values(key, family, with_server), value)
            yield metric

    def describe(self) -> list[Any]:
        return []


def _label_values(key: tuple[Any, ...], family: Family, with_server: bool) -> list[str]:
    if not family.per_server:
        return list(key)
    return list(key) if with_server else list(key[1:])


def _sort_key(item: tuple[tuple[Any, ...], Any]) -> tuple[str, ...]:
    return tuple("" if v is None else str(v) for v in item[0])


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
