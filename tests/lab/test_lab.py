"""imaptap_lab.lab without root: names, addresses, state files and the Dovecot configuration.
The lab itself (namespaces, Dovecot) runs in tests/live."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys

import pytest

from imaptap_lab import cyrus, lab


def test_names_fit_the_kernel_and_are_found_again():
    for slot in (lab.SLOT_MIN, lab.SLOT_MAX):
        for name in (lab._host_if(slot), lab._ns_if(slot)):
            assert len(name) < 16  # IFNAMSIZ, NUL included
            assert int(lab.VETH_NAME_RE.match(name).group(1)) == slot
    assert lab.VETH_NAME_RE.match("itap12x") is None
    assert lab.VETH_NAME_RE.match("eth0") is None


def test_the_addresses_of_a_slot_are_one_private_link():
    slot = 77
    v4 = [ipaddress.ip_address(lab.IPV4_TEMPLATE.format(slot=slot, host=h)) for h in (lab.HOST_SIDE, lab.NS_SIDE)]
    net4 = ipaddress.ip_network(f"{v4[0]}/{lab.IPV4_PREFIXLEN}", strict=False)
    assert v4[1] in net4 and net4.is_private and net4.num_addresses == 4
    v6 = [ipaddress.ip_address(lab.IPV6_TEMPLATE.format(slot=slot, host=h))
          for h in (lab.HOST_SIDE, lab.NS_SIDE, lab.STRICT_SIDE)]
    net6 = ipaddress.ip_network(f"{v6[0]}/{lab.IPV6_PREFIXLEN}", strict=False)
    assert v6[1] in net6 and v6[2] in net6 and net6.is_private  # fd00::/8, unique local; no route needed


def test_a_lab_object_before_start_says_so():
    fresh = lab.Lab()
    assert fresh.netns.startswith(f"{lab.NETNS_PREFIX}{os.getpid()}-")
    assert fresh.users == lab.DEFAULT_USERS and fresh.users is not lab.DEFAULT_USERS
    assert fresh.ports == (143, 10143)
    with pytest.raises(lab.LabError, match="not started"):
        fresh.server4  # noqa: B018 - the property is what is tested


def test_state_files_round_trip_and_bad_ones_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(lab, "STATE_DIR", tmp_path)
    me = lab.LabState(name="imaptap-lab-1-abc", slot=9, owner_pid=os.getpid(),
                      owner_start=lab._proc_start_time(os.getpid()), users={"alice": "pw"}, offloads=False)
    me.save()
    assert oct((tmp_path / "imaptap-lab-1-abc.json").stat().st_mode & 0o777) == "0o600"
    assert lab.LabState.load(me.path) == me
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"name": "x"}')  # missing fields
    assert lab._all_states() == [me]
    assert me.owner_alive()


def test_an_owner_is_dead_once_its_pid_is_reused_or_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = lab._proc_start_time(child.pid)
    child.wait()
    assert not lab._pid_alive(child.pid, start)
    assert lab._pid_alive(os.getpid(), lab._proc_start_time(os.getpid()))
    assert not lab._pid_alive(os.getpid(), lab._proc_start_time(os.getpid()) + 1), "another process, same pid"
    assert not lab._pid_alive(0)


def test_the_dovecot_configuration_is_complete():
    conf = lab.DOVECOT_CONF_TEMPLATE.format(tmp="/tmp/imaptap-lab-x", login_user=lab.LOGIN_USER,
                                            internal_user=lab.INTERNAL_USER, port=lab.IMAP_PORT,
                                            alt_port=lab.ALT_IMAP_PORT, strict="fd00:199:77::3")
    # braces left are Dovecot's own blocks, one opening per line and balanced
    assert all(line.rstrip().endswith("{") for line in conf.splitlines() if "{" in line)
    assert conf.count("{") == conf.count("}") > 0
    assert "port = 143\n" in conf and "port = 10143\n" in conf
    assert "disable_plaintext_auth = no" in conf
    # the strict address: plaintext logins disabled there only
    assert "local fd00:199:77::3 {\n  disable_plaintext_auth = yes\n}" in conf
    assert "log_path = /tmp/imaptap-lab-x/dovecot.log" in conf
    assert "/etc/dovecot" not in conf


def test_lab_passwords_are_recognisable_and_need_quoting_once():
    assert len(set(lab.DEFAULT_USERS.values())) == len(lab.DEFAULT_USERS)
    assert any(" " in pw and '"' in pw for pw in lab.DEFAULT_USERS.values())
    assert not any(c in pw for pw in lab.DEFAULT_USERS.values() for c in ":\r\n\0"), "a passwd-file takes none"


def test_a_state_file_with_keys_of_a_newer_checkout_still_loads(tmp_path, monkeypatch):
    """Labs of every checkout on a machine reap each other's leftovers: one that cannot read a
    state file takes the lab for a leftover and deletes its veth."""
    monkeypatch.setattr(lab, "STATE_DIR", tmp_path)
    me = lab.LabState(name="imaptap-lab-1-abc", slot=9, owner_pid=os.getpid(),
                      owner_start=lab._proc_start_time(os.getpid()), users={})
    me.save()
    fields = json.loads(me.path.read_text())
    assert set(fields) == {"name", "slot", "owner_pid", "owner_start", "tmpdir", "dovecot_pid", "dovecot_start",
                           "users", "offloads", "detached"}, "the keys every checkout reads"
    me.path.write_text(json.dumps({**fields, "added_later": 1}))
    assert lab.LabState.load(me.path) == me


def test_the_server_is_dovecot_or_cyrus():
    assert lab.Lab().server is lab.Server.DOVECOT
    assert lab.Lab(server="cyrus").server is lab.Server.CYRUS
    with pytest.raises(lab.LabError, match="unknown server 'uw'"):
        lab.Lab(server="uw")


def test_the_cyrus_configuration_reads_nothing_of_the_system():
    conf = cyrus.IMAPD_CONF_TEMPLATE.format(tmp="/tmp/imaptap-lab-x", servername=cyrus.SERVER_NAME,
                                            user=cyrus.MAIL_USER, group=cyrus.MAIL_GROUP, idle_poll=1)
    settings = dict(line.split(": ", 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["allowplaintext"] == "yes" and settings["failedloginpause"] == "0"
    paths = [v for k, v in settings.items() if v.startswith("/")]
    assert paths and all(p.startswith("/tmp/imaptap-lab-x/") for p in paths)
    services = cyrus.CYRUS_CONF_TEMPLATE.format(bin="/tree/usr/lib/cyrus/bin", conf="/tmp/imaptap-lab-x/imapd.conf",
                                                port=143, alt_port=10143)
    commands = re.findall(r'cmd="([^"]+)"', services)
    assert len(commands) == 3 and all(c.startswith("/tree/") and "-C /tmp/imaptap-lab-x/imapd.conf" in c
                                      for c in commands), "the master passes no -C of its own"
    assert 'listen="143"' in services and 'listen="10143"' in services


def test_missing_cyrus_debs_name_scripts_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(cyrus, "DEB_DIR", tmp_path)
    (tmp_path / "cyrus-common_3.6.1-4+deb12u5_amd64.deb").write_bytes(b"")
    with pytest.raises(cyrus.CyrusError, match=r"\(cyrus-imapd, sasl2-bin\) are not in .*; run scripts/setup"):
        cyrus.tree()


def test_the_delivery_client_gets_the_job_and_the_message_apart():
    data = cyrus.append_input("bob", 'Bob Pw "quoted" 42', b"Subject: x\r\n\r\n{5}\r\nbody\r\n", "INBOX", 143)
    job, message = data.split(b"\n", 1)
    assert json.loads(job)["password"] == 'Bob Pw "quoted" 42' and message.startswith(b"Subject: x\r\n")
    assert cyrus.append_command("ns")[:4] == ["ip", "netns", "exec", "ns"]
