"""The one exception live capture raises on purpose."""

from __future__ import annotations


class LiveError(Exception):
    """A one-line, user-facing reason why live capture cannot run (the CLI exits 2)."""
