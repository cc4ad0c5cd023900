"""What an auditor checks in one session beyond its facts, kept apart from session.py.

`ImapSession` calls its `SessionAudit` at a few points (each client command, a login's
credentials and outcome, each capability list) and lists the audit's findings after its own.
The audit keeps:

- whether the server announced LOGINDISABLED and a password went in clear all the same
  (RFC 3501 6.2.3, 7.2.1: a client must not send LOGIN then);
- whether the server offered AUTH=PLAIN or AUTH=LOGIN on this connection while it was not
  encrypted (everything the session reads is in clear: it stops at TLS);
- commands the client sent behind STARTTLS before the server answered it: bytes that a
  server which keeps its plaintext input buffer across the TLS handshake runs as if they had
  come through TLS (CVE-2011-0411 and its kin in Postfix, Cyrus, Courier, Dovecot);
- each login attempt: command, mechanism, user, outcome, and a keyed fingerprint of the
  password, computed here from the password as the server received it and kept instead of it;
- the client's habits in clear (tags, the commands it opens with, how it writes LOGIN's
  arguments and mailbox names, SASL-IR), from which `imaptap.clients` guesses the software.

Every list here is bounded (a hostile client cannot grow a flow), and nothing here holds a
password: only `PasswordFingerprint` sees one, and returns a truncated HMAC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from imaptap.findings import Finding
from imaptap.imap import parse

#: Login attempts kept per flow; later ones are counted in ``attempts_dropped``.  Servers
#: close a connection after a few failures (Dovecot after 3), so a flow with more than this
#: is an attack tool, and the first 32 already say which kind.
MAX_ATTEMPTS: Final = 32
#: Tags and command names kept of a flow's start: a client's habits show in its first lines.
MAX_HABIT_TAGS: Final = 4
MAX_HABIT_COMMANDS: Final = 12
#: Characters kept of a tag or a user name in an attempt (as the session keeps them).
MAX_HABIT_TAG: Final = 64
MAX_ATTEMPT_USER: Final = 256
#: Hex digits kept of a password's HMAC-SHA256: 48 bits tell the passwords of any real run
#: apart (among 100,000 distinct passwords two collide with a chance of 1 in 50,000) and fit a
#: table column; the password cannot be had back from it without the key.
FINGERPRINT_HEX: Final = 12
#: The shortest key accepted: HMAC-SHA256 wants at least its output length (RFC 2104 section 3).
MIN_KEY_BYTES: Final = 32
#: Mechanisms whose exchange carries a password the server checks as it is.
PASSWORD_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN"})
#: Capabilities that offer a password in clear before TLS.
PLAINTEXT_AUTH_CAPABILITIES: Final = frozenset({"AUTH=PLAIN", "AUTH=LOGIN"})
#: Security-relevant capability names kept per flow (STARTTLS, LOGINDISABLED, AUTH=...): a
#: server lists a handful; the bound holds against one that lists hundreds.
MAX_OFFERED: Final = 16


class PasswordFingerprint:
    """HMAC-SHA256 of a password under the installation's key, truncated to `FINGERPRINT_HEX`
    hex digits: the same password gives the same fingerprint in every run with that key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a password key needs at least {MIN_KEY_BYTES} bytes, not {len(key)}")
        self._key = bytes(key)

    def __call__(self, password: bytes) -> str:
        # here, not at the top: hmac loads OpenSSL, a tenth of a replay's start-up, and only a
        # login needs it; hmac.digest is its one-shot C path, a fifth of the cost of an HMAC object
        import hmac

        return hmac.digest(self._key, password, "sha256").hex()[:FINGERPRINT_HEX]

    def __repr__(self) -> str:
        return "PasswordFingerprint(<key>)"  # never the key itself

    def __reduce__(self) -> tuple[type[PasswordFingerprint], tuple[bytes]]:
        # --workers sends each flow's audit to the parent through a pipe: pickle rebuilds this
        # with its key, as compiled (mypyc) classes cannot be made without their __init__
        return (PasswordFingerprint, (self._key,))


class LoginAttempt(NamedTuple):
    """One LOGIN or AUTHENTICATE, without its secret (a JSON flow record's ``login_attempts``)."""

    command: str
    """``LOGIN`` or ``AUTHENTICATE``."""
    mechanism: str
    """``LOGIN`` for the LOGIN command, else the SASL mechanism."""
    user: str | None
    password_hmac: str | None
    """The password's `PasswordFingerprint`; None where no password crossed (CRAM-MD5, TLS)
    or no key was given."""
    ok: bool | None
    """None while the completion was not seen."""

    def record(self) -> dict[str, object]:
        """As the JSON flow record writes it."""
        return self._asdict()


