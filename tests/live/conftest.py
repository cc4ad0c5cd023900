"""Live-capture fixtures (helpers in livelab.py).

These tests need root, bcc and kernel headers.  Without them they skip on a workstation and
FAIL when CI=true, so CI can never pass by skipping the kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from imaptap_lab.lab import Lab
from livelab import (
    IN_CI,
    NETNS_PREFIX,
    OTHER_PORT,
    SERVER,
    SERVER_PORT,
    NetLab,
    free_slot,
    live_unavailable,
    reap_leftovers,
    run,
    wait_port,
)


@pytest.fixture(scope="session")
def live_ready() -> None:
    reason = live_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def netlab(live_ready, tmp_path):
    reap_leftovers()
    k = free_slot()
    lab = NetLab(k, f"{NETNS_PREFIX}{os.getpid()}-{k}", f"itl{k}h", f"itl{k}n",
                 f"10.198.{k}.1", f"10.198.{k}.2", f"fd00:198:{k}::1", f"fd00:198:{k}::2")
    try:
        run("ip", "netns", "add", lab.netns)
        run("ip", "link", "add", lab.host_if, "type", "veth", "peer", "name", lab.ns_if, "netns", lab.netns)
        run("ip", "addr", "add", f"{lab.client4}/30", "dev", lab.host_if)
        run("ip", "addr", "add", f"{lab.client6}/64", "dev", lab.host_if, "nodad")
        run("ip", "link", "set", lab.host_if, "up")
        ns = ("ip", "-n", lab.netns)
        run(*ns, "addr", "add", f"{lab.server4}/30", "dev", lab.ns_if)
        run(*ns, "addr", "add", f"{lab.server6}/64", "dev", lab.ns_if, "nodad")
        run(*ns, "link", "set", lab.ns_if, "up")
        run(*ns, "link", "set", "lo", "up")
        script = tmp_path / "tiny_imap_server.py"
        script.write_text(SERVER)
        proc = subprocess.Popen(["ip", "netns", "exec", lab.netns, sys.executable, str(script), "serve",
                                 str(SERVER_PORT), str(OTHER_PORT)], stdout=subprocess.PIPE, text=True)
        lab.procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        wait_port(lab.server4, SERVER_PORT)
        wait_port(lab.server4, OTHER_PORT)
        yield lab
    finally:
        for proc in lab.procs:
            proc.kill()
            proc.wait()
        run("ip", "netns", "del", lab.netns, check=False)
        run("ip", "link", "del", lab.host_if, check=False)


@pytest.fixture
def lab(live_ready):
    """A real Dovecot in its own namespace (imaptap_lab.lab, scripts/imaplab.py), torn down afterwards."""
    for tool in ("dovecot", "doveadm", "tcpdump", "openssl"):
        if shutil.which(tool) is None:
            if IN_CI:
                pytest.fail(f"CI=true and {tool} is missing (scripts/setup installs it)", pytrace=False)
            pytest.skip(f"needs {tool}")
    with Lab() as lab:
        yield lab
