"""How flow facts look on screen: safe text, the flow table's cells, the details panel.

Everything that came from the network goes through `safe`: a ``rich.text.Text`` built without
markup, with control characters, bidi overrides and invisible characters shown as escapes
(``\\x1b``, ``\\u202e``).  A user name like ``[bold red]root[/]`` is shown as those 17
characters, and ``ESC ] 0 ; ... BEL`` never reaches the terminal.  Only this module and the
widgets turn facts into text; none of it imports Textual.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

from imaptap.text import UNSAFE, escape, plain
from imaptap.tui.feed import FlowSnapshot

#: How an escaped character is shown, so it cannot pass for the text around it.
ESCAPE_STYLE = "reverse"
STYLE_TLS = "bold green"
STYLE_DEFLATE = "bold magenta"
STYLE_CLEARTEXT = "bold red"
STYLE_FAILED = "red"
STYLE_ENDED = "dim"
STYLE_NONE = "dim"
STATUS_STYLES = {"OK": "green", "NO": "yellow", "BAD": "bold red", "BYE": "magenta", "PREAUTH": "cyan"}

# What is unsafe and how it is shown: imaptap.text, shared with the report.
_UNSAFE = UNSAFE


def safe(value: object, style: str = "") -> Text:
    """Network text as a Text that shows every character literally and sends no control code."""
    if value is None:
        return Text("")
    s = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(s) is None:
        return Text(s, style=style, end="")
    out = Text(style=style, end="")
    pos = 0
    for m in _UNSAFE.finditer(s):
        if m.start() > pos:
            out.append(s[pos : m.start()])
        out.append(escape(m.group()), ESCAPE_STYLE)
        pos = m.end()
    if pos < len(s):
        out.append(s[pos:])
    return out


# --- numbers and times ---------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``12s``, ``3m04s``, ``2h05m``, ``3d02h``: short enough for a narrow column."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def latency(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 10:
        return f"{ms:.2f}ms"
    if ms < 1000:
        return f"{ms:.1f}ms" if ms < 100 else f"{ms:.0f}ms"
    return f"{ms / 1000:.2f}s"


def count(n: int | float) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def size(n: int | None) -> str:
    if n is None:
        return "?"
    value: float = n
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


def timestamp(ts: float) -> str:
    """UTC with milliseconds: the same moment whatever the viewer's time zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d} UTC"


# --- the flow table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a `VirtualTable`: ``width`` cells, a share of the spare room, or less when narrow."""

    key: str
    label: str
    width: int
    flex: int = 0
    """Share of the room beyond every column's width."""
    min: int | None = None
    """Narrowest it gets before columns are dropped (default: ``width``)."""
    drop: int = 0
    """When even the narrowest widths do not fit, columns go highest ``drop`` first (0: never)."""
    right: bool = False
    """Right-aligned (numbers)."""

    @property
    def min_width(self) -> int:
        return self.width if self.min is None else self.min


FLOW_COLUMNS: tuple[Column, ...] = (
    Column("mark", "", 2),
    Column("client", "client", 21, flex=2),  # a whole IPv4 address and port
    Column("server", "server", 21, flex=2),
    Column("user", "user", 12, flex=2, min=8),
    Column("software", "server software", 15, flex=1, min=8, drop=5),
    Column("state", "state", 20, flex=3, min=12),
    Column("last", "last command", 14, flex=1, min=8, drop=3),
    Column("commands", "cmds", 5, right=True, drop=2),
    Column("failed", "fail", 4, right=True),
    Column("latency", "latency", 8, right=True, drop=4),
    Column("age", "age", 6, right=True, drop=1),
)
"""The main table; ``mark`` is ● for an open flow, ○ for an ended one, then ! when a password
or SASL secret crossed in clear (so it shows without colours too)."""


def user_of(snap: FlowSnapshot) -> str | None:
    return snap.facts.username


