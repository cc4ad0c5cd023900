"""Every message the TUI's widgets and worker send, in one place.

The capture worker posts one `CaptureUpdated` per flush interval (a few per second), never one
per segment; everything else is a user action on a table.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from textual.message import Message

from imaptap.tui.feed import FeedUpdate

if TYPE_CHECKING:
    from imaptap.tui.table import VirtualTable

#: The row key type of the table a message comes from.
K = TypeVar("K", bound=Hashable)


@dataclass
class CaptureUpdated(Message):
    """The worker's counters, and sometimes a batch of changed flows and their messages."""

    update: FeedUpdate


@dataclass
class RowHighlighted(Message, Generic[K]):
    """The cursor moved to another row (keys, mouse, or the row under it went away)."""

    table: VirtualTable[K]
    key: K | None

    @property
    def control(self) -> VirtualTable[K]:
        return self.table


@dataclass
class RowSelected(Message, Generic[K]):
    """Enter, or a click on the row under the cursor."""

    table: VirtualTable[K]
    key: K

    @property
    def control(self) -> VirtualTable[K]:
        return self.table


@dataclass
class HeaderClicked(Message):
    """A click on a column's header."""

    table: VirtualTable
    column: str

    @property
    def control(self) -> VirtualTable:
        return self.table
