"""The kernel program through the verifier of older kernels: Debian's 5.10 and 6.1, booted in qemu.

Usage (as root):  scripts/verifier-check [--kernel 5.10|6.1 ...] [--variant NAME ...] [--json FILE]
                                         [--refresh] [--timeout S]

This machine runs one kernel, so every other test meets one verifier.  Here each variant of
bpf/imaptap.bpf.c that capture/live.py may build is compiled by bcc on this machine, exactly as
live.py compiles it, and its bytecode and maps are handed to a small static loader
(imaptap_lab/verifier_loader.c) that runs as /init of an initramfs under a Debian kernel in qemu:
it creates the maps, loads each program with BPF_PROG_LOAD and prints what the kernel said
(the verifier's log on a rejection), then powers the machine off.

Kernels: the newest linux-image-5.10.0-*-amd64-unsigned of Debian 11 (bullseye) and
linux-image-6.1.0-*-amd64-unsigned of Debian 12 (bookworm), fetched once from the Debian mirror
this machine's apt sources name (/etc/apt/sources.list and sources.list.d, or --mirror URL) and
kept (only the vmlinuz) in /var/cache/imaptap/kernels; later runs need no network (--refresh
looks for a newer build).  qemu uses KVM where /dev/kvm opens, and TCG whenever a KVM boot fails
in any way (an abort or error exit, a hang, no output from the loader): nested virtual machines
often cannot run KVM guests.

Variants (cflags of live.py's _load): ringbuf+xdp (5.18+: XDP ingress, TC egress),
ringbuf+tc (5.8+: TC both ways), perf+tc (5.3+: TC, perf buffer).  Every variant is tried on
every kernel: a variant rejected on a kernel older than its own minimum (XDP on 5.10 and 6.1)
shows that a rejection is seen.  Prints a table kernel x variant x program; --json writes the
results.  Exit status 0 when each variant loaded on every kernel live.py would build it for,
1 otherwise, 2 when the check itself could not run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("IMAPTAP_KERNEL_CACHE", "/var/cache/imaptap/kernels"))
#: Where apt keeps the machine's package sources: the mirror comes from there.
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
#: name -> (Debian suite, package pattern, (major, minor))
KERNELS = {
    "5.10": ("bullseye", r"linux-image-5\.10\.0-(\d+)-amd64-unsigned", (5, 10)),
    "6.1": ("bookworm", r"linux-image-6\.1\.0-(\d+)-amd64-unsigned", (6, 1)),
}
#: name -> (ring buffer, XDP, the oldest kernel live.py builds it for)
VARIANTS = {
    "ringbuf+xdp": (True, True, (5, 18)),
    "ringbuf+tc": (True, False, (5, 8)),
    "perf+tc": (False, False, (5, 3)),
    "ringbuf+tc+2workers": (True, False, (5, 8)),
}
#: Variants built for live --workers (one ring buffer per worker); the others for one process.
VARIANT_WORKERS = {"ringbuf+tc+2workers": 2}
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
PREFIX = "IMAPTAP-VC "
#: Seconds one boot may take, to the loader's DONE: TCG needs about 15 s a kernel; a loaded
#: 2-core machine booting two at once, several times that.
BOOT_TIMEOUT = 180
#: Seconds a download from the mirror may stall; the kernel package is about 60 MB.
DOWNLOAD_TIMEOUT = 120
DOWNLOAD_CHUNK = 1 << 20
#: Characters of serial output (or qemu's stderr) an error message carries: the end is what tells.
SERIAL_TAIL = 3000
QEMU_ERROR_TAIL = 2000


class CheckError(Exception):
    """The check could not run (no root, no qemu, no kernel image ...): exit status 2."""


def log(msg: str) -> None:
    """One line of progress on stderr."""
    print(f"verifier-check: {msg}", file=sys.stderr, flush=True)


# --- kernels -----------------------------------------------------------------------------

def _apt_entries(sources: tuple[Path, ...] = APT_SOURCES) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of every binary package source apt is configured with, in
    apt's order: one-line ``deb URI SUITE COMPONENT...`` files and deb822 ``.sources`` files."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
        elif src.is_file():
            files.append(src)
    entries = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()  # drop [options]
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]], words[3:]))
    return entries


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The Debian archive this machine's apt uses: the first source that carries a Debian
    release's main component (not its security or updates suites)."""
    debian_suites = {suite for suite, _, _ in KERNELS.values()} | {"trixie", "forky", "stable", "oldstable"}
    for uri, suites, components in _apt_entries(sources):
        if "main" in components and any(s in debian_suites for s in suites):
            return uri.rstrip("/")
    raise CheckError("no Debian mirror in this machine's apt sources (/etc/apt/sources.list*); give --mirror URL")


