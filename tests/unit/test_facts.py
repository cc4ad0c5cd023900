"""FlowFacts is built positionally (for speed): each value's comment names its field, and the
names must be the fields, in order; and the facts share nothing with the live flow."""

import ast
import pathlib
import re

from imaptap import facts
from imaptap.facts import FlowFacts, flow_facts
from imaptap.flows import FlowTable
from imaptap.testing import conversation


def _source_of(module, name):
    """A function's text, from the module's .py (mypyc compiles facts.py: no source to inspect)."""
    with open(pathlib.Path(module.__file__).with_name(module.__name__.rpartition(".")[2] + ".py")) as f:
        text = f.read()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(text, node)


def test_flow_facts_names_every_field_in_order():
    source = _source_of(facts, "flow_facts")
    named = re.findall(r",\s+# (\w+)$", source, re.M)
    assert named == list(FlowFacts._fields)


def test_facts_are_a_copy_the_session_cannot_change():
    segs = conversation([("s", b"* OK [CAPABILITY IMAP4rev1] hi\r\n"), ("c", b"a1 SELECT INBOX\r\n"),
                         ("s", b"a1 OK done\r\n")], close=False)
    t = FlowTable({143})
    for s in segs:
        t.add(s)
    (flow,) = t.flows.values()
    f = flow_facts(flow)
    flow.session.mailboxes.append("Sent")
    flow.session.commands["FETCH"] += 1
    flow.session.capabilities += ("X",)
    assert f.mailboxes == ("INBOX",) and "FETCH" not in f.commands and f.capabilities == ("IMAP4REV1",)
    assert f.record()["mailboxes"] == ["INBOX"]
