"""The audit report written out: aligned text for a terminal, Markdown for a ticket, JSON.

`ReportSink` is the pipeline's sink for ``--report`` and ``--fail-on``: it hands each ended flow
to an `imaptap.report.ReportBuilder` and, once the run is over, writes the report.  Every string
that came from the network goes through `imaptap.text.plain` (controls escaped) and, in
Markdown, has its markup characters escaped too; no password is ever in a report, only the
truncated fingerprints of `imaptap.imap.audit.PasswordFingerprint`.
"""

from __future__ import annotations

import enum
import json
import time
import unicodedata
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

from imaptap.findings import Finding, Severity
from imaptap.output import OutputError
from imaptap.pipeline import Sink
from imaptap.report import SHOWN_FLOWS, ClientRow, FlowRef, Report, ReportBuilder
from imaptap.text import plain

if TYPE_CHECKING:
    from imaptap.facts import FlowFacts
    from imaptap.flows import Flow
    from imaptap.pipeline import Pipeline


class ReportFormat(enum.StrEnum):
    """``--format``."""

    TEXT = "text"
    MARKDOWN = "markdown"
    JSON = "json"


#: Flows ``--fail-on`` names on stderr, one line each; further ones are counted in one more line.
MAX_NAMED_FLOWS = 1000
#: Characters of one table cell in text and Markdown (user lists, capability lists).
MAX_CELL = 120

_ANSI = {"bold": "1", "red": "1;31", "yellow": "33", "dim": "2", "green": "32", "cyan": "36"}
SEVERITY_STYLE = {Severity.HIGH: "red", Severity.MEDIUM: "yellow", Severity.LOW: "dim"}


