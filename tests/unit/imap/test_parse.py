import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaptap.imap import parse
from imaptap.imap.parse import Atom, Literal, RawLine


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"a1 LOGIN {5}", (5, True, False)),
        (b"a1 LOGIN {5+}", (5, False, False)),
        (b"a1 APPEND INBOX ~{12}", (12, True, True)),
        (b"* 1 FETCH (BODY[] {0}", (0, True, False)),
        (b"a1 LOGIN {5}x", None),
        (b"a1 LOGIN {}", None),
        (b"a1 LOGIN {-5}", None),
        (b"a1 NOOP", None),
    ],
)
def test_literal_mark(line, expected):
    assert parse.literal_mark(line) == expected


@pytest.mark.parametrize("tag", [b".", b"a0000", b"C00000", b"A001", b"x]y", b"1"])
def test_tags_of_any_shape_are_tags(tag):
    assert parse.is_tag(tag)


@pytest.mark.parametrize("tag", [b"", b"+a", b"a{1", b"*", b"a b", b"a\x00", b'"a"', b"(a"])
def test_not_tags(tag):
    assert not parse.is_tag(tag)


@pytest.mark.parametrize(
    "raw, name",
    [
        (b"INBOX", "INBOX"),
        (b"Entw&APw-rfe", "Entwürfe"),
        (b"&-Co", "&Co"),
        (b"&ZeVnLIqe-", "日本語"),
        (b"Bad&@@@-box", "Bad&@@@-box"),
        (b"open&AAA", "open&AAA"),
        (b"\xffraw", "\\xffraw"),
    ],
)
def test_decode_mailbox(raw, name):
    assert parse.decode_mailbox(raw) == name


def test_split_resp_text():
    assert parse.split_resp_text(b"[CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.") == (
        "CAPABILITY IMAP4rev1 STARTTLS",
        b"Dovecot ready.",
    )
    assert parse.split_resp_text(b"[BADCHARSET (UTF-8 [x])] no") == ("BADCHARSET (UTF-8 [x])", b"no")
    assert parse.split_resp_text(b"plain text") == (None, b"plain text")
    assert parse.split_resp_text(b"[UNTERMINATED") == ("UNTERMINATED", b"")


def _split_resp_text_by_depth(data):
    """The plain definition: the code ends at the "]" that closes the first "["."""
    if not data.startswith(b"["):
        return None, data
    depth = 0
    for i, c in enumerate(data):
        depth += (c == 0x5B) - (c == 0x5D)
        if c == 0x5D and depth == 0:
            return parse.text(data[1:i]), data[i + 1 :].lstrip(b" ")
    return parse.text(data[1:]), b""


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"[", b"]", b" ", b"A", b"1", b"\xff"]), max_size=12).map(b"".join))
def test_split_resp_text_ends_the_code_at_its_closing_bracket(data):
    assert parse.split_resp_text(data) == _split_resp_text_by_depth(data)
    assert parse.split_resp_text(b"[" + data) == _split_resp_text_by_depth(b"[" + data)


def test_tokens_strings_lists_and_literals():
    lit = Literal(5, bytearray(b"al ce"))
    line = RawLine([b'a1 X "q\\"uo\\\\te" (A (B "c")) BODY[HEADER.FIELDS (FROM TO)] {5}', b" NIL"], [lit])
    toks = parse.tokens(line, 0, 5)
    assert toks[0] == b'q"uo\\te'
    assert toks[1] == [Atom("A"), [Atom("B"), b"c"]]
    assert toks[2] == "BODY[HEADER.FIELDS (FROM TO)]"
    assert toks[3] is lit
    assert isinstance(toks[4], Atom) and parse.astring(toks[4]) is None


def test_literal_marker_text_inside_quotes_is_not_a_literal():
    line = RawLine([b'a1 LOGIN "{5}" pw'], [])
    assert parse.tokens(line, 0, 9)[0] == b"{5}"


