"""The kernel program through the real verifier of older kernels (scripts/verifier-check,
imaptap_lab.verifier_check).

test_kernel_compat.py checks what each variant asks of its oldest kernel by reading the
bytecode; here the verifiers of Debian 11's 5.10 and Debian 12's 6.1 decide, in qemu: every
variant is loaded on both, and each must pass where capture/live.py would build it.  The XDP
variant on 5.10 (bpf_xdp_load_bytes is 5.18) must be refused: it shows a refusal is seen.

Needs root, bcc, gcc, qemu-system-x86_64 (scripts/setup installs it) and, once, the Debian
mirror of this machine's apt sources for the two kernel images (cached in
/var/cache/imaptap/kernels).  Skips without them on a workstation, fails with CI=true.  About
20 s (two TCG boots side by side) once cached.  The end of the run says which accelerator
booted each kernel; a KVM boot that fails in any way falls back to TCG (tests/lab/
test_verifier_check.py checks every way with a fake qemu; here a real qemu that aborts under
KVM is given a real kernel).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from imaptap_lab import verifier_check as vc
from livelab import IN_CI
from testenv import SUMMARY


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def verdicts(live_ready) -> dict:
    for tool in ("qemu-system-x86_64", "gcc", "dpkg-deb"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is missing (scripts/setup installs it)")
    try:
        images = {k: vc.kernel_image(k) for k in vc.KERNELS}
    except (OSError, vc.CheckError) as exc:
        _unavailable(f"the Debian kernel images could not be fetched: {exc}")
    assert all(p.exists() for p in images.values())
    try:
        out = vc.run(list(vc.KERNELS), list(vc.VARIANTS))
    except vc.CheckError as exc:
        pytest.fail(str(exc), pytrace=False)
    print(vc.table(out["results"]))
    print(out["timings"])
    SUMMARY.append(f"old kernels: {vc.accelerators(out['boots'])}")
    return {(r["kernel"], r["variant"], r["program"]): r for r in out["results"]}


def _explain(r: dict) -> str:
    return "\n".join([f"{r['kernel']} ({r['release']}) {r['variant']} {r['program']}: {r['status']} {r['detail']}",
                      *r["failed_maps"], *r["log"][-30:]])


@pytest.mark.parametrize(("kernel", "variant", "program"), [
    ("5.10", "ringbuf+tc", "imaptap_tc_in"), ("5.10", "ringbuf+tc", "imaptap_tc_eg"),
    ("5.10", "perf+tc", "imaptap_tc_in"), ("5.10", "perf+tc", "imaptap_tc_eg"),
    ("6.1", "ringbuf+xdp", "imaptap_xdp"), ("6.1", "ringbuf+xdp", "imaptap_tc_eg"),
    ("5.10", "ringbuf+tc+2workers", "imaptap_tc_in"), ("5.10", "ringbuf+tc+2workers", "imaptap_tc_eg"),
])
def test_the_old_verifier_accepts(verdicts, kernel, variant, program):
    r = verdicts[(kernel, variant, program)]
    assert r["release"].startswith(kernel + ".")
    assert r["status"] == "LOADED", _explain(r)
    assert r["type"] == ("XDP" if program == "imaptap_xdp" else "SCHED_CLS")


def test_every_variant_loads_where_live_py_builds_it(verdicts):
    expected = [r for r in verdicts.values() if r["expected"]]
    assert len(expected) == 14  # 5.10: ringbuf+tc, perf+tc, ringbuf+tc+2workers; 6.1: all four
    bad = [_explain(r) for r in expected if r["status"] != "LOADED"]
    assert not bad, "\n\n".join(bad)


def test_a_refusal_is_seen(verdicts):
    # bpf_xdp_get_buff_len and bpf_xdp_load_bytes arrived in 5.18: the 5.10 verifier must
    # refuse the XDP program ("invalid func unknown#188": 5.10 has no name for the helper).
    r = verdicts[("5.10", "ringbuf+xdp", "imaptap_xdp")]
    assert not r["expected"]
    assert r["status"] == "REJECTED", _explain(r)
    assert any(re.search(r"(invalid|unknown) func", line) for line in r["log"]), _explain(r)


def test_a_kvm_boot_that_aborts_falls_back_to_tcg(verdicts, tmp_path, monkeypatch):
    """The real qemu and a real kernel, with a qemu in front that aborts under KVM as nested KVM
    does here ("failed to set MSR", then an assertion): the kernel is still checked, under TCG."""
    real = shutil.which("qemu-system-x86_64")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "qemu-system-x86_64"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" -enable-kvm "*) echo 'error: failed to set MSR 0x10a to 0x69' >&2; kill -ABRT $$ ;; esac
exec {real} "$@"
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(vc, "kvm_usable", lambda: True)
    out = vc.run(["5.10"], ["perf+tc"])
    boot = out["boots"]["5.10"]
    assert boot["accel"] == "tcg"
    assert "qemu exited -6 (kvm): error: failed to set MSR" in boot["kvm_failed"]
    got = {r["program"]: r["status"] for r in out["results"]}
    assert got == {"imaptap_tc_in": "LOADED", "imaptap_tc_eg": "LOADED"}
    SUMMARY.append(f"old kernels, KVM made to abort: {vc.accelerators(out['boots'])}")
