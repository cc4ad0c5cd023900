"""A real Prometheus server for tests and benchmarks: its own configuration and data directory,
listening on loopback on a free port, stopped and removed afterwards.

Debian's ``prometheus`` package (scripts/setup installs it) brings the server and promtool;
its system service is never used.  Only the standard library is used here: the configuration
is written as JSON, which is YAML too.

::

    with Prometheus({"imaptap": ["127.0.0.1:9464"]}) as prom:
        prom.wait_for("sum(up)", lambda v: v == 1)
        prom.value('sum(imaptap_logins_total{outcome="failure"})')
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"
#: How often the test server scrapes and evaluates rules: fast, so tests wait seconds, not minutes.
SCRAPE_INTERVAL = "1s"
#: Prometheus 2.42 opens its TSDB and answers /-/ready within a second or two; a loaded CI VM
#: gets more.
READY_TIMEOUT = 60.0
POLL = 0.2
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0


class PrometheusError(RuntimeError):
    """The server did not start, or a query failed; the message has the server's log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def available() -> str | None:
    """Why no Prometheus can run here, or None."""
    for tool in (PROMETHEUS, PROMTOOL):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package prometheus; scripts/setup installs it)"
    return None


class Prometheus:
    """A Prometheus scraping ``targets`` (job -> ["host:port", ...]) every SCRAPE_INTERVAL."""

    def __init__(self, targets: dict[str, Sequence[str]], *, rule_files: Sequence[str | Path] = (),
                 scrape_interval: str = SCRAPE_INTERVAL) -> None:
        self.targets = {job: list(addrs) for job, addrs in targets.items()}
        self.rule_files = [str(p) for p in rule_files]
        self.scrape_interval = scrape_interval
        self.port = 0
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self) -> dict[str, Any]:
        """The server's configuration file, as a dict."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addrs}]}
                               for job, addrs in self.targets.items()],
        }

    def start(self) -> None:
        """Start the server and return once it answers /-/ready."""
        self.tmpdir = Path(tempfile.mkdtemp(prefix="imaptap-prometheus-"))
        conf = self.tmpdir / "prometheus.yml"
        conf.write_text(json.dumps(self.config(), indent=1))
        self.port = free_port()
        log = open(self.tmpdir / "prometheus.log", "wb")
        self._proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={self.tmpdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=HTTP_TIMEOUT) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus was not ready within {READY_TIMEOUT} s")
            time.sleep(POLL)

    def stop(self) -> None:
        """Stop the server and remove its directory (idempotent)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def log(self) -> str:
        """The server's log so far."""
        try:
            assert self.tmpdir is not None
            return (self.tmpdir / "prometheus.log").read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its ``data``, or PrometheusError."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise PrometheusError(f"{path} {params}: {exc.read().decode(errors='replace')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: each series' labels and value."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, expr: str) -> float | None:
        """The value of a query that gives one series (None when it gives none)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr} gave {len(result)} series, not one")
        return result[0][1]

    def by(self, expr: str, label: str) -> dict[str, float]:
        """A query's values by one label (``sum by (label) (...)`` gives one series each)."""
        return {labels.get(label, ""): v for labels, v in self.query(expr)}

    def wait_for(self, expr: str, done: Callable[[float | None], bool], timeout: float = 60.0) -> float | None:
        """Query ``expr`` until ``done(value)``; PrometheusError with the last value at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.value(expr)
            if done(got):
                return got
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr} was still {got} after {timeout} s")
            time.sleep(POLL)

    def targets_health(self) -> dict[str, str]:
        """scrape URL -> health (``up``/``down``/``unknown``) of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}


def promtool(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run promtool with ``args``; its output in the result (check it yourself)."""
    return subprocess.run([PROMTOOL, *args], input=input, capture_output=True, timeout=120)
