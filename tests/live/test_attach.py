"""Attaching and detaching: nothing left behind, stale programs replaced, others respected.

Runs on a veth into a private namespace with a tiny IMAP-shaped server (conftest.py): these
tests are about the programs on the interface, not about IMAP.  Both ways of attaching run:
BPF links (XDP links and TCX, this kernel has both) and the netlink fallback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from imaptap.capture import live
from imaptap.capture.live import AttachMethod, Hook, LiveCapture, LiveError
from imaptap.capture.live.memory import memory_use
from imaptap.segment import PayloadMode, flow_key
from imaptap_lab.programs import prog_loaded, programs_on
from livelab import ROOT, SERVER_PORT, Client, both_fins, check_stream, collect, of_client

pytestmark = pytest.mark.live


METHODS = ["link", "netlink"]
#: How each attach method shows from outside (programs_on), per hook.
SEEN_AS = {"link": {"xdp": "link or netlink", "tc": "tcx"}, "netlink": {"xdp": "link or netlink", "tc": "netlink"}}


@pytest.mark.parametrize("method", METHODS)
def test_detach_leaves_nothing_behind(netlab, method):
    assert not netlab.has_clsact()
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, handshake_snaplen=0, attach=method) as cap:
        seen = SEEN_AS[method]
        assert netlab.programs() == {("xdp", seen["xdp"], "imaptap_xdp"), ("tc egress", seen["tc"], "imaptap_tc_eg")}
        assert {(a.hook, a.method) for a in cap.hooks()} == {(Hook.XDP, AttachMethod(method)),
                                                            (Hook.TC_EGRESS, AttachMethod(method))}
        # TCX needs no qdisc; the netlink filter does
        assert netlab.has_clsact() == (method == "netlink")
        assert cap.xdp_modes == {netlab.host_if: "native"}
        # the lab's interface is a veth: the user is told what native XDP costs there
        assert any(n.startswith(f"{netlab.host_if} is a veth") and "--no-xdp" in n for n in cap.notes)
        c = Client(netlab.server4)
        c.command("a1", "NOOP")
        c.logout()
        segs = collect(cap, both_fins(c))
    check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)  # egress: the server's side
    check_stream(of_client(segs, c), c.port, bytes(c.sent), 256)            # ingress
    assert netlab.programs() == set()
    assert not netlab.has_clsact()


@pytest.mark.parametrize("method", METHODS)
def test_detach_on_exception_and_no_xdp(netlab, method):
    with pytest.raises(RuntimeError):
        with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=False, attach=method) as cap:
            assert not netlab.xdp_attached() and not any("veth" in n for n in cap.notes)
            tc = SEEN_AS[method]["tc"]
            assert netlab.programs() == {("tc ingress", tc, "imaptap_tc_in"), ("tc egress", tc, "imaptap_tc_eg")}
            raise RuntimeError("boom")
    assert netlab.programs() == set()
    assert not netlab.has_clsact()


def test_a_bad_attach_method_is_one_line(monkeypatch):
    monkeypatch.setenv(live.ATTACH_ENV, "ioctl")
    with pytest.raises(LiveError, match="bad IMAPTAP_ATTACH 'ioctl': use link or netlink"):
        LiveCapture(["lo"], {143}, 256)


def test_segments_still_buffered_at_close_come_with_the_last_poll(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, handshake_snaplen=0) as cap:
        c = Client(netlab.server4)
        c.command("a1", "FETCH 3000")
        c.logout()
        time.sleep(0.3)   # all of it in the ring buffer, nothing polled
    segs = cap.poll(0)
    check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)
    assert cap.poll(0) == []
    counters = cap.counters()
    assert counters["submitted"] == counters["received"] == len(segs) and counters["lost"] == 0


def test_an_interface_removed_while_capturing_is_no_error(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, handshake_snaplen=0) as cap:
        subprocess.run(["ip", "link", "del", netlab.host_if], check=True)
        assert cap.poll(50) == []
    assert netlab.host_if not in {name for _, name in socket.if_nameindex()}


@pytest.mark.parametrize("method", METHODS)
def test_clsact_of_someone_else_stays(netlab, method):
    subprocess.run(["tc", "qdisc", "add", "dev", netlab.host_if, "clsact"], check=True)
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, attach=method):
        pass
    assert netlab.has_clsact()
    assert netlab.tc_filters("egress") == ""


def test_snaplen_over_the_copy_limit_is_refused(netlab):
    with pytest.raises(LiveError, match="snap length"):
        with LiveCapture([netlab.host_if], {SERVER_PORT}, 40000, output="perf"):
            pass


# --- other programs, other runs ---------------------------------------------------------------

CAPTURE_SCRIPT = textwrap.dedent('''
    import signal, sys, time
    sys.path.insert(0, {userspace!r})
    from imaptap.capture.live import LiveCapture
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    with LiveCapture([{iface!r}], {{143}}, 256, use_xdp={use_xdp!r}, attach={method!r}) as cap:
        print("ready", flush=True)
        while True:
            cap.poll(100)
''')


def start_capture_process(iface: str, use_xdp: bool = True, method: str = "link") -> subprocess.Popen:
    script = CAPTURE_SCRIPT.format(userspace=str(ROOT / "userspace"), iface=iface, use_xdp=use_xdp, method=method)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", "capture process did not start"
    return proc


@pytest.mark.parametrize("use_xdp", [True, False], ids=["xdp", "tc-only"])
def test_after_sigkill_with_links_nothing_is_left(netlab, use_xdp):
    proc = start_capture_process(netlab.host_if, use_xdp)
    attached = programs_on(netlab.host_if)
    assert {p.name for p in attached} == ({"imaptap_xdp"} if use_xdp else {"imaptap_tc_in"}) | {"imaptap_tc_eg"}
    proc.kill()
    proc.wait()
    assert netlab.programs() == set() and not netlab.has_clsact()
    assert not any(prog_loaded(p.prog_id) for p in attached)  # unloaded, not only off the interface


@pytest.mark.parametrize("use_xdp", [True, False], ids=["xdp", "tc-only"])
def test_after_sigkill_the_next_capture_replaces_the_stale_programs(netlab, use_xdp):
    proc = start_capture_process(netlab.host_if, use_xdp, method="netlink")
    proc.kill()
    proc.wait()
    # With netlink, SIGKILL leaves the program attached, running for nobody.
    assert netlab.xdp_attached() == use_xdp
    assert "imaptap_tc_eg" in netlab.tc_filters("egress")
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=use_xdp, handshake_snaplen=0,
                     attach="netlink") as cap:
        assert any("stale" in note for note in cap.notes)
        filters = [line for line in netlab.tc_filters("egress").splitlines() if "handle" in line]
        assert len(filters) == 1 and f"imaptap_tc_eg pid {os.getpid()}" in filters[0]
        c = Client(netlab.server4)
        c.command("a1", "NOOP")
        c.logout()
        segs = collect(cap, both_fins(c))
    check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)
    assert not netlab.xdp_attached()
    assert netlab.tc_filters("egress") == "" and netlab.tc_filters("ingress") == ""


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("use_xdp", [True, False], ids=["xdp", "tc-only"])
def test_a_running_capture_is_not_replaced(netlab, method, use_xdp):
    proc = start_capture_process(netlab.host_if, use_xdp, method)
    try:
        before = netlab.programs()
        # found by its XDP program, its TCX programs, or its filters' names, whichever it has
        with pytest.raises(LiveError, match=rf"imaptap \(pid {proc.pid}\) is already capturing"):
            with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=use_xdp, attach=method):
                pass
        assert netlab.programs() == before
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    # The running one cleaned up after itself on SIGTERM.
    assert netlab.programs() == set()


@pytest.mark.parametrize("method", METHODS)
def test_sigint_detaches(netlab, method):
    proc = start_capture_process(netlab.host_if, method=method)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert netlab.programs() == set() and not netlab.has_clsact()


OTHER_XDP = b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }"


def test_another_tools_xdp_program_is_refused_and_kept(netlab):
    import bcc

    other = bcc.BPF(text=OTHER_XDP)
    fn = other.load_func(b"other_xdp", bcc.BPF.XDP)
    bcc.BPF.attach_xdp(netlab.host_if.encode(), fn, 0)
    try:
        with pytest.raises(LiveError, match="XDP program of another tool.*other_xdp.*--no-xdp"):
            with LiveCapture([netlab.host_if], {SERVER_PORT}, 256):
                pass
        assert "other_xdp" in subprocess.run(["ip", "-d", "link", "show", netlab.host_if],
                                             capture_output=True, text=True).stdout
        # TC on ingress leaves it alone and works.
        with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=False) as cap:
            c = Client(netlab.server4)
            c.logout()
            segs = collect(cap, both_fins(c))
        check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)
        assert "other_xdp" in subprocess.run(["ip", "-d", "link", "show", netlab.host_if],
                                             capture_output=True, text=True).stdout
    finally:
        bcc.BPF.remove_xdp(netlab.host_if.encode(), 0)
        other.cleanup()


# --- user errors ------------------------------------------------------------------------------


def test_missing_interface(live_ready):
    with pytest.raises(LiveError, match="no such interface: nosuch0"):
        with LiveCapture(["nosuch0"], {143}, 256):
            pass


def test_without_privileges(netlab):
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(ROOT / "userspace")!r})
        from imaptap.capture.live import LiveCapture, LiveError
        try:
            with LiveCapture([{netlab.host_if!r}], {{143}}, 256):
                print("attached")
        except LiveError as e:
            print("LiveError:", e)
    ''')
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          "--bounding-set=-all", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.stdout.startswith("LiveError: live capture needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"), out
    assert not netlab.xdp_attached()


def test_missing_bcc_and_headers_say_what_to_install(netlab, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(LiveError, match="install python3-bpfcc"):
        with LiveCapture([netlab.host_if], {143}, 256):
            pass
    monkeypatch.undo()
    monkeypatch.setattr(live, "kernel_headers_present", lambda: False)
    with pytest.raises(LiveError, match=r"kernel headers for \S+ are missing: install linux-headers-"):
        with LiveCapture([netlab.host_if], {143}, 256):
            pass
    assert not netlab.xdp_attached() and not netlab.has_clsact()


def map_max_entries(fd: int) -> int:
    """max_entries from struct bpf_map_info (type, id, key_size, value_size, max_entries)."""
    info = (ctypes.c_uint8 * 24)()
    attr = (ctypes.c_uint8 * 16)()
    struct.pack_into("<IIQ", attr, 0, fd, 24, ctypes.addressof(info))
    live._bpf(15, attr)   # BPF_OBJ_GET_INFO_BY_FD
    return struct.unpack_from("<I", bytes(info), 16)[0]


def test_a_bigger_ring_buffer(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, buffer_bytes=3 << 20, handshake_snaplen=0) as cap:
        assert cap.ring_pages * os.sysconf("SC_PAGE_SIZE") == 4 << 20
        assert map_max_entries(cap._bpf[b"events"].map_fd) == 4 << 20   # a ring's size in bytes
        c = Client(netlab.server4)
        c.logout()
        segs = collect(cap, both_fins(c))
    check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)


def test_bad_arguments():
    with pytest.raises(LiveError, match="bad port"):
        LiveCapture(["lo"], {0}, 256)
    with pytest.raises(LiveError, match="XDP mode"):
        LiveCapture(["lo"], {143}, 256, xdp_mode="offload")
    with pytest.raises(LiveError):
        LiveCapture([], {143}, 256)
    with pytest.raises(LiveError, match="buffer size"):
        LiveCapture(["lo"], {143}, 256, buffer_bytes=10)


def test_interfaces_listed_like_tcpdump():
    listed = live.list_interfaces()
    names = {name for _, name, _ in listed}
    assert {name for _, name in socket.if_nameindex()} == names
    lo = next(entry for entry in listed if entry[1] == "lo")
    assert lo[0] == socket.if_nametoindex("lo") and "Loopback" in lo[2]


def test_default_interface_is_a_real_interface():
    try:
        name = live.default_interface()
    except LiveError as exc:
        assert "no default route" in str(exc)
        return
    assert name in {n for _, n in socket.if_nameindex()}


def test_kernel_flow_key_is_canonical():
    a = live.kernel_flow_key(flow_key("10.0.0.9", 50000, "10.0.0.10", 143))
    b = live.kernel_flow_key(flow_key("10.0.0.10", 143, "10.0.0.9", 50000))
    assert bytes(a) == bytes(b)
    assert a.port_a == 143 and bytes(a.addr_a[:4]) == socket.inet_aton("10.0.0.10")
    # Equal ports: the smaller address bytes first, although "10.0.0.10" < "10.0.0.9" as text.
    c = live.kernel_flow_key(flow_key("10.0.0.9", 143, "10.0.0.10", 143))
    assert bytes(c.addr_a[:4]) == socket.inet_aton("10.0.0.9")
    v6 = live.kernel_flow_key(flow_key("fd00::2", 143, "fd00::1", 40000))
    assert v6.ip_version == 6 and bytes(v6.addr_a) == socket.inet_pton(socket.AF_INET6, "fd00::2")


# --- memory and descriptors ---------------------------------------------------------------------


def compiler_code_resident_kb() -> int:
    """Resident KB of the r-x (code) mappings of clang's and LLVM's libraries in this process."""
    total, code = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                code = len(fields) > 5 and fields[1].startswith("r-x") and \
                    os.path.basename(fields[5]).startswith(("libLLVM", "libclang"))
            elif code and fields[0] == "Rss:":
                total += int(fields[1])
    return total


#: Heap blocks freed while capturing: 40 MB of malloc's (above pymalloc's 512 bytes), in its heap.
HEAP_BLOBS, HEAP_BLOB_BYTES = 20_000, 2_000


def test_what_compiling_left_behind_is_given_back_and_nothing_leaks(netlab):
    fds = set(os.listdir("/proc/self/fd"))
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256) as cap:
        # LLVM's code, megabytes of it while compiling, is not resident any more
        assert compiler_code_resident_kb() < 1024
        (before, after) = cap.memory
        assert before.file - after.file > 20 << 20 and before.anonymous - after.anonymous > 10 << 20
        assert cap._bpf.module is None  # bcc's module went; the maps are read through duplicates
        c = Client(netlab.server4)
        c.command("a1", "NOOP")
        c.logout()
        segs = collect(cap, both_fins(c))
        key = flow_key(netlab.client4, c.port, netlab.server4, SERVER_PORT)
        cap.policy.set(key, PayloadMode.NONE)  # a write to the flow_modes map
        counters = cap.counters()
        assert cap.policy.kernel_errors == 0 and counters["submitted"] == counters["received"] > 0
        # While capturing, the heap freed in the middle (as the churn of flows frees it) goes back too.
        blobs = [os.urandom(1) * HEAP_BLOB_BYTES for _ in range(HEAP_BLOBS)]
        pin = os.urandom(1) * HEAP_BLOB_BYTES  # above them: glibc cannot shrink the heap by itself
        del blobs
        kept = memory_use().anonymous
        assert cap.heap_trim is not None and cap.heap_trim.done == 0
        cap.heap_trim.due = 0.0  # the interval has passed
        cap.poll(0)
        assert cap.heap_trim.done == 1 and kept - memory_use().anonymous > (HEAP_BLOBS * HEAP_BLOB_BYTES) // 2
        del pin
    check_stream(of_client(segs, c), SERVER_PORT, bytes(c.received), 256)
    assert set(os.listdir("/proc/self/fd")) == fds  # links, map duplicates, netlink sockets: all closed
