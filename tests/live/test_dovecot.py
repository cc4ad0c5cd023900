"""The kernel capture watching a real Dovecot (scripts/imaplab.py) and real clients.

The clients run as separate processes, as they would on a real host, while this process polls
the capture (and, where a test says so, runs the analyzer that steers the kernel's per-flow
modes).  What the kernel hands over is compared with tcpdump's capture of the same packets,
replayed, and with what must not be there (payload after STARTTLS).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from imaptap.capture.live import LiveCapture
from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.flows import FlowTable
from imaptap.segment import PayloadPolicy, Segment, TcpFlag
from livelab import set_gro

pytestmark = pytest.mark.live

LIFECYCLE = TcpFlag.SYN | TcpFlag.FIN | TcpFlag.RST
MESSAGE = (b"From: carol@example.org\r\nTo: alice@example.org\r\nSubject: quarterly figures\r\n\r\n"
           + b"".join(b"line %04d of a longer body, to span several segments\r\n" % i for i in range(200)))


def run_client(code: str, **values) -> subprocess.Popen:
    """A client in its own process; it prints its local port, then 'done' at the end."""
    script = textwrap.dedent(code).format(**values)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def pump(cap: LiveCapture, procs: list[subprocess.Popen], table: FlowTable | None = None,
         timeout: float = 20.0) -> tuple[list[Segment], list[int]]:
    """Poll (feeding the analyzer if given) until the clients exit and their flows have ended."""
    segs: list[Segment] = []
    deadline = time.monotonic() + timeout

    def take(wait_ms: int) -> None:
        batch = cap.poll(wait_ms)
        segs.extend(batch)
        if table is not None:
            for s in batch:
                table.add(s)

    while time.monotonic() < deadline and not all(p.poll() is not None for p in procs):
        take(50)
    ports = []
    for p in procs:
        out = p.stdout.read().split()
        assert p.wait() == 0 and out and out[-1] == "done", f"client failed: {out}"
        ports.append(int(out[0]))

    def ended() -> bool:
        return all(sum(1 for s in segs if port in (s.sport, s.dport) and s.flags & (TcpFlag.FIN | TcpFlag.RST)) >= 2
                   for port in ports)

    while time.monotonic() < deadline and not ended():
        take(50)
    take(200)
    return segs, ports


IMAPLIB_SESSION = '''
    import imaplib
    m = imaplib.IMAP4({host!r}, {port})
    print(m.sock.getsockname()[1], flush=True)
    {login}
    m.select("INBOX")
    m.fetch("1", "(BODY.PEEK[])")
    m.list()
    m.logout()
    print("done")
'''


def fields(s: Segment) -> tuple:
    return (s.ip_version, s.src, s.dst, s.sport, s.dport, s.seq, s.ack, s.flags, s.wire_len, s.payload, s.tail)


def test_real_sessions_give_the_segments_tcpdump_and_replay_give(lab, tmp_path):
    lab.deliver("alice", MESSAGE)
    lab.deliver("bob", MESSAGE)
    set_gro(lab.host_if, False)   # tcpdump would see merged segments that XDP saw one by one
    pcap = tmp_path / "dovecot.pcap"
    with LiveCapture([lab.host_if], set(lab.ports), 256, handshake_snaplen=0) as cap:
        with lab.capture(pcap):
            procs = [
                run_client(IMAPLIB_SESSION, host=lab.server4, port=143,
                           login=f"m.login('alice', {lab.users['alice']!r})"),
                run_client(IMAPLIB_SESSION, host=lab.server6, port=10143,
                           login=f"m.authenticate('PLAIN', lambda _: b'\\0bob\\0' + {lab.users['bob'].encode()!r})"),
            ]
            segs, ports = pump(cap, procs)
        assert cap.counters()["lost"] == 0
    with open_capture(pcap) as reader:
        replayed = [s for s in reader.segments(set(lab.ports), PayloadPolicy(256, handshake_snaplen=0), ReplayStats())
                    if s.wire_len > 0 or s.flags & LIFECYCLE]
    assert {s.ip_version for s in segs} == {4, 6}
    assert len(replayed) > 30
    assert sorted(map(fields, segs)) == sorted(map(fields, replayed))
    # The mail body is longer than head + tail: the FETCH completion is in a tail.
    assert any(b"OK Fetch completed" in s.tail and b"OK Fetch completed" not in s.payload for s in segs)


STARTTLS_SESSION = '''
    import imaplib, ssl, time
    WAIT_BEFORE_TLS_S = 0.5
    m = imaplib.IMAP4({host!r}, 143)
    print(m.sock.getsockname()[1], flush=True)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    wrap = ctx.wrap_socket
    def wrap_later(*args, **kwargs):
        # The analyzer sets NONE once it has read the tagged OK, a poll or two after the
        # client has: on a loaded host the first TLS records (hellos, then encrypted) race it
        # and come copied.  Waiting here makes the test about the kernel honouring NONE.
        time.sleep(WAIT_BEFORE_TLS_S)
        return wrap(*args, **kwargs)
    ctx.wrap_socket = wrap_later
    m.starttls(ctx)
    m.login("alice", {password!r})
    m.select("INBOX")
    m.fetch("1", "(BODY.PEEK[])")
    m.logout()
    print("done")
'''


def test_after_starttls_the_kernel_copies_no_payload(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {143}, 256) as cap:
        table = FlowTable({143}, policy=cap.policy)
        proc = run_client(STARTTLS_SESSION, host=lab.server4, password=lab.users["alice"])
        segs, (port,) = pump(cap, [proc], table)
    mine = [s for s in segs if port in (s.sport, s.dport)]
    ok = next(s for s in mine if s.sport == 143 and b"OK Begin TLS" in s.payload)
    after_ok = mine[mine.index(ok) + 1:]
    tls = [s for s in after_ok if s.wire_len > 0]
    assert len(tls) > 6, "the TLS session should follow"
    client_tls = [s for s in tls if s.dport == 143]
    server_tls = [s for s in tls if s.sport == 143]
    # The analyzer has set NONE before the client's ClientHello (the client waits for it).
    assert all(s.payload == b"" and s.tail == b"" for s in client_tls + server_tls)
    # The end is still reported in NONE mode.  (imaplib closes without reading the server's
    # last TLS record, so the session often ends with the client's FIN and then an RST.)
    assert any(s.flags & TcpFlag.FIN for s in after_ok if s.dport == 143)
    assert any(s.flags & (TcpFlag.FIN | TcpFlag.RST) for s in after_ok[-3:])
    assert not cap.policy.modes, "the flow's mode is forgotten when it ends"


COMPRESS_SESSION = r'''
    import socket, zlib
    s = socket.create_connection(({host!r}, 143))
    print(s.getsockname()[1], flush=True)
    f = s.makefile("rb")
    def until(tag):
        while True:
            line = f.readline()
            if line.startswith(tag + b" "):
                return line
    f.readline()
    s.sendall(b"a1 LOGIN alice {password}\r\n"); until(b"a1")
    s.sendall(b"a2 COMPRESS DEFLATE\r\n"); assert b"OK" in until(b"a2")
    out = zlib.compressobj(6, zlib.DEFLATED, -15)
    inflate = zlib.decompressobj(-15)
    got = b""
    def send(cmd):
        s.sendall(out.compress(cmd) + out.flush(zlib.Z_SYNC_FLUSH))
    def until_z(tag):
        global got
        while (b"\r\n" + tag + b" ") not in got:
            got += inflate.decompress(s.recv(65536))
    send(b"a3 SELECT INBOX\r\n"); until_z(b"a3")
    send(b"a4 FETCH 1 (BODY.PEEK[])\r\n"); until_z(b"a4")
    send(b"a5 LOGOUT\r\n"); until_z(b"a5")
    s.close()
    print("done")
'''


def test_after_compress_the_kernel_copies_whole_payloads(lab):
    lab.deliver("alice", MESSAGE)
    with LiveCapture([lab.host_if], {143}, 64, taillen=16) as cap:
        table = FlowTable({143}, policy=cap.policy)
        proc = run_client(COMPRESS_SESSION, host=lab.server4, password=lab.users["alice"])
        segs, (port,) = pump(cap, [proc], table)
        assert cap.counters()["lost"] == 0
    mine = [s for s in segs if port in (s.sport, s.dport)]
    ok = next(s for s in mine if s.sport == 143 and b"a2 OK" in s.payload + s.tail)
    compressed = [s for s in mine[mine.index(ok) + 1:] if s.wire_len > 0]
    assert sum(s.wire_len for s in compressed if s.sport == 143) > 64, "the FETCH must be compressed data"
    # WHOLE from the COMPRESS command on: every compressed byte reached userspace.
    assert all(len(s.payload) == s.wire_len and s.tail == b"" for s in compressed)
