"""The JSON contract is declared once in code; the README must name every part of it."""

import os
import re

from imaptap.facts import FlowFacts
from imaptap.findings import FINDINGS, Finding
from imaptap.flows import EndReason
from imaptap.imap.anomalies import ALL_KEYS
from imaptap.imap.session import MESSAGE_OPTIONAL_FIELDS, Message
from imaptap.output.jsonl import _MESSAGE_KEYS
from testenv import ROOT

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
JSON_SECTION = README[README.index("## JSON Lines"):README.index("## How it works")]
NAMED = set(re.findall(r"`([a-z0-9_]+)`", JSON_SECTION))


def test_every_flow_record_key_is_in_the_readme():
    assert not [k for k in FlowFacts._fields if k not in NAMED]


def test_every_message_record_key_is_in_the_readme():
    keys = [_MESSAGE_KEYS.get(f, f) for f in Message._fields]
    assert not [k for k in keys if k not in NAMED]
    assert set(MESSAGE_OPTIONAL_FIELDS) <= set(Message._fields)


def test_every_end_reason_and_anomaly_name_is_in_the_readme():
    assert not [r.value for r in EndReason if r.value not in NAMED]
    assert not [a for a in ALL_KEYS if a not in NAMED]


def test_the_flow_update_record_is_in_the_readme():
    from imaptap.output.jsonl import FLOW_UPDATE

    assert f'{{"type": "{FLOW_UPDATE}", ...}}' in JSON_SECTION and "ts" in NAMED


def test_every_finding_is_in_the_readme_with_its_severity():
    audit = README[README.index("## Audit report"):README.index("## Metrics")]
    for finding in Finding:
        assert f"`{finding.value}`" in JSON_SECTION or f"`{finding.value}`" in audit, finding
        row = next(line for line in audit.splitlines() if line.startswith("|") and f"`{finding.value}`" in line)
        assert row.split("|")[1].strip() == FINDINGS[finding].severity.label, finding
