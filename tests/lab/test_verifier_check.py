"""imaptap_lab.verifier_check (scripts/verifier-check) without root or a kernel: the Debian mirror
taken from apt's sources, the fall-back from KVM to TCG for every way a KVM boot can fail (a fake
qemu on PATH), the initramfs and spec the loader reads, and the parsing of what it prints.

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


# --- the initramfs and the loader's spec --------------------------------------------------------

def read_newc(archive: bytes) -> list[dict]:
    """The entries of a newc archive, read by the format's definition (the kernel's
    Documentation/driver-api/early-userspace/buffer-format.rst), not by the writer's code."""
    fields = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
              "rdevmajor", "rdevminor", "namesize", "check")
    entries, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701", f"no newc magic at {pos}"
        head = {k: int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, k in enumerate(fields)}
        pos += 110
        name = archive[pos:pos + head["namesize"]]
        assert name.endswith(b"\0")
        head["name"] = name[:-1].decode()
        pos += head["namesize"]
        pos += -pos % 4
        head["data"] = archive[pos:pos + head["filesize"]]
        pos += head["filesize"]
        pos += -pos % 4
        entries.append(head)
        if head["name"] == "TRAILER!!!":
            assert pos == len(archive), "bytes after the trailer"
            return entries


def test_cpio_newc_entries_read_back_by_the_format():
    archive = vc.cpio_newc([("dev", 0o40755, b"", (0, 0)), ("dev/console", 0o20600, b"", (5, 1)),
                            ("init", 0o100755, b"\x7fELF binary", (0, 0)), ("spec", 0o100644, b"abc", (0, 0))])
    entries = read_newc(archive)
    assert [e["name"] for e in entries] == ["dev", "dev/console", "init", "spec", "TRAILER!!!"]
    by_name = {e["name"]: e for e in entries}
    assert by_name["init"]["data"] == b"\x7fELF binary"
    assert by_name["init"]["mode"] == 0o100755
    assert by_name["spec"]["data"] == b"abc"
    # /dev/console is the character device 5,1 the kernel opens for init's stdout
    assert (by_name["dev/console"]["mode"], by_name["dev/console"]["rdevmajor"],
            by_name["dev/console"]["rdevminor"]) == (0o20600, 5, 1)
    assert by_name["dev"]["mode"] == 0o40755
    assert len({e["ino"] for e in entries[:-1]}) == 4, "every entry has its own inode number"
    assert all(e["nlink"] == 1 for e in entries[:-1])


def test_cpio_newc_pads_names_and_data_to_four_bytes():
    # 110-byte header + "ab\0" = 113: three bytes of padding before the data, and data of 5 bytes
    # padded to 8 before the trailer's header.
    archive = vc.cpio_newc([("ab", 0o100644, b"12345", (0, 0))])
    assert archive[110:116] == b"ab\0\0\0\0"
    assert archive[116:124] == b"12345\0\0\0"
    assert archive[124:130] == b"070701"


def parse_spec(spec: bytes) -> list[dict]:
    """The spec as verifier_loader.c reads it (its header comment): little-endian u32s,
    char label[32], map name[16], prog name[32], then insn_cnt instructions of 8 bytes."""
    import struct

    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, spec, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    units = []
    (nunits,) = take("I")
    for _ in range(nunits):
        label, nmaps = take("32sI")
        maps = [take("16s5I") for _ in range(nmaps)]
        (nprogs,) = take("I")
        progs = []
        for _ in range(nprogs):
            name, ptype, cnt = take("32sII")
            progs.append((name.rstrip(b"\0").decode(), ptype, spec[pos:pos + 8 * cnt]))
            pos += 8 * cnt
        units.append({"label": label.rstrip(b"\0").decode(),
                      "maps": [(m[0].rstrip(b"\0").decode(), *m[1:]) for m in maps], "progs": progs})
    assert pos == len(spec), "trailing bytes after the last unit"
    return units


def test_write_spec_is_what_the_loader_reads():
    code_a = bytes(range(16))          # two instructions
    code_b = b"\x95" + b"\0" * 7       # exit
    units = [("ringbuf+tc", [("events", 27, 0, 0, 1 << 22, 0), ("policy", 1, 40, 1, 4096, 1)],
              [("imaptap_tc_in", vc.BPF_PROG_TYPE_SCHED_CLS, code_a)]),
             ("perf+tc", [], [("imaptap_tc_eg", vc.BPF_PROG_TYPE_SCHED_CLS, code_b),
                              ("imaptap_xdp", vc.BPF_PROG_TYPE_XDP, code_a)])]
    got = parse_spec(vc.write_spec(units))
    assert [u["label"] for u in got] == ["ringbuf+tc", "perf+tc"]
    assert got[0]["maps"] == [("events", 27, 0, 0, 1 << 22, 0), ("policy", 1, 40, 1, 4096, 1)]
    assert got[0]["progs"] == [("imaptap_tc_in", 3, code_a)]
    assert got[1]["maps"] == []
    assert got[1]["progs"] == [("imaptap_tc_eg", 3, code_b), ("imaptap_xdp", 6, code_a)]


def test_write_spec_keeps_a_map_name_nul_terminated():
    # The kernel takes at most 15 characters of a map name; the 16th byte stays NUL.
    spec = vc.write_spec([("v", [("a_very_long_map_name_indeed", 1, 4, 4, 1, 0)], [])])
    raw = spec[4 + 36:4 + 36 + 16]
    assert raw == b"a_very_long_map\0"


