"""deploy/prometheus (alerting rules and their promtool unit tests) and deploy/grafana (the dashboard).

promtool (Debian package prometheus) checks the rules and runs their unit tests; a copy of the
rules with a threshold changed must fail those tests, so they can tell.  The dashboard's
queries may only use families imaptap declares (`metrics.FAMILIES`), prometheus_client's
process_* ones and Prometheus' ``up``; tests/live/test_metrics_live.py checks them against a
real scrape as well.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from imaptap.output.metrics import FAMILIES, MetricKind
from testenv import IN_CI, ROOT, dashboard_metric_names

DEPLOY = Path(ROOT) / "deploy"
RULES = DEPLOY / "prometheus" / "imaptap-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "imaptap-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "imaptap.json"
PROCESS_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                   "process_open_fds", "process_max_fds", "process_start_time_seconds"}


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        if IN_CI:
            pytest.fail("CI=true and promtool is missing (scripts/setup installs prometheus)", pytrace=False)
        pytest.skip("needs promtool (Debian package prometheus)")
    return path


def run(promtool, *args, cwd=None):
    r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return r.returncode, r.stdout + r.stderr


def test_rules_are_valid(promtool):
    code, out = run(promtool, "check", "rules", str(RULES))
    assert code == 0, out
    assert "SUCCESS: 8 rules found" in out


def test_rules_pass_their_unit_tests(promtool):
    code, out = run(promtool, "test", "rules", str(RULE_TESTS))
    assert code == 0, out


def test_the_unit_tests_catch_a_wrong_threshold(promtool, tmp_path):
    text = RULES.read_text()
    assert 'outcome="failure"}[5m])) > 20' in text
    (tmp_path / RULES.name).write_text(text.replace('outcome="failure"}[5m])) > 20', 'outcome="failure"}[5m])) > 1000'))
    shutil.copy(RULE_TESTS, tmp_path)
    code, out = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert code != 0 and "ImaptapFailedLoginBurst" in out, out


def test_every_rule_uses_declared_families():
    served = {f.name for f in FAMILIES} | {"up"}
    for word in ("imaptap_logins_total", "imaptap_cleartext_credentials_total", "imaptap_starttls_total",
                 "imaptap_capture_segments_lost_total", "imaptap_capture_lag_seconds",
                 "imaptap_capture_interfaces_unavailable"):
        assert word in RULES.read_text() and word in served


def served_names() -> set:
    names = {"up"} | PROCESS_METRICS
    for f in FAMILIES:
        names.add(f.name)
        if f.kind is MetricKind.HISTOGRAM:
            names |= {f.name + "_bucket", f.name + "_count", f.name + "_sum"}
    return names


def test_the_dashboard_queries_only_what_imaptap_serves():
    dashboard = json.loads(DASHBOARD.read_text())
    used = dashboard_metric_names(dashboard)
    assert used - served_names() == set()
    # what the issue asks the dashboard to show
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Command rate", "Error ratio", "Latency heatmap", "Logins by outcome", "Cleartext logins",
            "Capture losses"} <= titles
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (heatmap,) = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert "imaptap_command_latency_seconds_bucket" in heatmap["targets"][0]["expr"]
