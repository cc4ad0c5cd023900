"""Outputs that consume flow and message events."""


class OutputError(Exception):
    """The output cannot be written (a full disk, an I/O error): reported in one line."""
