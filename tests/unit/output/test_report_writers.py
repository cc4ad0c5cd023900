"""The report as written (output/report.py): aligned text, colour only when asked, Markdown and text
that no network string can break, the JSON record, and the gate's lines."""

import json
import re

from imaptap.findings import Finding
from imaptap.imap.audit import PasswordFingerprint
from imaptap.output.report import (
    MAX_NAMED_FLOWS,
    ReportFormat,
    ReportSink,
    fail_on_lines,
    render,
    render_markdown,
    render_text,
    report_record,
)
from imaptap.report import MAX_FLOWS_PER_FINDING, ReportBuilder
from imaptap.testing import analyze, conversation

FP = PasswordFingerprint(bytes(range(32)))
HOSTILE = ["[bold red]root[/]", "\x1b]0;pwned\x07", "a|b`c*d_e", "\u202eevil", "<script>"]


def report_of(users, secret="Secret-Pw-1", ok=False, clients=None):
    segs = []
    for i, user in enumerate(users):
        quoted = '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts = [("s", b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"),
                 ("c", f"a1 LOGIN {quoted} {secret}{i}\r\n".encode()),
                 ("s", b"a1 OK in\r\n" if ok else b"a1 NO no\r\n")]
        client = (clients[i] if clients else "10.0.0.5", 40000 + i)
        segs += conversation(parts, client=client, server=("10.0.0.1", 143), ts=1_700_000_000.0 + i)
    sink = ReportSink(ReportBuilder("capture.pcap"))
    analyze(segs, password_fingerprint=FP, sinks=[sink])
    return sink.report


def test_text_tables_are_aligned():
    text = render_text(report_of(["alice", "bob"], clients=["10.0.0.5", "192.168.100.200"]))
    lines = text.splitlines()
    head = lines.index("Clients (by address)") + 1
    rows = lines[head:head + 3]
    # each column starts where its header starts (left-aligned) or ends where it ends (numbers)
    start = rows[0].index("software")
    assert all(len(r) >= start for r in rows) and rows[1][start - 2:start] == "  " and rows[2][start - 2:start] == "  "
    ends = rows[0].index("sessions") + len("sessions")
    assert rows[1][ends - 1] == "1" and rows[2][ends - 1] == "1"


def test_colour_only_when_asked():
    r = report_of(["alice"])
    assert "\x1b[" not in render_text(r) and "\x1b[" not in render(r, ReportFormat.MARKDOWN, color=True)
    coloured = render_text(r, color=True)
    assert "\x1b[1;31mhigh" in coloured and "\x1b[0m" in coloured


def test_network_strings_cannot_break_text_or_markdown():
    r = report_of(HOSTILE)
    text = render_text(r, color=True)
    assert "\x1b]0" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;pwned\\x07" in text and "\\u202eevil" in text
    md = render_markdown(r)
    assert "\x1b" not in md and "\u202e" not in md
    assert "<script>" not in md and r"\<script\>" in md
    assert r"a\|b\`c\*d\_e" in md
    # every table row of the clients table still has its 8 cells
    clients = md[md.index("## Clients"):md.index("## Password attacks")]
    (row,) = [line for line in clients.splitlines() if line.startswith("| 10.0.0.5")]
    assert len(re.findall(r"(?<!\\)\|", row)) == 9


def test_no_password_anywhere():
    r = report_of(["alice", "bob"])
    for fmt in ReportFormat:
        out = render(r, fmt)
        assert "Secret-Pw-1" not in out


def test_the_json_record():
    r = report_of(["alice"])
    rec = json.loads(render(r, ReportFormat.JSON))
    assert rec == report_record(r) | {}  # the text is the record
    assert rec["type"] == "report" and rec["source"] == "capture.pcap" and rec["imap_flows"] == 1
    (client,) = rec["clients"]
    assert client["users"] == ["alice"] and client["cleartext_logins"] == 1 and client["failed_logins"] == 1
    first = rec["findings"][0]
    assert first["finding"] == "cleartext_credentials" and first["severity"] == "high"
    assert first["flow_list"] == [{"flow": 1, "client": "10.0.0.5:40000", "server": "10.0.0.1:143", "user": "alice"}]


def test_the_gate_names_each_flow_once_with_its_findings():
    r = report_of(["alice", "bob"])
    lines = fail_on_lines(r, {Finding.CLEARTEXT_CREDENTIALS, Finding.FAILED_LOGINS})
    assert lines == [
        "cleartext_credentials, failed_logins: flow 1  10.0.0.5:40000 -> 10.0.0.1:143  user alice",
        "cleartext_credentials, failed_logins: flow 2  10.0.0.5:40001 -> 10.0.0.1:143  user bob"]
    assert fail_on_lines(r, {Finding.STARTTLS_REFUSED}) == []
    assert fail_on_lines(report_of(["alice"], ok=True), {Finding.FAILED_LOGINS}) == []


def test_the_gate_names_a_bounded_number_of_flows():
    assert MAX_NAMED_FLOWS <= MAX_FLOWS_PER_FINDING
    r = report_of([f"u{i}" for i in range(5)])
    from dataclasses import replace

    row = r.findings[0]
    big = replace(r, findings=(replace(row, count=MAX_FLOWS_PER_FINDING + 50),))
    lines = fail_on_lines(big, {row.finding})
    assert len(lines) == 6 and lines[-1].startswith("... and more flows not named")
