"""The names of what a flow did that IMAP does not allow, or that the capture could not follow.

They are the keys of a flow record's ``anomalies`` (README, "JSON Lines"): a contract, declared
here once.  Bad input is never an exception: each case is counted under its name and the flow
goes on.
"""

from __future__ import annotations

import enum


class Anomaly(enum.StrEnum):
    """An anomaly of the conversation, counted under this name."""

    BAD_REQUEST = "bad_request"
    """A client line that is not a command (mail text after a capture gap, a SASL response of
    a session seen from the middle): counted, never shown."""
    BAD_RESPONSE = "bad_response"
    """A server line that is neither untagged, a continuation nor a tagged completion."""
    BAD_UNTAGGED = "bad_untagged"
    """``* `` followed by something that is not a response name."""
    UNKNOWN_UNTAGGED = "unknown_untagged"
    """``* NAME`` with a name IMAP does not define: most often a mail body line after a gap."""
    BAD_SASL_RESPONSE = "bad_sasl_response"
    """A SASL response that is not base64."""
    TOO_MANY_PENDING = "too_many_pending"
    """More commands waiting for their completion than a session keeps; the oldest is dropped."""
    LOGIN_COMPLETION_LOST = "login_completion_lost"
    """A login's tagged completion was never seen; its outcome was inferred from what followed."""


class StreamAnomaly(enum.StrEnum):
    """An anomaly of one direction's byte stream, counted as ``client_<name>`` or ``server_<name>``."""

    LINE_TOO_LONG = "line_too_long"
    """A line longer than the stream keeps (stream.LINE_CAP); the rest of it is not kept."""
    TOO_MANY_LITERALS = "too_many_literals"
    """More literals in one line than the stream keeps (stream.MAX_LITERALS_PER_LINE)."""
    LARGE_LITERAL = "large_literal"
    """A literal of a gigabyte or more was announced (it is still skipped byte for byte)."""
    COMPRESSED_GAP = "compressed_gap"
    """Compressed bytes were not captured: DEFLATE cannot skip, nothing after them is decoded."""
    INFLATE_ERROR = "inflate_error"
    """The compressed stream could not be inflated."""


def stream_anomaly_key(side: str, anomaly: StreamAnomaly) -> str:
    """The ``anomalies`` key of a stream anomaly of ``side`` (``client`` or ``server``)."""
    return f"{side}_{anomaly.value}"


#: Every name a flow record's ``anomalies`` may hold, for the README and the tests.
ALL_KEYS = tuple(a.value for a in Anomaly) + tuple(
    stream_anomaly_key(side, a) for side in ("client", "server") for a in StreamAnomaly)
