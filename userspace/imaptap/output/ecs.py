"""``--json-format ecs``: the same records under Elastic Common Schema field names and types.

Filebeat, Elastic, Wazuh and most honeypot stacks take ECS documents without an ingest
pipeline of their own.  Each record of the default format becomes one nested document: the
facts ECS has a field for go there (``@timestamp``, ``event.*``, ``source.*``,
``destination.*``, ``client.*``, ``server.*``, ``network.*`` with the Community ID,
``user.name``, ``tls.established``), everything else keeps its imaptap name under
``imaptap.*``.  docs/ECS.md is the mapping, key by key; `FLOW_MAPPED` and `MESSAGE_MAPPED`
declare which keys leave the ``imaptap`` namespace, and the tests hold the two together.

A document is built from the reference record dicts (`message_record`, `FlowFacts.record`),
so it never holds anything the default format would not: passwords are ``***`` there too.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from imaptap.facts import FlowFacts
from imaptap.imap.session import Kind, Message, Side
from imaptap.output.jsonl import FLOW_UPDATE, FlowRef, JsonlSink, JsonlWriter, _dumps, message_record
from imaptap.pipeline import Pipeline

if TYPE_CHECKING:
    from imaptap.flows import Flow

#: The ECS version whose field definitions the documents follow (every field used is in it).
ECS_VERSION = "8.11.0"
#: ``event.module``; ``event.dataset`` is ``imaptap.<record type>``.
MODULE = "imaptap"
#: IANA protocol number of TCP: ``network.iana_number`` and the Community ID's protocol byte.
IPPROTO_TCP = 6
#: The Community ID's default seed (its spec): IDs agree with other tools that kept it.
COMMUNITY_ID_SEED = 0
#: The latest time ``@timestamp`` can say (the end of year 9999, datetime's last): a hostile
#: capture file can carry any timestamp, and the document must still be written (whole seconds:
#: a double holds no microseconds that far out).
MAX_TIMESTAMP = 253402300799.0

#: Flow record keys that become ECS fields (docs/ECS.md); every other one is ``imaptap.flow.<key>``.
FLOW_MAPPED = {
    "flow": "imaptap.flow.id",
    "client": "client.ip, client.port, source.ip, source.port",
    "server": "server.ip, server.port, destination.ip, destination.port",
    "ip_version": "network.type",
    "first_ts": "event.start",
    "last_ts": "event.end",
    "packets": "network.packets",
    "bytes": "network.bytes",
    "packets_c2s": "client.packets, source.packets",
    "packets_s2c": "server.packets, destination.packets",
    "bytes_c2s": "client.bytes, source.bytes",
    "bytes_s2c": "server.bytes, destination.bytes",
    "username": "user.name, related.user",
    "login_ok": "event.outcome",
    "encrypted": "tls.established",
}
#: Message record keys that become ECS fields; every other one is ``imaptap.message.<key>``.
MESSAGE_MAPPED = {
    "ts": "@timestamp",
    "flow": "imaptap.flow.id",
    "client": "client.ip, client.port",
    "server": "server.ip, server.port",
    "latency_ms": "event.duration (also kept as imaptap.message.latency_ms)",
}
#: Keys of the message record that stay under imaptap.message although they are mapped.
_MESSAGE_KEPT = {"latency_ms"}
#: Commands whose lines are part of a login: ``event.category`` gains ``authentication``.
AUTH_COMMANDS = frozenset({"LOGIN", "AUTHENTICATE"})
#: Tagged completion status -> ``event.outcome``.
OUTCOMES = {"OK": "success", "NO": "failure", "BAD": "failure"}
#: FlowFacts.login_ok -> ``event.outcome`` of a flow.
LOGIN_OUTCOMES = {True: "success", False: "failure", None: "unknown"}
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000
_OBSERVER = {"product": MODULE, "type": "sensor"}
_ECS = {"version": ECS_VERSION}


def community_id(a: tuple[str, int], b: tuple[str, int], proto: int = IPPROTO_TCP,
                 seed: int = COMMUNITY_ID_SEED) -> str:
    """The Community ID (v1) of a flow between endpoints ``a`` and ``b``: the same either way round.

    From the spec (github.com/corelight/community-id-spec): SHA-1 over the seed (2 bytes), the
    smaller endpoint's address then the other's, the protocol, a zero byte, and the ports in
    the same order, all in network byte order; base64, after ``1:``.
    """
    addr_a, addr_b = ipaddress.ip_address(a[0]).packed, ipaddress.ip_address(b[0]).packed
    (addr_lo, port_lo), (addr_hi, port_hi) = sorted(((addr_a, a[1]), (addr_b, b[1])))
    data = (seed.to_bytes(2, "big") + addr_lo + addr_hi + bytes((proto, 0)) + port_lo.to_bytes(2, "big")
            + port_hi.to_bytes(2, "big"))
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


def timestamp(ts: float) -> str:
    """``ts`` (Unix seconds) as ECS writes dates: ISO 8601 in UTC, microseconds, ``Z``."""
    if not 0.0 <= ts <= MAX_TIMESTAMP:  # NaN too
        ts = 0.0 if not ts > 0.0 else MAX_TIMESTAMP
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _network_type(ip: str) -> str:
    return "ipv6" if ":" in ip else "ipv4"


def _endpoint(addr: tuple[str, int]) -> dict[str, Any]:
    return {"ip": addr[0], "port": addr[1]}


def _related_ips(flow: FlowRef) -> list[str]:
    return list(dict.fromkeys((flow.client[0], flow.server[0])))


def _network(flow: FlowRef, cid: str, imap: bool = True) -> dict[str, Any]:
    net: dict[str, Any] = {"protocol": "imap"} if imap else {}
    net.update(transport="tcp", type=_network_type(flow.client[0]), iana_number=str(IPPROTO_TCP),
               community_id=cid)
    return net


def message_document(flow: FlowRef, msg: Message, user: str | None, cid: str | None = None) -> dict[str, Any]:
    """The ECS document of one IMAP line; ``user``: the flow's user at that moment, if any."""
    rec = message_record(flow, msg)
    command = msg.command
    auth = command in AUTH_COMMANDS
    event: dict[str, Any] = {
        "kind": "event",
        "category": ["network", "authentication"] if auth else ["network"],
        "type": ["protocol", "info"] if auth else ["protocol"],
        "action": command.lower().replace(" ", "-") if command else msg.kind.value,
        "module": MODULE,
        "dataset": f"{MODULE}.message",
    }
    if msg.kind is Kind.RESPONSE and msg.status in OUTCOMES:
        event["outcome"] = OUTCOMES[msg.status]
    if msg.latency_ms is not None and math.isfinite(msg.latency_ms):
        event["duration"] = round(msg.latency_ms * _NS_PER_MS)
    sender, receiver = (flow.client, flow.server) if msg.side is Side.CLIENT else (flow.server, flow.client)
    doc: dict[str, Any] = {
        "@timestamp": timestamp(msg.ts),
        "ecs": _ECS,
        "event": event,
        "observer": _OBSERVER,
        "source": _endpoint(sender),
        "destination": _endpoint(receiver),
        "client": _endpoint(flow.client),
        "server": _endpoint(flow.server),
        "network": _network(flow, cid or community_id(flow.client, flow.server)),
    }
    related: dict[str, Any] = {"ip": _related_ips(flow)}
    if user is not None:
        doc["user"] = {"name": user}
        related["user"] = [user]
    doc["related"] = related
    rest = {k: v for k, v in rec.items() if k not in MESSAGE_MAPPED or k in _MESSAGE_KEPT}
    del rest["type"]
    doc[MODULE] = {"flow": {"id": flow.id}, "message": rest}
    return doc


