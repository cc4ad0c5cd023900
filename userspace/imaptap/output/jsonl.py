"""JSON Lines output: one object per IMAP line, per flow at its end, and stats at the end.

The keys are a contract that log pipelines and the tests rely on (README, "JSON Lines"),
declared once: a message record is a `Message` with its flow's id and endpoints, a flow record
is a `FlowFacts`.  `message_record` and `FlowFacts.record` give them as dicts, the reference;
the lines are written without the dicts, by the C formatter where it was built and by
json's encoder otherwise, and tests check them against the reference byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache, partial
from typing import IO, TYPE_CHECKING, Any, ForwardRef, Protocol

from imaptap.facts import FlowFacts, endpoint, flow_facts
from imaptap.imap.session import MESSAGE_OPTIONAL_FIELDS, Kind, Message, Side
from imaptap.output import OutputError
from imaptap.pipeline import Sink

if TYPE_CHECKING:
    from imaptap.flows import Flow
    from imaptap.pipeline import Pipeline

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
# The C string encoder json itself uses for ensure_ascii=False (quotes, escapes, no ASCII-fication).
_quote = json.encoder.encode_basestring

try:  # the C accelerator of the message line (setup.py builds it where it can)
    import imaptap.output._jsonfast as _jsonfast
except ImportError:  # pragma: no cover - the build is optional
    _jsonfast = None


class FlowRef(Protocol):
    """What a message record takes from its flow: a `Flow`, or what the TUI keeps of one."""

    @property
    def id(self) -> int: ...
    @property
    def client(self) -> tuple[str, int]: ...
    @property
    def server(self) -> tuple[str, int]: ...


#: JSON keys of the Message fields that are not named as the field is.
_MESSAGE_KEYS = {"side": "from"}
#: The Message fields after ts, side and kind, as written: always, then only when they hold something.
_ALWAYS = tuple(f for f in Message._fields[3:] if f not in MESSAGE_OPTIONAL_FIELDS)
_SOMETIMES = MESSAGE_OPTIONAL_FIELDS


def message_record(flow: FlowRef, msg: Message) -> dict[str, Any]:
    """The JSON message record of ``msg`` as a dict: the reference that every writer of message
    lines is checked against (its ``_dumps`` is the line)."""
    rec: dict[str, Any] = {"type": "message", "ts": msg.ts, "flow": flow.id, "client": endpoint(flow.client),
                           "server": endpoint(flow.server), _MESSAGE_KEYS["side"]: msg.side.value,
                           "kind": msg.kind.value}
    for name in _ALWAYS:
        rec[_MESSAGE_KEYS.get(name, name)] = getattr(msg, name)
    for name in _SOMETIMES:
        value = getattr(msg, name)
        if value or (value is not None and value is not False and value != ()):
            rec[name] = list(value) if isinstance(value, tuple) else value
    return rec


def flow_record(flow: Flow) -> dict[str, Any]:
    """The JSON flow record of ``flow`` now, as a dict."""
    return flow_facts(flow).record()


# --- flow lines: FlowFacts written field by field, each by an encoder for its declared type ----

_JSON_OPTIONAL_BOOL = {None: "null", True: "true", False: "false"}


def _strings(items: tuple[str, ...]) -> str:
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


def _object(d: dict | None) -> str:
    return "null" if d is None else _dumps(d)


def _attempt(a: Any) -> str:
    """One login attempt as ``_dumps(a.record())`` writes it, without json's encoder."""
    return (f'{{"command":{_quote(a.command)},"mechanism":{_quote(a.mechanism)},"user":{_optional(a.user)},'
            f'"password_hmac":{_optional(a.password_hmac)},"ok":{_JSON_OPTIONAL_BOOL[a.ok]}}}')


def _attempts(attempts: tuple) -> str:
    return "[" + ",".join([_attempt(a) for a in attempts]) + "]"


@lru_cache(maxsize=256)
def _record_or_null(value: Any) -> str:
    """A record-like value (a client guess) or null: the same few come again flow after flow."""
    return "null" if value is None else _dumps(value.record())


