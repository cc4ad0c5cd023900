"""The passive client fingerprint (clients.py) on habits; tests/replay checks it on the lab's captures."""

import pytest

from imaptap.clients import MAX_PASSIVE_CONFIDENCE, MIN_CONFIDENCE, SIGNATURES, ClientGuess, guess, tag_style
from imaptap.imap.audit import SessionAudit


def habits(tags, opening, login_forms=None, mailbox_form=None, sasl_ir=None) -> SessionAudit:
    audit = SessionAudit()
    audit.tags, audit.opening = list(tags), list(opening)
    audit.login_forms, audit.mailbox_form, audit.sasl_ir = login_forms, mailbox_form, sasl_ir
    return audit


#: What each lab client showed (pcaps/, see clients.SIGNATURES).
LAB = {
    "Python imaplib": habits(["DOML0", "DOML1"], ["CAPABILITY", "LOGIN"], ("atom", "quoted"), "atom"),
    "OfflineIMAP": habits(["BNFM1", "BNFM2"], ["CAPABILITY", "ID"], None, "atom", False),
    "curl": habits(["A001", "A002"], ["CAPABILITY", "AUTHENTICATE"], None, "atom", True),
    "fetchmail": habits(["A0001", "A0002"], ["LOGIN", "SELECT"], ("quoted", "quoted"), "quoted"),
    "mbsync": habits(["1", "2"], ["LOGIN", "COMPRESS"], ("quoted", "quoted"), "quoted"),
}


@pytest.mark.parametrize("name", sorted(LAB))
def test_each_lab_client_is_told_apart(name):
    got = guess(LAB[name], None)
    assert got is not None and got.name == name and got.basis == "fingerprint"
    assert MIN_CONFIDENCE <= got.confidence <= MAX_PASSIVE_CONFIDENCE


def test_every_signature_has_a_lab_case():
    assert {s.name for s in SIGNATURES} == set(LAB)


@pytest.mark.parametrize("tags", [["a1"], ["."], ["x0001"], ["T0123456789"], []])
def test_a_tag_no_signature_knows_is_unknown(tags):
    assert guess(habits(tags, ["LOGIN"], ("atom", "atom"), "atom"), None) is None


def test_seeing_less_is_less_sure_and_contradictions_cost():
    full = guess(LAB["Python imaplib"], None)
    little = guess(habits(["DOML0"], ["CAPABILITY"]), None)
    odd = guess(habits(["DOML0"], ["LOGIN"], ("quoted", "quoted"), "quoted"), None)
    assert full is not None and little is not None
    assert full.confidence > little.confidence
    assert odd is None or odd.confidence < little.confidence


def test_id_is_what_the_client_says():
    got = guess(habits(["a1"], ["ID"]), {"name": "Thunderbird", "version": "115.3"})
    assert got == ClientGuess("Thunderbird", "115.3", 1.0, "id")
    assert guess(LAB["curl"], {"vendor": "x"}).name == "curl"  # an ID without a name says nothing
    assert guess(habits(["a1"], []), {"name": "n" * 500}).name == "n" * 64


def test_tag_styles():
    assert [tag_style(t) for t in ("A0001", "DOML0", "a1", "1", ".", "C00000")] == ["A1", "A1", "a1", "1", ".", "A1"]
