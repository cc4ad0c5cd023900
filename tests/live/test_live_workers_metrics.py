"""``imaptap -i --workers N --metrics``: the scrape of N workers must be that of one process.

A real Dovecot (imaptap_lab.lab) and real imaplib clients; the same sessions are watched by
``--workers 1`` and by ``--workers 2``, each scraped over HTTP once every flow has ended.  Both
scrapes must give the sessions' logins, commands, cleartext credentials and ended flows, the
two-worker run must have given flows to both workers, promtool must accept its scrape, and the
kernel's counters, read by the parent alone, must appear once and not be counted twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from imaptap_lab import prometheus
from livelab import IN_CI, CountingIMAP4, lab_sessions, metrics_port, start_imaptap, stop

pytestmark = pytest.mark.live

#: Plain logins after the mixed sessions: with two workers, 2**-25 that none reaches one.
EXTRA_LOGINS = 24
SETTLE_TIMEOUT = 60.0
#: Seconds a scrape may take to show what the workers counted: a worker ships its snapshot
#: every refresh (1 s) and the parent merges every refresh.
PUBLISH_SECONDS = 2.5
#: Capture counters only the parent reads (the kernel's, the interfaces'): one sample each.
KERNEL_FAMILIES = ("imaptap_capture_packets_seen_total", "imaptap_capture_packets_matched_total",
                   "imaptap_capture_segments_submitted_total", "imaptap_capture_segments_lost_total")


def samples(scrape: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family sample name -> sorted label pairs -> value, from a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(scrape):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(got: dict, name: str) -> float:
    return sum(got.get(name, {}).values())


def by(got: dict, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The family's values summed by ``labels``, zeros left out."""
    out: dict[tuple[str, ...], float] = {}
    for key, value in got.get(name, {}).items():
        pairs = dict(key)
        k = tuple(pairs[label] for label in labels)
        out[k] = out.get(k, 0) + value
    return {k: v for k, v in out.items() if v}