def flow_document(flow: FlowRef, facts: FlowFacts, update_ts: float | None = None,
                  cid: str | None = None) -> dict[str, Any]:
    """The ECS document of a flow record, or with ``update_ts`` of its flow_update at that time."""
    rec = facts.record()
    updating = update_ts is not None
    auth = facts.auth_command is not None or facts.login_failures > 0
    category = ["network", "session"]
    if auth:
        category.append("authentication")
    event: dict[str, Any] = {
        "kind": "state" if updating else "event",
        "category": category,
        "type": ["connection", "info"] if updating else ["connection", "end"],
        "action": "flow-update" if updating else "flow-end",
        "outcome": LOGIN_OUTCOMES[facts.login_ok],
        "module": MODULE,
        "dataset": f"{MODULE}.{FLOW_UPDATE if updating else 'flow'}",
        "start": timestamp(facts.first_ts),
        "end": timestamp(facts.last_ts),
    }
    duration = facts.last_ts - facts.first_ts
    if math.isfinite(duration):
        event["duration"] = max(0, round(duration * _NS_PER_S))
    client = {**_endpoint(flow.client), "bytes": facts.bytes_c2s, "packets": facts.packets_c2s}
    server = {**_endpoint(flow.server), "bytes": facts.bytes_s2c, "packets": facts.packets_s2c}
    network = _network(flow, cid or community_id(flow.client, flow.server), imap=facts.imap)
    network.update(bytes=facts.bytes, packets=facts.packets)
    doc: dict[str, Any] = {
        "@timestamp": timestamp(facts.last_ts if update_ts is None else update_ts),
        "ecs": _ECS,
        "event": event,
        "observer": _OBSERVER,
        "source": client,
        "destination": server,
        "client": dict(client),
        "server": dict(server),
        "network": network,
    }
    related: dict[str, Any] = {"ip": _related_ips(flow)}
    if facts.username is not None:
        doc["user"] = {"name": facts.username}
        related["user"] = [facts.username]
    doc["related"] = related
    if facts.encrypted or facts.starttls != "none":
        doc["tls"] = {"established": facts.encrypted}
    rest = {k: v for k, v in rec.items() if k not in FLOW_MAPPED}
    del rest["type"]
    doc[MODULE] = {"flow": {"id": facts.flow, **rest}}
    return doc


