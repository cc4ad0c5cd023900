"""--json-format ecs on every capture: valid documents with ECS's fields and types, the same
records as the default format (each rebuilt from its document), and no password anywhere."""

from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest

from imaptap.output.ecs import ECS_VERSION, community_id
from testenv import OWN_PCAPS, PUBLIC_PCAPS, PUBLIC_PCAPS_PRESENT, public_pcap_paths

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
#: Public captures with a login, and its password (as tests/tui/test_secrets.py).
PUBLIC_SECRETS = {"ndpi/imap.pcap": ["pfres"], "arkime/imap.pcap": ["XXXXXX"],
                  "suricata-verify/imap-detection.pcap": ["XXXXXX"]}
CAPTURES = [pytest.param(os.path.join(OWN_PCAPS, name), spec["ports"], spec["secrets"], id=name)
            for name, spec in sorted(FACTS.items())]
if PUBLIC_PCAPS_PRESENT:
    for path in public_pcap_paths():
        rel = os.path.relpath(path, PUBLIC_PCAPS)
        CAPTURES.append(pytest.param(path, [143], PUBLIC_SECRETS.get(rel, []), id=rel))
else:  # one parameter that skips, and fails under CI=true
    CAPTURES += [pytest.param(p.values[0], [143], [], id="third-party-captures", marks=p.marks)
                 for p in public_pcap_paths()]
