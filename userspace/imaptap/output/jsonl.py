"""JSON Lines output: one object per IMAP line, per flow at its end, and stats at the end.

The keys here are a contract that log pipelines and the tests rely on; see the README.  The
record builders are shared with the TUI, which shows the same facts.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from typing import IO, Any, Callable

from imaptap.flows import Flow
from imaptap.imap.session import Kind, Message, Side
from imaptap.output import OutputError

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
# The C string encoder json itself uses for ensure_ascii=False (quotes, escapes, no ASCII-fication).
_quote = json.encoder.encode_basestring

try:  # the C accelerator of the message line (setup.py builds it where it can)
    from imaptap.output import _jsonfast
except ImportError:  # pragma: no cover - the build is optional
    _jsonfast = None


def endpoint(addr: tuple[str, int]) -> str:
    """``ip:port``, IPv6 as ``[ip]:port``."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def message_record(flow: Flow, msg: Message) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "message",
        "ts": msg.ts,
        "flow": flow.id,
        "client": endpoint(flow.client),
        "server": endpoint(flow.server),
        "from": msg.side.value,
        "kind": msg.kind.value,
        "tag": msg.tag,
        "command": msg.command,
        "args": msg.args,
        "status": msg.status,
        "code": msg.code,
        "text": msg.text,
        "latency_ms": msg.latency_ms,
    }
    if msg.literals:
        rec["literals"] = list(msg.literals)
    if msg.number is not None:
        rec["number"] = msg.number
    if msg.truncated:
        rec["truncated"] = True
    return rec


def flow_record(flow: Flow) -> dict[str, Any]:
    s = flow.session
    return {
        "type": "flow",
        "flow": flow.id,
        "client": endpoint(flow.client),
        "server": endpoint(flow.server),
        "ip_version": flow.ip_version,
        "first_ts": flow.first_ts,
        "last_ts": flow.last_ts,
        "packets": flow.packets,
        "bytes": flow.bytes,
        "packets_c2s": flow.packets_c2s,
        "packets_s2c": flow.packets_s2c,
        "bytes_c2s": flow.bytes_c2s,
        "bytes_s2c": flow.bytes_s2c,
        "end": flow.end_reason,
        "imap": s.is_imap,
        "greeting": s.greeting,
        "server_software": s.server_software,
        "username": s.username,
        "authzid": s.authzid,
        "auth_command": s.auth_command,
        "auth_mechanism": s.auth_mechanism,
        "login_ok": s.login_ok,
        "login_failures": s.login_failures,
        "preauth": s.preauth,
        "capabilities": s.capabilities,
        "starttls": s.starttls.value,
        "encrypted": s.encrypted,
        "encrypted_from_start": s.encrypted_from_start,
        "compressed": s.compressed,
        "cleartext_credentials": s.cleartext_credentials,
        "findings": s.findings,
        "client_id": s.client_id,
        "server_id": s.server_id,
        "mailboxes": s.mailboxes,
        "mailboxes_dropped": s.mailboxes_dropped,
        "idles": s.idles,
        "commands": dict(s.commands),
        "statuses": dict(s.statuses),
        "anomalies": dict(s.anomalies),
        "gaps": flow.c2s.holes + flow.s2c.holes,
        "gap_bytes": flow.c2s.hole_bytes + flow.s2c.hole_bytes,
        "resyncs": s.client.resyncs + s.server.resyncs,
        "bytes_not_captured": s.client.bytes_missed + s.server.bytes_missed,
        "bytes_inflated": s.client.bytes_inflated + s.server.bytes_inflated,
        "retransmissions": flow.c2s.retransmissions + flow.s2c.retransmissions,
        "out_of_order": flow.c2s.out_of_order + flow.s2c.out_of_order,
    }


_JSON_OPTIONAL_BOOL = {None: "null", True: "true", False: "false"}


def _strings(items: list[str]) -> str:
    return "[" + ",".join(map(_quote, items)) + "]"


@lru_cache(maxsize=256)
def _capabilities(caps: tuple[str, ...]) -> str:
    """_strings for a capability list: the same few lists come again flow after flow."""
    return _strings(caps)


