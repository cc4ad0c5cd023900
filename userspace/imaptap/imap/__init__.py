"""IMAP: byte streams to lines, lines to facts."""
