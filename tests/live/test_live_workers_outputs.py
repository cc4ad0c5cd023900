"""`imaptap -i --workers 2` with the outputs the parent builds from what the workers send:
--json-format ecs (each worker formats its ECS documents), --report and --fail-on (each
worker sends its ended flows' facts and audits; the parent's report and gate cover them all),
and -w (each worker masks its flows' segments; the parent writes them to the one pcap).

The real kernel program on the lab's veth, the lab's Dovecot, real clients (imaplib, curl,
mbsync); the same scripted sessions are watched by one process and by two workers, and the
two runs must agree but for what differs between two runs of one script (test_live_workers:
flow ids, client ports, times, Dovecot's timings, tags).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
from test_cli_live import FACTS, env, imaptap_cmd
from test_live_workers import by_flow, normalised, script, watched_with
from test_report_live import sessions as attack_sessions
from test_service_life import NOTICE_TIMEOUT, Imaptap, login

pytestmark = pytest.mark.live

#: ECS fields that differ between two runs of one script, by their last name: the client's
#: port (as source or destination port too), the clocks, byte and packet counts (see
#: test_live_workers.RUN_KEYS), and the Community ID, a hash of the client's port.
ECS_RUN_FIELDS = ("port", "bytes", "packets", "start", "end", "duration", "community_id")
#: A client's port in the report's and the gate's text ("10.0.0.1:40112", "[fd00::1]:40112").
CLIENT_PORT = re.compile(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+")
#: A flow id as the gate names it.
GATE_FLOW = re.compile(r"flow \d+")
#: What the report's JSON and the gate name: every finding the sessions show.
GATED = "cleartext_credentials,brute_force,login_despite_logindisabled"
EXIT_FINDINGS = 3


def flat(doc: dict, prefix: str = "") -> dict:
    """An ECS document's fields by their dotted names."""
    out: dict = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_record(doc: dict) -> dict:
    """An ECS document as the imaptap record `test_live_workers.normalised` takes: its imaptap
    part, the record type, the flow id, and the ECS fields kept whole but for `ECS_RUN_FIELDS`."""
    kind = doc["event"]["dataset"].removeprefix("imaptap.")
    part = doc["imaptap"].get(kind, {}) if kind != "flow" else dict(doc["imaptap"]["flow"])
    record = {k: v for k, v in part.items() if k != "id"}
    record["type"] = kind
    record["flow"] = doc["imaptap"].get("flow", {}).get("id")
    record["encrypted"] = doc.get("tls", {}).get("established", record.get("encrypted"))
    ecs = {k: v for k, v in flat(doc).items() if not k.startswith("imaptap.") and k != "@timestamp"
           and k.rsplit(".", 1)[-1] not in ECS_RUN_FIELDS}
    record["ecs"] = ecs
    if kind == "flow":
        record["first_ts"] = doc["event"]["start"]
    return record


def assert_same_flows(one: list[dict], two: list[dict]) -> None:
    """Each flow of the two-worker run and its messages as the one process's, in order."""
    flows_one, flows_two = by_flow(one), by_flow(two)
    assert len(flows_two) == len(flows_one) >= 5
    for (flow1, msgs1), (flow2, msgs2) in zip(flows_one, flows_two, strict=True):
        assert normalised(flow2) == normalised(flow1)
        assert [normalised(m) for m in msgs2] == [normalised(m) for m in msgs1]


def deliver(lab) -> None:
    """Mail for the users `script` fetches (the lab starts with empty mailboxes)."""
    for user in ("alice", "bob", "dave"):
        lab.deliver(user, f"Subject: workers\r\n\r\n{'body line ' * 40}\r\n".encode())


