"""imaptap_lab.capture_facts: the facts of the captures in pcaps/ and the files that hold them.

The committed pcaps/facts.json and pcaps/MANIFEST.md were written by this code: what it writes
from the committed facts must still be what is committed.
"""

from __future__ import annotations

import json
import re

import pytest

from imaptap_lab import capture_facts as cf
from testenv import OWN_PCAPS


def committed() -> tuple[dict, str]:
    with open(f"{OWN_PCAPS}/facts.json") as f:
        facts = json.load(f)
    with open(f"{OWN_PCAPS}/MANIFEST.md", encoding="utf-8") as f:
        return facts, f.read()


def manifest_rows(text: str) -> dict[str, list[str]]:
    """The cells of each row of MANIFEST.md's capture table, by file name; md_escape escapes every
    '|' inside a cell, so an unescaped ' | ' separates cells."""
    table = text.split("## Captures", 1)[1].split("## Notes", 1)[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_committed_manifest_begins_and_ends_as_the_writer_writes_it():
    _, text = committed()
    assert text.startswith(cf.MANIFEST_HEAD)
    version = re.search(r"^(tshark \S+) with default preferences", text, re.M).group(1)
    assert text.endswith(cf.MANIFEST_TAIL.format(tshark_version=version))


def test_the_manifest_key_table_lists_every_key_of_a_flow():
    keys = {k.strip("`") for row, _ in cf.FACT_KEYS for k in row.split(", ")}
    assert keys == set(cf.flow("raw", "alice", commands=[], capabilities=[], attempts=[]))
    assert "| `commands` | every command name the client sent," in cf.MANIFEST_HEAD


def test_the_committed_summaries_are_what_summarize_writes_from_the_committed_facts():
    facts, text = committed()
    rows = manifest_rows(text)
    assert set(rows) == set(facts)
    for name, entry in facts.items():
        assert rows[name][3] == cf.md_escape(cf.summarize(entry["flows"])), name
        assert rows[name][2].startswith(cf.md_escape(entry["description"])), name


def test_facts_document_and_manifest_of_one_scenario(tmp_path):
    sc = cf.Scenario("two-ports", "raw", "a | pipe\nand a newline", run=lambda lab: None)
    flows = [cf.flow("raw", "alice", commands=["LOGIN"], port=10143),
             cf.flow("raw", None, commands=["CAPABILITY", "STARTTLS"], auth_command=None, auth_mechanism=None,
                     login_ok=None, starttls="completed", cleartext_credentials=False)]
    outcome = cf.Outcome(flows, ["Alice-Pw-7391"], decoys=["mallory"], notes="Note.")
    results = [(sc, outcome, ["prints the password 'Alice-Pw-7391'", "misses commands: \x1b x1"])]
    doc = cf.facts_document(results)
    assert doc == {"two-ports.pcap": {"description": "a | pipe\nand a newline", "ports": [143, 10143],
                                      "flows": flows, "secrets": ["Alice-Pw-7391"], "decoys": ["mallory"],
                                      "attacks": []}}
    text = cf.manifest(results, "tshark 4.0.17")
    row = text[len(cf.MANIFEST_HEAD):].split("\n", 1)[0]
    assert row == ("| `two-ports.pcap` | raw | a \\| pipe and a newline. Note. | 1: port 10143/ipv4; user 'alice';"
                   " LOGIN; ok; STARTTLS offered; cleartext credentials<br>2: port 143/ipv4; user —; auth not"
                   " visible; STARTTLS completed; no cleartext credentials | prints the password 'Alice-Pw-7391'"
                   "<br>misses commands: \\x1b x1 |")
    assert "tshark 4.0.17 with default preferences" in text
    cf.write_outputs(results, tmp_path, "tshark 4.0.17")
    assert json.loads((tmp_path / "facts.json").read_text()) == doc
    assert (tmp_path / "MANIFEST.md").read_text() == text
    # ensure_ascii: the file is plain ASCII whatever the user names hold
    assert (tmp_path / "facts.json").read_bytes().isascii()


def test_a_capture_with_nothing_wrong_in_tshark_says_so():
    sc = cf.Scenario("ok", "imaplib", "fine", run=lambda lab: None)
    text = cf.manifest([(sc, cf.Outcome([cf.flow("imaplib", "bob", commands=[])], []), [])], "tshark ?")
    assert text[len(cf.MANIFEST_HEAD):].split("\n", 1)[0].endswith("| nothing |")


@pytest.mark.parametrize(("name", "wire"), [
    ("INBOX", "INBOX"), ("Sent Items", "Sent Items"), ("Entwürfe", "Entw&APw-rfe"), ("A&B", "A&-B"),
    ("日本語", "&ZeVnLIqe-"), ("~peter/mail/台北", "~peter/mail/&U,BTFw-"),  # RFC 3501 5.1.3's own example
])
def test_mutf7(name, wire):
    assert cf.mutf7(name) == wire


def test_quote_and_sasl_secrets():
    assert cf.quote('Bob Pw "quoted" 42') == '"Bob Pw \\"quoted\\" 42"'
    assert cf.quote("back\\slash") == '"back\\\\slash"'
    assert cf.plain_secret("carol", "pw") == ["pw", "AGNhcm9sAHB3"]  # base64 of "\0carol\0pw"
    assert cf.b64(b"\xff") == "/w=="


def test_md_escape_keeps_cells_on_one_line_and_printable():
    assert cf.md_escape("a|b\nc") == "a\\|b c"
    assert cf.md_escape("\x1b[31mevil\x07") == "\\x1b[31mevil\\x07"
    assert cf.md_escape("bad \ufffd byte") == "bad \\ufffd byte"
    assert cf.md_escape("Entwürfe —") == "Entwürfe —"


def test_auth_label():
    assert cf.auth_label(cf.flow("raw", "a", commands=[])) == "LOGIN"
    assert cf.auth_label(cf.flow("curl", "a", commands=[], auth_command="AUTHENTICATE",
                                 auth_mechanism="CRAM-MD5")) == "AUTHENTICATE CRAM-MD5"


def test_a_flow_without_wire_names_takes_the_decoded_ones():
    f = cf.flow("imaplib", "bob", commands=[], mailboxes=["INBOX"])
    assert f["mailboxes_wire"] == ["INBOX"]
    assert f["mailboxes_wire"] is not f["mailboxes"], "one list changing must not change the other"
    g = cf.flow("imaplib", "bob", commands=[], mailboxes=["Entwürfe"], mailboxes_wire=["Entw&APw-rfe"])
    assert (g["mailboxes"], g["mailboxes_wire"]) == (["Entwürfe"], ["Entw&APw-rfe"])


def test_merge_keeps_the_other_captures_entries_and_rows(tmp_path):
    old = [cf.Scenario(name, "raw", f"{name} as it was", run=lambda lab: None) for name in ("a", "b", "c")]
    kept = [(sc, cf.Outcome([cf.flow("raw", "alice", commands=["LOGIN"])], ["pw"]), ["x"]) for sc in old]
    cf.write_outputs(kept, tmp_path, "tshark 4.0.17")
    remade = cf.Scenario("b", "curl", "b made again", run=lambda lab: None)
    added = cf.Scenario("d", "raw", "d is new", run=lambda lab: None)
    new = [(remade, cf.Outcome([cf.flow("curl", "bob", commands=["NOOP"])], ["pw2"]), []),
           (added, cf.Outcome([cf.flow("raw", None, commands=[], port=8143, imap=False)], ["pw3"]), [])]
    cf.merge_outputs(new, tmp_path, "tshark 4.0.18", ["a", "b", "d", "c"])
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert list(facts) == ["a.pcap", "b.pcap", "d.pcap", "c.pcap"]
    assert facts["a.pcap"]["description"] == "a as it was" and facts["b.pcap"]["description"] == "b made again"
    assert facts["d.pcap"]["flows"] == [{"port": 8143, "family": "ipv4", "client_kind": "raw", "imap": False}]
    text = (tmp_path / "MANIFEST.md").read_text()
    rows = manifest_rows(text)
    assert list(rows) == ["a.pcap", "b.pcap", "d.pcap", "c.pcap"]
    assert rows["a.pcap"][-1] == "x" and rows["b.pcap"][-1] == "nothing"
    assert "not IMAP: no message, no IMAP fact" in rows["d.pcap"][3]
    assert text.startswith(cf.MANIFEST_HEAD) and "tshark 4.0.18 with default preferences" in text


def test_the_findings_follow_from_the_facts():
    assert cf.flow("raw", "alice", commands=[])["findings"] == [
        "cleartext_credentials", "starttls_offered_not_used", "auth_plain_before_starttls"]
    strict = cf.flow("imaplib", "alice", commands=[], login_ok=False, login_failures=1, auth_plain_offered=False,
                     logindisabled_ignored=True)
    assert strict["findings"] == ["cleartext_credentials", "starttls_offered_not_used", "failed_logins",
                                  "login_despite_logindisabled"]
    injected = cf.flow("raw", "m", commands=[], starttls="completed", commands_after_starttls=True)
    assert injected["findings"][-1] == "commands_after_starttls"


def test_an_entry_written_before_is_completed_with_the_later_facts():
    old = cf.flow("raw", "alice", commands=["LOGIN"])
    for key in [*cf.later_flow_facts(old), "findings"]:
        del old[key]
    done = cf.complete(old)
    assert done == cf.flow("raw", "alice", commands=["LOGIN"])
    assert cf.complete({**old, "auth_plain_offered": False})["auth_plain_offered"] is False  # stated wins


def test_the_committed_findings_are_those_of_the_committed_facts():
    facts, _ = committed()
    for name, entry in facts.items():
        for f in entry["flows"]:
            if f["imap"]:
                assert f["findings"] == cf.expected_findings(f), name
            else:
                assert "findings" not in f, name  # another protocol: no IMAP fact at all
        assert set(entry["attacks"]) <= {"brute_force", "password_spraying", "credential_stuffing"}


def test_an_entry_kept_by_only_is_completed():
    old = {"description": "d", "ports": [143], "secrets": [], "decoys": [],
           "flows": [{k: v for k, v in cf.flow("raw", "bob", commands=[]).items()
                      if k not in cf.later_flow_facts({"starttls": "offered"}) and k != "findings"}]}
    done = cf.complete_entry(old)
    assert done["attacks"] == [] and done["flows"] == [cf.flow("raw", "bob", commands=[])]
    assert "attacks" not in old  # the entry itself is left as it was


def test_what_the_later_facts_are_for_a_flow_made_before():
    assert cf.later_flow_facts({"starttls": "offered"})["auth_plain_offered"] is True
    # a client-only capture saw no capability list: no AUTH=PLAIN offered either
    assert cf.later_flow_facts({"starttls": "none"})["auth_plain_offered"] is False
    other = cf.flow("curl", None, commands=[], imap=False)
    assert cf.complete(other) == other  # another protocol gains no IMAP fact
