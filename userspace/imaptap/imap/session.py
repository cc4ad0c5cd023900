"""An IMAP connection's state: both directions' lines in, facts and message events out.

The session owns the two `ImapStream`s, so it can switch both to encrypted after a completed
STARTTLS and to compressed after COMPRESS DEFLATE, at the exact byte where that happens.  It
matches tagged completions to requests, follows LOGIN and AUTHENTICATE for the user name and
the outcome, and never keeps a password or a SASL response in anything it outputs.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple

from imaptap.findings import Finding
from imaptap.imap import parse, sasl, software
from imaptap.imap.anomalies import Anomaly, StreamAnomaly, stream_anomaly_key
from imaptap.imap.audit import SessionAudit
from imaptap.imap.parse import RawLine, text
from imaptap.imap.stream import ImapStream
from imaptap.segment import FlowKey, PayloadMode, PayloadPolicy

#: Characters of arguments or response text shown per message; the rest is cut with "…".
DISPLAY_CAP: Final = 512
#: Requests waiting for their tagged completion; a client that never gets answers cannot grow it.
MAX_PENDING: Final = 64
#: Characters of SELECT/EXAMINE targets kept per flow, in order; later ones are counted in
#: ``mailboxes_dropped``.  Every per-flow store has such a bound, so that a hostile client
#: cannot make one flow hold more than a few tens of KB (MAX_FLOWS of them must fit in memory).
MAILBOX_BUDGET: Final = 4096
#: Characters kept of one mailbox name.
MAX_MAILBOX_NAME: Final = 256
#: Longest tag kept as it is; a longer one is kept as its start and a hash (still matched).
MAX_TAG: Final = 64
#: Distinct command names counted per flow; further names are counted as "OTHER".
MAX_COMMAND_NAMES: Final = 64
#: Longest command name taken as a command at all.
MAX_COMMAND_NAME: Final = 32
#: Characters kept of a user name.
MAX_USERNAME: Final = 256

MASK: Final = "***"
#: Messages of a flow not yet confirmed as IMAP that are held back until it is (then released in
#: order) or until it ends unconfirmed (then dropped): a server confirms within its first line as
#: a rule, so this only fills on one-sided captures and on other protocols on a watched port.
#: Past it, a flow whose server has sent nothing is judged by its client's lines (a one-sided
#: capture), and otherwise further messages are dropped and counted (``held_dropped``).
MAX_HELD_MESSAGES: Final = 256

#: Credentials kept per flow, as they crossed the wire, so that ``-w`` can blank them in the
#: pcap it writes (`capture.pcapwrite.MaskingWriter`); the newest, each at most MAX_SECRET bytes.
MAX_SECRETS: Final = 8
MAX_SECRET: Final = 1024


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Kind(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"
    UNTAGGED = "untagged"
    CONTINUATION = "continuation"


class StartTls(enum.Enum):
    NONE = "none"
    OFFERED = "offered"
    REQUESTED = "requested"
    COMPLETED = "completed"
    REFUSED = "refused"


class Message(NamedTuple):
    """One IMAP line (with its literals) as seen on the wire, secrets masked: a JSON message
    record (README, "JSON Lines") once its flow's id and endpoints are added.

    Made through the constructors below, one per kind of line; they build the tuple with
    ``tuple.__new__``, skipping the NamedTuple's Python-level ``__new__``: one is made per IMAP
    line, the hottest object of a replay.
    """

    ts: float
    side: Side
    kind: Kind
    tag: str | None = None
    command: str | None = None
    """Upper case; for a tagged completion, the command it completes."""
    args: str | None = None
    status: str | None = None
    code: str | None = None
    """Response code without brackets, e.g. ``CAPABILITY IMAP4rev1 ...``."""
    text: str | None = None
    latency_ms: float | None = None
    literals: tuple[int, ...] = ()
    """Sizes of the literals the line carried."""
    number: int | None = None
    """The message number of ``* n EXISTS`` / ``* n FETCH``."""
    truncated: bool = False
    """The line was longer than what is kept of it, or not all of it was captured."""

    @staticmethod
    def request(ts: float, tag: str, command: str, args: str | None, literals: tuple[int, ...],
                truncated: bool) -> Message:
        """A client's command."""
        return _new(Message, (ts, _CLIENT, _REQUEST, tag, command, args, None, None, None, None, literals, None,
                              truncated))

    @staticmethod
    def response(ts: float, tag: str, command: str | None, status: str, code: str | None, text: str | None,
                 latency_ms: float | None, literals: tuple[int, ...], truncated: bool) -> Message:
        """A tagged completion; ``command`` and ``latency_ms`` where its request was seen."""
        return _new(Message, (ts, _SERVER, _RESPONSE, tag, command, None, status, code, text, latency_ms, literals,
                              None, truncated))

    @staticmethod
    def untagged_status(ts: float, status: str, code: str | None, text: str | None, literals: tuple[int, ...],
                        truncated: bool) -> Message:
        """``* OK``, ``* NO``, ``* BAD``, ``* BYE``, ``* PREAUTH``."""
        return _new(Message, (ts, _SERVER, _UNTAGGED_KIND, None, None, None, status, code, text, None, literals, None,
                              truncated))

    @staticmethod
    def untagged_data(ts: float, name: str, args: str | None, literals: tuple[int, ...], number: int | None,
                      truncated: bool) -> Message:
        """Untagged data such as ``* CAPABILITY ...`` or ``* 3 FETCH ...``; ``command`` is its name."""
        return _new(Message, (ts, _SERVER, _UNTAGGED_KIND, None, name, args, None, None, None, None, literals, number,
                              truncated))

    @staticmethod
    def server_continuation(ts: float, text: str | None, truncated: bool) -> Message:
        """``+ ...``: the server waits for a literal or a SASL response."""
        return _new(Message, (ts, _SERVER, _CONTINUATION, None, None, None, None, None, text, None, (), None,
                              truncated))

    @staticmethod
    def client_continuation(ts: float, *, command: str | None = None, args: str | None = None,
                            text: str | None = None, truncated: bool = False) -> Message:
        """What a client sends that is not a command: ``DONE`` after IDLE, a SASL response
        (``args`` masked), ``*`` cancelling an exchange (``text``)."""
        return _new(Message, (ts, _CLIENT, _CONTINUATION, None, command, args, None, None, text, None, (), None,
                              truncated))


