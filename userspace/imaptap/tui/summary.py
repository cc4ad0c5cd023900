"""The summary view's content, drawn from a `Summary`: the report's rows and two pictures.

The rows are the report's own (`imaptap.output.report`: the same tables, cells already escaped
by `imaptap.text.plain`, put in ``rich.Text`` without markup); the pictures are drawn with block
characters: commands per second over the capture's time, and per command how many completions
fell in each latency bucket.  No Textual here: the app puts the renderable in a widget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from imaptap.activity import LATENCY_EDGES_MS, ActivitySnapshot
from imaptap.findings import Severity
from imaptap.output.report import NUMERIC_COLUMNS, attack_table, client_table, server_table
from imaptap.tui.display import duration, latency, safe
from imaptap.tui.feed import Summary

#: Eight heights of a bar, from an eighth to a whole cell.
BLOCKS = "▁▂▃▄▅▆▇█"
SEVERITY_STYLES = {Severity.HIGH: "bold red", Severity.MEDIUM: "yellow", Severity.LOW: "dim"}
#: Latency rows drawn: the commands completed most often.
MAX_LATENCY_ROWS = 12
#: Columns the summary never goes below for its pictures.
MIN_PICTURE_WIDTH = 20
#: Characters of the label column of the latency picture.
LATENCY_LABEL = 14


def sparkline(values: Sequence[float], width: int) -> str:
    """``values`` as one line of bars, at most ``width`` wide (neighbours summed to fit); a
    zero is a blank, anything else at least the lowest bar, the highest a whole cell."""
    if not values:
        return ""
    if len(values) > width:
        group = -(-len(values) // width)
        values = [sum(values[i:i + group]) / group for i in range(0, len(values), group)]
    top = max(values)
    out = []
    for v in values:
        if v <= 0 or top <= 0:
            out.append(" ")
        else:
            out.append(BLOCKS[min(len(BLOCKS), math.ceil(v / top * len(BLOCKS))) - 1])
    return "".join(out)


def _edge(ms: float) -> str:
    return f"{ms:g}" if ms >= 1 else f"{ms:g}".lstrip("0")


def commands_picture(activity: ActivitySnapshot, width: int) -> Text:
    """Commands per second over the capture's time, with its scale."""
    rates = activity.per_second()
    out = Text()
    if not rates:
        out.append("no command seen yet", "dim")
        return out
    line = sparkline(rates, max(MIN_PICTURE_WIDTH, width))
    out.append(line, "cyan")
    span = len(rates) * activity.bucket_seconds
    per_column = span / len(line) if line else activity.bucket_seconds
    out.append(f"\npeak {max(rates):,.3g}/s, over {duration(span)}, {per_column:g} s per column", "dim")
    return out


#: Columns per latency bucket in the picture, so that the axis has room for its labels.
BUCKET_COLUMNS = 2
#: The axis labels under the buckets: (bucket index, label).
LATENCY_AXIS = ((0, ".1ms"), (3, "1ms"), (6, "10ms"), (9, "100ms"), (12, "1s"))


def latency_axis() -> str:
    """The labels under the latency bars, each starting at its bucket's column."""
    width = (len(LATENCY_EDGES_MS) + 1) * BUCKET_COLUMNS
    line = [" "] * width
    for index, label in LATENCY_AXIS:
        at = index * BUCKET_COLUMNS
        line[at:at + len(label)] = label
    return "".join(line[:width])


def latency_picture(activity: ActivitySnapshot) -> RenderableType:
    """Per command, its completions by latency bucket: one bar per bucket, median beside it."""
    rows = activity.latencies[:MAX_LATENCY_ROWS]
    if not rows:
        return Text("no completion with a latency yet", "dim")
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True, width=LATENCY_LABEL)
    table.add_column(no_wrap=True, justify="right")
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, justify="right")
    table.add_row(Text("command", "bold"), Text("n", "bold"), Text(latency_axis(), "dim"), Text("median", "bold"))
    for row in rows:
        bars = "".join(c * BUCKET_COLUMNS for c in sparkline([float(n) for n in row.counts], len(row.counts)))
        median = "" if row.median_ms is None else (
            f"≤{latency(row.median_ms)}" if row.median_ms != float("inf") else f">{latency(LATENCY_EDGES_MS[-1])}")
        table.add_row(safe(row.command), f"{row.total:,}", Text(bars, "green"), median)
    legend = Text(f"buckets up to {', '.join(_edge(e) for e in LATENCY_EDGES_MS)} ms, then slower; a bar's height"
                  " is its share of that command's largest bucket", "dim")
    return Group(table, legend)


def _table(head: list[str], rows: list[list[str]], styles: Sequence[str] = ()) -> RenderableType:
    if not rows:
        return Text("none", "dim")
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    numeric = NUMERIC_COLUMNS
    for h in head:
        # every cell whole, at most MAX_CELL long: the view scrolls sideways where it is narrower
        table.add_column(h, justify="right" if h in numeric else "left", no_wrap=True)
    right = [h in numeric for h in head]
    for i, row in enumerate(rows):
        # the cells are plain text already escaped (imaptap.text.plain): never markup; their
        # justification set on them, as Textual's text-align would override the column's
        table.add_row(*(Text(c, justify="right" if r else "left") for c, r in zip(row, right, strict=True)),
                      style=styles[i] if i < len(styles) else "")
    return table


def _heading(text: str) -> Text:
    return Text(f"\n{text}", "bold underline")


def summary_renderable(summary: Summary | None, width: int) -> RenderableType:
    """Everything the summary view shows, for a terminal ``width`` columns wide."""
    if summary is None:
        return Text("the summary comes with the next update…", "dim")
    report = summary.report
    head = Text()
    head.append("summary of ", "bold")
    head.append_text(safe(report.source))
    head.append(f" · {report.flows:,} flow{'s' if report.flows != 1 else ''} ({report.imap_flows:,} IMAP),"
                f" {summary.open_flows:,} open")
    findings: RenderableType
    if report.findings:
        ft = Table.grid(padding=(0, 2))
        ft.add_column(no_wrap=True, min_width=len("medium"))
        ft.add_column(no_wrap=True)
        ft.add_column(no_wrap=True)
        for row in report.findings:
            where = f" from {', '.join(row.sources)}" if row.sources else ""
            ft.add_row(Text(row.severity.label, SEVERITY_STYLES[row.severity]), Text(row.finding.value),
                       Text(f"{row.count:,} flow{'s' if row.count != 1 else ''}{where}", "dim"))
        findings = ft
    else:
        findings = Text("none", "dim")
    parts: list[RenderableType] = [head, _heading("findings, most severe first"), findings,
                                   _heading("servers"), _table(*server_table(report)),
                                   _heading("clients (by address)"), _table(*client_table(report))]
    attack_head, attack_rows = attack_table(report)
    if attack_rows:
        parts += [_heading("password attacks by source (password fingerprints, never passwords)"),
                  _table(attack_head, attack_rows, ["red"] * len(attack_rows))]
    parts += [_heading("commands per second"), commands_picture(summary.activity, width - 2),
              _heading("latency per command (completions per bucket)"), latency_picture(summary.activity)]
    return Group(*parts)
