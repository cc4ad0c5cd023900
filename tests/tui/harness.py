"""The TUI test bench: an app factory over a capture file or segments, sources a test drives.

Every app here has a frozen clock, so rates, elapsed times and ages depend only on the capture.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator

from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.imap.audit import PasswordFingerprint
from imaptap.segment import PayloadPolicy, Segment
from imaptap.testing import conversation
from imaptap.tui.app import ImaptapApp
from imaptap.tui.feed import Feed, MemorySource, ReplaySource, Source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN_PCAPS = os.path.join(ROOT, "pcaps")

#: Every snapshot and Pilot test runs at this terminal size.
SIZE = (160, 40)


def frozen() -> float:
    return 0.0


def pcap(name: str) -> str:
    path = os.path.join(OWN_PCAPS, name)
    assert os.path.exists(path), f"missing capture {path} (scripts/make-captures)"
    return path


def pcap_ports(name: str) -> tuple[int, ...]:
    with open(os.path.join(OWN_PCAPS, "facts.json")) as f:
        return tuple(json.load(f)[name]["ports"])


def replay_app(name: str) -> ImaptapApp:
    """The app replaying one of pcaps/."""
    source = ReplaySource(pcap(name), pcap_ports(name), label=f"pcaps/{name}")  # the same in every checkout
    return ImaptapApp(Feed(source, clock=frozen, wallclock=frozen))


#: A fixed password-fingerprint key: the fingerprints on screen are the same in every run.
FINGERPRINT = PasswordFingerprint(bytes(range(200, 232)))
#: Captures one run of make-captures made together: a few seconds of one client address, which
#: shows all three password attacks, LOGINDISABLED ignored and a STARTTLS injection.
LAB_RUN = ("logindisabled.pcap", "starttls-injection.pcap", "brute-force.pcap", "password-spraying.pcap",
           "credential-stuffing.pcap")


def segments_app(segments: Iterable[Segment], ports: Iterable[int] = (143,), close: bool = True,
                 label: str = "test", fingerprint: bool = False) -> ImaptapApp:
    return ImaptapApp(Feed(MemorySource(segments, ports, label=label, open_at_end=not close),
                           clock=frozen, wallclock=frozen, password_fingerprint=FINGERPRINT if fingerprint else None))


def lab_run_app() -> ImaptapApp:
    return segments_app(all_captures(LAB_RUN), ports=all_ports(), label="pcaps/ of one lab run", fingerprint=True)


def all_captures(names: Iterable[str] | None = None) -> list[Segment]:
    """Every capture of pcaps/ (or those named) in one time line (each replay's own payloads, uncut)."""
    segs: list[Segment] = []
    whole = PayloadPolicy(1 << 30)
    with open(os.path.join(OWN_PCAPS, "facts.json")) as f:
        facts = json.load(f)
    for name in sorted(names or facts):
        reader = open_capture(pcap(name))
        try:
            segs.extend(reader.segments(set(facts[name]["ports"]), whole, ReplayStats()))
        finally:
            reader.close()
    segs.sort(key=lambda s: s.ts)
    return segs


def all_ports() -> set[int]:
    with open(os.path.join(OWN_PCAPS, "facts.json")) as f:
        return {p for v in json.load(f).values() for p in v["ports"]}


async def settle(pilot, timeout: float = 20.0) -> None:
    """Wait until the app has applied the worker's last update, then until it is drawn."""
    app = pilot.app
    deadline = time.monotonic() + timeout
    while not app.capture_complete:
        assert time.monotonic() < deadline, "the capture never finished"
        await pilot.pause(0.02)
    await pilot.pause()


async def wait_for(pilot, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await pilot.pause(0.02)


def login(user: str, i: int, ok: bool = True, port: int = 143, greeting: bytes = b"* OK Dovecot ready.\r\n",
          extra: list[tuple[str, bytes]] | None = None, close: bool = True,
          ts: float = 1_700_000_000.0) -> list[Segment]:
    """One connection: greeting, LOGIN user (OK or NO), then ``extra``."""
    parts = [("s", greeting), ("c", f"a1 LOGIN {user} secret{i}\r\n".encode()),
             ("s", b"a1 OK Logged in\r\n" if ok else b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")]
    return conversation(parts + (extra or []), client=(f"10.0.{i // 250}.{i % 250 + 1}", 40000 + i % 20000),
                        server=("10.1.0.1", port), close=close, ts=ts + i * 0.01)


def mixed_flows() -> list[Segment]:
    """alice logs in, bob fails, carol goes TLS, dave on port 10143, erin stays open."""
    segs = login("alice", 1, extra=[("c", b"a2 SELECT INBOX\r\n"), ("s", b"a2 OK [READ-WRITE] Select completed\r\n")])
    segs += login("bob", 2, ok=False)
    segs += conversation([("s", b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n"),
                          ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK Begin TLS negotiation now.\r\n"),
                          ("c", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))],
                         client=("10.0.0.4", 40003), server=("10.1.0.1", 143), ts=1_700_000_000.03)
    segs += login("dave", 4, port=10143)
    segs += login("erin", 5, close=False)
    segs.sort(key=lambda s: s.ts)
    return segs


class StepSource(Source):
    """A source that never ends: the test hands it lists of segments; it records entering and leaving."""

    def __init__(self, ports: Iterable[int] = (143,), counters: dict[str, int] | None = None) -> None:
        self.label = "step"
        self.ports = frozenset(ports)
        self.policy = PayloadPolicy()
        self.queue: queue.Queue = queue.Queue()
        self.entered = False
        self.left = False
        self.fake_counters = counters

    def segments(self) -> Iterator[Segment | None]:
        self.entered = True
        try:
            while True:
                try:
                    yield from self.queue.get(timeout=0.01)
                except queue.Empty:
                    pass
                yield None
        finally:
            self.left = True

    def counters(self) -> dict[str, int] | None:
        return self.fake_counters


def step_app(source: StepSource) -> ImaptapApp:
    # Updates at 20 Hz: quick enough for the tests, idle enough for Pilot's wait for idleness.
    return ImaptapApp(Feed(source, clock=time.monotonic, wallclock=frozen, flush_interval=0.05))


def run(coro) -> None:
    asyncio.run(coro)