#: Message fields a JSON record carries only when they hold something (non-empty, not None,
#: true); every other field is always written.
MESSAGE_OPTIONAL_FIELDS: Final = ("literals", "number", "truncated")

_new: Final = tuple.__new__
# The members the per-line paths use, as module constants: reading ``Kind.UNTAGGED`` goes
# through the enum's metaclass and costs five times a global.
_CLIENT: Final = Side.CLIENT
_SERVER: Final = Side.SERVER
_REQUEST: Final = Kind.REQUEST
_RESPONSE: Final = Kind.RESPONSE
_UNTAGGED_KIND: Final = Kind.UNTAGGED
_CONTINUATION: Final = Kind.CONTINUATION
_STARTTLS_REQUESTED: Final = StartTls.REQUESTED


class _Pending:
    """A command waiting for its completion (made positionally: one a command).

    A plain class rather than a dataclass: a dataclass's generated ``__init__`` is Python code
    even where mypyc compiles the class, and it ran once per command."""

    __slots__ = ("command", "ts", "mechanism", "waited_on_client", "known", "out_of_state")

    command: str
    ts: float
    mechanism: str | None
    waited_on_client: bool
    """The server asked the client for more (IDLE, a SASL step) after this command was sent, so
    its completion times the client's waits too, not the server alone."""
    known: bool
    """An IMAP command (RFC 3501/9051, an extension, UID ..., X...): its completion confirms IMAP."""
    out_of_state: bool
    """LOGIN or AUTHENTICATE sent when already authenticated: no login attempt, whatever the
    server answers (a BAD, RFC 3501 section 6.2)."""

    def __init__(self, command: str, ts: float, mechanism: str | None = None, waited_on_client: bool = False,
                 known: bool = False, out_of_state: bool = False) -> None:
        self.command = command
        self.ts = ts
        self.mechanism = mechanism
        self.waited_on_client = waited_on_client
        self.known = known
        self.out_of_state = out_of_state


@dataclass(slots=True)
class _Sasl:
    tag: str
    mechanism: str
    step: int = 0
    counts: bool = True
    """A login attempt (not an AUTHENTICATE sent in the authenticated state): its identity is
    the flow's user."""


_CRED_COMMANDS: Final = frozenset({"LOGIN", "AUTHENTICATE"})
#: Commands only an authenticated session may issue (RFC 3501 6.3, 6.4).
_AUTHENTICATED_COMMANDS: Final = frozenset(
    """SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND NAMESPACE
    ENABLE IDLE CHECK CLOSE EXPUNGE SEARCH FETCH STORE COPY MOVE UNSELECT GETQUOTA GETQUOTAROOT""".split()
) | {"UID " + c for c in ("FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE")}
#: Commands a client sends around its login to learn about the server and open a mailbox: any
#: other command after the login (FETCH, SEARCH, IDLE, APPEND ...) works on messages and ends
#: the handshake, the stretch the capture copies with the handshake snap length
#: (`PayloadMode.HANDSHAKE`).  Their answers are the long lines: capabilities, ID, SELECT's data.
HANDSHAKE_COMMANDS: Final = frozenset(
    {"CAPABILITY", "ID", "ENABLE", "NAMESPACE", "LIST", "LSUB", "XLIST", "STATUS", "SELECT", "EXAMINE"}
) | _CRED_COMMANDS
#: Commands whose tagged completion changes the session's state.
_STATE_COMMANDS: Final = _CRED_COMMANDS | {"STARTTLS", "COMPRESS", "IDLE", "UNAUTHENTICATE"}
_TAGGED_STATUS: Final = {b"OK": "OK", b"NO": "NO", b"BAD": "BAD"}
_STATUSES: Final = parse.STATUSES
#: The response names a greeting may have (RFC 3501 section 7.1, greeting).
_GREETING_NAMES: Final = frozenset({b"OK", b"PREAUTH", b"BYE"})


def _greets(head: bytes) -> bool:
    """A server line that can be a greeting: ``* OK``, ``* PREAUTH`` or ``* BYE``."""
    if head[:2] != b"* ":
        return False
    sp = head.find(b" ", 2)
    return (head[2:] if sp < 0 else head[2:sp]).upper() in _GREETING_NAMES
#: An untagged response: "* ", a message number, the response name, " " and the rest, as a
#: pattern (with re.S): the grammar _untagged follows by hand (tests/unit/imap/test_session.py
#: matches with it and compares).
UNTAGGED_GRAMMAR: Final = rb"\* (?:(\d{1,10}) )?([A-Za-z][A-Za-z0-9.\-]{0,63})(?: (.*))?$"
_WORD_BYTES: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"
#: Response names seen (as sent -> upper case): a few dozen in practice, checked once each.
_UNTAGGED_NAMES_KEPT: Final = 1024
_untagged_names: Final[dict[bytes, str]] = {}
#: Untagged data responses with a message number (RFC 3501, 9051).
_NUMBERED_DATA: Final = frozenset({"EXISTS", "RECENT", "EXPUNGE", "FETCH"})
#: Untagged data responses without one, from RFC 3501/9051 and the common extensions.
_UNTAGGED_DATA: Final = frozenset(
    """CAPABILITY LIST LSUB STATUS SEARCH ESEARCH FLAGS ID ENABLED NAMESPACE QUOTA QUOTAROOT ACL
    LISTRIGHTS MYRIGHTS METADATA SORT THREAD VANISHED XLIST LANGUAGE COMPARATOR CONVERTED
    GENURLAUTH URLFETCH ANNOTATION""".split()
)