def stats_document(record: dict[str, Any], ts: float) -> dict[str, Any]:
    """The ECS document of the final stats record, at ``ts``."""
    error = record.get("error")
    doc: dict[str, Any] = {
        "@timestamp": timestamp(ts),
        "ecs": _ECS,
        "event": {"kind": "metric", "category": ["network"], "type": ["info"], "action": "capture-stats",
                  "outcome": "failure" if error else "success", "module": MODULE, "dataset": f"{MODULE}.stats"},
        "observer": _OBSERVER,
    }
    if error:
        doc["error"] = {"message": error}
    doc[MODULE] = {"stats": record}
    return doc


class EcsSink(JsonlSink):
    """The pipeline's ECS output: `JsonlSink`'s records as ECS documents, one per line."""

    def __init__(self, writer: JsonlWriter, messages: bool = True) -> None:
        super().__init__(writer, messages)
        self._ids: dict[int, str] = {}
        """Community IDs of the open flows (bounded by the flow table)."""
        self._end_ts: float | None = None

    def _cid(self, flow: Flow) -> str:
        cid = self._ids.get(flow.id)
        if cid is None:
            cid = self._ids[flow.id] = community_id(flow.client, flow.server)
        return cid

    def flow_started(self, flow: Flow) -> Callable[[Message], None] | None:
        return partial(self._message, flow) if self.messages else None

    def _message(self, flow: Flow, msg: Message) -> None:
        doc = message_document(flow, msg, flow.session.username, self._cid(flow))
        self.writer.write(_dumps(doc) + "\n")

    def flow_ended(self, flow: Flow, facts: FlowFacts) -> None:
        doc = flow_document(flow, facts, cid=self._cid(flow))
        self._ids.pop(flow.id, None)
        self.writer.write(_dumps(doc) + "\n")

    def flow_update(self, flow: Flow, facts: FlowFacts, ts: float) -> None:
        self.writer.write(_dumps(flow_document(flow, facts, ts, self._cid(flow))) + "\n")

    def finished(self, pipeline: Pipeline) -> None:
        self._end_ts = pipeline.now() or None

    def stats(self, record: dict[str, Any]) -> None:
        """The final stats record, at the capture clock's end (the wall clock where it has none)."""
        ts = self._end_ts if self._end_ts is not None else time.time()
        self.writer.write(_dumps(stats_document(record, ts)) + "\n")
