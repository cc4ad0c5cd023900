"""The UI's copy of the flows: each one's latest snapshot and its recent messages, bounded.

Owned by the UI thread; the worker only ever hands it immutable `FeedUpdate`s.  Ended flows
stay (marked ended) until more than `MAX_ENDED_FLOWS` have ended, then the oldest go; message
timelines are bounded per flow (`MAX_MESSAGES_PER_FLOW`) and in total (`MAX_HISTORY_MESSAGES`).
"""

from __future__ import annotations

from collections import deque

from imaptap.imap.session import Message
from imaptap.tui.feed import MAX_ENDED_FLOWS, MAX_MESSAGES_PER_FLOW, FeedUpdate, FlowSnapshot
from imaptap.tui.query import haystack

#: Messages kept over all timelines: 500 per flow times thousands of long-lived flows would
#: otherwise be gigabytes.  Beyond it the timelines of ended flows are emptied first (oldest
#: first), then those of the oldest open flows; their messages count as dropped.
MAX_HISTORY_MESSAGES = 200_000


class FlowEntry:
    """One flow as the UI knows it."""

    __slots__ = ("snap", "messages", "received", "version", "_haystack", "_cells")

    def __init__(self, snap: FlowSnapshot) -> None:
        self.snap = snap
        self.messages: deque[Message] = deque(maxlen=MAX_MESSAGES_PER_FLOW)
        self.received = 0
        """Messages the flow had, kept or not."""
        self.version = 0
        """Counts snapshots: a drawn row is reused while this is unchanged."""
        self._haystack: str | None = None
        self._cells: list | None = None

    @property
    def id(self) -> int:
        return self.snap.ref.id

    @property
    def ended(self) -> bool:
        return self.snap.facts.end is not None

    @property
    def dropped(self) -> int:
        """Messages no longer in the timeline (the oldest ones)."""
        return self.received - len(self.messages)

    @property
    def haystack(self) -> str:
        if self._haystack is None:
            self._haystack = haystack(self.snap)
        return self._haystack

    def cells(self) -> list:
        """The row's cells but the age, built once per snapshot."""
        if self._cells is None:
            from imaptap.tui.display import flow_cells

            self._cells = flow_cells(self.snap)
        return self._cells

    def update(self, snap: FlowSnapshot) -> None:
        self.snap = snap
        self.version += 1
        self._haystack = None
        self._cells = None


class FlowStore:
    """Flows by id, in the order they were first seen."""

    def __init__(self, max_ended: int = MAX_ENDED_FLOWS, max_history: int = MAX_HISTORY_MESSAGES) -> None:
        self.flows: dict[int, FlowEntry] = {}
        self.max_ended = max_ended
        self.max_history = max_history
        self.history = 0
        """Messages kept over all timelines."""
        self.evicted = 0
        """Ended flows removed to stay within `max_ended`."""
        self._ended: dict[int, None] = {}  # ids of ended flows, oldest end first

    def apply(self, update: FeedUpdate) -> tuple[set[int], set[int]]:
        """Take a batch in; returns (ids changed or new, ids removed)."""
        flows = self.flows
        changed: set[int] = set()
        removed: set[int] = set()
        for snap in update.flows:
            fid = snap.ref.id
            entry = flows.get(fid)
            if entry is None:
                flows[fid] = FlowEntry(snap)
            else:
                entry.update(snap)
            if snap.facts.end is not None:
                self._ended[fid] = None
            changed.add(fid)
        for fid, batch in update.messages.items():
            entry = flows.get(fid)
            if entry is None:
                continue
            before = len(entry.messages)
            entry.messages.extend(batch.messages)
            entry.received += len(batch.messages) + batch.dropped
            self.history += len(entry.messages) - before
            changed.add(fid)
        for fid in update.gone:
            if self._remove(fid):
                removed.add(fid)
        while len(self._ended) > self.max_ended:
            fid = next(iter(self._ended))
            self._remove(fid)
            self.evicted += 1
            removed.add(fid)
        if self.history > self.max_history:
            changed |= self._trim_history()
        changed -= removed
        return changed, removed

    def _remove(self, fid: int) -> bool:
        entry = self.flows.pop(fid, None)
        self._ended.pop(fid, None)
        if entry is None:
            return False
        self.history -= len(entry.messages)
        return True

    def _trim_history(self) -> set[int]:
        target = self.max_history * 9 // 10  # some room, so this does not run on every batch
        trimmed: set[int] = set()
        for ids in (list(self._ended), sorted(self.flows)):
            for fid in ids:
                if self.history <= target:
                    return trimmed
                entry = self.flows[fid]
                if entry.messages:
                    self.history -= len(entry.messages)
                    entry.messages.clear()
                    trimmed.add(fid)
        return trimmed
