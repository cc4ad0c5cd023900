"""--json-format ecs: the Community ID from its spec's vectors, timestamps, and the mapping table."""

import os
import re

import pytest

from imaptap.facts import FlowFacts
from imaptap.imap.session import Message
from imaptap.output.ecs import FLOW_MAPPED, MAX_TIMESTAMP, MESSAGE_MAPPED, community_id, timestamp
from imaptap.output.jsonl import _MESSAGE_KEYS
from testenv import ROOT

#: From the spec's baseline (corelight/community-id-spec, baseline/baseline_deflt.json): TCP and
#: UDP over IPv4 and IPv6, each given both ways round.
VECTORS = [
    (6, ("128.232.110.120", 34855), ("66.35.250.204", 80), "1:LQU9qZlK+B5F3KDmev6m5PMibrg="),
    (6, ("2001:470:e5bf:dead:4957:2174:e82c:4887", 63943), ("2607:f8b0:400c:c03::1a", 25),
     "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4="),
    (17, ("192.168.1.52", 54585), ("8.8.8.8", 53), "1:d/FP5EW3wiY1vCndhwleRRKHowQ="),
    (132, ("192.168.170.8", 7), ("192.168.170.56", 7), "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs="),
]


@pytest.mark.parametrize(("proto", "a", "b", "want"), VECTORS)
def test_community_id_matches_the_specs_baseline_either_way_round(proto, a, b, want):
    assert community_id(a, b, proto) == community_id(b, a, proto) == want


def test_equal_addresses_are_ordered_by_port():
    a, b = ("10.0.0.1", 1234), ("10.0.0.1", 80)
    assert community_id(a, b) == community_id(b, a) != community_id(("10.0.0.1", 1235), b)


def test_timestamps_are_iso_utc_with_microseconds_and_hostile_ones_are_clamped():
    assert timestamp(1795845694.740664) == "2026-11-28T06:01:34.740664Z"
    assert timestamp(0.0) == "1970-01-01T00:00:00.000000Z"
    assert timestamp(1e30) == timestamp(float("inf")) == timestamp(MAX_TIMESTAMP) == "9999-12-31T23:59:59.000000Z"
    assert timestamp(-5.0) == timestamp(float("nan")) == "1970-01-01T00:00:00.000000Z"


DOC = open(os.path.join(ROOT, "docs", "ECS.md"), encoding="utf-8").read()


def section(title: str) -> set[str]:
    start = DOC.index(title)
    end = DOC.find("\n## ", start + 1)
    return set(re.findall(r"`([a-z0-9_@.]+)`", DOC[start:end if end > 0 else None]))


def test_the_mapping_table_names_every_key_of_every_record():
    flows = section("## Flow records")
    assert not [k for k in FlowFacts._fields if k not in flows]
    messages = section("## Message records")
    keys = ["ts", "flow", "client", "server"] + [_MESSAGE_KEYS.get(f, f) for f in Message._fields[1:]]
    assert not [k for k in keys if k not in messages]


def test_the_mapping_table_agrees_with_the_code():
    flows = section("## Flow records")
    for key, fields in FLOW_MAPPED.items():
        assert key in flows and all(f.strip() in flows for f in fields.split(","))
    messages = section("## Message records")
    for key, fields in MESSAGE_MAPPED.items():
        assert key in messages and fields.split()[0].rstrip(",") in messages
