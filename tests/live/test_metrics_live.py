"""``imaptap -i --metrics`` in the lab, scraped by a real Prometheus: the numbers must be the sessions'.

Dovecot runs in its namespace (imaptap_lab.lab); imaplib clients log in, fail to log in, send
commands in clear text and behind STARTTLS; imaptap watches the veth with ``--metrics`` on
loopback; a Prometheus server started here (imaptap_lab.prometheus: its own configuration and
data directory, a free loopback port) scrapes it every second.  Its HTTP API must then give
exactly the logins, failures, commands and cleartext credentials the clients made, promtool
must accept a scrape, and every metric the shipped Grafana dashboard queries must be in it.
"""

from __future__ import annotations

import collections
import imaplib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imaptap_lab import prometheus
from imaptap_lab.lab import Lab
from imaptap_lab.prometheus import Prometheus
from livelab import IN_CI, ROOT, live_unavailable
from testenv import dashboard_metric_names

ATTACH_TIMEOUT = 120.0
SETTLE_TIMEOUT = 60.0
DASHBOARD = ROOT / "deploy" / "grafana" / "imaptap.json"


class CountingIMAP4(imaplib.IMAP4):
    """imaplib that counts the commands it sends in clear text, as imaptap names them."""

    def __init__(self, *args, **kwargs) -> None:
        self.sent: collections.Counter[str] = collections.Counter()
        self.encrypted = False
        super().__init__(*args, **kwargs)

    def _command(self, name, *args):
        if not self.encrypted:
            self.sent["UID " + args[0].upper() if name == "UID" else name] += 1
        if name == "STARTTLS":
            self.encrypted = True  # its completion is the last thing seen in clear
        return super()._command(name, *args)


def lab_sessions(lab: Lab, host: str) -> dict:
    """Real client sessions against one lab; what they did, counted by the client side."""
    users = lab.users
    sent: collections.Counter[str] = collections.Counter()
    done = {"sessions": 0, "ok": collections.Counter(), "failed": 0, "cleartext": 0, "starttls": 0}

    def finish(imap: CountingIMAP4) -> None:
        imap.logout()
        sent.update(imap.sent)
        done["sessions"] += 1

    # LOGIN in clear, SELECT, FETCH, NOOP
    imap = CountingIMAP4(host, 143, timeout=30)
    imap.login("alice", users["alice"])
    imap.select("INBOX")
    imap.noop()
    done["ok"]["LOGIN"] += 1
    done["cleartext"] += 1
    finish(imap)
    # two failed LOGINs, then the right password
    imap = CountingIMAP4(host, 143, timeout=30)
    for wrong in ("Wrong-Pw-1", "Wrong-Pw-2"):
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("bob", wrong)
        done["failed"] += 1
    imap.login("bob", users["bob"])
    done["ok"]["LOGIN"] += 1
    imap.list()
    done["cleartext"] += 1
    finish(imap)
    # AUTHENTICATE PLAIN after a continuation, then STATUS
    imap = CountingIMAP4(host, 143, timeout=30)
    imap.authenticate("PLAIN", lambda _: f"\0carol\0{users['carol']}".encode())
    done["ok"]["PLAIN"] += 1
    imap.status("INBOX", "(MESSAGES)")
    done["cleartext"] += 1
    finish(imap)
    # STARTTLS first: the login is encrypted, nobody on the wire can count it
    imap = CountingIMAP4(host, 143, timeout=30)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    imap.starttls(ctx)
    done["starttls"] += 1
    imap.login("dave", users["dave"])
    finish(imap)
    done["commands"] = sent
    return done


def attached(ifname: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", ifname, "egress"], capture_output=True, text=True).stdout
    return "imaptap" in out


def metrics_port(err_path: Path, proc: subprocess.Popen) -> int:
    """The port imaptap says it serves metrics on (``--metrics ADDR:0``)."""
    deadline = time.monotonic() + 30
    while True:
        m = re.search(r"serving metrics on http://[^ ]+:(\d+)/metrics", err_path.read_text())
        if m:
            return int(m.group(1))
        assert proc.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, "no metrics line on stderr"
        time.sleep(0.1)


def start_imaptap(iface: str, listen: str, tmp: Path, *extra: str, netns: str | None = None):
    """``imaptap -i iface --metrics listen`` (in ``netns`` if given), running until SIGINT."""
    cmd = [sys.executable, "-m", "imaptap", "-i", iface, "--json", str(tmp / "out.jsonl"), "--metrics", listen,
           *extra]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    err = tmp / "stderr"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "userspace")))
    return proc, err


def wait_capturing(prom: Prometheus, instance: str) -> None:
    """Until the imaptap at ``instance`` serves its capture's counters: the sink reads them from the
    first tick on, which comes once the source is open, its programs attached (XDP and TC)."""
    prom.wait_for(f'imaptap_capture_packets_seen_total{{instance="{instance}"}} >= 0', lambda v: v is not None,
                  timeout=ATTACH_TIMEOUT)


def stop(proc: subprocess.Popen, err: Path) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, err.read_text()
    assert "Traceback" not in err.read_text()


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
