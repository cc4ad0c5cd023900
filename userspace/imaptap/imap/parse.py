"""One logical IMAP line -> tokens and the pieces the session needs.

A *logical* line is what `ImapStream` hands over: the physical lines of one command or
response joined across the literals between them (RFC 3501 section 4.3, RFC 7888).  Each
physical line but the last ends with a literal marker ``{n}``, ``{n+}`` or ``~{n}`` and is
followed by that literal's bytes.  Parsing never raises on network input: anything that does
not fit the grammar becomes ``None`` or a shorter result, and the caller records an anomaly.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Final, NamedTuple

from imaptap.imap.atom import Atom

#: Largest literal whose contents are kept: enough for usernames and ID values, never a mail
#: body.  A larger literal is only counted.
LITERAL_KEEP: Final = 1024

#: Tokens parsed from one line at most; the rest of a hostile line is not looked at.
MAX_TOKENS: Final = 512

#: Nesting depth of parenthesised lists followed before giving up on a line.
MAX_LIST_DEPTH: Final = 16


class Literal:
    """A literal's size and the part of its contents that was kept.

    A plain class rather than a dataclass: a dataclass's generated ``__init__`` is Python code
    even where mypyc compiles the class, and the stream makes one per literal."""

    __slots__ = ("size", "data", "complete", "binary", "sync")

    size: int
    data: bytearray
    complete: bool
    """False when bytes of the literal were never captured or were cut at `LITERAL_KEEP`."""
    binary: bool
    """``~{n}`` (RFC 3516 literal8)."""
    sync: bool
    """False for the non-synchronising ``{n+}`` form (RFC 7888)."""

    def __init__(self, size: int, data: bytearray | None = None, complete: bool = True, binary: bool = False,
                 sync: bool = True) -> None:
        self.size = size
        self.data = bytearray() if data is None else data
        self.complete = complete
        self.binary = binary
        self.sync = sync

    def __repr__(self) -> str:
        return (f"Literal(size={self.size}, data={self.data!r}, complete={self.complete}, binary={self.binary},"
                f" sync={self.sync})")

    @property
    def whole(self) -> bytes | None:
        """The contents when every byte was kept, else None."""
        return bytes(self.data) if self.complete and len(self.data) == self.size else None


class RawLine(NamedTuple):
    """One logical line: its physical lines (CRLF removed) and the literals between them.

    A NamedTuple built with ``tuple.__new__`` by the stream: one is made per IMAP line.
    """

    chunks: list[bytes]
    literals: list[Literal] | tuple[()]
    """The literals in order; the shared empty tuple for a line without any."""
    truncated: bool = False
    """Part of the line was not seen (cut at the line cap, or a capture gap)."""

    @property
    def head(self) -> bytes:
        """The first physical line, where tag, command and status live."""
        return self.chunks[0]


Token = "Atom | bytes | Literal | list"

#: A literal marker at the end of a physical line, as a pattern: the grammar `literal_mark`
#: follows by hand (tests/unit/imap/test_parse.py searches with it and compares).
LITERAL_MARK_GRAMMAR: Final = rb"(~?)\{(\d{1,20})(\+?)\}$"

# atom-specials (RFC 3501 section 9): ( ) { SP CTL % * " \ ]
_ATOM_STOP: Final = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_TAG_CHARS: Final = frozenset(range(0x21, 0x7F)) - frozenset(b'(){%*"\\+')
_TAG_BYTES: Final = bytes(sorted(_TAG_CHARS))
# atom characters: printable ASCII but atom-specials
_ATOM_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if c not in _ATOM_STOP)


def literal_mark(physical: bytes) -> tuple[int, bool, bool] | None:
    """``(size, sync, binary)`` when a physical line ends with a literal marker."""
    # LITERAL_MARK_GRAMMAR, by hand: only digits and "+" may stand between the braces, so the
    # mark opens at the last "{".
    if not physical.endswith(b"}"):
        return None
    start = physical.rfind(b"{")
    if start < 0:
        return None
    digits = physical[start + 1 : -1]
    sync = not digits.endswith(b"+")
    if not sync:
        digits = digits[:-1]
    if not 0 < len(digits) <= 20 or not digits.isdigit():
        return None
    return int(digits), sync, start > 0 and physical[start - 1] == 0x7E


def is_tag(word: bytes) -> bool:
    """True for a word that RFC 3501's tag grammar allows (any ASTRING-CHAR but ``+``)."""
    # translate() deletes every allowed byte in C; anything left is not allowed
    return bool(word) and not word.translate(None, _TAG_BYTES)