def test_incomplete_literal_gives_no_astring():
    lit = Literal(10, bytearray(b"abc"), complete=False)
    assert parse.astring(lit) is None
    assert parse.astring(Literal(3, bytearray(b"abc"))) == b"abc"


def test_unbalanced_and_deep_lists_do_not_raise():
    line = RawLine([b"a1 X " + b"(" * 5000 + b")" * 10 + b")))"], [])
    toks = parse.tokens(line, 0, 5)
    depth = 0
    while toks and isinstance(toks[0], list):
        toks = toks[0]
        depth += 1
    assert depth <= parse.MAX_LIST_DEPTH + 1


def test_token_count_is_bounded():
    line = RawLine([b"a1 X " + b"a " * 100_000], [])
    assert len(parse.tokens(line, 0, 5)) == parse.MAX_TOKENS


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"a1 uid fetch 1:* (FLAGS)", (b"a1", "UID FETCH", 13)),
        (b"a1 NOOP", (b"a1", "NOOP", 7)),
        (b"a1 select INBOX", (b"a1", "SELECT", 10)),
        (b"justoneword", (b"justoneword", None, 11)),
        (b"a1 (bad", (b"a1", None, 3)),
    ],
)
def test_command_words(head, expected):
    assert parse.command_words(head) == expected


def test_id_params():
    line = RawLine([b'a ID ("name" "Thunderbird" "Version" "115.3.1" "os" NIL)'], [])
    assert parse.id_params(parse.tokens(line, 0, 5)) == {"name": "Thunderbird", "version": "115.3.1", "os": None}
    assert parse.id_params(parse.tokens(RawLine([b"a ID NIL"], []), 0, 5)) is None


def test_capability_list_drops_a_cut_last_word():
    caps = parse.capability_list(b"IMAP4rev1 idle STARTTLS AUTH=PL", drop_last=True)
    assert caps == ["IMAP4REV1", "IDLE", "STARTTLS"]


def _capability_list_reference(words, drop_last=False):
    if isinstance(words, bytes):
        words = words.decode("latin-1")
    kept = words.split(None, parse.MAX_CAPABILITIES)[: parse.MAX_CAPABILITIES]
    caps = [w.upper()[: parse.MAX_CAPABILITY] for w in kept]
    if drop_last and caps:
        caps.pop()
    return caps


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.lists(st.sampled_from(["idle", "x" * 70, "ß", "\xb5", "\x1c", "\xa0", " ", "AUTH=PLAIN"]),
                          max_size=140).map(" ".join)),
       st.booleans())
def test_capability_list_is_each_word_upper_cased_and_cut(words, drop_last):
    """capability_list upper-cases the whole text at once and keeps what it found: the same
    result as word by word, the second time (from its cache) too, and never a shared list."""
    expected = _capability_list_reference(words, drop_last)
    first = parse.capability_list(words, drop_last)
    assert first == expected
    first.append("MUTATED")
    assert parse.capability_list(words, drop_last) == expected


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=30),
                 st.builds(lambda a, t, d, p, b: a + t + b"{" + d + p + b"}" + b,
                           st.binary(max_size=12), st.sampled_from([b"", b"~", b"~~"]),
                           st.one_of(st.integers(0, 10**22).map(lambda n: str(n).encode()), st.binary(max_size=4),
                                     st.sampled_from([b"", b"+", b"0", b"1+", b"12a"])),
                           st.sampled_from([b"", b"+", b"++"]), st.sampled_from([b"", b"}", b"{1}", b" "]))))
def test_literal_mark_follows_the_pattern(physical):
    """literal_mark finds the marker by hand; parse.LITERAL_MARK_GRAMMAR is the grammar it follows."""
    m = re.search(parse.LITERAL_MARK_GRAMMAR, physical)
    expected = None if m is None else (int(m.group(2)), not m.group(3), bool(m.group(1)))
    assert parse.literal_mark(physical) == expected