def test_two_workers_write_the_ecs_documents_of_one_process(lab, tmp_path):
    deliver(lab)
    script(lab)  # unwatched: the mail is no longer \Recent, so both runs find the same mailboxes
    docs_one, _, _ = watched_with(lab, tmp_path, 1, None, "--json-format", "ecs")
    docs_two, _, err = watched_with(lab, tmp_path, 2, None, "--json-format", "ecs")
    assert "2 worker processes" in err
    for docs in (docs_one, docs_two):
        assert {d["ecs"]["version"] for d in docs} == {docs_one[0]["ecs"]["version"]}
    one = [as_record(d) for d in docs_one[:-1]]
    two = [as_record(d) for d in docs_two[:-1]]
    assert_same_flows(one, two)
    # both workers wrote documents: flow ids of both residue classes
    assert {(r["flow"] - 1) % 2 for r in two if r["type"] == "flow"} == {0, 1}
    # the last document: the parent's stats, the workers' counts summed as one process counts
    stats_one, stats_two = docs_one[-1]["imaptap"]["stats"], docs_two[-1]["imaptap"]["stats"]
    assert docs_two[-1]["event"]["dataset"] == "imaptap.stats"
    for name in ("flows", "imap_flows", "non_imap_flows", "anomalies", "lost", "policy_errors"):
        assert stats_two[name] == stats_one[name], name
    assert stats_two["received"] == stats_two["segments"] and stats_two["stopped_by_signal"] is True


def report_sessions(lab) -> list[str]:
    """`script`'s clients, then test_report_live's attacks: a brute force over three
    connections (which the two workers share between them) and a login despite LOGINDISABLED."""
    script(lab)
    return attack_sessions(lab)


def run_independent(report: dict) -> dict:
    """The report's record without what differs between two runs of one script: its times, the
    flow ids in its flow lists, the clients' ports."""
    out = {k: v for k, v in report.items() if k not in ("first_ts", "last_ts")}
    for row in out["findings"]:
        row["flow_list"] = [{k: v for k, v in ref.items() if k != "flow"} for ref in row["flow_list"]]
    return json.loads(CLIENT_PORT.sub(r"\1", json.dumps(out)))


def gate_lines(err: str) -> list[str]:
    """The flows the gate named on stderr, without their ids and client ports, sorted (the gate
    lists them by flow id)."""
    named = [line for line in err.splitlines() if line.startswith("imaptap: ") and ": flow " in line]
    return sorted(CLIENT_PORT.sub(r"\1", GATE_FLOW.sub("flow", line)) for line in named)


def test_two_workers_report_and_gate_as_one_process(lab, tmp_path):
    deliver(lab)
    script(lab)  # unwatched, as in test_live_workers
    more = ("--format", "json", "--fail-on", GATED)
    passwords: list[str] = []

    def run(lab) -> None:
        passwords.extend(report_sessions(lab))

    one, report_one, err_one = watched_with(lab, tmp_path, 1, None, *more, status=EXIT_FINDINGS, run=run)
    two, report_two, err_two = watched_with(lab, tmp_path, 2, None, *more, status=EXIT_FINDINGS, run=run)
    assert "2 worker processes" in err_two
    (line_one,) = report_one.splitlines()
    (line_two,) = report_two.splitlines()
    rec_one, rec_two = json.loads(line_one), json.loads(line_two)
    assert rec_two["type"] == "report" and rec_two["source"] == rec_one["source"] == lab.host_if
    assert rec_two["flows"] == len([r for r in two if r["type"] == "flow"]) == rec_one["flows"]
    assert run_independent(rec_two) == run_independent(rec_one)
    # the flows came from both workers, the brute force still one attack over its three connections
    assert {(f["flow"] - 1) % 2 for f in two if f["type"] == "flow"} == {0, 1}
    (attack,) = rec_two["attacks"]
    assert attack["kinds"] == ["brute_force"] and attack["top_user_passwords"] == 6
    # the gate: the same flows named (and exit 3, as watched_with checked), no password anywhere
    assert gate_lines(err_two) == gate_lines(err_one) and len(gate_lines(err_two)) >= 5
    written = (tmp_path / "workers2.jsonl").read_text()
    assert passwords and not any(p in report_two or p in err_two or p in written for p in passwords)