def state_parts(snap: FlowSnapshot) -> tuple[str, str | None, str, str]:
    """(words, network text or None, closing words, style) of the state column."""
    r = snap.facts
    user = r.username
    if r.encrypted:
        return ("TLS", None, "", STYLE_TLS)
    if r.compressed:
        return ("DEFLATE", None, "", STYLE_DEFLATE) if user is None else ("DEFLATE (", user, ")", STYLE_DEFLATE)
    cleartext = STYLE_CLEARTEXT if r.cleartext_credentials else ""
    if user is not None or r.login_ok is not None:
        if r.login_ok:
            word = "IMAP LOGIN"
        elif r.login_ok is False:
            if user is None:
                return ("LOGIN FAILED", None, "", STYLE_FAILED)
            return ("LOGIN FAILED (", user, ")", STYLE_FAILED)
        else:
            word = "IMAP LOGIN?"
        return (word, None, "", cleartext) if user is None else (word + " (", user, ")", cleartext)
    software = r.server_software
    if r.preauth:
        return ("IMAP PREAUTH", None, "", "") if software is None else ("IMAP PREAUTH (", software, ")", "")
    if r.greeting is not None:
        return ("IMAP OK", None, "", "") if software is None else ("IMAP OK (", software, ")", "")
    if r.imap:
        return ("IMAP", None, "", "")
    if r.end is not None and r.bytes:
        # it carried bytes and ended without the server ever answering as IMAP does
        return ("NOT IMAP", None, "", STYLE_NONE)
    return ("TCP", None, "", STYLE_NONE)


def state_text(snap: FlowSnapshot) -> Text:
    words, net, close, style = state_parts(snap)
    out = Text(words, style=style, end="")
    if net is not None:
        out.append_text(safe(net, style))
        out.append(close, style)
    return out


def state_plain(snap: FlowSnapshot) -> str:
    words, net, close, _ = state_parts(snap)
    return words if net is None else words + plain(net) + close


def age_seconds(snap: FlowSnapshot, now: float) -> float:
    """How long the flow has been open; for an ended flow, how long it lasted."""
    r = snap.facts
    end = r.last_ts if r.end is not None else max(now, r.last_ts)
    return end - r.first_ts


def flow_cells(snap: FlowSnapshot) -> list[Text]:
    """The cells of a flow's row except the age, which changes with the clock."""
    r = snap.facts
    ended = r.end is not None
    dim = STYLE_ENDED if ended else ""
    user_style = STYLE_CLEARTEXT if r.cleartext_credentials else ""
    last = Text(end="")
    if snap.last_command is not None:
        last.append_text(safe(snap.last_command))
    if snap.last_status is not None:
        if last:
            last.append(" ")
        last.append_text(safe(snap.last_status, STATUS_STYLES.get(snap.last_status, "")))
    commands = sum(r.commands.values())
    failures = r.login_failures
    return [
        Text.assemble(("○", "dim") if ended else ("●", "green"),
                      ("!", STYLE_CLEARTEXT) if r.cleartext_credentials else " ", end=""),
        Text(r.client, style=dim, end=""),
        Text(r.server, style=dim, end=""),
        safe(r.username, user_style),
        safe(r.server_software),
        state_text(snap),
        last,
        Text(f"{commands:,}" if commands else "", end=""),
        Text(str(failures) if failures else "", style=STYLE_FAILED if failures else "", end=""),
        Text(latency(snap.last_latency_ms), end=""),
    ]


def age_cell(snap: FlowSnapshot, now: float) -> Text:
    return Text(duration(age_seconds(snap, now)), style=STYLE_ENDED if snap.facts.end is not None else "",
                end="")


def _addr_key(endpoint: tuple[str, int]) -> tuple:
    import socket

    host, port = endpoint
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        packed = host.encode()
    return (len(packed), packed, port)


def _none_last(v: Any) -> tuple:
    return (v is None, v if v is not None else 0)


def _text_key(v: str | None) -> tuple:
    return (v is None, (v or "").casefold())


SORT_KEYS: dict[str, Callable[[FlowSnapshot, float], Any]] = {
    "mark": lambda s, now: s.facts.end is not None,
    "client": lambda s, now: _addr_key(s.ref.client),
    "server": lambda s, now: _addr_key(s.ref.server),
    "user": lambda s, now: _text_key(s.facts.username),
    "software": lambda s, now: _text_key(s.facts.server_software),
    "state": lambda s, now: state_plain(s).casefold(),
    "last": lambda s, now: _text_key(s.last_command),
    "commands": lambda s, now: sum(s.facts.commands.values()),
    "failed": lambda s, now: s.facts.login_failures,
    "latency": lambda s, now: _none_last(s.last_latency_ms),
    "age": lambda s, now: age_seconds(s, now),
}
"""Sort key per column; ties keep the order flows were first seen in."""


