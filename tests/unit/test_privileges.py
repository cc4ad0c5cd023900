"""Dropping root after attach (imaptap.privileges), in child processes: a drop cannot be undone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imaptap import privileges
from testenv import ROOT

KEPT = 1 << 12 | 1 << 39  # CAP_NET_ADMIN, CAP_BPF
CHILD = """
import json, sys
from imaptap import privileges
dropped = privileges.drop(sys.argv[1])
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
import email.parser  # a module imported only after the drop still loads
print(json.dumps({"dropped": dropped._asdict(), "status": {k: v.strip() for k, v in status.items()}}))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


#: The system's Python, whose directories nobody can read wherever this checkout is.
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture(scope="module")
def readable_copy():
    """The package copied where anyone can read it: the checkout may be under /root."""
    base = Path(tempfile.mkdtemp(prefix="imaptap-priv-", dir="/tmp"))
    try:
        shutil.copytree(os.path.join(ROOT, "userspace", "imaptap"), base / "imaptap")
        for path in (base, *base.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield str(base)
    finally:
        shutil.rmtree(base)


def child(user: str, pythonpath: str) -> dict:
    r = subprocess.run([SYSTEM_PYTHON, "-c", CHILD, user], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=pythonpath), cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_root
def test_drop_to_nobody_keeps_only_what_detaching_needs(readable_copy):
    got = child("nobody", readable_copy)
    status = got["status"]
    assert got["dropped"] == {"user": "nobody", "capabilities": ["CAP_NET_ADMIN", "CAP_BPF"], "note": None}
    assert status["Uid"].split() == status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    for kind in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[kind], 16) == KEPT, kind
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"


@needs_root
def test_root_asked_keeps_everything(readable_copy):
    got = child("root", readable_copy)
    assert got["dropped"]["capabilities"] is None
    assert got["status"]["Uid"].split() == ["0"] * 4 and got["status"]["NoNewPrivs"] == "0"


@needs_root
def test_a_user_who_cannot_read_the_modules_leaves_root_with_no_capabilities_to_spare(tmp_path):
    hidden = tmp_path / "private"
    shutil.copytree(os.path.join(ROOT, "userspace", "imaptap"), hidden / "imaptap")
    hidden.chmod(0o700)  # like a virtualenv under /root: nobody may not enter
    got = child("nobody", str(hidden))
    assert got["dropped"]["user"] == "root" and "nobody cannot read" in got["dropped"]["note"]
    status = got["status"]
    assert status["Uid"].split() == ["0"] * 4
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == KEPT
    assert status["NoNewPrivs"] == "1"


@needs_root
def test_a_service_given_the_capabilities_as_another_user_keeps_only_the_two(readable_copy):
    # As a systemd unit with User= (or DynamicUser=) and AmbientCapabilities= starts it.
    caps = "+bpf,+net_admin,+perfmon"
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", f"--inh-caps=-all,{caps}",
                        f"--ambient-caps=-all,{caps}", "--", SYSTEM_PYTHON, "-c", CHILD, "nobody"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=readable_copy), cwd="/")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    status = got["status"]
    assert got["dropped"] == {"user": "nobody", "capabilities": ["CAP_NET_ADMIN", "CAP_BPF"], "note": None}
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == KEPT
    assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
    assert status["NoNewPrivs"] == "1" and status["Uid"].split() == ["65534"] * 4


def test_unknown_user():
    with pytest.raises(privileges.PrivilegeError, match="no such user: nosuchuser-imaptap"):
        privileges.lookup("nosuchuser-imaptap")
    assert privileges.lookup("0").pw_name == "root"


@needs_root
def test_reachability_follows_mode_bits():
    base = Path(tempfile.mkdtemp(prefix="imaptap-modes-", dir="/tmp"))  # pytest's tmp_path is 0700
    try:
        check_modes(base)
    finally:
        shutil.rmtree(base)


def check_modes(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    nobody = privileges.lookup("nobody")
    assert privileges._can_enter(str(inner), nobody.pw_uid, {nobody.pw_gid}, 5)
    (tmp_path / "a").chmod(0o750)  # searchable by its group only
    assert not privileges._can_enter(str(inner), nobody.pw_uid, {nobody.pw_gid}, 5)
    os.chown(tmp_path / "a", 0, nobody.pw_gid)
    assert privileges._can_enter(str(inner), nobody.pw_uid, {nobody.pw_gid}, 5)
    inner.chmod(0o711)  # enterable, not listable
    assert not privileges._can_enter(str(inner), nobody.pw_uid, {nobody.pw_gid}, 5)