def _tag(raw: bytes) -> str:
    """A tag as kept and shown: whole up to MAX_TAG, else its start and a hash of all of it."""
    if len(raw) <= MAX_TAG:
        return raw.decode("latin-1")
    import hashlib  # here, not at the top: it loads OpenSSL, a tenth of the start-up, for a rare case

    return raw[: MAX_TAG - 17].decode("latin-1") + "~" + hashlib.blake2b(raw, digest_size=8).hexdigest()


def _sizes(line: RawLine) -> tuple[int, ...]:
    literals = line.literals
    if not literals:
        return ()
    if len(literals) == 1:  # nearly always: a FETCH body, an APPEND, a LOGIN argument
        return (literals[0].size,)
    return tuple([lit.size for lit in literals])


def _shown(data: bytes) -> str:
    """Network bytes as shown in a message: decoded without loss, cut at `DISPLAY_CAP`."""
    s = data.decode("utf-8", "backslashreplace")
    return s if len(s) <= DISPLAY_CAP else s[:DISPLAY_CAP] + "…"


def _clip(s: str | None) -> str | None:
    if s is None or len(s) <= DISPLAY_CAP:
        return s
    return s[:DISPLAY_CAP] + "…"


class _Counts(Counter):
    """A Counter whose making and first counts run no Python code: Counter's own __init__ and
    __missing__ are Python functions, run three times a flow and at every name's first count
    (``__init__ = dict.__init__`` would do for the first, but mypyc drops such an assignment)."""

    def __init__(self) -> None:
        pass  # dict.__new__ made it empty

    def __missing__(self, key: str) -> int:
        return 0  # as Counter's: nothing stored


class _NoCounts(_Counts):
    """The counts of a session that has counted nothing yet: one shared by every such session
    (an empty Counter is 88 bytes, three a flow), so it refuses to be written; a session puts a
    Counter of its own in its place at its first count."""

    def __setitem__(self, key: str, value: int) -> None:
        raise TypeError("the shared empty counts are read-only: the session makes its own first")


_NO_COUNTS: Final[Counter[str]] = _NoCounts()
#: A session's lists before their first item: one empty tuple shared by all (an empty list is
#: 56 bytes, and most flows never fill most of them); the session makes a list at the first.
_NONE: Final[tuple[()]] = ()
#: A session's requests waiting for their completion before the first: shared and only read
#: (the one place that adds a request makes the session's own dict first).
_NO_PENDING: Final[dict[str, _Pending]] = {}