#: The encoder of each type a FlowFacts field is declared with.
_ENCODERS: dict[str, Callable[[Any], str]] = {
    "int": str,
    "float": _float,
    "str": _quote,
    "str | None": _optional,
    "bool": _JSON_OPTIONAL_BOOL.__getitem__,
    "bool | None": _JSON_OPTIONAL_BOOL.__getitem__,
    "tuple[str, ...]": _strings,
    "dict[str, int]": _counts,
    "dict[str, str | None] | None": _object,
    "tuple[LoginAttempt, ...]": _attempts,
    "ClientGuess | None": _record_or_null,
}
#: Fields whose values repeat from flow to flow: a cached encoder.
_ENCODER_OF_FIELD: dict[str, Callable[[Any], str]] = {"capabilities": _capabilities}


def _declared(hint: Any) -> str:
    """A field's type as written: facts.py postpones annotations, which NamedTuple keeps as ForwardRefs."""
    return hint.__forward_arg__ if isinstance(hint, ForwardRef) else hint


_FLOW_FIELDS = tuple((f'"{name}":', _ENCODER_OF_FIELD.get(name) or _ENCODERS[_declared(hint)])
                     for name, hint in FlowFacts.__annotations__.items())



def _c_flow_fields() -> tuple[tuple[str, int, Callable[[Any], str]], ...]:
    """_FLOW_FIELDS for the C formatter: each key with the comma before it, and the code of its
    encoder where the C side writes that encoder's values itself (FLOW_CALL: it calls it).
    `_capabilities` is called: its cache has the text of the few lists servers send, which
    writing the twenty-odd names again would cost more than the call."""
    if _jsonfast is None:
        return ()
    known: dict[Callable[[Any], str], int] = {
        str: _jsonfast.FLOW_INT, _float: _jsonfast.FLOW_FLOAT, _quote: _jsonfast.FLOW_STR,
        _optional: _jsonfast.FLOW_OPTIONAL_STR, _JSON_OPTIONAL_BOOL.__getitem__: _jsonfast.FLOW_BOOL,
        _strings: _jsonfast.FLOW_STRINGS, _counts: _jsonfast.FLOW_COUNTS, _object: _jsonfast.FLOW_OPTIONAL,
        _record_or_null: _jsonfast.FLOW_OPTIONAL,
    }
    return tuple((("," if i else "") + key, known.get(encode, _jsonfast.FLOW_CALL), encode)
                 for i, (key, encode) in enumerate(_FLOW_FIELDS))


_C_FLOW_FIELDS = _c_flow_fields()

_FLOW_PREFIX = '{"type":"flow",'


def flow_line(facts: FlowFacts, prefix: str = _FLOW_PREFIX) -> str:
    """The JSON line of a flow record: the same bytes as ``_dumps(facts.record())``, built
    without the dict and json's encoder, which took 20 µs a flow, a twentieth of a replay; in C
    where it was built (the Python below took 17 µs a flow, a tenth of a replay).
    ``prefix``: what comes before the flow's keys (another record type, `flow_update_line`)."""
    if _jsonfast is not None:
        return _jsonfast.flow_line(prefix, facts, _C_FLOW_FIELDS)
    # The keys come from the annotations, the values from the tuple: if those ever disagree,
    # fail rather than write values under the wrong keys.
    pairs = zip(_FLOW_FIELDS, facts, strict=True)
    return prefix + ",".join([key + encode(value) for (key, encode), value in pairs]) + "}"


#: The record type of an open flow's interim record (--flow-interval).
FLOW_UPDATE = "flow_update"


def flow_update_record(facts: FlowFacts, ts: float) -> dict[str, Any]:
    """The JSON record of an open flow at ``ts`` as a dict: the flow record's keys after
    ``"type": "flow_update"`` and ``ts``, ``end`` null."""
    return {"type": FLOW_UPDATE, "ts": ts, **{k: v for k, v in facts.record().items() if k != "type"}}


def flow_update_line(facts: FlowFacts, ts: float) -> str:
    """The JSON line of `flow_update_record`, the same bytes as ``_dumps`` of it."""
    return flow_line(facts, f'{{"type":"{FLOW_UPDATE}","ts":{_float(ts)},')


#: Lines queued before one write to the output.
_BATCH = 256

