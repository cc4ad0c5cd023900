"""deploy/systemd and deploy/logrotate: the units pass systemd-analyze and share one hardening;
logrotate reads its config.

systemd is not PID 1 where the tests run; ``systemd-analyze verify`` and ``security
--offline`` read unit files all the same.  tests/live/test_service.py runs the unit's sandbox.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testenv import IN_CI, ROOT

DEPLOY = Path(ROOT) / "deploy"
UNITS = ("imaptap.service", "imaptap@.service")
#: Where the units expect the installed command (README, "Running it as a service").
INSTALLED = "/opt/imaptap/bin/imaptap"
#: systemd's exposure score (0 safest, 10 unconfined) the units must stay at or under: "OK" is below 4.
MAX_EXPOSURE = 3.0
#: The marker after which both units' [Service] lines must be the same.
HARDENING = "# --- hardening"


def tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.path.exists(p)), None)
    if path is None:
        if IN_CI:
            pytest.fail(f"CI=true and {name} is missing (scripts/setup installs it)", pytrace=False)
        pytest.skip(f"needs {name}")
    return path


def installed_copy(tmp_path: Path, name: str, instance: str = "lo") -> Path:
    """The unit as installed, its ExecStart pointing at an executable that exists here (verify
    checks it), a template under an instance's name."""
    exe = tmp_path / "imaptap"
    exe.write_text(f"#!{sys.executable}\nfrom imaptap.cli import main\nmain()\n")
    exe.chmod(0o755)
    text = (DEPLOY / "systemd" / name).read_text()
    assert INSTALLED in text
    target = tmp_path / name.replace("@.", f"@{instance}.")
    target.write_text(text.replace(INSTALLED, str(exe)))
    return target


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, name):
    r = subprocess.run([tool("systemd-analyze"), "verify", str(installed_copy(tmp_path, name))], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr + r.stdout


def test_verify_would_catch_a_mistake(tmp_path):
    unit = installed_copy(tmp_path, "imaptap.service")
    unit.write_text(unit.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    r = subprocess.run([tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert "Unknown key 'ProtectClok'" in r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_the_units_exposure_is_low(tmp_path, name):
    r = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                        str(installed_copy(tmp_path, name))], capture_output=True, text=True)
    (score,) = re.findall(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout + r.stderr)
    assert float(score) <= MAX_EXPOSURE, r.stdout


def hardening(name: str) -> list[str]:
    text = (DEPLOY / "systemd" / name).read_text()
    service = text[text.index("[Service]"):text.index("[Install]")]
    return [line for line in service[service.index(HARDENING):].splitlines()[1:]]


def test_both_units_have_the_same_hardening():
    assert hardening("imaptap.service") == hardening("imaptap@.service")
    assert "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON" in hardening("imaptap.service")


def test_logrotate_reads_the_shipped_config(tmp_path):
    conf = tmp_path / "imaptap"
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "imaptap.jsonl").write_text("{}\n")
    conf.write_text((DEPLOY / "logrotate" / "imaptap").read_text().replace("/var/log/imaptap", str(logs)))
    conf.chmod(0o644)
    r = subprocess.run([tool("logrotate"), "--debug", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr.lower() and "copytruncate" not in conf.read_text().split("{", 1)[1]
    assert "delaycompress" in conf.read_text()  # the file moved away is written until the next tick