class ImapSession:
    """Both directions of one IMAP connection, with the facts learnt so far.

    One is kept per open flow, up to --max-flows of them, most of them idle: so it has slots,
    not a dict, keeps no bound method or closure, and makes its counters, lists and the audit's
    lists only when it first has something to put in them.
    """

    __slots__ = (
        "on_payload_mode", "_policy", "_policy_key", "now", "client", "server", "is_imap", "_sink", "on_message",
        "_held", "held_dropped", "server_from_start", "_refuted", "_client_commands", "_client_junk", "greeting",
        "server_software", "server_product", "server_version", "preauth", "username", "authzid", "auth_mechanism",
        "auth_command", "login_ok", "login_failures", "capabilities", "starttls", "encrypted",
        "encrypted_from_start", "compressed", "cleartext_credentials", "secrets", "client_id", "server_id",
        "mailboxes", "mailboxes_dropped", "_mailbox_chars", "commands", "statuses", "anomalies", "idles",
        "last_command", "last_status", "last_latency_ms", "latency_timed_server", "completion_out_of_state",
        "handshake_done", "_pending", "_sasl", "_attempt_user", "_idle_tag", "_login_tag", "_authenticated",
        "_early", "_utf8_names", "_client_lines", "_server_lines", "audit",
    )

    def __init__(
        self,
        on_message: Callable[[Message], None] | None = None,
        on_payload_mode: Callable[[PayloadMode], None] | None = None,
        password_fingerprint: Callable[[bytes], str] | None = None,
        policy: PayloadPolicy | None = None,
        policy_key: FlowKey | None = None,
    ) -> None:
        self.on_payload_mode = on_payload_mode
        """Told each payload mode the session asks the capture for; instead, with ``policy``,
        ``policy.set(policy_key, mode)`` is called (the flow table's way: no callable a flow)."""
        self._policy = policy
        self._policy_key = policy_key
        self.now = 0.0
        # the streams call the session's methods with the session: no bound method kept per flow
        self.client = ImapStream(self, ImapSession._client_line, ImapSession._client_anomaly,
                                 ImapSession._tls_from_start, server=False)
        self.server = ImapStream(self, ImapSession._server_line, ImapSession._server_anomaly,
                                 ImapSession._tls_from_start)

        self.is_imap = False
        """Confirmed by the server (a greeting, a tagged completion of a command the client sent,
        a continuation the client waited for, or an untagged response IMAP defines), or, where
        no server byte was captured, by the client's commands alone (`finish`)."""
        self._sink = on_message
        self.on_message: Callable[[Message], None] | None = None
        """Where this line's message goes: the sink once confirmed, `_hold` until then."""
        self._held: list[Message] | tuple[()] = _NONE
        self.held_dropped = 0
        """Messages not held for want of room (MAX_HELD_MESSAGES) before the flow was confirmed."""
        self.server_from_start = False
        """The capture saw the server's SYN: its first line is the first it sent (the flow table
        says so)."""
        self._refuted = False
        """Seen from its start, the server's first line was not a greeting: not IMAP, whatever
        follows (an IMAP server greets first, RFC 3501 section 7.1)."""
        self._client_commands = 0
        """Client lines that were IMAP commands (a known name after a valid tag)."""
        self._client_junk = 0
        """Client lines that were not: no command, or a name IMAP does not define."""
        self.set_message_sink(on_message)
        self.greeting: str | None = None
        self.server_software: str | None = None
        self.server_product: str | None = None
        self.server_version: str | None = None
        self.preauth = False
        self.username: str | None = None
        self.authzid: str | None = None
        self.auth_mechanism: str | None = None
        """``LOGIN`` for the LOGIN command, else the SASL mechanism of AUTHENTICATE."""
        self.auth_command: str | None = None
        self.login_ok: bool | None = None
        self.login_failures = 0
        self.capabilities: tuple[str, ...] = ()
        """The last capability list announced: a tuple shared by the flows that saw the same text."""
        self.starttls = StartTls.NONE
        self.encrypted = False
        self.encrypted_from_start = False
        self.compressed = False
        self.cleartext_credentials = False
        self.secrets: list[tuple[bytes, bytes]] | tuple[()] = _NONE
        """Passwords and SASL responses as they crossed the wire, each with what replaces it in
        a capture written to disk (as long, the user name kept in a SASL response): never
        output, only blanked."""
        self.client_id: dict[str, str | None] | None = None
        self.server_id: dict[str, str | None] | None = None
        self.mailboxes: list[str] | tuple[()] = _NONE
        self.mailboxes_dropped = 0
        self._mailbox_chars = 0
        self.commands: Counter[str] = _NO_COUNTS
        self.statuses: Counter[str] = _NO_COUNTS
        self.anomalies: Counter[str] = _NO_COUNTS
        self.idles = 0
        self.last_command: str | None = None
        self.last_status: str | None = None
        self.last_latency_ms: float | None = None
        self.latency_timed_server = False
        """The completion just handled was matched to its command and times the server alone:
        not IDLE, a SASL exchange or a refused literal, whose latency holds the client's waits.
        Set before its Message goes out, for the metrics' latency histogram."""
        self.completion_out_of_state = False
        """The completion just handled answers a LOGIN or AUTHENTICATE sent when already
        authenticated: no login attempt, so no login outcome (set before its Message goes out,
        for the metrics' login counts)."""
        self.handshake_done = False
        """Logged in (or PREAUTH), and the client sent a command outside `HANDSHAKE_COMMANDS`."""

        self._pending: dict[str, _Pending] = _NO_PENDING
        self._sasl: _Sasl | None = None
        self._attempt_user: str | None = None
        self._idle_tag: str | None = None
        self._login_tag: str | None = None
        self._authenticated = False
        """In the authenticated (or selected) state: after a login's OK or a PREAUTH greeting,
        until UNAUTHENTICATE (RFC 8437)."""
        self._early: tuple[bytes, str] | None = None
        """(tag, status) of a completion that came while its command was still arriving: a
        non-synchronising literal the server refused (RFC 7888 LITERAL-, BAD [TOOBIG])."""
        self._utf8_names = False
        """UTF8=ACCEPT (RFC 6855) or IMAP4rev2 (RFC 9051) enabled: mailbox names are UTF-8 as
        they stand, not modified UTF-7."""
        self._client_lines = 0
        self._server_lines = 0
        self.audit = SessionAudit(password_fingerprint)
        """The auditor's facts (imap/audit.py): fed at the lines marked ``audit``."""

    # --- facts derived on demand --------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """What a security reviewer wants at a glance, in a fixed order."""
        out = []
        if self.cleartext_credentials:
            out.append(Finding.CLEARTEXT_CREDENTIALS)
        if self.starttls is StartTls.OFFERED:
            out.append(Finding.STARTTLS_OFFERED_NOT_USED)
        elif self.starttls is StartTls.REFUSED:
            out.append(Finding.STARTTLS_REFUSED)
        if self.login_failures:
            out.append(Finding.FAILED_LOGINS)
        out.extend(self.audit.findings())  # audit
        return out

    # --- classification -----------------------------------------------------------------------

    def set_message_sink(self, sink: Callable[[Message], None] | None) -> None:
        """Where messages go (None: nobody wants them, so none are made); held until confirmed."""
        self._sink = sink
        if sink is None:
            self.on_message = None
        elif self.is_imap:
            self.on_message = sink
        else:
            self.on_message = self._hold

    def _hold(self, msg: Message) -> None:
        held = self._held
        if len(held) < MAX_HELD_MESSAGES:
            if isinstance(held, tuple):
                held = self._held = []
            held.append(msg)
            return
        if self._server_silent() and self._client_speaks_imap():
            # a one-sided capture: that many commands and not one byte from the server
            self._confirm()
        if self.is_imap and self._sink is not None:
            self._sink(msg)
        else:
            self.held_dropped += 1

    def _confirm(self) -> None:
        """The flow is IMAP (unless refuted): messages go to the sink from now on, the held ones
        first, in order."""
        if self._refuted:
            return
        self.is_imap = True
        sink = self._sink
        self.on_message = sink
        held, self._held = self._held, _NONE
        if sink is not None:
            for msg in held:
                sink(msg)

    def _server_silent(self) -> bool:
        server = self.server
        return server.bytes_seen == 0 and server.bytes_missed == 0

    def _client_silent(self) -> bool:
        client = self.client
        return client.bytes_seen == 0 and client.bytes_missed == 0

    def _awaits_continuation(self) -> bool:
        """The client waits for a ``+``: a synchronising literal, a SASL exchange or IDLE."""
        return self._sasl is not None or self._idle_tag is not None or self.client.waiting_for_literal

    def _client_speaks_imap(self) -> bool:
        """The client's lines read as IMAP: some commands, and more of them than other lines."""
        return self._client_commands > self._client_junk

    # --- helpers ------------------------------------------------------------------------------

    def _emit(self, msg: Message) -> None:
        if self.on_message is not None:
            self.on_message(msg)

    def _anomaly(self, anomaly: Anomaly) -> None:
        self._count_anomaly(anomaly.value)

    def _client_anomaly(self, anomaly: StreamAnomaly, detail: str) -> None:
        self._count_anomaly(stream_anomaly_key("client", anomaly))

    def _server_anomaly(self, anomaly: StreamAnomaly, detail: str) -> None:
        self._count_anomaly(stream_anomaly_key("server", anomaly))

    def _count_anomaly(self, name: str) -> None:
        anomalies = self.anomalies
        if anomalies is _NO_COUNTS:
            anomalies = self.anomalies = _Counts()
        anomalies[name] += 1

    def _tls_from_start(self) -> None:
        if not self.encrypted:
            self.encrypted = True
            self.encrypted_from_start = True
            self.client.start_encryption()
            self.server.start_encryption()
            self._set_payload_mode(PayloadMode.NONE)

    def _set_payload_mode(self, mode: PayloadMode) -> None:
        if self.on_payload_mode is not None:
            self.on_payload_mode(mode)
        elif self._policy is not None:
            assert self._policy_key is not None, "a policy comes with its flow's key"
            self._policy.set(self._policy_key, mode)

    def _try_user(self, user: str) -> None:
        self._attempt_user = user[:MAX_USERNAME]
        if not self.login_ok:
            self.username = self._attempt_user

    # --- client -------------------------------------------------------------------------------

    def _client_line(self, line: RawLine) -> None:
        self._client_lines += 1
        head = line.chunks[0]
        if self._sasl is not None:
            word = head.strip()
            if b" " not in word:
                self._sasl_response(line, word)
                return
            self._sasl = None  # the server's answer was never seen; this is a new command
        if self._idle_tag is not None and head.strip().upper() == b"DONE":
            self._emit(Message.client_continuation(self.now, command="DONE"))
            return
        tag_b, cmd, argpos = parse.command_words(head)
        if cmd is None or not parse.is_tag(tag_b) or len(cmd) > MAX_COMMAND_NAME:
            # Not a command: maybe a SASL response or password of a session seen from the
            # middle, mail text after a capture gap, or another protocol.  Counted, never shown.
            self._anomaly(Anomaly.BAD_REQUEST)
            self._client_junk += 1
            return
        tag = _tag(tag_b)
        self.audit.command(tag, cmd, self.starttls is _STARTTLS_REQUESTED)  # audit
        if cmd in parse.KNOWN_COMMANDS or cmd.startswith("UID "):
            known = True
            if not self.is_imap:  # counted only while they may still decide (a one-sided capture)
                self._client_commands += 1
        else:
            known = cmd.startswith("X")
            if not known:
                self._client_junk += 1
        commands = self.commands
        if commands is _NO_COUNTS:
            commands = self.commands = _Counts()
        if cmd in commands or len(commands) < MAX_COMMAND_NAMES:
            commands[cmd] += 1
        else:
            commands["OTHER"] += 1
        self.last_command = cmd
        if not self.handshake_done and cmd not in HANDSHAKE_COMMANDS and (self.login_ok or self.preauth):
            self.handshake_done = True
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
            self._anomaly(Anomaly.TOO_MANY_PENDING)
        out_of_state = False
        if cmd in _CRED_COMMANDS:
            out_of_state = self._authenticated
            pending = _Pending(cmd, self.now, None, False, known, out_of_state)
            if not out_of_state:
                if self._login_tag is not None and self._login_tag in self._pending:
                    self._lost_login_completion(cmd, "")
                self._login_tag = tag
        else:
            pending = _Pending(cmd, self.now, None, False, known)
        if self._pending is _NO_PENDING:
            self._pending = {}
        self._pending[tag] = pending

        args: str | None
        if cmd == "LOGIN":
            args = self._login(line, argpos, not out_of_state)
        elif cmd == "AUTHENTICATE":
            args = self._authenticate(line, argpos, tag, pending, not out_of_state)
        else:
            args = self._display_args(line, argpos) if known and self.on_message is not None else None
            if cmd == "STARTTLS":
                if self.starttls is not StartTls.COMPLETED:
                    self.starttls = StartTls.REQUESTED
            elif cmd == "COMPRESS":
                # Ask the capture for whole payloads now: the first compressed bytes follow the
                # server's OK within one round trip, too soon to wait for it.
                self._set_payload_mode(PayloadMode.WHOLE)
            elif cmd in ("SELECT", "EXAMINE"):
                toks = parse.tokens(line, 0, argpos)
                raw = parse.astring(toks[0]) if toks else None
                if raw is not None:
                    self._mailbox(text(raw) if self._utf8_names else parse.decode_mailbox(raw))
                    self.audit.mailbox(toks[0])  # audit
            elif cmd == "ID":
                self.client_id = parse.id_params(parse.tokens(line, 0, argpos))
            elif cmd == "IDLE":
                self._idle_tag = tag
                self.idles += 1
        early = self._early
        if early is not None and early[0] == tag_b:
            # answered before all of it arrived: the completion is already in
            self._early = None
            del self._pending[tag]
            if cmd in _STATE_COMMANDS and not out_of_state:
                self._completed(cmd, early[1])
        if self.on_message is not None:
            self.on_message(Message.request(self.now, tag, cmd, args, _sizes(line), line.truncated))

    def _mailbox(self, name: str) -> None:
        if len(name) > MAX_MAILBOX_NAME:
            name = name[:MAX_MAILBOX_NAME] + "…"
        if self._mailbox_chars + len(name) > MAILBOX_BUDGET:
            self.mailboxes_dropped += 1
            return
        self._mailbox_chars += len(name)
        mailboxes = self.mailboxes
        if isinstance(mailboxes, tuple):
            mailboxes = self.mailboxes = []
        mailboxes.append(name)

    def _display_args(self, line: RawLine, argpos: int) -> str | None:
        raw = line.chunks[0][argpos:]
        if len(line.chunks) > 1:
            raw = raw + b"".join(line.chunks[1:])
        return _shown(raw) if raw else None

    def _login(self, line: RawLine, argpos: int, counts: bool) -> str:
        """A LOGIN's facts (only when ``counts``: an attempt, not one sent when authenticated)
        and its arguments as shown."""
        toks = parse.tokens(line, 0, argpos)
        if counts:
            self.auth_command = "LOGIN"
            self.auth_mechanism = "LOGIN"
        user_raw = parse.astring(toks[0]) if toks else None
        # A cut line may have lost the end of the user name: only a token followed by another
        # one (the password) is known to be whole.
        shown: str | None
        if user_raw is not None and (len(toks) > 1 or not line.truncated):
            shown = text(user_raw)[:MAX_USERNAME]
            if counts:
                self._try_user(shown)
        else:
            shown = "?"
        if counts:
            self.audit.login(None if shown == "?" else shown, toks[0] if toks else None,  # audit
                             toks[1] if len(toks) > 1 else None)
        if len(toks) > 1:
            self.cleartext_credentials = True
            self._secret(toks[1])
        return f"{_quote(shown)} {MASK}"

    def _secret(self, tok: object) -> None:
        """Remember a password token in the forms it has on the wire."""
        if isinstance(tok, parse.Literal):
            self._keep_secret(bytes(tok.data), b"*" * len(tok.data))
        elif isinstance(tok, bytes):  # a quoted string, unescaped: also its quoted form
            quoted = b'"' + tok.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
            self._keep_secret(tok, b"*" * len(tok))
            # the quotes stay, so the blanked copy still holds a quoted string (the same facts)
            self._keep_secret(quoted, b'"' + b"*" * (len(quoted) - 2) + b'"')
        elif isinstance(tok, str):
            form = tok.encode("latin-1", "replace")
            self._keep_secret(form, b"*" * len(form))

    def _keep_secret(self, wire: bytes, blanked: bytes) -> None:
        if wire and len(wire) <= MAX_SECRET and all(wire != w for w, _ in self.secrets):
            secrets = self.secrets
            if isinstance(secrets, tuple):
                secrets = self.secrets = []
            secrets.append((wire, blanked))
            del secrets[:-MAX_SECRETS]

    def _authenticate(self, line: RawLine, argpos: int, tag: str, pending: _Pending, counts: bool) -> str:
        head = line.chunks[0]
        words = head[argpos:].split()
        mech = words[0].decode("latin-1").upper()[:64] if words else "?"
        if counts:
            self.auth_command = "AUTHENTICATE"
            self.auth_mechanism = mech
        pending.mechanism = mech
        # followed even when it does not count: its responses still hold secrets to mask
        self._sasl = _Sasl(tag, mech, counts=counts)
        if counts:
            self.audit.authenticate(mech, len(words) > 1)  # audit
        if len(words) > 1:
            self._sasl_data(words[1])
            return f"{mech} {MASK}"
        return mech

    def _sasl_data(self, word: bytes) -> None:
        exchange = self._sasl
        assert exchange is not None
        mech = exchange.mechanism
        decoded = sasl.b64(word)
        blanked = sasl.blanked_wire(mech, exchange.step, word, decoded)
        if blanked is not None:
            self._keep_secret(word, blanked)
        if decoded is not None and decoded and exchange.counts:
            who = sasl.identity(mech, exchange.step, decoded)
            if who.user:
                self._try_user(who.user)
            if who.user or who.authzid:
                self.authzid = who.authzid
        if decoded and mech in sasl.CLEARTEXT_MECHANISMS and (mech != "LOGIN" or exchange.step >= 1):
            self.cleartext_credentials = True  # readable on the wire, whether it counted or not
        if decoded and exchange.counts:
            self.audit.sasl(mech, exchange.step, decoded, self._attempt_user)  # audit
        if decoded is None:
            self._anomaly(Anomaly.BAD_SASL_RESPONSE)
        exchange.step += 1

    def _sasl_response(self, line: RawLine, word: bytes) -> None:
        if word == b"*":
            self._emit(Message.client_continuation(self.now, text="*"))
            return
        if not word:
            # an empty response: what SCRAM's client sends after the server-final message,
            # and what any mechanism sends for an empty challenge answer
            self._sasl_empty()
            return
        self._sasl_data(word)
        self._emit(Message.client_continuation(self.now, args=MASK, truncated=line.truncated))

    def _sasl_empty(self) -> None:
        exchange = self._sasl
        assert exchange is not None
        exchange.step += 1
        self._emit(Message.client_continuation(self.now))

    def _sasl_challenge(self, data: bytes) -> str:
        """A server continuation inside AUTHENTICATE as shown: a challenge that is a secret
        (SCRAM's server signature) is kept to be blanked and shown as ``***``."""
        exchange = self._sasl
        assert exchange is not None
        decoded = sasl.b64(data) if data else None
        if decoded and sasl.server_secret(exchange.mechanism, decoded):
            self._keep_secret(data.strip(), b"*" * len(data.strip()))
            return MASK
        return _shown(data)

    @property
    def server_secrets_pending(self) -> bool:
        """The server may send a secret next (a SCRAM exchange is under way): a capture written
        to disk holds its segments until they are analysed (`capture.pcapwrite.MaskingWriter`)."""
        return self._sasl is not None and sasl.is_scram(self._sasl.mechanism)

    # --- server -------------------------------------------------------------------------------

    def _server_line(self, line: RawLine) -> None:
        first = self._server_lines == 0
        self._server_lines += 1
        head = line.chunks[0]
        if first and self.server_from_start and not self.is_imap and not self.server.resyncs and not _greets(head):
            self._refuted = True
        if head[:2] == b"* ":
            self._untagged(line, head, first)
            return
        if head[:1] == b"+":
            if self.client.pending_head is None and self._pending:
                # Not a synchronising literal's go-ahead (that line is not complete, so its
                # command is not pending yet): the newest command now waits on the client.
                next(reversed(self._pending.values())).waited_on_client = True
            if not self.is_imap and head[1:2] in (b" ", b"") and self._awaits_continuation():
                self._confirm()
            data = head[1:].lstrip(b" ")
            shown = self._sasl_challenge(data) if self._sasl is not None else _shown(data)
            if self.on_message is not None:
                self.on_message(Message.server_continuation(self.now, shown, line.truncated))
            return
        tag_b, _, rest = head.partition(b" ")
        word, _, after = rest.partition(b" ")
        status = _TAGGED_STATUS.get(word.upper())
        if status is None or not parse.is_tag(tag_b):
            # Most often mail text: after a gap hid a literal's announcement, the stream
            # resynchronises inside the literal.  Counted, never shown as a response.
            self._anomaly(Anomaly.BAD_RESPONSE)
            return
        tag = _tag(tag_b)
        code, rest_text = parse.split_resp_text(after)
        pending = self._pending.pop(tag, None)
        early = False
        if pending is None:
            client_head = self.client.pending_head
            if client_head is not None and client_head.split(b" ", 1)[0] == tag_b and status != "OK":
                # A refused synchronising literal: its bytes will never come.
                self.client.cancel_literal()
                pending = self._pending.pop(tag, None)
                if pending is not None:
                    pending.waited_on_client = True  # completed the moment its line was
                else:
                    # A refused non-synchronising one (LITERAL-): its bytes come all the same,
                    # and the command is complete only after them.
                    self._early = (tag_b, status)
                    early = True
                    command_name = parse.command_words(client_head)[1] or "?"
                    pending = _Pending(command_name, self.now, None, True, command_name in parse.KNOWN_COMMANDS)
        if not self.is_imap and (pending.known if pending is not None else self._client_silent()):
            self._confirm()
        if code is not None:
            self._response_code(code, line.truncated and not rest_text)
        command = pending.command if pending else None
        latency = round((self.now - pending.ts) * 1000.0, 3) if pending and not early else None
        statuses = self.statuses
        if statuses is _NO_COUNTS:
            statuses = self.statuses = _Counts()
        statuses[status] += 1
        self.last_status = status
        if latency is not None:
            self.last_latency_ms = latency
        self.latency_timed_server = pending is not None and not pending.waited_on_client
        self.completion_out_of_state = pending is not None and pending.out_of_state
        if self._sasl is not None and self._sasl.tag == tag:
            self._sasl = None
        if self._login_tag is not None and self._login_tag != tag and pending is not None:
            self._lost_login_completion(command, status)
        if pending is not None and command in _STATE_COMMANDS and not pending.out_of_state and not early:
            self._completed(command, status)
        if self.on_message is not None:
            self.on_message(Message.response(self.now, tag, command, status, _clip(code), _shown(rest_text), latency,
                                             _sizes(line) if line.literals else (), line.truncated))

    def _lost_login_completion(self, command: str | None, status: str) -> None:
        """A later command was sent or completed while LOGIN/AUTHENTICATE's own completion was
        never seen (cut from the capture): what the later one implies about the login."""
        login_tag = self._login_tag
        assert login_tag is not None, "called only while a login is outstanding"
        if command in _CRED_COMMANDS:
            # nobody logs in again after a success: the earlier attempt failed
            self._pending.pop(login_tag, None)
            self._anomaly(Anomaly.LOGIN_COMPLETION_LOST)
            self._login_tag = None
            self.login_failures += 1
            if self.login_ok is None:
                self.login_ok = False
            self.audit.login_done(False)  # audit
        elif command in _AUTHENTICATED_COMMANDS and status == "OK":
            # only an authenticated session may do this: the login succeeded
            self._pending.pop(login_tag, None)
            self._anomaly(Anomaly.LOGIN_COMPLETION_LOST)
            self._login_tag = None
            self._completed("LOGIN", "OK")

    def _completed(self, command: str, status: str) -> None:
        """State changes that a tagged completion of ``command`` brings."""
        if command in _CRED_COMMANDS:
            self._login_tag = None
            self.audit.login_done(status == "OK")  # audit
            if status == "OK":
                self._authenticated = True
                self.login_ok = True
                if self._attempt_user is not None:
                    self.username = self._attempt_user
            else:
                self.login_failures += 1
                if self.login_ok is None:
                    self.login_ok = False
        elif command == "STARTTLS":
            if status == "OK":
                self.starttls = StartTls.COMPLETED
                self.encrypted = True
                self.client.start_encryption()
                self.server.start_encryption()
                self._set_payload_mode(PayloadMode.NONE)
            else:
                self.starttls = StartTls.REFUSED
        elif command == "COMPRESS":
            if status == "OK":
                self.compressed = True
                self.client.start_compression()
                self.server.start_compression()
            else:
                self._set_payload_mode(PayloadMode.PREFIX)
        elif command == "IDLE":
            self._idle_tag = None
        elif command == "UNAUTHENTICATE" and status == "OK":
            self._authenticated = False  # a new login may follow (RFC 8437)

    def _untagged(self, line: RawLine, head: bytes, first: bool) -> None:
        # UNTAGGED_GRAMMAR, by hand: matching the pattern was a tenth of this method
        sp = head.find(b" ", 2)
        word_b = head[2:] if sp < 0 else head[2:sp]
        number_b = None
        if word_b.isdigit():
            if len(word_b) > 10 or sp < 0:
                self._anomaly(Anomaly.BAD_UNTAGGED)
                return
            number_b = word_b
            start = sp + 1
            sp = head.find(b" ", start)
            word_b = head[start:] if sp < 0 else head[start:sp]
        upper = _untagged_names.get(word_b)
        if upper is None:
            if not word_b[:1].isalpha() or len(word_b) > 64 or word_b.translate(None, _WORD_BYTES):
                self._anomaly(Anomaly.BAD_UNTAGGED)
                return
            if len(_untagged_names) >= _UNTAGGED_NAMES_KEPT:
                _untagged_names.clear()
            upper = _untagged_names[word_b] = word_b.decode("latin-1").upper()
        after = b"" if sp < 0 else head[sp + 1 :]
        if number_b is None and upper in _STATUSES:
            code, rest_text = parse.split_resp_text(after)
            if code is not None:
                self._response_code(code, line.truncated and not rest_text)
            txt = text(rest_text)
            if not self.is_imap:
                self._confirm()
            if first and self._client_lines == 0 and upper in ("OK", "PREAUTH", "BYE"):
                self.greeting = txt[:DISPLAY_CAP]
                if upper != "BYE":
                    self.server_software, self.server_product, self.server_version = software.from_greeting(txt)
                if upper == "PREAUTH":
                    self.preauth = True
                    self._authenticated = True
            statuses = self.statuses
            if statuses is _NO_COUNTS:
                statuses = self.statuses = _Counts()
            statuses[upper] += 1
            if upper in ("BYE", "NO", "BAD"):
                self.last_status = upper
            if self.on_message is not None:
                self.on_message(Message.untagged_status(self.now, upper, _clip(code), _clip(txt),
                                                        _sizes(line) if line.literals else (), line.truncated))
            return
        if number_b is not None:
            if upper not in _NUMBERED_DATA:
                self._anomaly(Anomaly.UNKNOWN_UNTAGGED)
                return
            number = int(number_b)
            if not self.is_imap:
                self._confirm()
        else:
            # Mail text after a capture gap often starts with "* " (a bullet list): only
            # response names IMAP defines are taken as responses.
            if upper not in _UNTAGGED_DATA and not upper.startswith("X"):
                self._anomaly(Anomaly.UNKNOWN_UNTAGGED)
                return
            number = None
            if not self.is_imap and upper in _UNTAGGED_DATA:
                self._confirm()
            if upper == "CAPABILITY":
                self.capabilities = parse.capability_names(after, drop_last=line.truncated)
                self._offered()
            elif upper == "ENABLED":
                enabled = parse.capability_list(after)
                if "UTF8=ACCEPT" in enabled or "IMAP4REV2" in enabled:
                    self._utf8_names = True
            elif upper == "ID":
                self.server_id = parse.id_params(parse.tokens(line, 0, sp + 1 if sp >= 0 else len(head)))
                if self.server_id:
                    self._software_from_id(software.from_id(self.server_id))
        if self.on_message is not None:
            chunks, literals, truncated = line
            if len(chunks) > 1:
                after = after + b"".join(chunks[1:])
            self.on_message(Message.untagged_data(self.now, upper, _shown(after) if after else None,
                                                  _sizes(line) if literals else (), number, truncated))

    def _software_from_id(self, named: software.Software) -> None:
        """What the greeting did not name, from the ID answer: the product, and the version
        where the ID names the same product (or the greeting named none)."""
        if self.server_software is None:
            self.server_software = named.shown
        if self.server_product is None:
            self.server_product = named.product
        if self.server_version is None and named.product == self.server_product:
            self.server_version = named.version

    def _response_code(self, code: str, cut: bool) -> None:
        name, _, rest = code.partition(" ")
        if name.upper() == "CAPABILITY":
            self.capabilities = parse.capability_names(rest, drop_last=cut)
            self._offered()

    def _offered(self) -> None:
        self.audit.capabilities(self.capabilities)  # audit
        if "STARTTLS" in self.capabilities and self.starttls is StartTls.NONE:
            self.starttls = StartTls.OFFERED

    # --- end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """The connection is over: deliver any line still being collected, and where no server
        byte was captured (a one-sided capture) let the client's commands decide."""
        self.client.finish()
        self.server.finish()
        if not self.is_imap and self._server_silent() and self._client_speaks_imap():
            self._confirm()
        self._held = _NONE

    def release(self) -> None:
        """The flow has ended and been reported: drop what ties the session to itself (each
        stream's owner, the message sink, whose callables hold the flow), so that reference
        counting frees the flow at once.  Left in those cycles, every ended flow (with the
        inflaters of a compressed one, 40 KB each) waited for the cyclic collector's rare full runs."""
        self.client.owner = None
        self.server.owner = None
        self.set_message_sink(None)


def _quote(s: str | None) -> str:
    """A user name as it would appear in a LOGIN command."""
    if s is None:
        return "?"
    if s and all(c.isalnum() or c in "._@-+" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