#: A server sends the same list to every client: what this many distinct lists offer is kept.
_LISTS_KEPT: Final = 256


@functools.lru_cache(maxsize=_LISTS_KEPT)
def _what_a_list_offers(names: tuple[str, ...]) -> tuple[bool, bool, tuple[str, ...]]:
    """(LOGINDISABLED, a plaintext mechanism, the security-relevant names) of a capability list."""
    security = tuple(n for n in names if n in ("STARTTLS", "LOGINDISABLED") or n.startswith("AUTH="))
    return "LOGINDISABLED" in names, not PLAINTEXT_AUTH_CAPABILITIES.isdisjoint(names), security


#: An audit's lists before their first item: one empty tuple shared by every session (an empty
#: list is 56 bytes, four a flow, and a SYN scan's flows never fill one); a list at the first.
_NONE: Final[tuple[()]] = ()

# tuple.__new__ builds a LoginAttempt without the NamedTuple's Python-level __new__ (as session.py
# builds its Messages)
_new: Final = tuple.__new__


def token_form(tok: object) -> str:
    """How an argument was written: ``atom``, ``quoted``, ``literal`` or ``literal+``."""
    if isinstance(tok, parse.Literal):
        return "literal" if tok.sync else "literal+"
    if isinstance(tok, bytes):
        return "quoted"
    if isinstance(tok, str):
        return "atom"
    return "other"