# --- the loader's output ----------------------------------------------------------------------

SERIAL = """\
[    0.812345] Run /init as init process
IMAPTAP-VC KERNEL 5.10.0-32-amd64 #1 SMP Debian 5.10.223-1
IMAPTAP-VC MAP ringbuf+tc events ok fd=3
IMAPTAP-VC MAP ringbuf+xdp events FAILED errno=22
IMAPTAP-VC PROG ringbuf+tc imaptap_tc_in LOADED insns=2891 processed 497129 insns
[    0.9] random: crng init done
IMAPTAP-VC PROG ringbuf+xdp imaptap_xdp REJECTED errno=22 (Invalid argument) insns=1405
IMAPTAP-VC LOG ringbuf+xdp imaptap_xdp | 0: R1=ctx(id=0,off=0,imm=0) R10=fp0
IMAPTAP-VC LOG ringbuf+xdp imaptap_xdp | invalid func unknown#188
IMAPTAP-VC LOG perf+tc imaptap_tc_eg | a log line before its PROG line
IMAPTAP-VC ERROR something odd
IMAPTAP-VC DONE 0
"""


def test_parse_reads_every_kind_of_loader_line():
    got = vc.parse(SERIAL)
    assert got["kernel"] == "5.10.0-32-amd64"
    assert got["done"] is True
    assert got["errors"] == ["something odd"]
    assert got["maps"][("ringbuf+tc", "events")] == {"status": "ok", "detail": "fd=3"}
    assert got["maps"][("ringbuf+xdp", "events")]["status"] == "FAILED"
    loaded = got["progs"][("ringbuf+tc", "imaptap_tc_in")]
    assert (loaded["status"], loaded["detail"]) == ("LOADED", "insns=2891 processed 497129 insns")
    rejected = got["progs"][("ringbuf+xdp", "imaptap_xdp")]
    assert rejected["status"] == "REJECTED"
    assert rejected["log"] == ["0: R1=ctx(id=0,off=0,imm=0) R10=fp0", "invalid func unknown#188"]
    # a LOG line of a program not reported (yet) is kept, with an unknown status
    assert got["progs"][("perf+tc", "imaptap_tc_eg")] == {"status": "?", "detail": "",
                                                        "log": ["a log line before its PROG line"]}


def test_parse_without_done_is_not_done():
    got = vc.parse("IMAPTAP-VC KERNEL 6.1.0-50-amd64 #1\nKernel panic - not syncing\n")
    assert got["kernel"] == "6.1.0-50-amd64"
    assert got["done"] is False


def test_table_aligns_columns_and_leaves_the_detail_unpadded():
    rows = [{"kernel": "5.10", "release": "5.10.0-32-amd64", "variant": "perf+tc", "program": "imaptap_tc_in",
             "type": "SCHED_CLS", "status": "LOADED", "detail": "insns=1457", "expected": True},
            {"kernel": "6.1", "release": "6.1.0-50-amd64", "variant": "ringbuf+xdp", "program": "imaptap_xdp",
             "type": "XDP", "status": "REJECTED", "detail": "errno=22", "expected": False}]
    lines = vc.table(rows).splitlines()
    assert len(lines) == 3
    assert lines[1].split() == ["5.10", "(5.10.0-32-amd64)", "perf+tc", "imaptap_tc_in", "SCHED_CLS", "loaded", "yes",
                                "insns=1457"]
    assert lines[2].split()[5:7] == ["rejected", "no"]
    # every column starts at the same place on every line
    starts = [line.index(word) for line, word in zip(lines, ("variant", "perf+tc", "ringbuf+xdp"), strict=True)]
    assert len(set(starts)) == 1
    assert not lines[2].endswith(" ")


# --- the kernel cache ---------------------------------------------------------------------------

def test_the_newest_cached_build_of_a_kernel_is_used_without_the_network(tmp_path, monkeypatch):
    for name in ("vmlinuz-5.10.0-30-amd64", "vmlinuz-5.10.0-32-amd64", "vmlinuz-5.10.0-9-amd64",
                 "vmlinuz-6.1.0-50-amd64", "vmlinuz-5.10.0-33-amd64.part"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(vc, "CACHE", tmp_path)
    monkeypatch.setattr(vc, "debian_mirror", lambda *a: pytest.fail("looked for a mirror"))
    assert vc.kernel_image("5.10").name == "vmlinuz-5.10.0-32-amd64"
    assert vc.kernel_image("6.1").name == "vmlinuz-6.1.0-50-amd64"
    assert vc.kernel_release(vc.kernel_image("5.10")) == "5.10.0-32-amd64"


def test_the_kernels_fall_on_both_sides_of_the_xdp_variant():
    # "expected" compares these: 5.10 must show a refusal (XDP), 6.1 must load every variant
    assert vc.VARIANTS["perf+tc"][2] < vc.VARIANTS["ringbuf+tc"][2] <= vc.KERNELS["5.10"][2]
    assert vc.KERNELS["5.10"][2] < vc.VARIANTS["ringbuf+xdp"][2] <= vc.KERNELS["6.1"][2]
    assert {suite for suite, _, _ in vc.KERNELS.values()} == {"bullseye", "bookworm"}


def test_the_loader_source_ships_beside_the_module():
    assert vc.LOADER_SOURCE.is_file()
    assert b'#define P "IMAPTAP-VC "' in vc.LOADER_SOURCE.read_bytes()
    assert vc.PREFIX == "IMAPTAP-VC "