#: Short enough that most captures get flow_update documents too.
FLOW_INTERVAL = "0.05"

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
COMMUNITY_ID = re.compile(r"1:[A-Za-z0-9+/]{27}=")
KINDS = {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"}
#: ECS's allowed event.type values of each event.category imaptap uses.
TYPES = {"network": {"access", "allowed", "connection", "denied", "end", "info", "protocol", "start"},
         "authentication": {"start", "end", "info"}, "session": {"start", "end", "info"}}
OUTCOMES = {"success", "failure", "unknown"}


def endpoint(obj: dict) -> str:
    ip, port = obj["ip"], obj["port"]
    ipaddress.ip_address(ip)
    assert isinstance(port, int) and 0 <= port <= 65535
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def check_common(doc: dict, dataset: str) -> None:
    assert TIMESTAMP.fullmatch(doc["@timestamp"])
    assert doc["ecs"] == {"version": ECS_VERSION}
    event = doc["event"]
    assert event["kind"] in KINDS and event["module"] == "imaptap" and event["dataset"] == f"imaptap.{dataset}"
    assert event["category"] and set(event["category"]) <= set(TYPES)
    allowed = set().union(*(TYPES[c] for c in event["category"]))
    assert event["type"] and set(event["type"]) <= allowed
    assert isinstance(event["action"], str) and event["action"]
    if "outcome" in event:
        assert event["outcome"] in OUTCOMES
    if "duration" in event:
        assert isinstance(event["duration"], int) and event["duration"] >= 0


def check_network(doc: dict) -> None:
    net = doc["network"]
    assert net["transport"] == "tcp" and net["iana_number"] == "6"
    client, server = doc["client"], doc["server"]
    assert net["type"] == ("ipv6" if ":" in client["ip"] else "ipv4")
    assert COMMUNITY_ID.fullmatch(net["community_id"])
    assert net["community_id"] == community_id((client["ip"], client["port"]), (server["ip"], server["port"]))
    assert doc["related"]["ip"] == list(dict.fromkeys([client["ip"], server["ip"]]))
    if "user" in doc:
        assert isinstance(doc["user"]["name"], str) and doc["related"]["user"] == [doc["user"]["name"]]


def default_message(doc: dict) -> dict:
    """The default format's message record, rebuilt from its ECS document."""
    check_common(doc, "message")
    check_network(doc)
    assert doc["network"]["protocol"] == "imap" and doc["event"]["kind"] == "event"
    msg = doc["imaptap"]["message"]
    client, server = endpoint(doc["client"]), endpoint(doc["server"])
    sender, receiver = (client, server) if msg["from"] == "client" else (server, client)
    assert endpoint(doc["source"]) == sender and endpoint(doc["destination"]) == receiver
    if msg.get("latency_ms") is not None:
        assert doc["event"]["duration"] == round(msg["latency_ms"] * 1e6)
    if msg["kind"] == "response" and msg["status"] in ("OK", "NO", "BAD"):
        assert doc["event"]["outcome"] == ("success" if msg["status"] == "OK" else "failure")
    return {"type": "message", "ts": doc["@timestamp"], "flow": doc["imaptap"]["flow"]["id"], "client": client,
            "server": server, **msg}


def default_flow(doc: dict, dataset: str) -> dict:
    """The default format's flow (or flow_update) record, rebuilt from its ECS document."""
    check_common(doc, dataset)
    check_network(doc)
    event, net, rest = doc["event"], doc["network"], dict(doc["imaptap"]["flow"])
    assert event["kind"] == ("state" if dataset == "flow_update" else "event")
    assert net.get("protocol") == ("imap" if rest["imap"] else None)
    assert doc["source"] == doc["client"] and doc["destination"] == doc["server"]
    for side in ("client", "server"):
        assert isinstance(doc[side]["bytes"], int) and isinstance(doc[side]["packets"], int)
    tls = doc.get("tls")
    if tls is not None:
        assert isinstance(tls["established"], bool)
    else:
        assert rest["starttls"] == "none"
    rec = {"type": dataset}
    if dataset == "flow_update":
        rec["ts"] = doc["@timestamp"]
    else:
        assert doc["@timestamp"] == event["end"]
    rec.update(flow=rest.pop("id"), client=endpoint(doc["client"]), server=endpoint(doc["server"]),
               ip_version=6 if net["type"] == "ipv6" else 4, first_ts=event["start"], last_ts=event["end"],
               packets=net["packets"], bytes=net["bytes"], packets_c2s=doc["client"]["packets"],
               packets_s2c=doc["server"]["packets"], bytes_c2s=doc["client"]["bytes"],
               bytes_s2c=doc["server"]["bytes"])
    rec.update(rest)
    rec["username"] = doc["user"]["name"] if "user" in doc else None
    rec["login_ok"] = {"success": True, "failure": False, "unknown": None}[event["outcome"]]
    rec["encrypted"] = bool(tls and tls["established"])
    return rec


def default_record(doc: dict) -> dict:
    dataset = doc["event"]["dataset"].removeprefix("imaptap.")
    if dataset == "message":
        return default_message(doc)
    if dataset in ("flow", "flow_update"):
        return default_flow(doc, dataset)
    assert dataset == "stats"
    check_common(doc, "stats")
    stats = doc["imaptap"]["stats"]
    assert doc["event"]["kind"] == "metric"
    assert doc["event"]["outcome"] == ("failure" if stats.get("error") else "success")
    if stats.get("error"):
        assert doc["error"]["message"] == stats["error"]
    return {"type": "stats", **stats}


def comparable(rec: dict) -> dict:
    """A default record with its times as ECS writes them, the run's duration left out."""
    from imaptap.output.ecs import timestamp

    out = {k: v for k, v in rec.items() if k != "seconds"}
    for key in ("ts", "first_ts", "last_ts"):
        if key in out and not isinstance(out[key], str):
            out[key] = timestamp(out[key])
    return out


@pytest.mark.parametrize(("path", "ports", "secrets"), CAPTURES)
@pytest.mark.parametrize("snap", ["256", "65535"])
def test_ecs_documents_are_the_default_records_with_ecs_fields(imaptap, path, ports, secrets, snap):
    args = ["-r", path, "--json", "-", "-s", snap, "--flow-interval", FLOW_INTERVAL,
            *(a for p in ports for a in ("--port", str(p)))]
    default = imaptap(*args)
    ecs = imaptap(*args, "--json-format", "ecs")
    assert ecs.returncode == default.returncode == 0, ecs.stderr
    lines = ecs.stdout.splitlines()
    docs = [json.loads(line) for line in lines]  # every line one valid JSON document
    assert len(docs) == len(default.records) and docs[-1]["event"]["dataset"] == "imaptap.stats"
    assert [default_record(d) for d in docs][:-1] == [comparable(r) for r in default.records][:-1]
    assert comparable(default_record(docs[-1])) == comparable(default.records[-1])
    for secret in secrets:
        assert secret not in ecs.stdout and secret not in ecs.stderr


def test_flows_only_gives_flow_and_stats_documents(imaptap):
    r = imaptap("-r", os.path.join(OWN_PCAPS, "failed-login.pcap"), "--json", "-", "--json-format", "ecs",
                "--flows-only")
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["event"]["dataset"] for d in docs] == ["imaptap.flow"] * (len(docs) - 1) + ["imaptap.stats"]
    # facts.json: two wrong passwords then the right one; a second connection that only fails
    got = sorted((d["imaptap"]["flow"]["login_failures"], d["event"]["outcome"], d["user"]["name"]) for d in docs[:-1])
    assert got == [(1, "failure", "alice"), (2, "success", "alice")]
    assert all("authentication" in d["event"]["category"] for d in docs[:-1])


def test_a_failed_login_is_an_authentication_failure_of_its_user(imaptap):
    r = imaptap("-r", os.path.join(OWN_PCAPS, "failed-login.pcap"), "--json", "-", "--json-format", "ecs")
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    logins = [d for d in docs if d["event"]["dataset"] == "imaptap.message" and d["event"]["action"] == "login"
              and d["imaptap"]["message"]["kind"] == "response"]
    assert sorted((d["event"]["outcome"], d["imaptap"]["flow"]["id"]) for d in logins) == sorted(
        [("failure", 1), ("failure", 1), ("success", 1), ("failure", 2)])
    assert {d["user"]["name"] for d in logins} == {"alice"}
    assert all(d["event"]["category"] == ["network", "authentication"] for d in logins)
