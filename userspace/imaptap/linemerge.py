"""The per-segment and per-line work of ``imaptap -r FILE --workers N`` (`imaptap.workers`):
each worker's grouping of its JSON lines under merge keys (`LineGroups`), and the parent's
merge of the workers' groups into one process's order (`merge`).

`imaptap.workers` explains the merge key and owns the processes and pipes; this module holds
only the loops that run once per segment or per line group, kept apart so that mypyc compiles
them (setup.py, COMPILED): interpreted, they were a third of a worker's time beside its share
of the analysis and most of the parent's.
"""

from __future__ import annotations

from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import Any, Final

from imaptap.flows import EndReason, Flow, FlowTable
from imaptap.flowshare import FlowShare
from imaptap.segment import FlowKey, Segment, flow_key

#: The steps of a segment's processing, in the order one process takes them (merge key part 2).
ROUND_END: Final = 0
"""A --flow-interval round: a flow idle past the timeout at the round's time ends."""
ROUND_UPDATE: Final = 1
"""A --flow-interval round: an open flow's flow_update record."""
SWEEP: Final = 2
"""The idle sweep a segment's time makes."""
SEGMENT: Final = 3
"""The segment itself."""
INPUT_END: Final = 4
"""The end of the input: every open flow ends."""

#: Bits of the merge key below the step: a flow's last segment index or a worker's count of
#: line groups, each below 2**40 (a trillion segments).
SUB_BITS: Final = 40
#: The step and the segment index above it: the end of the input comes after any segment.
STEP_BITS: Final = 3
END_INDEX: Final = 1 << SUB_BITS
#: Above every merge key.
END_KEY: Final = (END_INDEX + 1) << (STEP_BITS + SUB_BITS)
#: Lines a worker collects before it sends them (about a megabyte): large chunks make the
#: pipe cheap, and a worker sends what it has at every tick of its source too.
SEND_LINES: Final = 4096
#: Line groups the parent joins into one write.
WRITE_ITEMS: Final = 1024

#: One line group as a worker sends it: (merge key, worker, the worker's flow id, the lines'
#: text or None for a flow's creation, whether the flow ends with it, its facts and audit for
#: the report or None).
Item = tuple[int, int, int, "str | None", bool, Any]

_END: Final = EndReason.END
_IDLE: Final = EndReason.IDLE


def merge_key(index: int, step: int, sub: int) -> int:
    """The merge key of a line group: segment ``index``, its processing ``step``, then ``sub``."""
    return (((index << STEP_BITS) | step) << SUB_BITS) | sub


