"""The command line's segment loop answers a signal on a tick, not only on a segment."""

import itertools

from testenv import ROOT  # noqa: F401 - puts userspace/ on sys.path

from imaptap import cli
from imaptap.flows import FlowTable
from imaptap.testing import conversation


def test_a_signal_during_a_stretch_without_segments_stops_the_loop():
    table = FlowTable({143})
    segs = conversation([("s", b"* OK ready\r\n"), ("c", b"a1 NOOP\r\n")], close=False)

    def source():
        yield from segs
        cli._stop.append(15)  # the handler ran while other ports' records were being read
        yield from itertools.repeat(None)  # they never end: only the tick can stop the loop

    cli._stop.clear()
    try:
        cli._run(source(), table)
    finally:
        cli._stop.clear()
    assert table.stats.segments == len(segs) and len(table.flows) == 1
