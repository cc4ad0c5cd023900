"""The kernel capture against real traffic on a veth pair: what reaches userspace, and what not.

Every test attaches `LiveCapture` to the root-namespace end of a veth whose other end holds a
tiny IMAP-shaped server (conftest.py), talks to it, and checks the `Segment`s byte for byte
against what the client really sent and received.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from livelab import OTHER_PORT, ROOT, SERVER_PORT, Client, server_body, set_gro
from imaptap.capture import live
from imaptap.capture.live import LiveCapture, LiveError
from imaptap.segment import DEFAULT_TAILLEN, PayloadMode, Segment, TcpFlag, flow_key, split_payload

pytestmark = pytest.mark.live

LIFECYCLE = TcpFlag.SYN | TcpFlag.FIN | TcpFlag.RST


def collect(cap: LiveCapture, done, timeout: float = 5.0) -> list[Segment]:
    """Poll until ``done(segments)`` holds (then a little longer for stragglers) or the timeout."""
    segs: list[Segment] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segs += cap.poll(100)
        if done(segs):
            segs += cap.poll(100)
            return segs
    return segs


def of_client(segs: list[Segment], client: Client) -> list[Segment]:
    return [s for s in segs if client.port in (s.sport, s.dport) and SERVER_PORT in (s.sport, s.dport)]


def both_fins(client: Client):
    def done(segs):
        fins = {s.sport for s in of_client(segs, client) if s.flags & TcpFlag.FIN}
        return {client.port, SERVER_PORT} <= fins
    return done


def check_stream(segs: list[Segment], sport: int, stream: bytes, snaplen: int,
                 taillen: int = DEFAULT_TAILLEN) -> list[Segment]:
    """Every data segment from ``sport`` carries the stream's bytes at its offset, cut into head
    and tail as `split_payload` cuts them, and together the segments cover the whole stream;
    returns those segments."""
    (syn,) = {s for s in segs if s.sport == sport and s.flags & TcpFlag.SYN}
    base = (syn.seq + 1) & 0xFFFFFFFF
    data = [s for s in segs if s.sport == sport and s.wire_len > 0]
    covered = 0
    for s in data:
        off = (s.seq - base) & 0xFFFFFFFF
        want = stream[off:off + s.wire_len]
        assert len(want) == s.wire_len, f"segment at {off} beyond the stream"
        assert (s.payload, s.tail) == split_payload(want, snaplen, taillen), f"payload at offset {off} differs"
        if off <= covered:
            covered = max(covered, off + s.wire_len)
    assert covered == len(stream)
    return data


def check_session(segs, client: Client, snaplen: int, ifindex: int, t0: float, t1: float) -> None:
    mine = of_client(segs, client)
    assert mine, "no segment of the session"
    c2s = [s for s in mine if s.sport == client.port]
    s2c = [s for s in mine if s.sport == SERVER_PORT]
    assert any(s.flags & TcpFlag.SYN and not s.flags & TcpFlag.ACK for s in c2s)
    assert any(s.flags & TcpFlag.SYN and s.flags & TcpFlag.ACK for s in s2c)
    assert any(s.flags & TcpFlag.FIN for s in c2s) and any(s.flags & TcpFlag.FIN for s in s2c)
    # Pure ACKs never leave the kernel.
    assert all(s.wire_len > 0 or s.flags & LIFECYCLE for s in mine)
    assert all(s.ifindex == ifindex for s in mine)
    assert all(t0 - 0.05 <= s.ts <= t1 + 0.05 for s in mine)
    check_stream(mine, client.port, bytes(client.sent), snaplen)
    check_stream(mine, SERVER_PORT, bytes(client.received), snaplen)


def test_ipv4_session_both_directions_cut_at_snaplen(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 64) as cap:
        t0 = time.time()
        c = Client(netlab.server4)
        c.command("a1", "LOGIN alice secret")
        c.command("a2", "FETCH 3000")
        c.command("a3", "APPEND INBOX", literal=server_body(2000))
        c.logout()
        segs = collect(cap, both_fins(c))
        t1 = time.time()
    check_session(segs, c, 64, netlab.ifindex, t0, t1)
    mine = of_client(segs, c)
    assert all(s.ip_version == 4 for s in mine)
    assert {(s.src, s.dst) for s in mine} == {(netlab.client4, netlab.server4), (netlab.server4, netlab.client4)}
    assert any(s.wire_len > 64 and len(s.payload) == 64 for s in mine if s.sport == SERVER_PORT)
    assert any(s.wire_len > 64 and len(s.payload) == 64 for s in mine if s.sport == c.port)
    # The tagged completion at the end of a long response is in the tail.
    assert any(s.wire_len > 64 and s.tail.endswith(b"a2 OK FETCH done\r\n") and b"a2 OK" not in s.payload
               for s in mine if s.sport == SERVER_PORT)
    assert any(len(s.tail) == DEFAULT_TAILLEN for s in mine)
    counters = cap.counters()
    assert counters["lost"] == 0 and counters["unparsed"] == 0
    assert counters["submitted"] == counters["received"] >= len(mine)


def test_ipv6_session(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256) as cap:
        t0 = time.time()
        c = Client(netlab.server6)
        c.command("a1", "LOGIN alice secret")
        c.command("a2", "FETCH 5000")
        c.logout()
        segs = collect(cap, both_fins(c))
        t1 = time.time()
    check_session(segs, c, 256, netlab.ifindex, t0, t1)
    mine = of_client(segs, c)
    assert all(s.ip_version == 6 for s in mine)
    # Text form as socket.inet_ntop gives it: compressed.
    assert {s.src for s in mine} == {f"fd00:198:{netlab.k}::1", f"fd00:198:{netlab.k}::2"}


def test_other_ports_and_udp_are_counted_but_never_submitted(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256) as cap:
        cap.poll(0)
        before = cap.counters()
        other = Client(netlab.server4, OTHER_PORT)
        other.command("a1", "FETCH 4000")
        other.logout()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u4, \
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u6:
            for _ in range(5):
                u4.sendto(b"a1 LOGIN alice secret\r\n", (netlab.server4, SERVER_PORT))
                u6.sendto(b"a1 LOGIN alice secret\r\n", (netlab.server6, SERVER_PORT))
        time.sleep(0.3)
        segs = collect(cap, lambda s: False, timeout=0.5)
        after = cap.counters()
    assert segs == []
    assert after["matched"] == before["matched"]
    assert after["submitted"] == before["submitted"]
    # The TCP session is >10 packets each way, plus 10 datagrams.
    assert after["seen"] - before["seen"] >= 30


def test_none_mode_stops_payload_copies_but_fin_is_reported(netlab):
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256) as cap:
        c = Client(netlab.server4)
        c.command("a1", "LOGIN alice secret")
        key = flow_key(netlab.client4, c.port, netlab.server4, SERVER_PORT)
        cap.policy.set(key, PayloadMode.NONE)
        sent_before, received_before = len(c.sent), len(c.received)
        c.command("a2", "FETCH 3000")
        c.command("a3", "APPEND INBOX", literal=server_body(1000))
        sent_none, received_none = len(c.sent), len(c.received)
        cap.policy.forget(key)
        c.command("a4", "NOOP")
        c.logout()
        segs = of_client(collect(cap, both_fins(c)), c)
    c2s = check_offsets(segs, c.port)
    s2c = check_offsets(segs, SERVER_PORT)
    for offsets, before, none_end in ((c2s, sent_before, sent_none), (s2c, received_before, received_none)):
        for off, s in offsets:
            if before <= off < none_end:
                assert s.payload == b"" and s.tail == b"" and s.wire_len > 0
            elif s.wire_len:
                assert s.payload, "payload copies must resume after forget()"
        assert any(before <= off < none_end for off, _ in offsets)
    assert any(s.flags & TcpFlag.FIN for s in segs if s.sport == c.port)
    assert any(s.flags & TcpFlag.FIN for s in segs if s.sport == SERVER_PORT)


def check_offsets(segs: list[Segment], sport: int) -> list[tuple[int, Segment]]:
    (syn,) = {s for s in segs if s.sport == sport and s.flags & TcpFlag.SYN}
    base = (syn.seq + 1) & 0xFFFFFFFF
    return [((s.seq - base) & 0xFFFFFFFF, s) for s in segs if s.sport == sport and s.wire_len > 0]


def test_whole_mode_copies_whole_payloads(netlab):
    snaplen = 64
    with LiveCapture([netlab.host_if], {SERVER_PORT}, snaplen) as cap:
        c = Client(netlab.server4)
        key = flow_key(netlab.client4, c.port, netlab.server4, SERVER_PORT)
        cap.policy.set(key, PayloadMode.WHOLE)
        assert len(cap._bpf[b"flow_modes"]) == 1
        c.command("a1", "FETCH 40000")
        c.command("a2", "APPEND INBOX", literal=server_body(100000))
        c.logout()
        segs = of_client(collect(cap, both_fins(c)), c)
        cap.policy.forget(key)
        assert len(cap._bpf[b"flow_modes"]) == 0
        assert cap.counters()["lost"] == 0
    for sport, stream in ((c.port, bytes(c.sent)), (SERVER_PORT, bytes(c.received))):
        data = check_stream(segs, sport, stream, live.WHOLE_PAYLOAD_CAP)
        assert all(len(s.payload) == s.wire_len and s.tail == b"" for s in data)
        assert max(s.wire_len for s in data) > snaplen


def test_detach_leaves_nothing_behind(netlab):
    assert not netlab.has_clsact()
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256) as cap:
        assert netlab.xdp_attached()
        assert "imaptap_tc_eg" in netlab.tc_filters("egress")
        assert cap.xdp_modes == {netlab.host_if: "native"}
    assert not netlab.xdp_attached()
    assert netlab.tc_filters("egress") == "" and netlab.tc_filters("ingress") == ""
    assert not netlab.has_clsact()


def test_detach_on_exception_and_no_xdp(netlab):
    with pytest.raises(RuntimeError):
        with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=False):
            assert not netlab.xdp_attached()
            assert "imaptap_tc_in" in netlab.tc_filters("ingress")
            raise RuntimeError("boom")
    assert not netlab.xdp_attached()
    assert netlab.tc_filters("egress") == "" and netlab.tc_filters("ingress") == ""
    assert not netlab.has_clsact()


def test_clsact_of_someone_else_stays(netlab):
    subprocess.run(["tc", "qdisc", "add", "dev", netlab.host_if, "clsact"], check=True)
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256):
        pass
    assert netlab.has_clsact()
    assert netlab.tc_filters("egress") == ""


@pytest.mark.parametrize("options", [
    {"use_xdp": False},
    {"xdp_mode": "skb"},
    {"output": "perf"},
    {"use_xdp": False, "output": "perf"},
], ids=["tc-only", "xdp-skb", "perf-buffer", "tc-perf"])
def test_variants_capture_the_same_session(netlab, options):
    with LiveCapture([netlab.host_if], {SERVER_PORT, 10143}, 100, **options) as cap:
        if options.get("xdp_mode") == "skb":
            assert cap.xdp_modes == {netlab.host_if: "skb"}
        t0 = time.time()
        c = Client(netlab.server4)
        c.command("a1", "FETCH 3000")
        c.command("a2", "APPEND INBOX", literal=server_body(3000))
        c.logout()
        c6 = Client(netlab.server6)
        c6.command("a1", "FETCH 700")
        c6.logout()
        segs = collect(cap, lambda s: both_fins(c)(s) and both_fins(c6)(s))
        t1 = time.time()
    check_session(segs, c, 100, netlab.ifindex, t0, t1)
    check_session(segs, c6, 100, netlab.ifindex, t0, t1)
    assert not netlab.xdp_attached() and netlab.tc_filters("ingress") == ""


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
    with LiveCapture([{iface!r}], {{143}}, 256, use_xdp={use_xdp!r}) as cap:
        print("ready", flush=True)
        while True:
            cap.poll(100)
''')


def start_capture_process(iface: str, use_xdp: bool = True) -> subprocess.Popen:
    script = CAPTURE_SCRIPT.format(userspace=str(ROOT / "userspace"), iface=iface, use_xdp=use_xdp)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", "capture process did not start"
    return proc


@pytest.mark.parametrize("use_xdp", [True, False], ids=["xdp", "tc-only"])
def test_after_sigkill_the_next_capture_replaces_the_stale_programs(netlab, use_xdp):
    proc = start_capture_process(netlab.host_if, use_xdp)
    proc.kill()
    proc.wait()
    # SIGKILL leaves the program attached, running for nobody.
    assert netlab.xdp_attached() == use_xdp
    assert "imaptap_tc_eg" in netlab.tc_filters("egress")
    with LiveCapture([netlab.host_if], {SERVER_PORT}, 256, use_xdp=use_xdp) as cap:
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


def test_a_running_capture_is_not_replaced(netlab):
    proc = start_capture_process(netlab.host_if)
    try:
        with pytest.raises(LiveError, match=rf"imaptap \(pid {proc.pid}\) is already capturing"):
            with LiveCapture([netlab.host_if], {SERVER_PORT}, 256):
                pass
        assert netlab.xdp_attached()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    # The running one cleaned up after itself on SIGTERM.
    assert not netlab.xdp_attached()
    assert netlab.tc_filters("egress") == ""


def test_sigint_detaches(netlab):
    proc = start_capture_process(netlab.host_if)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert not netlab.xdp_attached()
    assert netlab.tc_filters("egress") == "" and not netlab.has_clsact()


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


def test_bad_arguments():
    with pytest.raises(LiveError, match="bad port"):
        LiveCapture(["lo"], {0}, 256)
    with pytest.raises(LiveError, match="XDP mode"):
        LiveCapture(["lo"], {143}, 256, xdp_mode="offload")
    with pytest.raises(LiveError):
        LiveCapture([], {143}, 256)


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


# --- live against tcpdump + replay ---------------------------------------------------------------


def test_live_segments_equal_a_replayed_tcpdump_capture(netlab, tmp_path):
    """The same packets through the kernel and through tcpdump + replay give the same Segments."""
    from imaptap.capture.replay import ReplayStats, open_capture
    from imaptap.segment import PayloadPolicy

    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is needed (scripts/setup installs it)")
    # With GRO on, tcpdump would see merged ingress segments that XDP saw one by one.
    set_gro(netlab.host_if, False)
    snaplen = 128
    pcap = tmp_path / "same.pcap"
    with LiveCapture([netlab.host_if], {SERVER_PORT}, snaplen) as cap:
        # --immediate-mode: otherwise packets still in the ring when SIGINT comes are never written.
        dump = subprocess.Popen(["tcpdump", "-i", netlab.host_if, "-n", "-s", "0", "--immediate-mode", "-w", str(pcap),
                                 f"tcp port {SERVER_PORT}"], stderr=subprocess.PIPE, text=True)
        try:
            assert "listening on" in dump.stderr.readline()
            c = Client(netlab.server4)
            c.command("a1", "LOGIN alice secret")
            c.command("a2", "FETCH 5000")
            c.command("a3", "APPEND INBOX", literal=server_body(3000))
            c.logout()
            c6 = Client(netlab.server6)
            c6.command("a1", "FETCH 2000")
            c6.logout()
            segs = collect(cap, lambda s: both_fins(c)(s) and both_fins(c6)(s))
            time.sleep(0.3)
        finally:
            dump.send_signal(signal.SIGINT)
            dump.wait(timeout=10)
    with open_capture(pcap) as reader:
        replayed = [s for s in reader.segments({SERVER_PORT}, PayloadPolicy(snaplen), ReplayStats())
                    if s.wire_len > 0 or s.flags & LIFECYCLE]

    def fields(s: Segment) -> tuple:
        return (s.ip_version, s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags, s.wire_len, s.payload,
                s.tail)

    assert len(replayed) > 20
    assert sorted(map(fields, segs)) == sorted(map(fields, replayed))
    # Same order within each direction, and the clocks agree (monotonic -> wall clock offset).
    for live_seg, file_seg in zip(sorted(segs, key=fields), sorted(replayed, key=fields)):
        assert abs(live_seg.ts - file_seg.ts) < 0.05