class LineGroups:
    """A worker's JSON lines (the list its writer appends to), grouped as they are written,
    each group with its merge key and its flow; `take` is the worker's per-segment hook."""

    def __init__(self, share: FlowShare, lines: list[str]) -> None:
        self.share = share
        self.lines = lines
        self.index = 0
        """The index of the segment being processed (1 for the first)."""
        self.step = SWEEP
        self.groups: list[tuple[int, int, int, int, bool, Any]] = []
        """(merge key, end in `lines`, the worker's flow id, a flow's creation, the flow's last
        lines, its facts and audit for the report or None)."""
        self.start = 0
        """Where the lines not yet in a group start."""
        self.count = 0
        """Line groups made so far: the order of a segment's own groups."""
        self.last: dict[FlowKey, int] = {}
        """Each open flow's last segment index, by flow key: its place in the table."""
        self.own = 0
        """Segments of this worker's share taken so far."""
        self.due = share.wake
        """No segment before this capture time makes a sweep or a round."""
        self.table: FlowTable | None = None
        self.round_due: Callable[[float], None] | None = None
        self.wake: Callable[[], float] | None = None
        self.send: Callable[[], None] | None = None
        """Sends the groups made so far (set by the worker's sink)."""

    def attach(self, table: FlowTable, round_due: Callable[[float], None] | None, wake: Callable[[], float],
               send: Callable[[], None]) -> None:
        """The pipeline's table and clock functions (``round_due`` with --flow-interval only)."""
        self.table = table
        self.round_due = round_due
        self.wake = wake
        self.send = send
        self.due = self.share.wake

    def group(self, key: int, flow_id: int, ends: bool = False, ended: Any = None) -> None:
        self.groups.append((key, len(self.lines), flow_id, 0, ends, ended))
        self.start = len(self.lines)

    def own_key(self) -> int:
        self.count += 1
        return merge_key(self.index, SEGMENT, self.count)

    def started(self, flow_id: int) -> None:
        if len(self.lines) > self.start:  # not expected: every earlier line belongs to a flow's end
            self.group(self.own_key(), -1)
        self.groups.append((self.own_key(), len(self.lines), flow_id, 1, False, None))

    def ended(self, flow: Flow, ended: Any) -> None:
        reason = flow.end_reason
        place = self.last.pop(flow.key, 0)
        if reason is _END:
            key = merge_key(END_INDEX, INPUT_END, place)
        elif reason is _IDLE:
            key = merge_key(self.index, self.step, place)
        else:
            key = self.own_key()
        self.group(key, flow.id, True, ended)

    def updated(self, flow: Flow) -> None:
        self.group(merge_key(self.index, ROUND_UPDATE, self.last[flow.key]), flow.id)

    def take(self, seg: Any) -> None:
        """One item of the worker's source: a segment of its share, or the time of another
        worker's segment (a float)."""
        table = self.table
        assert table is not None
        share = self.share
        if isinstance(seg, float):
            ts: float = seg
            self.index = self.own + share.skipped
            if self.round_due is not None:
                self.step = ROUND_END
                self.round_due(ts)
            self.step = SWEEP
            table.advance(ts)
        else:
            segment: Segment = seg
            ts = segment.ts
            self.own += 1
            index = self.index = self.own + share.skipped
            if self.round_due is not None and ts >= self.due:
                self.step = ROUND_END
                self.round_due(ts)
                self.step = SWEEP
            table.add(segment)
            key = flow_key(segment.src, segment.sport, segment.dst, segment.dport)
            flow = table.flows.get(key)
            if flow is not None:
                self.last[key] = index
                if len(self.lines) > self.start:
                    self.group(self.own_key(), flow.id)
            if len(self.lines) >= SEND_LINES:
                assert self.send is not None
                self.send()
        if ts >= self.due:  # a sweep or a round may have been made: the next one's time
            assert self.wake is not None
            self.due = self.wake()
            share.wake = self.due

    def items(self, worker: int) -> list[Item]:
        """The groups made so far as items to send, their lines taken out of `lines`."""
        lines = self.lines
        items: list[Item] = []
        start = 0
        for key, end, flow_id, created, ends, ended in self.groups:
            if created:
                items.append((key, worker, flow_id, None, False, None))
            else:
                items.append((key, worker, flow_id, "".join(lines[start:end]), ends, ended))
                start = end
        del lines[:start]
        self.groups.clear()
        self.start = len(lines)
        return items


def merge(workers: int, chunk: Callable[[int], list[Item] | None], write: Callable[[str], object] | None,
          add: Callable[[Any, Any], None] | None) -> None:
    """Write the workers' items in merge-key order.  ``chunk(w)`` gives worker ``w``'s next
    items (never an empty list; None after its last word), ``write`` takes the text, ``add``
    the facts and audit of each ended flow (the report).  A heap holds each worker's next key;
    the worker whose key is lowest gives every item below the next lowest worker's key at once
    (a run of one worker's segments is the rule, so the heap is seldom touched).  Flow ids are
    given in the order of the flows' creation marks, and written into their lines."""
    ids: list[dict[int, int]] = [{} for _ in range(workers)]
    next_id = 0
    lists: list[list[Item] | None] = [chunk(w) for w in range(workers)]
    places = [0] * workers
    heap: list[tuple[int, int]] = []
    for w in range(workers):
        first = lists[w]
        if first is not None:
            heap.append((first[0][0], w))
    heapify(heap)
    out: list[str] = []
    while heap:
        _, w = heappop(heap)
        bound = heap[0][0] if heap else END_KEY
        items = lists[w]
        i = places[w]
        numbers = ids[w]
        while items is not None:
            if i == len(items):
                items = lists[w] = chunk(w)
                i = 0
                continue
            key, _worker, flow_id, text, ends, ended = items[i]
            if key > bound:
                break
            i += 1
            if text is None:  # a flow made: its id in one process
                next_id += 1
                numbers[flow_id] = next_id
                continue
            new_id = numbers.pop(flow_id, flow_id) if ends else numbers.get(flow_id, flow_id)
            if write is not None:
                if new_id != flow_id:
                    # Every line names its flow once as "flow":N, and JSON strings cannot hold
                    # that text unescaped (a quote in a string is \"), nor can a client's ID
                    # parameter named flow (its value is a string or null).
                    text = text.replace(f'"flow":{flow_id},', f'"flow":{new_id},')
                out.append(text)
                if len(out) >= WRITE_ITEMS:
                    write("".join(out))
                    out.clear()
            if ended is not None and add is not None:
                facts, audit = ended
                add(facts._replace(flow=new_id), audit)
        if items is not None:
            places[w] = i
            heappush(heap, (items[i][0], w))
    if write is not None and out:
        write("".join(out))
