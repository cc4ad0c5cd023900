"""The password-fingerprint key: where it lives, made once 0600, refused when others may read it."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imaptap import passwordkey
from imaptap.passwordkey import KEY_BYTES, PasswordKeyError, default_path, load, load_or_create
from testenv import ROOT


def test_where_the_key_lives():
    assert default_path({"STATE_DIRECTORY": "/var/lib/imaptap:/other"}, 0) == Path("/var/lib/imaptap/password-key")
    assert default_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, 1000) == Path("/s/imaptap/password-key")
    assert default_path({"HOME": "/h"}, 0) == Path("/var/lib/imaptap/password-key")
    assert default_path({"HOME": "/h"}, 1000) == Path("/h/.local/state/imaptap/password-key")


def test_made_once_private_and_then_read_back(tmp_path):
    path = tmp_path / "a" / "b" / "password-key"
    key, made = load_or_create(path)
    assert made and len(key) == KEY_BYTES
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert path.read_text() == key.hex() + "\n"
    again, made = load_or_create(path)
    assert again == key and not made
    assert [p.name for p in path.parent.iterdir()] == ["password-key"]  # no temporary file left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_others_may_read_is_refused(tmp_path, mode):
    path = tmp_path / "password-key"
    load_or_create(path)
    path.chmod(mode)
    with pytest.raises(PasswordKeyError, match="chmod 600"):
        load(path)


@pytest.mark.parametrize("content", [b"", b"not hex at all\n", b"00ff\n", "é".encode() * 64])
def test_a_file_that_is_no_key_is_refused(tmp_path, content):
    path = tmp_path / "password-key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(PasswordKeyError, match="not a password key"):
        load(path)


def test_a_symlink_is_not_followed(tmp_path):
    real = tmp_path / "real"
    load_or_create(real)
    link = tmp_path / "password-key"
    link.symlink_to(real)
    with pytest.raises(PasswordKeyError):
        load(link)


def test_a_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PasswordKeyError, match="cannot make the password key"):
        load_or_create(blocker / "sub" / "password-key")


def test_the_command_line_uses_the_key_and_never_prints_it(tmp_path):
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"), XDG_STATE_HOME=str(state))
    env.pop("STATE_DIRECTORY", None)
    capture = os.path.join(ROOT, "pcaps", "failed-login.pcap")

    def fingerprints(*extra):
        p = subprocess.run([sys.executable, "-m", "imaptap", "-r", capture, "--json", "-", "--flows-only", *extra],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        return p.stdout, [a["password_hmac"] for line in p.stdout.splitlines() if '"flow"' in line
                          for a in json.loads(line)["login_attempts"]]

    out, first = fingerprints()
    key = (state / "imaptap" / "password-key").read_text().strip()
    assert key not in out and len(set(first)) == 4  # four passwords, one fingerprint each
    assert fingerprints()[1] == first  # the same key the next time
    other = tmp_path / "other-key"
    passwordkey.load_or_create(other)
    assert set(fingerprints("--password-key", str(other))[1]).isdisjoint(first)
    other.chmod(0o644)
    p = subprocess.run([sys.executable, "-m", "imaptap", "-r", capture, "--password-key", str(other), "--json", "-"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "chmod 600" in p.stderr