def _counts(counts: dict[str, int]) -> str:
    return "{" + ",".join([f"{_quote(k)}:{v}" for k, v in counts.items()]) + "}"


def _float(x: float) -> str:
    text = repr(x) if _jsonfast is None else _jsonfast.ts_repr(x)
    return text if "n" not in text else _dumps(x)  # inf and nan: as json writes them


def _optional(s: str | None) -> str:
    return "null" if s is None else _quote(s)


def flow_line(flow: Flow) -> str:
    """Same bytes as ``_dumps(flow_record(flow))``, built without the dict and the encoder:
    json's encoder took 20 µs a flow, a twentieth of a replay's time."""
    s = flow.session
    c2s, s2c = flow.c2s, flow.s2c
    client, server = s.client, s.server
    return (
        f'{{"type":"flow","flow":{flow.id},"client":{_quote(endpoint(flow.client))},'
        f'"server":{_quote(endpoint(flow.server))},"ip_version":{flow.ip_version},'
        f'"first_ts":{_float(flow.first_ts)},"last_ts":{_float(flow.last_ts)},'
        f'"packets":{flow.packets},"bytes":{flow.bytes},"packets_c2s":{flow.packets_c2s},'
        f'"packets_s2c":{flow.packets_s2c},"bytes_c2s":{flow.bytes_c2s},"bytes_s2c":{flow.bytes_s2c},'
        f'"end":{_optional(flow.end_reason)},"imap":{_JSON_OPTIONAL_BOOL[s.is_imap]},'
        f'"greeting":{_optional(s.greeting)},"server_software":{_optional(s.server_software)},'
        f'"username":{_optional(s.username)},"authzid":{_optional(s.authzid)},'
        f'"auth_command":{_optional(s.auth_command)},"auth_mechanism":{_optional(s.auth_mechanism)},'
        f'"login_ok":{_JSON_OPTIONAL_BOOL[s.login_ok]},"login_failures":{s.login_failures},'
        f'"preauth":{_JSON_OPTIONAL_BOOL[s.preauth]},"capabilities":{_capabilities(tuple(s.capabilities))},'
        f'"starttls":{_quote(s.starttls.value)},"encrypted":{_JSON_OPTIONAL_BOOL[s.encrypted]},'
        f'"encrypted_from_start":{_JSON_OPTIONAL_BOOL[s.encrypted_from_start]},'
        f'"compressed":{_JSON_OPTIONAL_BOOL[s.compressed]},'
        f'"cleartext_credentials":{_JSON_OPTIONAL_BOOL[s.cleartext_credentials]},'
        f'"findings":{_strings(s.findings)},'
        f'"client_id":{"null" if s.client_id is None else _dumps(s.client_id)},'
        f'"server_id":{"null" if s.server_id is None else _dumps(s.server_id)},'
        f'"mailboxes":{_strings(s.mailboxes)},"mailboxes_dropped":{s.mailboxes_dropped},"idles":{s.idles},'
        f'"commands":{_counts(s.commands)},"statuses":{_counts(s.statuses)},"anomalies":{_counts(s.anomalies)},'
        f'"gaps":{c2s.holes + s2c.holes},"gap_bytes":{c2s.hole_bytes + s2c.hole_bytes},'
        f'"resyncs":{client.resyncs + server.resyncs},'
        f'"bytes_not_captured":{client.bytes_missed + server.bytes_missed},'
        f'"bytes_inflated":{client.bytes_inflated + server.bytes_inflated},'
        f'"retransmissions":{c2s.retransmissions + s2c.retransmissions},'
        f'"out_of_order":{c2s.out_of_order + s2c.out_of_order}}}'
    )


#: Lines queued before one write to the output.
_BATCH = 256

# Enum members hash in Python code: the hot path tells the side by identity and looks the kind
# up by its value (a str, whose hash is cached).
_CLIENT = Side.CLIENT
_FROM_CLIENT = {kind.value: f'"from":"client","kind":"{kind.value}",' for kind in Kind}
_FROM_SERVER = {kind.value: f'"from":"server","kind":"{kind.value}",' for kind in Kind}