# --- the details panel ---------------------------------------------------------------------------


def _yes(v: bool | None, style_yes: str = "", style_no: str = "") -> Text:
    if v is None:
        return Text("—", style=STYLE_NONE)
    return Text("yes", style=style_yes) if v else Text("no", style=style_no)


def _joined(items: Sequence[Any], sep: str = ", ", style: str = "") -> Text:
    if not items:
        return Text("—", style=STYLE_NONE)
    out = Text()
    for i, item in enumerate(items):
        if i:
            out.append(sep)
        out.append_text(safe(item, style))
    return out


def _counts(d: dict[str, int], style: str = "") -> Text:
    if not d:
        return Text("—", style=STYLE_NONE)
    out = Text()
    for i, (k, n) in enumerate(d.items()):
        if i:
            out.append("  ")
        out.append_text(safe(k, style))
        out.append(f" {n}", "dim")
    return out


def _ident(d: dict[str, str | None] | None) -> Text:
    if d is None:
        return Text("—", style=STYLE_NONE)
    if not d:
        return Text("NIL", style=STYLE_NONE)
    out = Text()
    for i, (k, v) in enumerate(d.items()):
        if i:
            out.append("  ")
        out.append_text(safe(k, "bold"))
        out.append("=")
        out.append_text(safe(v) if v is not None else Text("NIL", style=STYLE_NONE))
    return out


def _value(v: Any) -> Text:
    if v is None:
        return Text("—", style=STYLE_NONE)
    if isinstance(v, bool):
        return _yes(v)
    if isinstance(v, (list, tuple)):
        return _joined(v)
    if isinstance(v, dict):
        return _counts(v)
    if isinstance(v, float):
        return Text(f"{v:g}")
    if isinstance(v, int):
        return Text(f"{v:,}")
    return safe(v)


def _attempts(attempts: list[dict[str, Any]]) -> Text:
    """One line per login attempt: user, mechanism, outcome, the password's fingerprint."""
    if not attempts:
        return Text("—", style=STYLE_NONE)
    out = Text()
    for i, a in enumerate(attempts):
        if i:
            out.append("\n")
        out.append_text(safe(a["user"]) if a["user"] is not None else Text("?", style=STYLE_NONE))
        out.append(f" {a['mechanism']} ", "dim")
        if a["ok"] is None:
            out.append("?", STYLE_NONE)
        else:
            out.append("ok" if a["ok"] else "failed", "green" if a["ok"] else STYLE_FAILED)
        if a["password_hmac"] is not None:
            out.append(f" pw#{a['password_hmac']}", "dim")
    return out


def client_software_text(guess: dict[str, Any] | None) -> Text:
    """``Python imaplib (fingerprint 95%)``, ``OfflineIMAP 8.0.0 (ID)``."""
    if guess is None:
        return Text("—", style=STYLE_NONE)
    out = safe(guess["name"])
    if guess["version"]:
        out.append(" ")
        out.append_text(safe(guess["version"]))
    out.append(" (ID)" if guess["from"] == "id" else f" (fingerprint {round(guess['confidence'] * 100)}%)", "dim")
    return out


_FACTS: dict[str, Callable[[Any], Text]] = {
    "first_ts": lambda v: Text(timestamp(v)),
    "last_ts": lambda v: Text(timestamp(v)),
    "end": lambda v: Text("open", style="green") if v is None else Text(v),
    "username": lambda v: safe(v, "bold") if v is not None else _value(v),
    "login_ok": lambda v: _yes(v, "green", STYLE_FAILED),
    "login_failures": lambda v: Text(str(v), style=STYLE_FAILED if v else ""),
    "capabilities": lambda v: _joined(v, " "),
    "starttls": lambda v: Text(v, style={"completed": STYLE_TLS, "refused": STYLE_FAILED,
                                          "offered": "yellow"}.get(v, "")),
    "encrypted": lambda v: _yes(v, STYLE_TLS),
    "encrypted_from_start": lambda v: _yes(v, STYLE_TLS),
    "compressed": lambda v: _yes(v, STYLE_DEFLATE),
    "cleartext_credentials": lambda v: _yes(v, STYLE_CLEARTEXT),
    "findings": lambda v: _joined(v, style=STYLE_CLEARTEXT),
    "client_id": _ident,
    "server_id": _ident,
    "statuses": lambda v: _status_counts(v),
    "anomalies": lambda v: _counts(v, "yellow"),
    "login_attempts": _attempts,
    "client_software": client_software_text,
}