class SessionAudit:
    """The audit facts of one session, fed by `ImapSession`; its lists are made at their first item."""

    __slots__ = ("fingerprint", "attempts", "attempts_dropped", "logindisabled", "login_despite_logindisabled",
                 "auth_plain_offered", "offered", "commands_after_starttls", "tags", "opening", "login_forms",
                 "mailbox_form", "sasl_ir", "_current", "_last_list", "_logged_in", "_held")

    def __init__(self, fingerprint: Callable[[bytes], str] | None = None) -> None:
        self.fingerprint = fingerprint
        """Makes a password's fingerprint; None: attempts are kept without one."""
        self.attempts: list[LoginAttempt] | tuple[()] = _NONE
        self.attempts_dropped = 0
        self.logindisabled = False
        """The last capability list seen announced LOGINDISABLED."""
        self.login_despite_logindisabled = False
        self.auth_plain_offered = False
        self.offered: list[str] | tuple[()] = _NONE
        """STARTTLS, LOGINDISABLED and AUTH= names of any capability list seen, in order: what the
        server offers before login (the list after login drops them)."""
        self.commands_after_starttls = 0
        self.tags: list[str] | tuple[()] = _NONE
        """The first tags the client used."""
        self.opening: list[str] | tuple[()] = _NONE
        """The first command names, repeats included."""
        self.login_forms: tuple[str, str] | None = None
        """(user, password) forms (`token_form`) of the first LOGIN."""
        self.mailbox_form: str | None = None
        """`token_form` of the first SELECT or EXAMINE argument."""
        self.sasl_ir: bool | None = None
        """The first AUTHENTICATE carried an initial response (RFC 4959)."""
        self._current: int | None = None  # index of the attempt waiting for its outcome
        self._last_list: tuple[str, ...] = ()
        self._logged_in = False
        self._held: tuple[str, ...] | None = None  # a list that came while a login awaited its answer

    # --- what the session tells ---------------------------------------------------------------

    def capabilities(self, names: Sequence[str]) -> None:
        """A capability list (upper case) was announced."""
        if self._logged_in:
            return  # the list after a login says nothing of what is offered before one (Cyrus adds LOGINDISABLED)
        if self._current is not None:
            # most likely the login's own answer (its OK carries the list after the login, and
            # comes before its outcome is known): kept until the outcome says which it was
            self._held = tuple(names)
            return
        self._take(tuple(names))

    def _take(self, key: tuple[str, ...]) -> None:
        if key == self._last_list:
            return  # the greeting's list again, in a CAPABILITY response: nothing new
        self._last_list = key
        logindisabled, plain, security = _what_a_list_offers(key)
        self.logindisabled = logindisabled
        if plain:
            self.auth_plain_offered = True
        offered = self.offered
        for name in security:
            if name not in offered:
                if len(offered) >= MAX_OFFERED:
                    break
                if isinstance(offered, tuple):
                    offered = self.offered = []
                offered.append(name)

    def command(self, tag: str, name: str, behind_starttls: bool) -> None:
        """A client command; ``behind_starttls`` while a STARTTLS waits for its answer."""
        tags = self.tags
        if len(tags) < MAX_HABIT_TAGS:
            if isinstance(tags, tuple):
                tags = self.tags = []
            tags.append(tag[:MAX_HABIT_TAG])
        opening = self.opening
        if len(opening) < MAX_HABIT_COMMANDS:
            if isinstance(opening, tuple):
                opening = self.opening = []
            opening.append(name)
        if behind_starttls:
            self.commands_after_starttls += 1

    def mailbox(self, tok: object) -> None:
        """The argument of a SELECT or EXAMINE."""
        if self.mailbox_form is None:
            self.mailbox_form = token_form(tok)

    def login(self, user: str | None, user_tok: object, password_tok: object | None) -> None:
        """A LOGIN command, its user and its password token (None when the line lacks one)."""
        if self.login_forms is None and password_tok is not None:
            self.login_forms = (token_form(user_tok), token_form(password_tok))
        password = parse.astring(password_tok) if password_tok is not None else None
        if password_tok is not None and self.logindisabled:
            self.login_despite_logindisabled = True
        self._begin("LOGIN", "LOGIN", user, password)

    def authenticate(self, mechanism: str, initial_response: bool) -> None:
        """An AUTHENTICATE command."""
        if self.sasl_ir is None:
            self.sasl_ir = initial_response
        self._begin("AUTHENTICATE", mechanism, None, None)

    def sasl(self, mechanism: str, step: int, decoded: bytes, user: str | None) -> None:
        """A client's SASL response, decoded; ``user`` as the session now knows it."""
        password: bytes | None = None
        if mechanism == "PLAIN":
            parts = decoded.split(b"\x00")
            if len(parts) == 3:
                password = parts[2]
        elif mechanism == "LOGIN" and step >= 1:
            password = decoded
        if mechanism in PASSWORD_MECHANISMS and password is not None and self.logindisabled:
            self.login_despite_logindisabled = True
        current = self._current
        if current is None:
            return
        attempts = self.attempts
        assert isinstance(attempts, list), "an attempt waits for its outcome"
        command, mech, old_user, fingerprint, ok = attempts[current]
        if password is not None and self.fingerprint is not None and fingerprint is None:
            fingerprint = self.fingerprint(password)
        attempts[current] = _new(LoginAttempt, (command, mech, user[:MAX_ATTEMPT_USER] if user else old_user,
                                                     fingerprint, ok))

    def login_done(self, ok: bool) -> None:
        """The outcome of the login waiting for one."""
        held, self._held = self._held, None
        if ok:
            self._logged_in = True
        elif held is not None:
            self._take(held)
        current = self._current
        if current is None:
            return
        self._current = None
        attempts = self.attempts
        assert isinstance(attempts, list), "an attempt waits for its outcome"
        command, mech, user, fingerprint, _ = attempts[current]
        attempts[current] = _new(LoginAttempt, (command, mech, user, fingerprint, ok))

    def _begin(self, command: str, mechanism: str, user: str | None, password: bytes | None) -> None:
        self._current = None
        if len(self.attempts) >= MAX_ATTEMPTS:
            self.attempts_dropped += 1
            return
        fingerprint = None
        if password is not None and self.fingerprint is not None:
            fingerprint = self.fingerprint(password)
        attempts = self.attempts
        if isinstance(attempts, tuple):
            attempts = self.attempts = []
        self._current = len(attempts)
        attempts.append(_new(LoginAttempt, (command, mechanism, user[:MAX_ATTEMPT_USER] if user else None,
                                                 fingerprint, None)))

    # --- what it says -------------------------------------------------------------------------

    def findings(self) -> list[Finding]:
        """The audit's findings, in the order of `imaptap.findings.Finding`."""
        out = []
        if self.login_despite_logindisabled:
            out.append(Finding.LOGIN_DESPITE_LOGINDISABLED)
        if self.auth_plain_offered:
            out.append(Finding.AUTH_PLAIN_BEFORE_STARTTLS)
        if self.commands_after_starttls:
            out.append(Finding.COMMANDS_AFTER_STARTTLS)
        return out