def _flow_prefix(flow: Flow) -> str:
    return f'"flow":{flow.id},"client":{_quote(endpoint(flow.client))},"server":{_quote(endpoint(flow.server))},'


def _message_rest(msg: Message) -> str:
    """A message record after its "kind" key, as _jsonfast's Formatter writes it."""
    tag, command, args, status, code, txt, lat, literals, number, truncated = msg[3:]
    q = _quote
    line = (
        f'"tag":{"null" if tag is None else q(tag)},"command":{"null" if command is None else q(command)},'
        f'"args":{"null" if args is None else q(args)},"status":{"null" if status is None else q(status)},'
        f'"code":{"null" if code is None else q(code)},"text":{"null" if txt is None else q(txt)},'
        f'"latency_ms":{"null" if lat is None else repr(lat)}'
    )
    if literals:
        line += ',"literals":[' + ",".join(map(str, literals)) + "]"
    if number is not None:
        line += f',"number":{number}'
    if truncated:
        line += ',"truncated":true'
    return line + "}\n"


class JsonlWriter:
    """Writes records to a text stream, one JSON object per line."""

    def __init__(self, out: IO[str], name: str = "the output") -> None:
        self.out = out
        self.name = name
        self.failed: OSError | None = None
        """The error that stopped the output: later records are dropped, not retried."""
        self._lines: list[str] = []
        self._append = self._lines.append
        self._ts = -1.0
        self._ts_text = ""
        self._emit: Callable[[str, Message], None] = self._message_py
        """Queues the line of one message after its flow's part: the C formatter where built."""
        if _jsonfast is not None:
            kinds = tuple((kind, _FROM_CLIENT[kind.value], _FROM_SERVER[kind.value]) for kind in Kind)
            self._emit = _jsonfast.Formatter(self._lines, self._drain, _BATCH, _CLIENT, kinds).message

    def write(self, line: str) -> None:
        """Queue one line; lines go out in batches, in order (one write call per line was a
        tenth of a replay's cost)."""
        self._append(line)
        if len(self._lines) >= _BATCH:
            self._drain()

    def _drain(self) -> None:
        if self._lines:
            try:
                self._output(self.out.write, "".join(self._lines))
            finally:
                self._lines.clear()

    def _output(self, call: Callable[..., object], *args: str) -> None:
        """``call(*args)`` on the output, unless it failed before: a failure is one OutputError."""
        if self.failed is not None:
            return
        try:
            call(*args)
        except BrokenPipeError:
            raise  # the reader went away (`| head`): the CLI stops quietly
        except OSError as exc:
            self.failed = exc
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def sink(self, flow: Flow) -> Callable[[Message], None]:
        """The message writer of one flow, for FlowTable(message_sink=...): each message as the
        same bytes as ``_dumps(message_record(flow, msg))``, built without the dict.

        One record is written per IMAP line, so this is the hottest path of a replay: the
        flow's part of the record is made once, and with the C formatter a message costs one
        C call and no Python frame.
        """
        return partial(self._emit, _flow_prefix(flow))

    def _message_py(self, prefix: str, msg: Message) -> None:
        """`_emit` without the C formatter: the same characters."""
        ts = msg[0]
        if ts != self._ts:  # the lines of one segment share its time: format it once
            self._ts = ts
            self._ts_text = f'{{"type":"message","ts":{ts!r},'
        from_kind = (_FROM_CLIENT if msg[1] is _CLIENT else _FROM_SERVER)[msg[2]._value_]
        self._append(self._ts_text + prefix + from_kind + _message_rest(msg))
        if len(self._lines) >= _BATCH:
            self._drain()

    def flow_end(self, flow: Flow) -> None:
        self.write(flow_line(flow) + "\n")

    def stats(self, record: dict[str, Any]) -> None:
        self.write(_dumps({"type": "stats", **record}) + "\n")

    def flush(self) -> None:
        self._drain()
        self._output(self.out.flush)
