"""imaptap_lab.prometheus: the real Prometheus the metrics tests start, on its own (no root needed)."""

from __future__ import annotations

import os

import pytest

from imaptap_lab import prometheus
from imaptap_lab.prometheus import Prometheus, PrometheusError
from testenv import IN_CI


def test_the_configuration_scrapes_each_job_and_loads_the_rules():
    prom = Prometheus({"imaptap": ["127.0.0.1:9464", "10.199.3.2:9464"]}, rule_files=["/x/rules.yml"])
    conf = prom.config()
    assert conf["rule_files"] == ["/x/rules.yml"]
    assert conf["global"]["scrape_interval"] == prometheus.SCRAPE_INTERVAL
    assert conf["scrape_configs"] == [{"job_name": "imaptap",
                                       "static_configs": [{"targets": ["127.0.0.1:9464", "10.199.3.2:9464"]}]}]


def test_a_server_starts_answers_and_is_gone_afterwards():
    reason = prometheus.available()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    with Prometheus({"nothing": []}) as prom:
        tmpdir = prom.tmpdir
        assert prom.value("vector(41) + 1") == 42
        assert prom.value("absent(up)") == 1
        with pytest.raises(PrometheusError):
            prom.value("sum(")
    assert tmpdir is not None and not os.path.exists(tmpdir)
