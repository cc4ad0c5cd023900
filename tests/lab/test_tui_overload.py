"""bench-live's TUI check past the knee (imaptap_lab.tui_overload): reading the status line's
loss count off the screen as the TUI draws it."""

from __future__ import annotations

from imaptap.tui import display
from imaptap_lab import tui_overload


def test_the_counts_the_status_line_draws_read_back():
    for n in (0, 7, 12_345, 999_999):
        assert tui_overload.shown_count(display.count(n).encode()) == n
    # past a million the line rounds: read back within its rounding
    for n in (1_234_567, 9_950_000):
        assert abs(tui_overload.shown_count(display.count(n).encode()) - n) <= 50_000
    assert tui_overload.shown_count(display.count(23_456_789).encode()) == 23_000_000


def test_the_last_loss_count_on_screen_wins():
    screen = (b"\x1b[38;5;112;48;5;17mlost 0\x1b[0m ... \x1b[1;37;41mlost 12,345\x1b[0m"
              b"\x1b[39;1H ... lost 1.5M\x1b[0m")
    assert tui_overload.last_lost(screen) == 1_500_000
    assert tui_overload.last_lost(b"\x1b[1;3H LIVE itap0 \xc2\xb7 starting") is None
