"""Is the TUI still responsive with many flows and a steady stream of segments?

    scripts/bench-tui [--flows 10000] [--rate 5000] [--seconds 10] [--syn-flood]

Runs the real app headless (Textual's test driver, 160x40) on a synthetic live source: first
--flows IMAP sessions are opened (greeting, LOGIN, SELECT) as fast as the analyzer goes, then
they exchange NOOPs and FETCHes at --rate segments per second, paced against the wall clock,
for --seconds.  Meanwhile the cursor is moved twice a second and the filter is changed once.
It prints what the worker kept up with, how long the UI spent on each batch from it, and how
long a key took to act (queue wait and handling, not drawing).  With --syn-flood the steady
phase is a SYN scan instead: every segment a SYN from a new address, so --rate new flows a
second push the table to --max-flows (32,768) and past it, evicting the oldest.  Costs one core for the
worker and some of another for the UI: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Iterator

from imaptap.segment import PayloadPolicy, Segment, TcpFlag
from imaptap.tui.app import ImaptapApp
from imaptap.tui.feed import Feed, Source

from imaptap_lab.rounds import percentile

SERVER = ("10.255.0.1", 143)
PSH_ACK = int(TcpFlag.PSH | TcpFlag.ACK)
#: Segments produced per pacing step of the steady phase.
STEP = 50
#: The headless terminal, as the screenshot's.
SCREEN = (160, 40)
#: Seconds for every opened flow to show in the table before the run is given up.
SHOWN_TIMEOUT = 300
#: Seconds a key may take to move the cursor before it is counted as done anyway.
KEY_TIMEOUT = 5
#: Seconds the filter may take to apply before the run is given up.
FILTER_TIMEOUT = 30
#: Seconds between two keys: "twice a second".
KEY_INTERVAL = 0.5


class SyntheticLive(Source):
    """Many long sessions; paced like a live capture once they are all open."""

    live = True
    flows_end_with_input = False

    def __init__(self, flows: int, rate: float, seconds: float, syn_flood: bool = False) -> None:
        self.label = f"synthetic {flows} flows @ {rate:.0f} {'SYN' if syn_flood else 'seg'}/s"
        self.syn_flood = syn_flood
        self.ports = frozenset({SERVER[1]})
        self.policy = PayloadPolicy()
        self.flows, self.rate, self.seconds = flows, rate, seconds
        self.setup_seconds = 0.0
        self.steady_segments = 0
        self.steady_seconds = 0.0

    def _client(self, i: int) -> tuple[str, int]:
        return (f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 40000 + i % 20000)

    def segments(self) -> Iterator[Segment | None]:
        seq = {}

        def seg(i: int, side: str, data: bytes, flags: int = PSH_ACK) -> Segment:
            c, s = seq[i]
            client = self._client(i)
            if side == "c":
                seq[i] = (c + len(data), s)
                return Segment(time.time(), 4, client[0], SERVER[0], client[1], SERVER[1], c, s, flags, len(data), data)
            seq[i] = (c, s + len(data))
            return Segment(time.time(), 4, SERVER[0], client[0], SERVER[1], client[1], s, c, flags, len(data), data)

        t0 = time.monotonic()
        for i in range(self.flows):
            seq[i] = (1000, 50000)
            yield seg(i, "s", b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n")
            yield seg(i, "c", f"a1 LOGIN user{i} secret\r\n".encode())
            yield seg(i, "s", b"a1 OK Logged in\r\n")
            yield seg(i, "c", b"a2 SELECT INBOX\r\n")
            yield seg(i, "s", b"* 12 EXISTS\r\na2 OK [READ-WRITE] Select completed.\r\n")
            if i % 100 == 99:
                yield None  # a tick every 500 segments, as a source gives them (pipeline.CHECK_EVERY)
        self.setup_seconds = time.monotonic() - t0
        yield None

        start = time.monotonic()
        n = 0
        tag = 3
        i = 0
        syn = int(TcpFlag.SYN)
        new = self.flows
        while time.monotonic() - start < self.seconds:
            for _ in range(STEP // 2):
                if self.syn_flood:
                    for _ in range(2):
                        client = self._client(new)
                        new += 1
                        yield Segment(time.time(), 4, client[0], SERVER[0], client[1], SERVER[1], 7, 0, syn, 0, b"")
                    continue
                if tag % 2:
                    yield seg(i, "c", f"a{tag} NOOP\r\n".encode())
                    yield seg(i, "s", f"a{tag} OK NOOP completed.\r\n".encode())
                else:
                    yield seg(i, "c", f"a{tag} UID FETCH 1:* (FLAGS)\r\n".encode())
                    yield seg(i, "s", f"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\na{tag} OK Fetch completed.\r\n".encode())
                i = (i + 1) % self.flows
                if i == 0:
                    tag += 1
            n += STEP
            self.steady_segments, self.steady_seconds = n, time.monotonic() - start  # so far
            ahead = n / self.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            yield None
        self.steady_segments = n
        self.steady_seconds = time.monotonic() - start
        while True:  # stay open until the app quits
            time.sleep(0.05)
            yield None


async def bench(args: argparse.Namespace) -> None:
    """Run the app on the synthetic source, move the cursor and filter, and print the figures."""
    source = SyntheticLive(args.flows, args.rate, args.seconds, args.syn_flood)
    app = ImaptapApp(Feed(source))
    batch_ms: list[float] = []
    apply = app._apply

    def timed_apply(update):
        t = time.perf_counter()
        apply(update)
        batch_ms.append((time.perf_counter() - t) * 1000)

    app._apply = timed_apply
    key_ms: list[float] = []
    async with app.run_test(size=SCREEN) as pilot:
        table = app.flows_table
        t0 = time.monotonic()
        while table.row_count < args.flows:
            await asyncio.sleep(0.05)
            if time.monotonic() - t0 > SHOWN_TIMEOUT:
                raise SystemExit("the flows never all showed up")
        shown = time.monotonic() - t0
        setup_batches = len(batch_ms)
        end = time.monotonic() + args.seconds
        filter_ms = None
        expected = sum("user99" in f"user{i}" for i in range(args.flows))
        while time.monotonic() < end:
            before = (table.cursor_row, table.cursor_key)
            t = time.perf_counter()
            app.call_later(table.action_cursor_down)
            # rows come and go under a flood: the cursor moved when its row or its flow changed
            while ((table.cursor_row, table.cursor_key) == before and table.row_count
                   and table.cursor_row != table.row_count - 1 and time.perf_counter() - t < KEY_TIMEOUT):
                await asyncio.sleep(0.001)
            key_ms.append((time.perf_counter() - t) * 1000)
            if filter_ms is None and time.monotonic() > end - args.seconds / 2:
                t = time.perf_counter()
                app.query_one("#filter").value = "user:user99"
                while table.row_count != expected and not (args.syn_flood and table.row_count <= expected):
                    await asyncio.sleep(0.001)
                    if time.perf_counter() - t > FILTER_TIMEOUT:
                        raise SystemExit(f"the filter never applied ({table.row_count} rows)")
                filter_ms = (time.perf_counter() - t) * 1000
            await asyncio.sleep(KEY_INTERVAL)
        await pilot.press("q")
    steady = batch_ms[setup_batches:]
    if args.syn_flood:
        print(f"SYN flood: {source.steady_segments:,} new flows; the worker's table evicted "
              f"{app.feed.table.stats.evicted:,}; {app.store.evicted + app.feed.ended_dropped:,} ended flows let go")
    print(f"flows: {args.flows:,} opened by the worker in {source.setup_seconds:.1f} s, all shown after {shown:.1f} s")
    if source.steady_seconds:
        print(f"steady: {source.steady_segments:,} segments in {source.steady_seconds:.1f} s = "
              f"{source.steady_segments / source.steady_seconds:,.0f} seg/s (target {args.rate:,.0f})")
    else:
        print("steady: the worker never reached its steady phase (it fell behind)")
    if steady:
        print(f"UI per batch (steady): {len(steady)} batches, median {statistics.median(steady):.1f} ms, "
              f"p95 {percentile(steady, 0.95):.1f} ms, max {max(steady):.1f} ms")
    print(f"UI per batch (setup): {setup_batches} batches, max {max(batch_ms[:setup_batches] or [0]):.1f} ms")
    print(f"key to effect: {len(key_ms)} keys, median {statistics.median(key_ms):.1f} ms, "
          f"p95 {percentile(key_ms, 0.95):.1f} ms, max {max(key_ms):.1f} ms")
    if filter_ms is not None:
        print(f"filter user:user99 over {args.flows:,} flows: {filter_ms:.0f} ms to its {expected:,} rows")


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/bench-tui."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flows", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=5000.0, help="segments per second once all flows are open")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--syn-flood", action="store_true", help="steady phase: SYNs from new addresses, not sessions")
    return p


def main(argv: list[str] | None = None) -> int:
    """scripts/bench-tui: run the app headless under the synthetic load and print the figures."""
    asyncio.run(bench(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
