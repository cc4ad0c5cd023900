"""imaptap_lab.verifier_check (scripts/verifier-check) without root or a kernel: the Debian mirror taken from apt's sources,
and the fall-back from KVM to TCG for every way a KVM boot can fail (a fake qemu on PATH).

The real boots are in tests/live/test_old_kernels.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from imaptap_lab import verifier_check as vc

from testenv import ROOT

LOADER_DONE = "IMAPTAP-VC KERNEL 5.10.0-99-amd64 #1\\nIMAPTAP-VC DONE\\n"


# --- the mirror --------------------------------------------------------------------------------

def test_mirror_from_a_deb822_sources_file(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    (d / "other.list.disabled").write_text("deb http://not.this/one bookworm main\n")
    assert vc.debian_mirror((tmp_path / "sources.list", d)) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_list_skips_other_repositories(tmp_path):
    lst = tmp_path / "sources.list"
    lst.write_text("# deb http://commented.out/debian bookworm main\n"
                   "deb [arch=amd64 signed-by=/k.gpg] https://vendor.example/apt stable-vendor main\n"
                   "deb-src http://src.example/debian bookworm main\n"
                   "deb http://local.example/debian/ bookworm main contrib\n")
    assert vc.debian_mirror((lst,)) == "http://local.example/debian"


def test_mirror_disabled_stanza_and_no_debian_source(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.sources").write_text("Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
                                 "Components: main\nEnabled: no\n")
    with pytest.raises(vc.CheckError, match="no Debian mirror"):
        vc.debian_mirror((d,))


def test_the_repository_names_no_mirror_host():
    """The machine's sources name the mirror; no file of this repository may."""
    import subprocess

    if not os.path.exists(os.path.join(ROOT, ".git")):  # a directory, or a file in a worktree
        pytest.skip("not a git checkout")
    hosts = {uri.split("/")[2] for uri, _, _ in vc._apt_entries()}
    for host in sorted(hosts):
        found = subprocess.run(["git", "grep", "-nI", "-F", host, "--", "."], cwd=ROOT, capture_output=True,
                               text=True)
        assert found.stdout == "", f"{host} is written in the repository:\n{found.stdout}"


# --- KVM to TCG ------------------------------------------------------------------------------

def fake_qemu(tmp_path: Path, under_kvm: str) -> Path:
    """A qemu-system-x86_64 on PATH: ``under_kvm`` is the shell run when -enable-kvm is given;
    under TCG it prints what the loader prints when it is done."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    q = bindir / "qemu-system-x86_64"
    q.write_text(f"""#!/bin/sh
case " $* " in
  *" -enable-kvm "*) {under_kvm} ;;
esac
printf '{LOADER_DONE}'
exit 0
""")
    q.chmod(q.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir


@pytest.fixture
def kvm(monkeypatch):
    """/dev/kvm opens, as far as verifier-check can tell; and a hang is noticed within a second."""
    monkeypatch.setattr(vc, "kvm_usable", lambda: True)
    monkeypatch.setattr(vc, "KVM_SILENT", 1)


@pytest.mark.parametrize(("under_kvm", "why"), [
    ("kill -ABRT $$", "qemu exited -6 (kvm)"),  # what nested KVM does here: an assertion fails
    ("echo 'failed to set MSR 0x10a' >&2; exit 1", "qemu exited 1 (kvm): failed to set MSR 0x10a"),
    ("exec sleep 30", "printed nothing of the loader's"),  # a hang in early boot
    ("echo booting; exit 0", "the loader did not finish under KVM"),  # no loader output
    ("printf 'IMAPTAP-VC KERNEL 5.10\\n'; exec sleep 30", "did not power off"),  # hangs after starting
], ids=["abort", "error-exit", "hang", "no-output", "hang-later"])
def test_a_failed_kvm_boot_falls_back_to_tcg(tmp_path, monkeypatch, kvm, under_kvm, why):
    monkeypatch.setenv("PATH", f"{fake_qemu(tmp_path, under_kvm)}:{os.environ['PATH']}")
    serial, secs, used, reason = vc.boot(tmp_path / "vmlinuz-5.10.0-99-amd64", tmp_path / "initrd", timeout=2)
    assert used == "tcg"
    assert why in reason
    assert vc.parse(serial)["done"]


def test_a_working_kvm_boot_stays_on_kvm(tmp_path, monkeypatch, kvm):
    monkeypatch.setenv("PATH", f"{fake_qemu(tmp_path, 'true')}:{os.environ['PATH']}")
    serial, secs, used, reason = vc.boot(tmp_path / "vmlinuz", tmp_path / "initrd", timeout=5)
    assert (used, reason) == ("kvm", None)


def test_without_dev_kvm_tcg_is_used_and_said(tmp_path, monkeypatch):
    monkeypatch.setattr(vc, "kvm_usable", lambda: False)
    monkeypatch.setenv("PATH", f"{fake_qemu(tmp_path, 'kill -ABRT $$')}:{os.environ['PATH']}")
    serial, secs, used, reason = vc.boot(tmp_path / "vmlinuz", tmp_path / "initrd", timeout=5)
    assert (used, reason) == ("tcg", "/dev/kvm cannot be opened")
    assert vc.accelerators({"5.10": {"accel": used, "kvm_failed": reason, "seconds": secs}}) == \
        "booted: 5.10 under TCG (KVM: /dev/kvm cannot be opened)"


def test_tcg_failing_too_is_an_error_not_a_loop(tmp_path, monkeypatch, kvm):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    q = bindir / "qemu-system-x86_64"
    q.write_text("#!/bin/sh\nexit 3\n")
    q.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(vc.CheckError, match=r"qemu exited 3 \(tcg\)"):
        vc.boot(tmp_path / "vmlinuz", tmp_path / "initrd", timeout=5)