def _fetch(url: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f, DOWNLOAD_CHUNK)
    tmp.rename(dest)


def _cached_kernel(name: str) -> Path | None:
    pattern = re.compile(rf"vmlinuz-{re.escape(name)}\.\d+-(\d+)-amd64$")
    found = [(int(m.group(1)), p) for p in CACHE.glob("vmlinuz-*") if (m := pattern.search(p.name))]
    return max(found)[1] if found else None


def kernel_image(name: str, refresh: bool = False, mirror: str | None = None) -> Path:
    """The vmlinuz of the newest Debian build of kernel NAME, downloaded once (from ``mirror``,
    by default the machine's own, `debian_mirror`)."""
    cached = _cached_kernel(name)
    if cached is not None and not refresh:
        return cached
    mirror = mirror or debian_mirror()
    suite, pkg_re, _ = KERNELS[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    index = CACHE / f"Packages-{suite}.xz"
    _fetch(f"{mirror}/dists/{suite}/main/binary-amd64/Packages.xz", index)
    best = None
    for stanza in lzma.decompress(index.read_bytes()).decode("utf-8", "replace").split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.MULTILINE))
        m = re.fullmatch(pkg_re, fields.get("Package", ""))
        if m and "Filename" in fields and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), fields["Filename"])
    if best is None:
        if cached is not None:
            return cached
        raise CheckError(f"no {pkg_re} in {suite}'s Packages")
    deb = CACHE / Path(best[1]).name
    log(f"downloading {best[1]}")
    _fetch(f"{mirror}/{best[1]}", deb)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        images = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not images:
            raise CheckError(f"{deb.name} holds no /boot/vmlinuz-*")
        dest = CACHE / images[-1].name
        shutil.move(str(images[-1]), dest)
    deb.unlink()
    index.unlink()
    log(f"{dest} ready in {time.monotonic() - t0:.1f} s")
    return dest


def kernel_release(image: Path) -> str:
    """The release a cached vmlinuz is of: ``5.10.0-35-amd64`` for ``vmlinuz-5.10.0-35-amd64``."""
    return image.name.removeprefix("vmlinuz-")


# --- the programs --------------------------------------------------------------------------

def compile_variant(ringbuf: bool, xdp: bool, workers: int = 1) -> tuple[list[tuple], list[tuple]]:
    """bcc builds the variant as live.py does; returns (maps, programs) for the loader's spec.

    maps: (name, type, key_size, value_size, max_entries, flags) in bcc's table order;
    programs: (name, prog_type, bytecode) with map references rewritten to map indexes.
    """
    import ctypes as ct

    import bcc
    from bcc import lib
    from imaptap.capture import live
    from imaptap.segment import DEFAULT_HANDSHAKE_SNAPLEN, DEFAULT_SNAPLEN, DEFAULT_TAILLEN

    for fn, restype in (("bpf_table_name", ct.c_char_p), ("bpf_table_fd_id", ct.c_int),
                        ("bpf_table_key_size_id", ct.c_size_t), ("bpf_table_leaf_size_id", ct.c_size_t)):
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = [ct.c_void_p, ct.c_ulonglong]
    src = live.bpf_source_dir()
    # the default build: the snap, tail and handshake lengths imaptap uses unless told otherwise
    cflags = live.program_cflags(src, ringbuf=ringbuf, xdp=xdp, ring_pages=live.RING_PAGES, snaplen=DEFAULT_SNAPLEN,
                                 taillen=DEFAULT_TAILLEN, handshake_snaplen=DEFAULT_HANDSHAKE_SNAPLEN, workers=workers)
    b = bcc.BPF(src_file=str(src / "imaptap.bpf.c").encode(), cflags=cflags)
    try:
        maps, index_of = [], {}
        for i in range(lib.bpf_num_tables(b.module)):
            index_of[lib.bpf_table_fd_id(b.module, i)] = len(maps)
            maps.append((lib.bpf_table_name(b.module, i).decode(), lib.bpf_table_type_id(b.module, i),
                         lib.bpf_table_key_size_id(b.module, i), lib.bpf_table_leaf_size_id(b.module, i),
                         lib.bpf_table_max_entries_id(b.module, i), lib.bpf_table_flags_id(b.module, i)))
        progs = []
        wanted = [(live.PROG_XDP, BPF_PROG_TYPE_XDP) if xdp else (live.PROG_TC_IN, BPF_PROG_TYPE_SCHED_CLS),
                  (live.PROG_TC_EG, BPF_PROG_TYPE_SCHED_CLS)]
        for fn, ptype in wanted:
            code = bytearray(b.dump_func(fn.encode()))
            for off in range(0, len(code), 8):
                op, regs, _, imm = struct.unpack_from("<BBhi", code, off)
                if op == _LD_IMM64 and regs >> 4 in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                    if imm not in index_of:
                        raise CheckError(f"{fn}: instruction {off // 8} refers to fd {imm}, no map of bcc's")
                    struct.pack_into("<i", code, off + 4, index_of[imm])
            progs.append((fn, ptype, bytes(code)))
        return maps, progs
    finally:
        b.cleanup()


