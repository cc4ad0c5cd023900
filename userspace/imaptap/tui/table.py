"""A keyed table drawn line by line, as toolong draws its log: only rows on screen are rendered.

Textual's DataTable measures every cell of every new row and rebuilds its row index on each
removal: 10,000 flows took 1.6 s to add and 4.7 s to lay out on the development machine, and a
filter that hides and shows rows would pay that again.  Here the rows are a list of keys the
app hands over (already filtered and sorted), cells come from a callback when a row is drawn,
and the cursor follows its key, not its position, so a flow stays selected while rows move.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from imaptap.tui.display import Column
from imaptap.tui.messages import HeaderClicked, RowHighlighted, RowSelected

#: Between two cells.
SEPARATOR = " "

#: The type of a table's row keys (the app's are flow ids and message numbers).
K = TypeVar("K", bound=Hashable)

#: Drawn rows kept: a few screens' worth, so scrolling back and forth and a 4 Hz refresh
#: redraw only the rows that changed.
STRIP_CACHE = 512


def fit_widths(columns: Sequence[Column], total: int) -> list[int]:
    """Column widths for ``total`` cells; 0 for a column dropped because the table is too narrow.

    Every column gets its width and the flexible ones share what is left; when that is too
    wide, columns shrink towards their minimum in proportion to how much they can give; when
    even the minimums do not fit, columns are dropped in their ``drop`` order.
    """
    active = list(range(len(columns)))

    def gaps() -> int:
        return len(SEPARATOR) * max(0, len(active) - 1)

    while sum(columns[i].min_width for i in active) + gaps() > total:
        droppable = [i for i in active if columns[i].drop]
        if not droppable:
            break
        active.remove(max(droppable, key=lambda i: columns[i].drop))
    widths = [0] * len(columns)
    for i in active:
        widths[i] = columns[i].width
    spare = total - gaps() - sum(widths)
    if spare > 0:
        flexible = [i for i in active if columns[i].flex]
        weight = sum(columns[i].flex for i in flexible)
        for i in flexible:
            widths[i] += spare * columns[i].flex // weight
        rest = total - gaps() - sum(widths)
        for i in flexible[:rest]:  # the rounding remainder
            widths[i] += 1
    elif spare < 0:
        need = -spare
        room = {i: columns[i].width - columns[i].min_width for i in active if columns[i].width > columns[i].min_width}
        total_room = sum(room.values())
        left = need
        for i, r in room.items():  # the minimums fit (see above), so need <= total_room
            cut = min(r, -(-need * r // total_room), left)
            widths[i] -= cut
            left -= cut
    return widths


class VirtualTable(ScrollView, Generic[K], can_focus=True):
    """Rows are keys; ``cells(key)`` gives (version, cells): the row's cells (`rich.text.Text`,
    never markup) and a hashable that changes whenever they do, for the cache of drawn rows."""

    BINDINGS = [
        Binding("up,k", "cursor_up", "Up", show=False),
        Binding("down,j", "cursor_down", "Down", show=False),
        Binding("pageup,ctrl+b", "page_up", "Page up", show=False),
        Binding("pagedown,ctrl+f", "page_down", "Page down", show=False),
        Binding("home,g", "first", "First", show=False),
        Binding("end,G", "last", "Last", show=False),
        Binding("enter", "select", "Details"),
    ]

    COMPONENT_CLASSES = {
        "virtual-table--header",
        "virtual-table--header-sorted",
        "virtual-table--cursor",
    }

    DEFAULT_CSS = """
    VirtualTable {
        overflow-x: hidden;
        overflow-y: auto;
        scrollbar-gutter: stable;
        background: $surface;
        & > .virtual-table--header { text-style: bold; background: $panel; color: $foreground; }
        & > .virtual-table--header-sorted { text-style: bold underline; background: $panel; color: $accent; }
        & > .virtual-table--cursor { background: $surface-lighten-2; }
        &:focus > .virtual-table--cursor { background: $block-cursor-background; }
    }
    """

    def __init__(self, columns: Sequence[Column], cells: Callable[[K], tuple[Hashable, Sequence[Text]]],
                 *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.columns = tuple(columns)
        self.cells = cells
        self.rows: list[K] = []
        self._index: dict[K, int] = {}
        self.cursor_key: K | None = None
        self.sort_column: str | None = None
        self.sort_reverse = False
        self._widths: tuple[int, list[int]] = (-1, [])
        self._strips: LRUCache[tuple, Strip] = LRUCache(STRIP_CACHE)
        self._frame: tuple[Style, Style, bool] = (Style(), Style(), False)

    # --- content -------------------------------------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self.rows)

    @property
    def cursor_row(self) -> int | None:
        """The cursor's position in `rows`, None without rows."""
        return self._index.get(self.cursor_key) if self.cursor_key is not None else None

    def set_rows(self, keys: list[K]) -> None:
        """Show these rows in this order; the cursor stays on its key, else on its position."""
        old_row = self.cursor_row
        self.rows = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self.virtual_size = Size(self.scrollable_content_region.width, len(keys) + 1)
        if self.cursor_key not in self._index:
            if keys:
                self._move(keys[min(old_row or 0, len(keys) - 1)])
            else:
                self._move(None)
        self.refresh()

    def set_sort(self, column: str | None, reverse: bool) -> None:
        """Which header to mark; the app does the sorting."""
        self.sort_column = column
        self.sort_reverse = reverse
        self.refresh()

    def move_to(self, key: K) -> None:
        """Put the cursor on ``key`` (no-op if it is not shown)."""
        if key in self._index:
            self._move(key)

    def _move(self, key: K | None) -> None:
        changed = key != self.cursor_key
        self.cursor_key = key
        row = self.cursor_row
        if row is not None:
            self._scroll_to_row(row)
        self.refresh()
        if changed:
            self.post_message(RowHighlighted(self, key))

    def _page(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def _scroll_to_row(self, row: int) -> None:
        top = round(self.scroll_y)
        height = self._page()
        if row < top:
            self.scroll_to(y=row, animate=False)
        elif row >= top + height:
            self.scroll_to(y=row - height + 1, animate=False)

    # --- actions -------------------------------------------------------------------------------

    def _step(self, delta: int) -> None:
        if not self.rows:
            return
        row = self.cursor_row
        row = 0 if row is None else max(0, min(len(self.rows) - 1, row + delta))
        self._move(self.rows[row])

    def action_cursor_up(self) -> None:
        self._step(-1)

    def action_cursor_down(self) -> None:
        self._step(1)

    def action_page_up(self) -> None:
        self._step(-self._page())

    def action_page_down(self) -> None:
        self._step(self._page())

    def action_first(self) -> None:
        self._step(-len(self.rows))

    def action_last(self) -> None:
        self._step(len(self.rows))

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(RowSelected(self, self.cursor_key))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            x = 0
            for column, width in zip(self.columns, self._fit(), strict=True):
                if x <= offset.x < x + width + len(SEPARATOR):
                    self.post_message(HeaderClicked(self, column.key))
                    return
                x += width + len(SEPARATOR)
            return
        row = round(self.scroll_y) + offset.y - 1
        if 0 <= row < len(self.rows):
            key = self.rows[row]
            if key == self.cursor_key:
                self.post_message(RowSelected(self, key))
            else:
                self._move(key)

    # --- drawing -------------------------------------------------------------------------------

    def _fit(self) -> list[int]:
        width = self.scrollable_content_region.width
        if self._widths[0] != width:
            self._widths = (width, fit_widths(self.columns, width))
        return self._widths[1]

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, len(self.rows) + 1)
        if self.cursor_row is not None:
            self._scroll_to_row(self.cursor_row)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self.refresh()

    def render_lines(self, crop: Region) -> list[Strip]:
        # Styles come from the DOM, which costs more than drawing a row: look them up once a frame.
        cursor = self.get_component_rich_style("virtual-table--cursor")
        self._frame = (self.rich_style, Style(bgcolor=cursor.bgcolor), self.has_focus)
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base, cursor, focused = self._frame
        widths = self._fit()
        if y == 0:
            return self._header(widths, width, base)
        row = round(self.scroll_y) + y - 1
        if row >= len(self.rows):
            return Strip.blank(width, base)
        key = self.rows[row]
        version, cells = self.cells(key)
        at_cursor = key == self.cursor_key
        cache_key = (key, version, width, at_cursor, focused)
        strip = self._strips.get(cache_key)
        if strip is not None:
            return strip
        line = Text(style=base, end="", no_wrap=True)
        # Not strict: a row whose flow has just left the store has no cells and is drawn blank.
        for column, w, cell in zip(self.columns, widths, cells, strict=False):
            if w <= 0:
                continue
            line.append_text(self._fitted(cell, w, column.right))
            line.append(SEPARATOR)
        style = base
        if at_cursor:
            style = base + cursor
            line.stylize(cursor)
        strip = Strip(line.render(self.app.console), line.cell_len).crop_extend(0, width, style)
        self._strips[cache_key] = strip
        return strip

    @staticmethod
    def _fitted(cell: Text, width: int, right: bool) -> Text:
        c = cell.copy()
        c.no_wrap = True
        c.end = ""
        if c.cell_len > width:
            c.truncate(width, overflow="ellipsis")
        c.align("right" if right else "left", width)
        return c

    def _header(self, widths: list[int], width: int, base: Style) -> Strip:
        header = base + self.get_component_rich_style("virtual-table--header")
        sorted_style = base + self.get_component_rich_style("virtual-table--header-sorted")
        line = Text(style=header, end="", no_wrap=True)
        for column, w in zip(self.columns, widths, strict=True):
            if w <= 0:
                continue
            label = column.label
            style = header
            if column.key == self.sort_column:
                label = label + ("▼" if self.sort_reverse else "▲")
                style = sorted_style
            line.append_text(self._fitted(Text(label, style=style), w, column.right))
            line.append(SEPARATOR)
        return Strip(line.render(self.app.console), line.cell_len).crop_extend(0, width, header)
