"""The `/` filter: words that all have to match a flow.

    alice                plain text: a substring of any field (user, addresses, software, state,
                         commands, statuses, mailboxes, capabilities, ID, findings), any case
    "tls"                quoted: always plain text, even when it is a keyword
    user:alice           a field; the keys are in FIELDS
    port:143             client or server port
    status:NO            a status the server sent (OK, NO, BAD, BYE, PREAUTH)
    tls cleartext ...    a keyword; the keywords are in KEYWORDS
    -ended  !tls         negated

Never raises: a filter is typed one key at a time, so every prefix of it must mean something.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from imaptap.tui.display import state_plain
from imaptap.tui.feed import FlowSnapshot


class Searchable(Protocol):
    """A flow as the filter sees it: its snapshot, and its text fields (built only when needed)."""

    snap: FlowSnapshot

    @property
    def haystack(self) -> str: ...


Predicate = Callable[[Searchable], bool]


def _low(v: Any) -> str:
    return "" if v is None else str(v).lower()


def _endpoint_port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[-1]


def _field(get: Callable[[FlowSnapshot], Iterable[Any]], exact: bool = False) -> Callable[[str], Predicate]:
    def make(value: str) -> Predicate:
        v = value.lower()
        if exact:
            return lambda f: any(_low(x) == v for x in get(f.snap))
        return lambda f: any(v in _low(x) for x in get(f.snap))

    return make


def _state(s: FlowSnapshot) -> list[Any]:
    return [state_plain(s)]


FIELDS: dict[str, Callable[[str], Predicate]] = {
    "user": _field(lambda s: [s.facts.username, s.facts.authzid]),
    "port": _field(lambda s: [_endpoint_port(s.facts.client), _endpoint_port(s.facts.server)], exact=True),
    "status": _field(lambda s: [*s.facts.statuses, s.last_status], exact=True),
    "cmd": _field(lambda s: [*s.facts.commands, s.last_command]),
    "client": _field(lambda s: [s.facts.client]),
    "server": _field(lambda s: [s.facts.server]),
    "host": _field(lambda s: [s.facts.client, s.facts.server]),
    "software": _field(lambda s: [s.facts.server_software, s.facts.greeting]),
    "mailbox": _field(lambda s: s.facts.mailboxes),
    "mech": _field(lambda s: [s.facts.auth_mechanism]),
    "finding": _field(lambda s: s.facts.findings),
    "end": _field(lambda s: [s.facts.end or "open"], exact=True),
    "state": _field(_state),
}
"""``key:value`` forms; user, cmd, host, software, mailbox, state match substrings, the rest whole values."""

ALIASES = {"command": "cmd", "ip": "host", "addr": "host", "sw": "software", "mbox": "mailbox",
           "mechanism": "mech", "auth": "mech"}


def _has(key: str) -> Predicate:
    return lambda f: bool(getattr(f.snap.facts, key))


KEYWORDS: dict[str, Predicate] = {
    "tls": _has("encrypted"),
    "cleartext": _has("cleartext_credentials"),
    "deflate": _has("compressed"),
    "failed": _has("login_failures"),
    "imap": _has("imap"),
    "open": lambda f: f.snap.facts.end is None,
    "ended": lambda f: f.snap.facts.end is not None,
    "starttls": lambda f: f.snap.facts.starttls != "none",
    "findings": _has("findings"),
    "ipv6": lambda f: f.snap.facts.ip_version == 6,
    "ipv4": lambda f: f.snap.facts.ip_version == 4,
}
"""Bare words with a meaning of their own; quote one ("tls") to search for it as text."""
KEYWORD_ALIASES = {"compressed": "deflate", "encrypted": "tls", "closed": "ended"}

_TERM = re.compile(r'\s*(?P<neg>[-!])?(?:(?P<key>[A-Za-z_]+):)?(?:"(?P<quoted>[^"]*)"?|(?P<word>\S*))')


@dataclass(frozen=True)
class Query:
    """A parsed filter; `matches` is true for every flow when the text is empty."""

    text: str
    terms: tuple[tuple[bool, Predicate], ...] = ()
    """(negated, predicate) pairs, all of which must hold."""

    def matches(self, flow: Searchable) -> bool:
        for negated, pred in self.terms:
            if pred(flow) == negated:
                return False
        return True

    def __bool__(self) -> bool:
        return bool(self.terms)


def _substring(value: str) -> Predicate:
    v = value.lower()
    return lambda f: v in f.haystack


def parse(text: str) -> Query:
    """The filter typed so far as a `Query`; an unknown ``key:`` is searched for as text."""
    terms: list[tuple[bool, Predicate]] = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or m.end() == pos:  # only trailing blanks left
            break
        pos = m.end()
        negated = m.group("neg") is not None
        key = m.group("key")
        quoted = m.group("quoted")
        value = quoted if quoted is not None else m.group("word")
        if key is not None:
            name = ALIASES.get(key.lower(), key.lower())
            make = FIELDS.get(name)
            if make is None:
                # Not a field: take the whole word literally, e.g. an IPv6 address or "a:b".
                value = f"{key}:{value}"
            elif value:
                terms.append((negated, make(value)))
                continue
            else:
                continue  # "user:" typed, value still to come
        if not value:
            continue
        if quoted is None:
            kw = KEYWORDS.get(KEYWORD_ALIASES.get(value.lower(), value.lower()))
            if kw is not None:
                terms.append((negated, kw))
                continue
        terms.append((negated, _substring(value)))
    return Query(text, tuple(terms))


def haystack(snap: FlowSnapshot) -> str:
    """Every text field of a flow, lower case, for plain-text terms."""
    r = snap.facts
    parts: list[Any] = [
        r.client, r.server, r.username, r.authzid, r.server_software, r.greeting,
        r.auth_mechanism, r.starttls, r.end or "open", snap.last_command, snap.last_status,
        *r.commands, *r.statuses, *r.mailboxes, *r.capabilities, *r.findings, *r.anomalies,
    ]
    for ident in (r.client_id, r.server_id):
        if ident:
            for k, v in ident.items():
                parts.append(k)
                parts.append(v)
    parts.append(state_plain(snap))
    return "\n".join(str(p) for p in parts if p is not None).lower()
