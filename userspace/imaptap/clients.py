"""Which client software a flow came from: its ID where it sent one, else a passive fingerprint.

Every client shows habits in clear before it logs in: the shape of its tags (``A0001``, ``a1``,
``1``), the commands it opens with, how it writes LOGIN's arguments and mailbox names, whether
its AUTHENTICATE carries an initial response.  `SIGNATURES` holds those habits for the clients
the lab runs against a real Dovecot and a real Cyrus (``pcaps/``, made by
``scripts/make-captures``; each entry says which capture shows it), and `guess` scores a flow's
habits against them.

A fingerprint is a guess, and says so: its confidence is the share of a signature's weight the
flow showed and matched, scaled down when the flow showed little, and never above
`MAX_PASSIVE_CONFIDENCE` (anyone can imitate a tag style).  ID (RFC 2971) is what the client
says it is: confidence 1.0, basis ``id``.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from imaptap.imap.audit import SessionAudit

#: A passive fingerprint never claims more: habits can be imitated.
MAX_PASSIVE_CONFIDENCE = 0.95
#: Below this the flow is "unknown": a guess this weak misleads more than it tells.
MIN_CONFIDENCE = 0.5
#: Characters kept of the name and version a client's ID gives.
MAX_ID_TEXT = 64

#: The weight of each habit in a signature: the tag style tells most clients apart alone.
WEIGHT_TAG = 0.5
WEIGHT_OPENING = 0.2
WEIGHT_LOGIN_FORMS = 0.15
WEIGHT_MAILBOX_FORM = 0.1
WEIGHT_SASL_IR = 0.05


class ClientGuess(NamedTuple):
    """The client software of a flow (a JSON flow record's ``client_software``)."""

    name: str
    version: str | None
    confidence: float
    """From 0 to 1: 1.0 from ID, at most `MAX_PASSIVE_CONFIDENCE` from habits."""
    basis: str
    """``id`` (the client's ID command) or ``fingerprint`` (its habits)."""

    def record(self) -> dict[str, object]:
        """As the JSON flow record writes it."""
        return {"name": self.name, "version": self.version, "confidence": self.confidence, "from": self.basis}


class Signature(NamedTuple):
    """One client's habits, as the lab's captures show them; None where it has no fixed habit."""

    name: str
    first_tag: str
    """A pattern the first tag matches in full."""
    opening: tuple[str, ...] | None
    """Command names the client opens with (any of them first)."""
    login_forms: tuple[str, str] | None
    """`imaptap.imap.audit.token_form` of LOGIN's user and password."""
    mailbox_form: str | None
    sasl_ir: bool | None
    seen_in: str
    """The capture that shows it."""


SIGNATURES: tuple[Signature, ...] = (
    # imaplib.IMAP4: tagpre is 4 letters A-P from a random 16-bit number, tags count from 0; it
    # asks CAPABILITY on connect even after a greeting that has them; LOGIN user as given (an
    # atom), password always quoted; mailbox names as given.
    Signature("Python imaplib", r"[A-P]{4}0", ("CAPABILITY",), ("atom", "quoted"), "atom", False,
              "pcaps/login-atom.pcap"),
    # imaplib2 (OfflineIMAP): the same tag prefix, counted from 1; CAPABILITY, then ID.
    Signature("OfflineIMAP", r"[A-P]{4}1", ("CAPABILITY",), None, "atom", False,
              "pcaps/cyrus-offlineimap.pcap"),
    # curl: one letter and three digits from A001; CAPABILITY first; SASL-IR when told.
    Signature("curl", r"[A-Z]001", ("CAPABILITY",), ("atom", "atom"), "atom", None, "pcaps/curl.pcap"),
    # fetchmail: A0001 on; trusts the greeting's capabilities and logs in at once; quotes both
    # LOGIN arguments and the mailbox.
    Signature("fetchmail", r"A0001", ("LOGIN", "AUTHENTICATE", "CAPABILITY"), ("quoted", "quoted"), "quoted",
              None, "pcaps/cyrus-fetchmail.pcap"),
    # mbsync (isync): bare numbers from 1; logs in at once after a greeting with capabilities;
    # quotes both LOGIN arguments and the mailbox; COMPRESS right after the login.
    Signature("mbsync", r"1", ("LOGIN", "AUTHENTICATE", "CAPABILITY"), ("quoted", "quoted"), "quoted",
              None, "pcaps/compress.pcap"),
)


def from_id(client_id: dict[str, str | None] | None) -> ClientGuess | None:
    """The software an ID (RFC 2971) names, if it names one."""
    if not client_id:
        return None
    name = client_id.get("name")
    if not name:
        return None
    version = client_id.get("version")
    return ClientGuess(name[:MAX_ID_TEXT], version[:MAX_ID_TEXT] if version else None, 1.0, "id")


#: Each signature's tag pattern, compiled once.
_TAG_PATTERNS = tuple(re.compile(sig.first_tag) for sig in SIGNATURES)


class Habits(NamedTuple):
    """What a signature is scored on, of one flow: the tag only as which signatures' patterns it
    fits (imaplib's tags carry a random prefix: the tag itself would make every flow new)."""

    tag_fits: int
    """Bit ``i`` set: the first tag fits ``SIGNATURES[i]``."""
    first_command: str | None
    login_forms: tuple[str, str] | None
    mailbox_form: str | None
    sasl_ir: bool | None


def habits_of(audit: SessionAudit) -> Habits:
    """The habits `score` looks at."""
    fits = 0
    if audit.tags:
        tag = audit.tags[0]
        for i, pattern in enumerate(_TAG_PATTERNS):
            if pattern.fullmatch(tag) is not None:
                fits |= 1 << i
    return Habits(fits, audit.opening[0] if audit.opening else None, audit.login_forms, audit.mailbox_form,
                  audit.sasl_ir)


def score(index: int, habits: Habits) -> float:
    """How well a flow's habits fit ``SIGNATURES[index]``: 0 when its tags contradict it."""
    if not habits.tag_fits >> index & 1:
        return 0.0
    sig = SIGNATURES[index]
    matched = total_seen = WEIGHT_TAG
    total = WEIGHT_TAG
    checks = (
        (sig.opening, habits.first_command, WEIGHT_OPENING, lambda want, got: got in want),
        (sig.login_forms, habits.login_forms, WEIGHT_LOGIN_FORMS, lambda want, got: got == want),
        (sig.mailbox_form, habits.mailbox_form, WEIGHT_MAILBOX_FORM, lambda want, got: got == want),
        (sig.sasl_ir, habits.sasl_ir, WEIGHT_SASL_IR, lambda want, got: got == want),
    )
    for want, got, weight, fits in checks:
        if want is None:
            continue
        total += weight
        if got is None:
            continue
        total_seen += weight
        if fits(want, got):
            matched += weight
    # the share that fitted of what was seen, scaled by how much of the signature was seen
    return (matched / total_seen) * (0.5 + 0.5 * total_seen / total)


def guess(audit: SessionAudit, client_id: dict[str, str | None] | None) -> ClientGuess | None:
    """The client of a flow: from its ID, else the best-fitting signature, else None."""
    named = from_id(client_id)
    if named is not None:
        return named
    return passive_guess(habits_of(audit))


#: Distinct habits whose guess is kept: one client program shows the same habits flow after
#: flow, so a run meets a handful (a client making up command names makes the cache turn over).
_GUESSES_KEPT = 1024


@functools.lru_cache(maxsize=_GUESSES_KEPT)
def passive_guess(habits: Habits) -> ClientGuess | None:
    """The best-fitting signature for these habits, if one fits well enough."""
    best: tuple[float, Signature] | None = None
    for index, sig in enumerate(SIGNATURES):
        s = score(index, habits)
        if s >= MIN_CONFIDENCE and (best is None or s > best[0]):
            best = (s, sig)
    if best is None:
        return None
    return ClientGuess(best[1].name, None, round(min(best[0], MAX_PASSIVE_CONFIDENCE), 2), "fingerprint")


_SHAPES = ((re.compile(r"[A-Z]+"), "A"), (re.compile(r"[a-z]+"), "a"), (re.compile(r"[0-9]+"), "1"))


def tag_style(tag: str) -> str:
    """A tag's shape for a person: letters and digits by kind, ``A0001`` -> ``A1``, ``1`` -> ``1``."""
    out = tag
    for pattern, mark in _SHAPES:
        out = pattern.sub(mark, out)
    return out[:16]