def text(data: bytes | bytearray) -> str:
    """Network bytes as a str that never fails and never hides a byte."""
    return bytes(data).decode("utf-8", "backslashreplace")


class _Tokens:
    """Flat token reader over the chunks of a `RawLine`."""

    __slots__ = ("chunks", "literals", "ci", "pos", "count")

    def __init__(self, line: RawLine, chunk: int = 0, pos: int = 0) -> None:
        self.chunks = line.chunks
        self.literals = line.literals
        self.ci = chunk
        self.pos = pos
        self.count = 0

    def next(self) -> object | None:
        """The next token, ``")"`` / ``"("`` for parentheses, or None at the end."""
        while self.ci < len(self.chunks):
            chunk = self.chunks[self.ci]
            n = len(chunk)
            pos = self.pos
            while pos < n and chunk[pos] == 0x20:
                pos += 1
            if pos >= n:
                self.ci += 1
                self.pos = 0
                continue
            self.count += 1
            if self.count > MAX_TOKENS:
                return None
            c = chunk[pos]
            if c == 0x28:  # (
                self.pos = pos + 1
                return "("
            if c == 0x29:  # )
                self.pos = pos + 1
                return ")"
            if c == 0x22:  # "
                out = bytearray()
                i = pos + 1
                while i < n:
                    ch = chunk[i]
                    if ch == 0x5C and i + 1 < n:  # backslash escape
                        out.append(chunk[i + 1])
                        i += 2
                        continue
                    if ch == 0x22:
                        self.pos = i + 1
                        return bytes(out)
                    out.append(ch)
                    i += 1
                self.pos = n  # unterminated: keep what there is
                return bytes(out)
            if self.ci < len(self.chunks) - 1 and (c == 0x7B or c == 0x7E):
                # A literal marker is always the last thing on its physical line.
                if literal_mark(chunk[pos:]) is not None and chunk.find(b" ", pos) < 0:
                    lit = self.literals[self.ci] if self.ci < len(self.literals) else None
                    self.ci += 1
                    self.pos = 0
                    return lit if lit is not None else b""
            # atom, with [...] sections kept whole (BODY[HEADER.FIELDS (FROM)])
            i = pos
            depth = 0
            while i < n:
                ch = chunk[i]
                if ch == 0x5B:
                    depth += 1
                elif ch == 0x5D:
                    if depth == 0:
                        break
                    depth -= 1
                elif depth == 0 and ch in _ATOM_STOP and ch != 0x5D:
                    break
                i += 1
            if i == pos:  # a lone special such as { or % : take it as a one-char atom
                i = pos + 1
            self.pos = i
            return Atom(chunk[pos:i].decode("latin-1"))
        return None


def tokens(line: RawLine, chunk: int = 0, pos: int = 0) -> list:
    """All tokens from (chunk, pos) on, with parenthesised lists nested as Python lists."""
    reader = _Tokens(line, chunk, pos)
    root: list = []
    stack = [root]
    while True:
        tok = reader.next()
        if tok is None:
            break
        if tok == "(" and not isinstance(tok, Atom):
            if len(stack) > MAX_LIST_DEPTH:
                break
            sub: list = []
            stack[-1].append(sub)
            stack.append(sub)
        elif tok == ")" and not isinstance(tok, Atom):
            if len(stack) > 1:
                stack.pop()
        else:
            stack[-1].append(tok)
    return root