_CLIENT = Side.CLIENT
_FROM_CLIENT = {kind.value: f'"from":"client","kind":"{kind.value}",' for kind in Kind}
_FROM_SERVER = {kind.value: f'"from":"server","kind":"{kind.value}",' for kind in Kind}
#: The keys of the Message fields after ts, side and kind, as the C formatter writes them.
_C_KEYS = tuple(("" if i == 0 else ",") + f'"{_MESSAGE_KEYS.get(name, name)}":'
                for i, name in enumerate(Message._fields[3:]))


def _flow_prefix(flow: FlowRef) -> str:
    return f'"flow":{flow.id},"client":{_quote(endpoint(flow.client))},"server":{_quote(endpoint(flow.server))},'


class JsonlWriter:
    """Writes records to a text stream, one JSON object per line."""

    def __init__(self, out: IO[str], name: str = "the output", opener: Callable[[], IO[str]] | None = None) -> None:
        self.out = out
        self.name = name
        self.opener = opener
        """Opens the output anew at its path (`reopen`); None for a stream such as stdout."""
        self.failed: OSError | None = None
        """The error that stopped the output: later records are dropped, not retried."""
        self._lines: list[str] = []
        self._append = self._lines.append
        self._formatter = None
        """The C formatter of message lines, where it was built."""
        if _jsonfast is not None:
            kinds = tuple((kind, _FROM_CLIENT[kind.value], _FROM_SERVER[kind.value]) for kind in Kind)
            self._formatter = _jsonfast.Formatter(self._lines, self._drain, _BATCH, _CLIENT, kinds, _C_KEYS)

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

    def sink(self, flow: FlowRef) -> Callable[[Message], None]:
        """The message writer of one flow, for FlowTable(message_sink=...): each message as the
        bytes of ``_dumps(message_record(flow, msg))``.

        One record is written per IMAP line, so this is the hottest path of a replay: with the
        C formatter the flow's part of the line is made once, and a message costs one C call
        and no Python frame.
        """
        if self._formatter is not None:
            return partial(self._formatter.message, _flow_prefix(flow))
        return partial(self._message, flow)

    def _message(self, flow: FlowRef, msg: Message) -> None:
        """A message line without the C formatter: json's encoder over the reference record."""
        self.write(_dumps(message_record(flow, msg)) + "\n")

    def flow_end(self, facts: FlowFacts) -> None:
        self.write(flow_line(facts) + "\n")

    def flow_update(self, facts: FlowFacts, ts: float) -> None:
        self.write(flow_update_line(facts, ts) + "\n")

    def reopen(self) -> None:
        """Go on in the output opened anew (logrotate moved it away): every line queued so far
        goes to the old file, which is flushed and closed; OSError leaves the old one in use."""
        if self.opener is None or self.failed is not None:
            return
        new = self.opener()
        try:
            self.flush()
        except BaseException:
            new.close()
            raise
        old, self.out = self.out, new
        self._output(old.close)

    def stats(self, record: dict[str, Any]) -> None:
        self.write(_dumps({"type": "stats", **record}) + "\n")

    def flush(self) -> None:
        self._drain()
        self._output(self.out.flush)


#: Seconds a live capture's records may wait in the writer's batch and the file's buffer: a log
#: shipper (or ``| jq``) sees each record within this, on a quiet host too.  A replay flushes
#: only as buffers fill, which is what makes it fast.
LIVE_FLUSH_INTERVAL = 1.0


class JsonlSink(Sink):
    """The pipeline's JSON Lines output: message records as they come (unless ``messages`` is
    false, as with --flows-only) and a flow record as each flow ends."""

    def __init__(self, writer: JsonlWriter, messages: bool = True) -> None:
        self.writer = writer
        self.messages = messages
        self._next_flush = 0.0

    def tick(self, pipeline: Pipeline) -> None:
        if not pipeline.source.live:
            return
        now = pipeline.clock()
        if now >= self._next_flush:
            self._next_flush = now + LIVE_FLUSH_INTERVAL
            self.writer.flush()

    def flow_started(self, flow: Flow) -> Callable[[Message], None] | None:
        return self.writer.sink(flow) if self.messages else None

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.writer.flow_end(facts)

    def flow_update(self, flow: Flow, facts: FlowFacts, ts: float) -> None:
        self.writer.flow_update(facts, ts)

    def stats(self, record: dict[str, Any]) -> None:
        """The final stats record."""
        self.writer.stats(record)
