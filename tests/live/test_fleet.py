"""A fleet on one machine: two mail hosts, each with its Dovecot and its own imaptap, one Prometheus.

Each lab (imaptap_lab.lab) is a host: a network namespace with Dovecot.  imaptap runs inside
each namespace, as the service would on the mail host, captures that host's own end of its
veth and serves its metrics on the host's address (an explicit ``--metrics ADDR:PORT``, the
same port on both, as across a fleet), with the per-server label.  A Prometheus in the root
namespace scrapes both over the veths; a query summing over instances must give the total of
both hosts' sessions, and each instance its own.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest

from imaptap_lab import prometheus
from imaptap_lab.lab import Lab
from imaptap_lab.prometheus import Prometheus
from livelab import IN_CI, lab_sessions, live_unavailable, start_imaptap, stop, wait_capturing

#: The port every host serves its metrics on (one port for the fleet, as a unit file would set).
FLEET_METRICS_PORT = 9464
SETTLE_TIMEOUT = 60.0


@pytest.fixture
def fleet_ready():
    reason = live_unavailable() or prometheus.available()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    pytest.importorskip("prometheus_client")


def test_prometheus_sums_the_sessions_of_two_hosts(fleet_ready):
    with Lab() as host_a, Lab() as host_b, tempfile.TemporaryDirectory(prefix="imaptap-fleet-") as tmp:
        hosts = {}
        try:
            for lab in (host_a, host_b):
                workdir = Path(tmp) / lab.netns
                workdir.mkdir()
                target = f"{lab.server4}:{FLEET_METRICS_PORT}"
                proc, err = start_imaptap(lab.ns_if, target, workdir, "--metrics-label", "server", netns=lab.netns)
                hosts[target] = (lab, proc, err)
            with Prometheus({"imaptap": list(hosts)}) as prom:
                for target in hosts:
                    wait_capturing(prom, target)
                # different work on each host: two rounds of sessions on A, one on B
                did = {target: [lab_sessions(lab, lab.server4) for _ in range(rounds)]
                       for (target, (lab, _, _)), rounds in zip(hosts.items(), (2, 1), strict=True)}
                sessions = {t: sum(d["sessions"] for d in runs) for t, runs in did.items()}
                failed = {t: sum(d["failed"] for d in runs) for t, runs in did.items()}
                total = sum(sessions.values())
                prom.wait_for('sum(imaptap_flows_ended_total{imap="true"})', lambda v: v == total,
                              timeout=SETTLE_TIMEOUT)
                time.sleep(2.5)  # one more refresh and scrape
                assert prom.value('sum(imaptap_flows_ended_total{imap="true"})') == total
                assert prom.value('count(up{job="imaptap"} == 1)') == 2
                per_instance = prom.by('sum by (instance) (imaptap_flows_ended_total{imap="true"})', "instance")
                assert per_instance == {t: float(n) for t, n in sessions.items()}
                failures = prom.by('sum by (instance) (imaptap_logins_total{outcome="failure"})', "instance")
                assert failures == {t: float(n) for t, n in failed.items()}
                assert prom.value('sum(imaptap_logins_total{outcome="failure"})') == sum(failed.values())
                # each imaptap saw only its own server, under its own label
                servers = prom.query('sum by (instance, server) (imaptap_flows_ended_total) > 0')
                assert {(s["instance"], s["server"]) for s, _ in servers} == {
                    (t, f"{lab.server4}:143") for t, (lab, _, _) in hosts.items()}
                assert prom.value("sum(imaptap_capture_segments_lost_total)") == 0
        finally:
            for _, proc, err in hosts.values():
                if proc.poll() is None:
                    stop(proc, err)
