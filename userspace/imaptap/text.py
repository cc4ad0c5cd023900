"""Network text made safe to show: every character visible, no control code sent.

A user name like ``\\x1b]0;pwned\\x07`` or one with a right-to-left override must reach a
terminal, a Markdown ticket or a log as the characters it is.  C0 and C1 controls, DEL,
zero-width and bidi formatting characters, line and paragraph separators, surrogates, the BOM
and interlinear annotations are shown escaped (``\\x1b``, ``\\u202e``).  The TUI (`tui.display`)
and the report (`output.report`) both use this; it imports nothing.
"""

from __future__ import annotations

import re

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                    "\ud800-\udfff\ufeff\ufff9-\ufffb]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(ch: str) -> str:
    """The visible form of one unsafe character."""
    named = _NAMED.get(ch)
    if named:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object) -> str:
    """``value`` as a string with every unsafe character escaped; None is ""."""
    if value is None:
        return ""
    s = value if isinstance(value, str) else str(value)
    return UNSAFE.sub(lambda m: escape(m.group()), s)