def astring(tok: object) -> bytes | None:
    """The bytes of an astring / nstring token (atom, quoted or literal); None for NIL or a list."""
    if isinstance(tok, Atom):
        return None if tok.upper() == "NIL" else tok.encode("latin-1")
    if isinstance(tok, bytes):
        return tok
    if isinstance(tok, Literal):
        return tok.whole
    return None


# --- modified UTF-7 mailbox names (RFC 3501 section 5.1.3) ---------------------------------

def decode_mailbox(raw: bytes) -> str:
    """A mailbox name as a person reads it: modified UTF-7 decoded, anything invalid kept as is."""
    if b"&" not in raw:
        return text(raw)
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        amp = raw.find(b"&", i)
        if amp < 0:
            out.append(text(raw[i:]))
            break
        out.append(text(raw[i:amp]))
        end = raw.find(b"-", amp + 1)
        if end < 0:
            out.append(text(raw[amp:]))
            break
        if end == amp + 1:
            out.append("&")
        else:
            b64 = raw[amp + 1 : end].replace(b",", b"/")
            try:
                utf16 = base64.b64decode(b64 + b"=" * (-len(b64) % 4), validate=True)
                out.append(utf16.decode("utf-16-be"))
            except (binascii.Error, ValueError):
                out.append(text(raw[amp : end + 1]))
        i = end + 1
    return "".join(out)


# --- response text: [code] text ---------------------------------------------------------

def split_resp_text(data: bytes) -> tuple[str | None, bytes]:
    """``(code, rest)`` of a resp-text: ``[CAPABILITY IMAP4rev1] hi`` -> ("CAPABILITY IMAP4rev1", b"hi")."""
    if not data.startswith(b"["):
        return None, data
    close = data.find(b"]")
    if close < 0:
        return text(data[1:]), b""  # unterminated code (e.g. a cut line)
    if data.find(b"[", 1, close) < 0:
        # No bracket inside (nearly every code): the first "]" ends it; found in C rather than
        # by the loop below, which CAPABILITY codes of 300 characters made costly.
        return text(data[1:close]), data[close + 1 :].lstrip(b" ")
    depth = 0
    for i, c in enumerate(data):
        if c == 0x5B:
            depth += 1
        elif c == 0x5D:
            depth -= 1
            if depth == 0:
                return text(data[1:i]), data[i + 1 :].lstrip(b" ")
    return text(data[1:]), b""  # unterminated code (e.g. a cut line)


def capability_list(words: bytes | str, drop_last: bool = False) -> list[str]:
    """Upper-cased capability names from a space-separated list.

    ``drop_last`` leaves out the final word, which may have been cut by a truncated line.
    """
    return list(_capability_names(words, drop_last))


def capability_names(words: bytes | str, drop_last: bool = False) -> tuple[str, ...]:
    """`capability_list` as a tuple shared by every caller with the same text: what a session
    keeps, since a server sends the same list to every client."""
    return _capability_names(words, drop_last)


#: A server sends the same list to every client: the lists of this many texts are kept.
@functools.lru_cache(maxsize=256)
def _capability_names(words: bytes | str, drop_last: bool) -> tuple[str, ...]:
    text_ = words.decode("latin-1") if isinstance(words, bytes) else words
    # Upper-casing the whole text never moves a space, so it splits into the same words.
    found = text_.upper().split(None, MAX_CAPABILITIES)[:MAX_CAPABILITIES]
    if found and max(map(len, found)) > MAX_CAPABILITY:
        found = [w[:MAX_CAPABILITY] for w in found]
    if drop_last and found:
        found.pop()
    return tuple(found)


# --- ID (RFC 2971) -------------------------------------------------------------------------

