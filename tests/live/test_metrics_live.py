"""``imaptap -i --metrics`` in the lab, scraped by a real Prometheus: the numbers must be the sessions'.

Dovecot runs in its namespace (imaptap_lab.lab); imaplib clients log in, fail to log in, send
commands in clear text and behind STARTTLS; imaptap watches the veth with ``--metrics`` on
loopback; a Prometheus server started here (imaptap_lab.prometheus: its own configuration and
data directory, a free loopback port) scrapes it every second.  Its HTTP API must then give
exactly the logins, failures, commands and cleartext credentials the clients made, promtool
must accept a scrape, and every metric the shipped Grafana dashboard queries must be in it.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from imaptap_lab import prometheus
from imaptap_lab.lab import Lab
from imaptap_lab.prometheus import Prometheus
from livelab import (
    IN_CI,
    ROOT,
    attached,
    dropped_uid,
    lab_sessions,
    live_unavailable,
    metrics_port,
    start_imaptap,
    stop,
    wait_capturing,
)
from testenv import dashboard_metric_names

SETTLE_TIMEOUT = 60.0
DASHBOARD = ROOT / "deploy" / "grafana" / "imaptap.json"


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """One lab, one imaptap, one Prometheus; what Prometheus answered and one raw scrape."""
    reason = live_unavailable() or prometheus.available()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    pytest.importorskip("prometheus_client")
    tmp = tmp_path_factory.mktemp("metrics-live")
    with Lab() as lab:
        proc, err = start_imaptap(lab.host_if, "127.0.0.1:0", tmp)
        try:
            port = metrics_port(err, proc)
            target = f"127.0.0.1:{port}"
            with Prometheus({"imaptap": [target]}) as prom:
                wait_capturing(prom, target)
                assert attached(lab.host_if)
                did = lab_sessions(lab, lab.server4)
                # Every flow ended (both FINs seen) and scraped: the counts are final.
                prom.wait_for("sum(imaptap_flows_ended_total)", lambda v: v == did["sessions"],
                              timeout=SETTLE_TIMEOUT)
                time.sleep(2.5)  # one more refresh and scrape, for nothing in between to hide
                answers = {
                    "commands": prom.by("sum by (command) (imaptap_commands_total)", "command"),
                    "logins": prom.query("sum by (mechanism, outcome) (imaptap_logins_total) > 0"),
                    "cleartext": prom.value("sum(imaptap_cleartext_credentials_total)"),
                    "starttls": prom.by("sum by (outcome) (imaptap_starttls_total) > 0", "outcome"),
                    "ended": prom.by("sum by (end) (imaptap_flows_ended_total)", "end"),
                    "imap_flows": prom.value('sum(imaptap_flows_ended_total{imap="true"})'),
                    "lost": prom.value("sum(imaptap_capture_segments_lost_total)"),
                    "lag": prom.value("imaptap_capture_lag_seconds"),
                    "latency_count": prom.by("sum by (command) (imaptap_command_latency_seconds_count)", "command"),
                    "active": prom.value("sum(imaptap_flows_active)"),
                    "up": prom.value(f'up{{instance="{target}"}}'),
                }
                with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as r:
                    scrape = r.read()
                answers["threads"] = thread_credentials(proc.pid)
        finally:
            if proc.poll() is None:
                stop(proc, err)
    return did, answers, scrape, tmp


def test_prometheus_gives_the_numbers_the_sessions_made(scraped):
    did, got, _, _ = scraped
    assert got["up"] == 1
    assert got["commands"] == {c: float(n) for c, n in did["commands"].items()}
    logins = {(labels["mechanism"], labels["outcome"]): v for labels, v in got["logins"]}
    assert logins == {("LOGIN", "success"): did["ok"]["LOGIN"], ("PLAIN", "success"): did["ok"]["PLAIN"],
                      ("LOGIN", "failure"): did["failed"]}
    assert got["cleartext"] == did["cleartext"]
    assert got["starttls"] == {"completed": did["starttls"], "offered_unused": did["sessions"] - did["starttls"]}
    # the TLS session may end in a reset (ssl closes with bytes unread): ended all the same
    assert sum(got["ended"].values()) == got["imap_flows"] == did["sessions"]
    assert set(got["ended"]) <= {"fin", "rst"} and got["ended"]["fin"] >= did["sessions"] - did["starttls"]
    assert got["active"] == 0
    assert got["lost"] == 0
    assert got["lag"] is not None and 0 <= got["lag"] < 5
    # IDLE-free sessions: every completion but AUTHENTICATE's (after a continuation) is timed
    timed = dict(did["commands"])
    timed.pop("AUTHENTICATE")
    assert got["latency_count"] == {c: float(n) for c, n in timed.items()}


def thread_credentials(pid: int) -> list[tuple[int, int]]:
    """(uid, effective capabilities) of each thread of ``pid``."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
        out.append((int(status["Uid"].split()[0]), int(status["CapEff"], 16)))
    return out


def test_the_metrics_server_threads_keep_no_privilege(scraped):
    _, got, _, _ = scraped
    threads = got["threads"]
    assert len(threads) >= 2, "the HTTP server runs on a thread of its own"
    kept = 1 << 12 | 1 << 39  # CAP_NET_ADMIN, CAP_BPF: the detaching thread's
    # Made once the capture was attached and the user switched, the serving threads give up even
    # the two capabilities the capturing thread keeps to detach.  (Where nobody cannot read this
    # checkout's Python, imaptap stays root, README: the capabilities are cut down all the same.)
    uid = dropped_uid()
    assert sorted(threads) == sorted([(uid, kept)] + [(uid, 0)] * (len(threads) - 1))


def test_promtool_accepts_the_scrape(scraped):
    _, _, scrape, _ = scraped
    r = prometheus.promtool("check", "metrics", input=scrape)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert (r.stdout + r.stderr).strip() == b"", (r.stdout + r.stderr).decode()


def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(scraped):
    _, _, scrape, _ = scraped
    served = set()
    for line in scrape.decode().splitlines():
        if line and not line.startswith("#"):
            served.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    served.add("up")  # Prometheus' own, for every target
    missing = dashboard_metric_names(json.loads(DASHBOARD.read_text())) - served
    assert not missing, f"the dashboard queries metrics no scrape has: {sorted(missing)}"
