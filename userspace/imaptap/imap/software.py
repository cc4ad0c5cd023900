"""The server's product and version, from its greeting or else from its ID answer (RFC 2971).

A greeting's text is free-form (RFC 3501 section 7.1.1), but the common servers each word
theirs in a shape of their own: ``Dovecot (Debian) ready.``, ``host Cyrus IMAP
3.6.1-Debian-3.6.1-4+deb12u5 server ready``, ``Courier-IMAP ready. Copyright ...``,
``Microsoft Exchange Server 2003 IMAP4rev1 server version 6.5.7638.1 (host) ready.``,
``host Zimbra IMAP4rev1 server ready``, ``host IMAP4rev1 2007f.404 at <date>`` (UW). Words of the
protocol (``IMAP4rev1``, ``IMAP4``, ``server``, ``ready``) name no product: ``* OK IMAP4rev1``
gives none, so that the ID answer's name can fill it.  Versions keep every character real ones
have (``+``, ``~``, ``_``, ``-``).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

#: Characters kept of the software text, and of a product or version.
MAX_SOFTWARE = 80
MAX_VERSION = 64

# a version as the products write it: a digit first (or "v" and a digit), then anything but
# space, brackets and parentheses; the sentence's own full stop or comma is not part of it
_V = r"(?P<v>v?\d[\w.+~:\-]*)"

#: (product, a word the text must hold, pattern): the first pattern that matches a text
#: (case-insensitive) names its product, and its group ``v``, where it has one and it
#: matched, the version.  The word, looked for in the lower-cased text first, spares compiling
#: and running the patterns of every product a greeting does not name.
_PRODUCTS: tuple[tuple[str, str, str], ...] = (
    ("Dovecot", "dovecot", r"\bDovecot\b"),
    ("Cyrus IMAP", "cyrus imap", r"\bCyrus IMAP\S*(?:\s+" + _V + ")?"),
    ("Microsoft Exchange", "microsoft exchange", r"\bMicrosoft Exchange\b[^\[]*?\bversion\s+" + _V),
    ("Microsoft Exchange", "microsoft exchange", r"\bMicrosoft Exchange Server (?P<v>20\d\d)\b"),
    ("Microsoft Exchange", "microsoft exchange", r"\bMicrosoft Exchange\b"),
    ("Courier-IMAP", "courier-imap", r"\bCourier-IMAP\b"),
    ("Zimbra", "zimbra", r"\bZimbra\b"),
    ("UW IMAP", "imap4rev1 ", r"\bIMAP4rev1 (?P<v>20\d\d[a-z]?\.\d+|v\d+\.\d+)(?= at | server\b)"),
    ("UW IMAP", "uw imap", r"\bUW IMAP\b"),
    ("Coremail", "coremail", r"\bCoremail\b"),
    ("hMailServer", "hmailserver", r"\bhMailServer\b"),
    ("Gimap", "gimap", r"\bGimap\b"),
    ("Stalwart", "stalwart", r"\bStalwart\b"),
    ("Kerio Connect", "kerio connect", r"\bKerio Connect(?:\s+" + _V + ")?"),
    ("MDaemon", "mdaemon", r"\bMDaemon(?:\s+" + _V + ")?"),
    ("Lotus Domino", "domino", r"\bDomino\b(?:.*?\bRelease\s+" + _V + ")?"),
    ("IceWarp", "icewarp", r"\bIceWarp(?:\s+" + _V + ")?"),
    ("CommuniGate Pro", "communigate pro", r"\bCommuniGate Pro\b(?:\D*?\s" + _V + ")?"),
    ("Mercury/32", "mercury/32", r"\bMercury/32(?:\s+" + _V + ")?"),
    ("SmarterMail", "smartermail", r"\bSmarterMail\b"),
    ("Sun Java System Messaging Server", "messaging server",
     r"\bSun Java(?:\(tm\))? System Messaging Server(?:\s+" + _V + ")?"),
    ("Oracle Communications Messaging Server", "messaging server",
     r"\bOracle Communications Messaging Server(?:\s+" + _V + ")?"),
    ("Binc IMAP", "binc imap", r"\bBinc IMAP(?:\s+" + _V + ")?"),
    ("Apache James", "james", r"\bJAMES\b"),
    ("Archiveopteryx", "archiveopteryx", r"\bArchiveopteryx\b"),
    ("Citadel", "citadel", r"\bCitadel\b"),
    ("Axigen", "axigen", r"\bAxigen\b"),
    ("Yandex", "yandex", r"\bYandex\b"),
)
# patterns are compiled on first use and cached by re: compiling them all at import would be a
# tenth of a replay's start-up
_READY = r"[\s.,;:!-]*\b(?:is\s+)?ready\b.*$"
# a dotted number standing alone: what an unknown product's greeting must show to count as
# naming software at all (IMAP4rev1 and its like are words, not versions)
_VERSION_WORD = r"(?<![\w.])v?\d+(?:\.\d+)+[\w.+~\-]*"


class Software(NamedTuple):
    """What a greeting or an ID answer says of the server software."""

    shown: str | None
    """The text for ``server_software``: product and version as written, or an unknown
    product's greeting text without its "ready"."""
    product: str | None
    version: str | None


NONE = Software(None, None, None)


def _version(raw: str | None) -> str | None:
    if not raw:
        return None
    raw = raw.rstrip(".,:-")
    if raw[:1] in "vV" and raw[1:2].isdigit():
        raw = raw[1:]
    return raw[:MAX_VERSION] or None


def _product(text: str) -> tuple[str, str | None, str | None] | None:
    """(product, version as written, version) of the first known product ``text`` names."""
    lower = text.lower()
    for product, word, pattern in _PRODUCTS:
        if word not in lower:
            continue
        m = re.search(pattern, text, re.I)
        if m:
            raw = m.groupdict().get("v")
            written = raw.rstrip(".,:-") if raw else None
            return product, written, _version(raw)
    return None


def _is_address(word: str) -> bool:
    """An IPv4 address as written in a greeting's "ready for requests from ..."."""
    parts = word.split(".")
    return len(parts) == 4 and all(p.isdigit() and str(int(p)) == p and int(p) < 256 for p in parts)


#: Greetings read so far (text -> what it names): a server greets every connection alike, and
#: reading one runs the product patterns one by one (2% of a replay's analysis); bounded
#: against a server whose greeting varies each time.
_GREETINGS_KEPT: Final = 256
_greetings: Final[dict[str, Software]] = {}


def from_greeting(text: str) -> Software:
    """The software a greeting's text (after its response code) names, if any."""
    named = _greetings.get(text)
    if named is None:
        if len(_greetings) >= _GREETINGS_KEPT:
            _greetings.clear()
        named = _greetings[text] = _read_greeting(text)
    return named


def _read_greeting(text: str) -> Software:
    known = _product(text)
    if known is not None:
        product, written, version = known
        shown = product if written is None else f"{product} {written}"
        return Software(shown[:MAX_SOFTWARE], product, version)
    cleaned = re.sub(_READY, "", text, flags=re.I).strip(" .")
    if not any(not _is_address(m.group()) for m in re.finditer(_VERSION_WORD, cleaned)):
        return NONE  # protocol words and the like: no product named
    return Software(cleaned[:MAX_SOFTWARE], None, None)


def from_id(params: dict[str, str | None]) -> Software:
    """The software an ID answer's ``name`` and ``version`` name (keys lower-cased)."""
    name = params.get("name")
    if not name:
        return NONE
    known = _product(name)
    product = known[0] if known is not None else name[:MAX_SOFTWARE]
    return Software(name[:MAX_SOFTWARE], product, _version(params.get("version")))