def scrape_until(url: str, done: Callable[[str], bool], timeout: float) -> str:
    """Scrape ``url`` until ``done`` holds for a scrape or ``timeout`` seconds pass: the last
    scrape (the workers' counts reach the parent once a refresh)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def scraped_run(lab, tmp: Path, workers: int, *more: str) -> tuple[dict, str, list[dict]]:
    """What the sessions did, the final scrape of a ``--workers`` run, and its JSON records."""
    tmp.mkdir()
    proc, err = start_imaptap(lab.host_if, "127.0.0.1:0", tmp, "--workers", str(workers), *more)
    try:
        port = metrics_port(err, proc)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while "listening on" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        did = lab_sessions(lab, lab.server4)
        for _ in range(EXTRA_LOGINS):
            imap = CountingIMAP4(lab.server4, 143, timeout=30)
            imap.login("bob", lab.users["bob"])
            imap.select("INBOX")
            imap.logout()
            did["commands"].update(imap.sent)
        did["sessions"] += EXTRA_LOGINS
        did["ok"]["LOGIN"] += EXTRA_LOGINS
        did["cleartext"] += EXTRA_LOGINS
        def ended(text: str) -> float:
            return total(samples(text), "imaptap_flows_ended_total")

        scrape = scrape_until(url, lambda text: ended(text) == did["sessions"], SETTLE_TIMEOUT)
        assert ended(scrape) == did["sessions"], scrape
        time.sleep(PUBLISH_SECONDS)  # one more refresh on every side, for nothing in between to hide
        with urllib.request.urlopen(url, timeout=10) as r:
            scrape = r.read().decode()
    finally:
        if proc.poll() is None:
            stop(proc, err)
    records = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    return did, scrape, records


@pytest.fixture(scope="module")
def runs(live_ready, tmp_path_factory):
    reason = prometheus.available()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    pytest.importorskip("prometheus_client")
    from imaptap_lab.lab import Lab

    tmp = tmp_path_factory.mktemp("workers-metrics")
    with Lab() as lab:
        got = {n: scraped_run(lab, tmp / f"workers{n}", n) for n in (1, 2)}
        got["server"] = scraped_run(lab, tmp / "server-label", 2, "--metrics-label", "server")
        return got


def test_two_workers_scrape_the_numbers_of_one_process(runs):
    did, _, _ = runs[1]
    got = {n: samples(scrape) for n, (_, scrape, _) in runs.items()}
    for n in (1, 2):
        assert runs[n][0]["commands"] == did["commands"]
        logins = by(got[n], "imaptap_logins_total", "mechanism", "outcome")
        assert logins == {("LOGIN", "success"): did["ok"]["LOGIN"], ("PLAIN", "success"): did["ok"]["PLAIN"],
                          ("LOGIN", "failure"): did["failed"]}, n
        commands = by(got[n], "imaptap_commands_total", "command")
        assert commands == {(c,): float(k) for c, k in did["commands"].items()}, n
        assert total(got[n], "imaptap_cleartext_credentials_total") == did["cleartext"], n
        assert total(got[n], "imaptap_flows_ended_total") == did["sessions"], n
        assert total(got[n], "imaptap_flows_active") == 0, n
    for name, labels in (("imaptap_logins_total", ("mechanism", "outcome")),
                         ("imaptap_commands_total", ("command", "status")),
                         ("imaptap_cleartext_credentials_total", ()),
                         ("imaptap_flows_ended_total", ("imap",)),
                         ("imaptap_starttls_total", ("outcome",)),
                         ("imaptap_command_latency_seconds_count", ("command",))):
        assert by(got[2], name, *labels) == by(got[1], name, *labels), name
    # the same series, label sets included (zeros too): one program's scrape
    ours = {name for name in got[1] if name.startswith("imaptap_")}
    assert {name for name in got[2] if name.startswith("imaptap_")} == ours
    for name in ("imaptap_logins_total", "imaptap_anomalies_total", "imaptap_starttls_total"):
        assert set(got[2][name]) == set(got[1][name]), name


def test_the_flows_went_to_both_workers(runs):
    _, _, records = runs[2]
    flows = [r["flow"] for r in records if r["type"] == "flow"]
    assert {(flow - 1) % 2 for flow in flows} == {0, 1}
    assert sum(1 for r in records if r["type"] == "stats") == 1


def test_the_kernel_counters_appear_once_and_are_not_multiplied(runs):
    for n in (1, 2):
        _, _, records = runs[n]
        got = samples(runs[n][1])
        for name in KERNEL_FAMILIES:
            assert len(got[name]) == 1, (n, name)
        assert got["imaptap_capture_segments_lost_total"][()] == 0
        # submitted: the kernel's count, read by the parent; received and analysed: each worker's
        # own, summed.  Counted N times, the kernel's would be N times the others.
        submitted = got["imaptap_capture_segments_submitted_total"][()]
        assert submitted == got["imaptap_capture_records_received_total"][()] > 0, n
        assert submitted == got["imaptap_analyzer_segments_total"][()], n
        assert len(got["imaptap_build_info"]) == 1 and set(got["imaptap_build_info"].values()) == {1.0}
        # and the stats record's count, the parent's after detaching, is no smaller
        assert records[-1]["submitted"] >= submitted


def test_promtool_accepts_the_workers_scrape(runs):
    _, scrape, _ = runs[2]
    r = prometheus.promtool("check", "metrics", input=scrape.encode())
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert (r.stdout + r.stderr).strip() == b"", (r.stdout + r.stderr).decode()


def test_the_server_label_under_workers_names_the_one_server_with_no_overflow(runs):
    did, scrape, records = runs["server"]
    got = samples(scrape)
    (server,) = {r["server"] for r in records if r["type"] == "flow"}
    servers = {dict(key).get("server") for name in ("imaptap_logins_total", "imaptap_commands_total",
                                                    "imaptap_flows_ended_total", "imaptap_bytes_total")
               for key in got[name]}
    assert servers == {server} and server.endswith(":143")
    assert got["imaptap_metrics_server_overflow_total"][()] == 0
    assert by(got, "imaptap_logins_total", "server", "mechanism", "outcome") == {
        (server, "LOGIN", "success"): did["ok"]["LOGIN"], (server, "PLAIN", "success"): did["ok"]["PLAIN"],
        (server, "LOGIN", "failure"): did["failed"]}
    assert {(flow - 1) % 2 for flow in (r["flow"] for r in records if r["type"] == "flow")} == {0, 1}
    r = prometheus.promtool("check", "metrics", input=scrape.encode())
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == b"", (r.stdout + r.stderr).decode()


def test_a_killed_worker_under_metrics_stops_the_parent_with_its_line(lab, tmp_path):
    proc, err = start_imaptap(lab.host_if, "127.0.0.1:0", tmp_path, "--workers", "2")
    try:
        port = metrics_port(err, proc)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while "listening on" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"imaptap_capture_packets_seen_total" in r.read()
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        # only the parent holds the listening socket: the workers closed their copies
        listening = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                     if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"}
        assert len(listening) == 1
        for pid in workers:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert not {f"socket:[{inode}]" for inode in listening} & held
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert "Traceback" not in text, text
    assert text.endswith("imaptap: live worker 2 of 2 was killed by signal 9: capture stopped, its flows are lost\n")