def _timestamp(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _width(s: str) -> int:
    """Terminal cells ``s`` takes: East Asian wide characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _cut(s: str, limit: int = MAX_CELL) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _percent(confidence: float) -> str:
    return f"{round(confidence * 100)}%"


def software_text(row: ClientRow, limit: int = 2) -> str:
    """What the inventory says of a client address's software, most flows first."""
    parts = []
    for name, version, confidence, basis, _flows in row.software[:limit]:
        label = plain(name) + (f" {plain(version)}" if version else "")
        parts.append(f"{label} (ID)" if basis == "id" else f"{label} ({_percent(confidence)})")
    if not parts:
        styles = ", ".join(plain(s) for s in row.tag_styles) or "?"
        return f"unknown (tags like {styles})"
    if len(row.software) > limit:
        parts.append(f"+{len(row.software) - limit} more")
    return ", ".join(parts)


def _users(row: ClientRow) -> str:
    users = ", ".join(plain(u) for u in row.users) or "-"
    return _cut(users + (f" +{row.users_more}" if row.users_more else ""))


def _flow_text(ref: FlowRef) -> str:
    user = f"  user {plain(ref.user)}" if ref.user else ""
    return f"flow {ref.flow}  {ref.client} -> {ref.server}{user}"


# --- the tables every format shares --------------------------------------------------------------


def server_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the per-server table."""
    head = ["server", "software", "offers before login", "sessions", "STARTTLS used", "cleartext logins",
            "logins ok", "failed logins"]
    rows = [[r.server, plain(r.software) or "-", _cut(" ".join(r.offered)) or "-", str(r.sessions),
             str(r.starttls_used), str(r.cleartext_logins), str(r.logins_ok), str(r.failed_logins)]
            for r in report.servers]
    return head, rows


def client_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the per-client-address table (the inventory)."""
    head = ["client", "sessions", "users", "mechanisms", "STARTTLS used/unused/refused", "cleartext logins",
            "failed logins", "software"]
    rows = [[r.client, str(r.sessions), _users(r), " ".join(plain(m) for m in r.mechanisms) or "-",
             f"{r.starttls_used}/{r.starttls_unused}/{r.starttls_refused}", str(r.cleartext_logins),
             str(r.failed_logins), software_text(r)]
            for r in report.clients]
    return head, rows


def attack_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the password-attack table."""
    head = ["source", "kind", "attempts", "failed", "users tried", "passwords tried", "most passwords for one user",
            "most users for one password", "logged in after failing"]
    rows = []
    for r in report.attacks:
        top_user = f"{plain(r.top_user)}: {r.top_user_passwords}" if r.top_user else "-"
        top_pw = f"{r.top_password}: {r.top_password_users}" if r.top_password else "-"
        rows.append([r.source, ", ".join(k.value for k in r.kinds), str(r.attempts), str(r.failed), str(r.users),
                     str(r.passwords), top_user, top_pw, ", ".join(plain(u) for u in r.succeeded) or "-"])
    return head, rows


#: The columns of numbers, right-aligned (the TUI's summary uses them too).
NUMERIC_COLUMNS = frozenset({"sessions", "STARTTLS used", "cleartext logins", "logins ok", "failed logins",
                             "attempts", "failed", "users tried", "passwords tried", "flows"})


# --- text ----------------------------------------------------------------------------------------


class _Paint:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, s: str, style: str) -> str:
        if not self.color or not style:
            return s
        return f"\x1b[{_ANSI[style]}m{s}\x1b[0m"


def _aligned(head: Sequence[str], rows: Sequence[Sequence[str]], paint: _Paint, indent: str = "  ",
             styles: Sequence[str] | None = None) -> list[str]:
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(head)]
    right = [h in NUMERIC_COLUMNS for h in head]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            pad = " " * (widths[i] - _width(cell))
            out.append(pad + cell if right[i] else (cell + pad if i < len(cells) - 1 else cell))
        return indent + "  ".join(out)

    lines = [paint(line(head), "bold")]
    for i, r in enumerate(rows):
        lines.append(paint(line(r), styles[i] if styles else ""))
    return lines


def render_text(report: Report, color: bool = False) -> str:
    """The report for a terminal: aligned tables; ANSI colour only when ``color``."""
    paint = _Paint(color)
    out = [paint(f"imaptap audit report: {plain(report.source)}", "bold"),
           f"{_n(report.flows, 'flow')}, {report.imap_flows:,} IMAP, from {_timestamp(report.first_ts)}"
           f" to {_timestamp(report.last_ts)}", ""]
    out.append(paint("Findings, most severe first", "bold"))
    if not report.findings:
        out.append("  none")
    for row in report.findings:
        label = paint(f"{row.severity.label:<6}", SEVERITY_STYLE[row.severity])
        out.append(f"  {label}  {row.finding.value}: {_n(row.count, 'flow')}"
                   f"{' from ' + ', '.join(row.sources) if row.sources else ''}. {row.summary}")
        for ref in row.flows[:SHOWN_FLOWS]:
            out.append(f"            {_flow_text(ref)}")
        if row.count > SHOWN_FLOWS:
            out.append(f"            ... and {row.count - SHOWN_FLOWS:,} more")
    out.append("")
    for title, (head, rows), more in (("Servers", server_table(report), report.servers_more),
                                      ("Clients (by address)", client_table(report), report.clients_more)):
        out.append(paint(title, "bold"))
        out += _aligned(head, rows, paint) if rows else ["  none"]
        if more:
            out.append(f"  ... and {more:,} more sessions of addresses not listed")
        out.append("")
    head, rows = attack_table(report)
    out.append(paint("Password attacks by source (fingerprints: HMAC of each password, never the password)", "bold"))
    out += _aligned(head, rows, paint, styles=["red"] * len(rows)) if rows else ["  none"]
    return "\n".join(out) + "\n"


# --- Markdown ------------------------------------------------------------------------------------

#: What makes markup inside a table cell: emphasis, code, links, HTML, the cell separator.
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|~"})


def md(s: str) -> str:
    """A cell of network text for Markdown: controls escaped, markup characters backslashed."""
    return plain(s).translate(_MD_SPECIAL)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = "|".join("---:" if h in NUMERIC_COLUMNS else "---" for h in head)
    out = ["| " + " | ".join(head) + " |", "|" + align + "|"]
    out += ["| " + " | ".join(md(c) for c in r) + " |" for r in rows]
    return out


def render_markdown(report: Report) -> str:
    """The report as Markdown (GitHub's tables), to paste into a ticket."""
    out = [f"# imaptap audit report: {md(report.source)}", "",
           f"{_n(report.flows, 'flow')}, {report.imap_flows:,} IMAP, from {_timestamp(report.first_ts)} to "
           f"{_timestamp(report.last_ts)}.", "", "## Findings", ""]
    if report.findings:
        rows = []
        for row in report.findings:
            flows = ", ".join(f"{f.flow} ({f.client} -> {f.server})" for f in row.flows[:SHOWN_FLOWS])
            if row.count > SHOWN_FLOWS:
                flows += f", and {row.count - SHOWN_FLOWS:,} more"
            rows.append([row.severity.label, row.finding.value, str(row.count), row.summary, flows])
        out += _md_table(["severity", "finding", "flows", "what", "flows that show it"], rows)
    else:
        out.append("None.")
    for title, (head, rows) in (("Servers", server_table(report)), ("Clients", client_table(report)),
                                ("Password attacks by source", attack_table(report))):
        out += ["", f"## {title}", ""]
        out += _md_table(head, rows) if rows else ["None."]
    return "\n".join(out) + "\n"


# --- JSON ----------------------------------------------------------------------------------------


def _flow_record(ref: FlowRef) -> dict[str, Any]:
    return {"flow": ref.flow, "client": ref.client, "server": ref.server, "user": ref.user}


def report_record(report: Report) -> dict[str, Any]:
    """The report as one JSON object (README, "Audit report"): every number the text shows."""
    return {
        "type": "report",
        "source": report.source,
        "flows": report.flows,
        "imap_flows": report.imap_flows,
        "first_ts": report.first_ts,
        "last_ts": report.last_ts,
        "findings": [{"finding": r.finding.value, "severity": r.severity.label, "summary": r.summary,
                      "flows": r.count, "sources": list(r.sources),
                      "flow_list": [_flow_record(f) for f in r.flows]} for r in report.findings],
        "servers": [{"server": r.server, "software": r.software, "offered": list(r.offered), "sessions": r.sessions,
                     "starttls_used": r.starttls_used, "cleartext_logins": r.cleartext_logins,
                     "logins_ok": r.logins_ok, "failed_logins": r.failed_logins} for r in report.servers],
        "servers_more": report.servers_more,
        "clients": [{"client": r.client, "sessions": r.sessions, "users": list(r.users), "users_more": r.users_more,
                     "mechanisms": list(r.mechanisms), "starttls_used": r.starttls_used,
                     "starttls_unused": r.starttls_unused, "starttls_refused": r.starttls_refused,
                     "cleartext_logins": r.cleartext_logins, "failed_logins": r.failed_logins,
                     "software": [{"name": n, "version": v, "confidence": c, "from": b, "flows": k}
                                  for n, v, c, b, k in r.software],
                     "tag_styles": list(r.tag_styles)} for r in report.clients],
        "clients_more": report.clients_more,
        "attacks": [{"source": r.source, "kinds": [k.value for k in r.kinds], "attempts": r.attempts,
                     "failed": r.failed, "users": r.users, "passwords": r.passwords, "top_user": r.top_user,
                     "top_user_passwords": r.top_user_passwords, "top_password_hmac": r.top_password,
                     "top_password_users": r.top_password_users, "logged_in_after_failing": list(r.succeeded)}
                    for r in report.attacks],
    }


def render_json(report: Report) -> str:
    """One line, as the JSON Lines output writes its records (``jq .`` indents it)."""
    return json.dumps(report_record(report), ensure_ascii=False, separators=(",", ":")) + "\n"


def render(report: Report, fmt: ReportFormat, color: bool = False) -> str:
    """The report in ``fmt``."""
    if fmt is ReportFormat.JSON:
        return render_json(report)
    if fmt is ReportFormat.MARKDOWN:
        return render_markdown(report)
    return render_text(report, color)


# --- the gate ------------------------------------------------------------------------------------


def fail_on_lines(report: Report, chosen: Iterable[Finding]) -> list[str]:
    """For ``--fail-on``: one line per flow showing a chosen finding (its findings named), at
    most `MAX_NAMED_FLOWS`, then one line counting the rest; empty when none occurred."""
    chosen = frozenset(chosen)
    named: dict[int, tuple[FlowRef, list[str]]] = {}
    total = 0
    for row in report.findings:
        if row.finding not in chosen:
            continue
        total = max(total, row.count)
        for ref in row.flows:
            entry = named.setdefault(ref.flow, (ref, []))
            entry[1].append(row.finding.value)
    counted = sum(r.count for r in report.findings if r.finding in chosen)
    if not counted:
        return []
    lines = [f"{', '.join(found)}: {_flow_text(ref)}" for _, (ref, found) in sorted(named.items())[:MAX_NAMED_FLOWS]]
    listed = min(len(named), MAX_NAMED_FLOWS)
    if total > listed:
        lines.append(f"... and more flows not named (at least {total - listed:,})")
    return lines


# --- the sink ------------------------------------------------------------------------------------


class ReportSink(Sink):
    """Counts every ended flow for the report; writes it to ``out`` when the run is over
    (``out`` None: only counts, for ``--fail-on`` alone)."""

    def __init__(self, builder: ReportBuilder, out: IO[str] | None = None, fmt: ReportFormat = ReportFormat.TEXT,
                 color: bool = False, name: str = "standard output") -> None:
        self.builder = builder
        self.out = out
        self.fmt = fmt
        self.color = color
        self.name = name
        self.report: Report | None = None
        """The final report, once the run is over."""

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        self.builder.add(facts, flow.session.audit)

    def finished(self, pipeline: Pipeline) -> None:
        if not self.builder.source:
            self.builder.source = pipeline.source.label
        self.report = self.builder.report()
        if self.out is None:
            return
        try:
            self.out.write(render(self.report, self.fmt, self.color))
            self.out.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from None