#: Field/value pairs kept from one ID list (RFC 2971 allows 30).
MAX_ID_FIELDS: Final = 30
#: Characters kept of one ID value: RFC 2971's bound of 1024 octets.  Cyrus' "environment" is
#: near 300; the whole list is at most a line (`stream.LINE_CAP`) anyway.
MAX_ID_VALUE: Final = 1024
#: Capability names kept from one list, and characters kept of each.
MAX_CAPABILITIES: Final = 128
MAX_CAPABILITY: Final = 64


def id_params(toks: list) -> dict[str, str | None] | None:
    """The field/value pairs of an ID parameter list, keys lower-cased; None for NIL or junk."""
    if not toks or not isinstance(toks[0], list):
        return None
    items = toks[0]
    out: dict[str, str | None] = {}
    for i in range(0, min(len(items), 2 * MAX_ID_FIELDS) - 1, 2):
        key = astring(items[i])
        if key is None:
            continue
        val = astring(items[i + 1])
        out[text(key).lower()[:64]] = None if val is None else text(val)[:MAX_ID_VALUE]
    return out


# --- commands whose arguments we show -------------------------------------------------------

#: Client commands from RFC 3501/9051 and common extensions.  A client line whose command is not
#: one of these (nor an X- extension) has its arguments hidden: it may be a SASL response or a
#: password the capture started in the middle of.
KNOWN_COMMANDS: Final = frozenset(
    """CAPABILITY NOOP LOGOUT STARTTLS AUTHENTICATE LOGIN SELECT EXAMINE CREATE DELETE RENAME
    SUBSCRIBE UNSUBSCRIBE LIST LSUB STATUS APPEND CHECK CLOSE EXPUNGE SEARCH FETCH STORE COPY
    MOVE UID ENABLE IDLE NAMESPACE ID COMPRESS UNSELECT GETQUOTA GETQUOTAROOT SETQUOTA GETACL
    SETACL DELETEACL LISTRIGHTS MYRIGHTS GETMETADATA SETMETADATA SORT THREAD ESEARCH NOTIFY
    UNAUTHENTICATE REPLACE GETANNOTATION SETANNOTATION CANCELUPDATE CONVERT URLFETCH GENURLAUTH
    RESETKEY""".split()
)

STATUSES: Final = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})


#: Command names seen (the word as sent -> upper case): a few dozen in practice, so each flow's
#: counts, last command and audit share one string per name instead of a copy per line.
_COMMAND_NAMES_KEPT: Final = 1024
_command_names: Final[dict[bytes, str]] = {}


def _command_name(word: bytes) -> str:
    """``word`` (an atom, or ``UID`` and its atom) upper-cased, one string per distinct word."""
    name = _command_names.get(word)
    if name is None:
        if len(_command_names) >= _COMMAND_NAMES_KEPT:
            _command_names.clear()
        name = _command_names[word] = word.decode("ascii").upper()
    return name


def command_words(head: bytes) -> tuple[bytes, str | None, int]:
    """``(tag, COMMAND, offset of the arguments)`` of a client line's first physical line.

    ``UID FETCH`` and friends come back as one command.  COMMAND is None when there is none.
    """
    sp = head.find(b" ")
    if sp <= 0:
        return head, None, len(head)
    tag = head[:sp]
    start = sp + 1
    end = head.find(b" ", start)
    if end < 0:
        end = len(head)
    word = head[start:end]
    if not word or word.translate(None, _ATOM_BYTES):
        return tag, None, start
    cmd = _command_names.get(word) or _command_name(word)
    if cmd == "UID" and end < len(head):
        end2 = head.find(b" ", end + 1)
        if end2 < 0:
            end2 = len(head)
        sub = head[end + 1 : end2]
        if sub and not sub.translate(None, _ATOM_BYTES):
            cmd = _command_name(head[start:end2])  # "UID", one space, the atom
            end = end2
    return tag, cmd, min(end + 1, len(head))