def write_spec(units: list[tuple[str, list, list]]) -> bytes:
    """The loader's /spec: (label, maps, programs) units in the layout verifier_loader.c reads."""
    out = [struct.pack("<I", len(units))]
    for label, maps, progs in units:
        out.append(struct.pack("<32sI", label.encode(), len(maps)))
        for name, *nums in maps:
            out.append(struct.pack("<16s5I", name.encode()[:15], *nums))
        out.append(struct.pack("<I", len(progs)))
        for name, ptype, code in progs:
            out.append(struct.pack("<32sII", name.encode(), ptype, len(code) // 8) + code)
    return b"".join(out)


# --- the initramfs ---------------------------------------------------------------------------

#: The loader's source, package data beside this module.
LOADER_SOURCE = Path(__file__).with_name("verifier_loader.c")


def loader_binary() -> Path:
    """verifier_loader.c built static, rebuilt when the source changes."""
    src = LOADER_SOURCE
    out = CACHE / "verifier-init"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        CACHE.mkdir(parents=True, exist_ok=True)
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise CheckError("needs gcc (scripts/setup installs it)")
        r = subprocess.run([cc, "-static", "-O2", "-Wall", "-o", str(out) + ".tmp", str(src)],
                           check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise CheckError(f"building the loader failed:\n{r.stderr}")
        os.replace(str(out) + ".tmp", out)
    return out


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc archive of (path, mode, data, (rdev major, minor)) entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        out.extend(hdr.encode() + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, 1):
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", (0, 0), 0)
    return bytes(out)


def initramfs(spec: bytes) -> bytes:
    """The guest's initramfs: /dev/console, the loader as /init, and the spec."""
    init = loader_binary().read_bytes()
    return cpio_newc([("dev", 0o40755, b"", (0, 0)),
                      ("dev/console", 0o20600, b"", (5, 1)),
                      ("init", 0o100755, init, (0, 0)),
                      ("spec", 0o100644, spec, (0, 0))])


# --- booting ---------------------------------------------------------------------------------

def kvm_usable() -> bool:
    """Whether /dev/kvm opens (KVM may still fail to run a guest)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def boot(image: Path, initrd: Path, timeout: float, accel: str = "auto") -> tuple[str, float, str, str | None]:
    """Boot IMAGE with INITRD; returns (serial output, seconds, accelerator used, why KVM was
    given up or None).

    accel "auto": KVM where /dev/kvm opens, and TCG if that boot fails in any way: qemu aborts
    or exits non-zero (nested KVM: "failed to set MSR" then an assertion), the guest prints
    nothing from the loader within KVM_SILENT seconds (a hang in early boot), or the loader
    does not finish.  Nothing is remembered between runs: each one tries KVM again, so a
    machine that can run KVM guests is never stuck on TCG by an earlier one.
    """
    why = None
    if accel == "auto":
        if kvm_usable():
            try:
                serial, secs, used = _boot(image, initrd, KVM_SILENT + timeout, "kvm", silent_limit=KVM_SILENT)
                if parse(serial)["done"]:
                    return serial, secs, used, None
                why = "the loader did not finish under KVM"
            except CheckError as exc:
                why = str(exc).splitlines()[0]
            log(f"{image.name} under KVM: {why}; booting it under TCG")
        else:
            why = "/dev/kvm cannot be opened"
        accel = "tcg"
    serial, secs, used = _boot(image, initrd, timeout, accel)
    return serial, secs, used, why


#: Seconds a guest under KVM may print nothing of the loader's before it is taken for hung:
#: TCG boots these kernels to the loader in about 12 s, KVM in 2.
KVM_SILENT = 20


def _boot(image: Path, initrd: Path, timeout: float, accel: str, silent_limit: float | None = None):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise CheckError("needs qemu-system-x86_64 (scripts/setup installs qemu-system-x86)")
    opts = ["-enable-kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg"]
    cmd = [qemu, *opts, "-m", "1024", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults",
           "-serial", "stdio", "-kernel", str(image), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 quiet"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = bytearray()
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            chunk = proc.stdout.read(65536)
            if chunk:
                out.extend(chunk)
            elif chunk == b"":
                break  # EOF: qemu exited
            now = time.monotonic() - t0
            if silent_limit is not None and now > silent_limit and PREFIX.encode() not in out:
                raise CheckError(f"{image.name} printed nothing of the loader's in {silent_limit:.0f} s ({accel})")
            if now > timeout:
                raise CheckError(f"{image.name} did not power off within {timeout:.0f} s ({accel}); serial"
                                 f" output:\n{out.decode('utf-8', 'replace')[-SERIAL_TAIL:]}")
            if not chunk:
                time.sleep(0.05)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    serial = out.decode("utf-8", "replace").replace("\r", "")
    if proc.returncode != 0:
        err = proc.stderr.read().decode(errors="replace").strip()
        raise CheckError(f"qemu exited {proc.returncode} ({accel}): {err[-QEMU_ERROR_TAIL:] or 'no message'}")
    return serial, time.monotonic() - t0, accel


def parse(serial: str) -> dict:
    """The loader's lines: {'kernel': str, 'done': bool, 'maps': {...}, 'progs': {(variant, prog): {...}}}."""
    res: dict = {"kernel": None, "done": False, "maps": {}, "progs": {}, "errors": []}
    for line in serial.splitlines():
        if PREFIX not in line:
            continue
        kind, _, rest = line[line.index(PREFIX) + len(PREFIX):].partition(" ")
        if kind == "KERNEL":
            res["kernel"] = rest.split(" ")[0]
        elif kind == "DONE":
            res["done"] = True
        elif kind == "ERROR":
            res["errors"].append(rest)
        elif kind == "MAP":
            variant, name, status, *more = rest.split(" ")
            res["maps"][(variant, name)] = {"status": status, "detail": " ".join(more)}
        elif kind == "PROG":
            variant, name, status, *more = rest.split(" ")
            res["progs"][(variant, name)] = {"status": status, "detail": " ".join(more), "log": []}
        elif kind == "LOG":
            variant, name, text = (rest.split(" ", 2) + ["", ""])[:3]
            text = text.removeprefix("| ")
            res["progs"].setdefault((variant, name), {"status": "?", "detail": "", "log": []})["log"].append(text)
    return res


def run(kernels: list[str], variants: list[str], refresh: bool = False, timeout: float = BOOT_TIMEOUT,
        accel: str = "auto", mirror: str | None = None) -> dict:
    """Compile, boot each kernel once, and return {'results': [...], 'timings': {...},
    'boots': {kernel: {'accel': 'kvm' or 'tcg', 'kvm_failed': why or None, 'seconds': s}}}."""
    if os.geteuid() != 0:
        raise CheckError("needs root (bcc compiles against this kernel, and /dev/kvm)")
    timings: dict = {}
    images = {}
    for k in kernels:
        t0 = time.monotonic()
        images[k] = kernel_image(k, refresh, mirror)
        timings[f"kernel {k}"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    units, same_as, seen = [], {}, {}
    for v in variants:
        ringbuf, xdp, _ = VARIANTS[v]
        maps, progs = compile_variant(ringbuf, xdp, VARIANT_WORKERS.get(v, 1))
        unique = []
        for name, ptype, code in progs:
            # The same bytes with the same maps are one load: the kernel sees the same input
            # (imaptap_tc_in and imaptap_tc_eg are one function; ringbuf+xdp's egress is ringbuf+tc's).
            key = (ptype, code, tuple(maps))
            same_as[(v, name)] = seen.setdefault(key, (v, name))
            if same_as[(v, name)] == (v, name):
                unique.append((name, ptype, code))
        units.append((v, maps, progs, unique))
    timings["compile"] = round(time.monotonic() - t0, 2)
    results = []
    booted = {}
    with tempfile.TemporaryDirectory(prefix="imaptap-vc-") as tmp:
        initrd = Path(tmp, "initrd.cpio")
        initrd.write_bytes(initramfs(write_spec([(v, m, u) for v, m, _, u in units if u])))
        with concurrent.futures.ThreadPoolExecutor(len(kernels)) as pool:  # TCG: a CPU each
            boots = dict(zip(kernels, pool.map(lambda k: boot(images[k], initrd, timeout, accel), kernels),
                             strict=True))
        for k in kernels:
            serial, secs, used, why = boots[k]
            timings[f"boot {k} ({used})"] = round(secs, 2)
            booted[k] = {"accel": used, "kvm_failed": why, "seconds": round(secs, 2)}
            got = parse(serial)
            if not got["done"] or got["errors"]:
                raise CheckError(f"the loader did not finish on {images[k].name}; serial output:\n"
                                 f"{serial[-SERIAL_TAIL:]}")
            for v, _maps, progs, _ in units:
                for name, ptype, _code in progs:
                    fv, fname = same_as[(v, name)]
                    p = got["progs"].get((fv, fname), {"status": "MISSING", "detail": "", "log": []})
                    fmaps = next(u[1] for u in units if u[0] == fv)
                    failed_maps = [f"{n}: {got['maps'].get((fv, n), {}).get('detail', 'no report')}"
                                   for n, *_ in fmaps if got["maps"].get((fv, n), {}).get("status") != "ok"]
                    detail = p["detail"] if (fv, fname) == (v, name) else f"{p['detail']} (bytecode of {fv} {fname})"
                    results.append({
                        "kernel": k, "release": got["kernel"], "variant": v, "program": name,
                        "type": "XDP" if ptype == BPF_PROG_TYPE_XDP else "SCHED_CLS",
                        "status": p["status"], "detail": detail, "log": p["log"],
                        "failed_maps": failed_maps,
                        "expected": KERNELS[k][2] >= VARIANTS[v][2],
                    })
    return {"results": results, "timings": timings, "boots": booted}


def table(results: list[dict]) -> str:
    """The results as a text table, one row per kernel, variant and program."""
    rows = [("kernel", "variant", "program", "type", "result", "live.py builds it here", "detail")]
    for r in results:
        rows.append((f"{r['kernel']} ({r['release']})", r["variant"], r["program"], r["type"],
                     r["status"].lower(), "yes" if r["expected"] else "no", r["detail"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    # zip stops at the widths: the last column (detail) is not padded.
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows)


def accelerators(boots: dict) -> str:
    """Which accelerator booted each kernel, and why KVM did not where it did not."""
    parts = []
    for k, b in boots.items():
        parts.append(f"{k} under {b['accel'].upper()}" + (f" (KVM: {b['kvm_failed']})" if b["kvm_failed"] else ""))
    return "booted: " + "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/verifier-check."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="default: all")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--refresh", action="store_true", help="look for newer kernel builds on the mirror")
    ap.add_argument("--mirror", metavar="URL", help="Debian archive to download the kernels from"
                    " (default: the one this machine's apt sources name)")
    ap.add_argument("--timeout", type=float, default=BOOT_TIMEOUT,
                    help=f"seconds per boot (default {BOOT_TIMEOUT})")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="qemu accelerator (default: KVM, and TCG where a KVM boot fails in any way)")
    ap.add_argument("--logs", action="store_true", help="print the verifier's log of every rejection")
    return ap


def main(argv: list[str] | None = None) -> int:
    """scripts/verifier-check: the table, and exit 1 where a variant failed where it must load."""
    args = build_parser().parse_args(argv)
    kernels = args.kernel or list(KERNELS)
    variants = args.variant or list(VARIANTS)
    try:
        out = run(kernels, variants, args.refresh, args.timeout, args.accel, args.mirror)
    except CheckError as exc:
        log(str(exc))
        return 2
    if args.json == "-":
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(table(out["results"]))
        print("timings (s): " + ", ".join(f"{k} {v}" for k, v in out["timings"].items()))
        print(accelerators(out["boots"]))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    bad = [r for r in out["results"] if r["expected"] and r["status"] != "LOADED"]
    for r in out["results"]:
        if r["status"] != "LOADED" and (args.logs or r["expected"]):
            print(f"\n--- {r['kernel']} {r['variant']} {r['program']}: {r['status']} {r['detail']}",
                  file=sys.stderr)
            for m in r["failed_maps"]:
                print(f"    map {m}", file=sys.stderr)
            for line in r["log"]:
                print(f"    {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
