"""``--metrics`` on the command line: what it prints, what it leaves alone, how it fails."""

import os
import re
import socket
import subprocess
import sys

import pytest

from testenv import OWN_PCAPS, ROOT

CAPTURE = os.path.join(OWN_PCAPS, "failed-login.pcap")


def without_seconds(stdout: str) -> str:
    return re.sub(r'"seconds": ?[0-9.]+', "", stdout)


def test_metrics_leave_the_json_as_it_was(imaptap):
    pytest.importorskip("prometheus_client")
    plain = imaptap("-r", CAPTURE, "--json", "-")
    served = imaptap("-r", CAPTURE, "--json", "-", "--metrics", "0", "--metrics-label", "server")
    assert served.returncode == 0, served.stderr
    assert re.fullmatch(r"imaptap: serving metrics on http://127\.0\.0\.1:\d+/metrics\n", served.stderr)
    assert without_seconds(served.stdout) == without_seconds(plain.stdout)


def test_without_the_library_it_is_one_line():
    # prometheus_client made unimportable, as on an install without the metrics extra
    code = ("import sys; sys.modules['prometheus_client'] = None; from imaptap.cli import main; "
            f"sys.exit(main(['-r', {CAPTURE!r}, '--json', '-', '--metrics', '9464']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace")))
    assert r.returncode == 2
    assert r.stderr == ("imaptap: --metrics needs the prometheus_client library: pip install 'imaptap[metrics]'"
                        " (Debian: python3-prometheus-client)\n")
    assert r.stdout == ""
    # and without --metrics nothing needs it
    code = code.replace(", '--metrics', '9464'", "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace")))
    assert r.returncode == 0, r.stderr


def test_a_busy_port_is_one_line_before_anything_is_read(imaptap):
    pytest.importorskip("prometheus_client")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = imaptap("-r", CAPTURE, "--json", "-", "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr == f"imaptap: cannot serve metrics on 127.0.0.1:{port}: Address already in use\n"
    assert r.records == []


@pytest.mark.parametrize("args, message", [
    (["--metrics", "::1:9464"], "argument --metrics: put an IPv6 address in brackets: [::1]:9464"),
    (["--metrics", "localhost:http"], "argument --metrics: not a port: 'http'"),
    (["--metrics-label", "server"], "--metrics-label needs --metrics"),
    (["--metrics", "9464", "--metrics-label", "user"], "argument --metrics-label: invalid choice: 'user'"),
])
def test_bad_metrics_options_are_one_line(imaptap, args, message):
    r = imaptap("-r", CAPTURE, "--json", "-", *args)
    assert r.returncode == 2
    assert r.stderr.startswith(f"imaptap: {message}") and r.stderr.count("\n") == 1, r.stderr