def _status_counts(d: dict[str, int]) -> Text:
    if not d:
        return Text("—", style=STYLE_NONE)
    out = Text()
    for i, (k, n) in enumerate(d.items()):
        if i:
            out.append("  ")
        out.append_text(safe(k, STATUS_STYLES.get(k, "")))
        out.append(f" {n}", "dim")
    return out


def facts_table(snap: FlowSnapshot, shown: int, dropped: int) -> Table:
    """Every key of the flow record, under its JSON name, with the timeline's bounds."""
    table = Table.grid(padding=(0, 1), expand=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(ratio=1, overflow="fold")
    r = snap.facts.record()
    for key, value in r.items():
        if key == "type":
            continue
        fmt = _FACTS.get(key, _value)
        table.add_row(key, fmt(value))
        if key == "last_ts":
            table.add_row("duration", Text(f"{snap.facts.last_ts - snap.facts.first_ts:.3f} s", style="dim"))
    table.add_row("last_command", safe(snap.last_command) if snap.last_command else _value(None))
    table.add_row("last_status", safe(snap.last_status) if snap.last_status else _value(None))
    table.add_row("last_latency_ms", _value(snap.last_latency_ms))
    timeline = Text(f"{shown:,} messages")
    if dropped:
        timeline.append(f" (the {dropped:,} before them dropped: the last {shown:,} are kept)", "yellow")
    table.add_row("timeline", timeline)
    return table


TIMELINE_COLUMNS: tuple[Column, ...] = (
    Column("time", "time", 9, right=True),
    Column("dir", "dir", 3),
    Column("kind", "kind", 8, drop=2),
    Column("tag", "tag", 6, flex=1, min=4),
    Column("command", "command", 12, flex=1, min=7),
    Column("status", "status", 6),
    Column("detail", "detail", 20, flex=8, min=10),
    Column("latency", "latency", 8, right=True, drop=1),
)

_KIND = {"request": "request", "response": "response", "untagged": "untagged", "continuation": "cont"}


def message_cells(rec: dict[str, Any], first_ts: float) -> list[Text]:
    """A ``message_record`` as timeline cells; secrets are already ``***`` in the record."""
    client = rec["from"] == "client"
    detail = Text(end="")

    def add(piece: Text) -> None:
        if detail:
            detail.append(" ")
        detail.append_text(piece)

    if rec.get("number") is not None:
        add(Text(str(rec["number"]), style="bold"))
    if rec["args"] is not None:
        add(safe(rec["args"]))
    if rec["code"] is not None:
        add(Text.assemble(("[", "dim"), safe(rec["code"], "cyan"), ("]", "dim")))
    if rec["text"] is not None:
        add(safe(rec["text"]))
    literals = rec.get("literals")
    if literals:
        # Sizes the arguments do not already show (a masked LOGIN hides its {n} markers).
        shown = rec["args"] or ""
        hidden = [n for n in literals if f"{{{n}}}" not in shown and f"{{{n}+}}" not in shown]
        if hidden:
            add(Text(" ".join(f"{{{n}}}" for n in hidden), style="dim"))
    if rec.get("truncated"):
        add(Text("(cut at the snap length)", style="yellow"))
    status = rec["status"]
    return [
        Text(f"+{rec['ts'] - first_ts:.3f}", style="dim", end=""),
        Text("C→S" if client else "S→C", style="cyan" if client else "yellow", end=""),
        Text(_KIND.get(rec["kind"], rec["kind"]), style="dim", end=""),
        safe(rec["tag"]),
        safe(rec["command"], "bold" if client else ""),
        safe(status, STATUS_STYLES.get(status or "", "")),
        detail,
        Text(latency(rec["latency_ms"]), end=""),
    ]