def replayed(pcap) -> list[dict]:
    """One process's records of a pcap imaptap wrote."""
    proc = subprocess.run(imaptap_cmd("-r", str(pcap), "--port", "143", "--port", "10143", "--json", "-"),
                          capture_output=True, text=True, env=env(), check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def pcap_records(pcap) -> int:
    """The records in a pcap imaptap wrote (its file header, then whole records only)."""
    from imaptap.capture.pcapwrite import FILE_HEADER, whole_records

    data = pcap.read_bytes()
    assert data.startswith(FILE_HEADER)
    end, count = whole_records(data[len(FILE_HEADER):])
    assert end == len(data) - len(FILE_HEADER), "a record cut short"
    return count


def test_two_workers_write_the_masked_pcap_of_one_process(lab, tmp_path):
    deliver(lab)
    script(lab)  # unwatched, as in test_live_workers
    pcaps = {n: tmp_path / f"written{n}.pcap" for n in (1, 2)}
    passwords: list[str] = []

    def run(lab) -> None:
        passwords.extend(report_sessions(lab))

    one, _, _ = watched_with(lab, tmp_path, 1, None, "-w", str(pcaps[1]), run=run)
    two, _, err = watched_with(lab, tmp_path, 2, None, "-w", str(pcaps[2]), run=run)
    assert "2 worker processes" in err
    assert {(r["flow"] - 1) % 2 for r in two if r["type"] == "flow"} == {0, 1}
    for records, n in ((one, 1), (two, 2)):
        assert records[-1]["type"] == "stats" and records[-1]["written"] == pcap_records(pcaps[n]) > 0
        data = pcaps[n].read_bytes()
        assert passwords and not any(p.encode() in data for p in passwords), f"a password in -w of {n}"
    # each file, replayed, gives the flows its live run wrote, in FACTS (test_live_workers, as
    # for tcpdump's capture): where the kernel cut a long segment, its head and tail are framed
    # as one shorter segment, and the replay finds the gap otherwise than the live run did (so
    # with one process); the two files give the same flows
    facts = {}
    for records, n in ((one, 1), (two, 2)):
        again = [{k: f[k] for k in FACTS} for f, _ in by_flow(replayed(pcaps[n]))]
        assert again == [{k: f[k] for k in FACTS} for f, _ in by_flow(records)], f"-w of {n}"
        facts[n] = again
    assert facts[2] == facts[1] and len(facts[2]) >= 5


def test_sigusr1_reopens_the_one_pcap_of_two_workers(lab, tmp_path):
    out, pcap = tmp_path / "out.jsonl", tmp_path / "out.pcap"
    moved = tmp_path / "out.pcap.1"
    # -Z root: nobody may not make a file in the test's directory (the reopen is what is tested)
    tap = Imaptap(lab.host_if, out, "--workers", "2", "-Z", "root", "-w", str(pcap))
    try:
        tap.wait_said(r"listening on .*, 2 worker processes")
        login(lab, "alice").logout()
        tap.wait_until(lambda: '"username":"alice"' in out.read_text(), NOTICE_TIMEOUT, "alice's flow not written")
        time.sleep(0.5)  # her last records: a worker sends them at its next tick
        pcap.rename(moved)
        tap.proc.send_signal(signal.SIGUSR1)
        tap.wait_until(pcap.exists, NOTICE_TIMEOUT, "the pcap was not opened anew")
        login(lab, "bob").logout()
        time.sleep(1.0)
    finally:
        records = tap.stop()
    users = {n: {f["username"] for f in replayed(path) if f["type"] == "flow"} for n, path in (("old", moved),
                                                                                               ("new", pcap))}
    assert users == {"old": {"alice"}, "new": {"bob"}}
    assert records[-1]["written"] == pcap_records(moved) + pcap_records(pcap)
