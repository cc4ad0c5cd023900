"""The flow hash of --workers: symmetric, stable, and the same in the C reader as in Python."""

import glob
import os
import socket

import pytest

import imaptap.capture.replay as replay_module
from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.flowshare import FlowShare, flow_hash, share_of
from imaptap.segment import PayloadPolicy
from testenv import OWN_PCAPS, accelerator, accelerator_params, public_pcap_paths

ENDPOINTS = [("10.0.0.1", 40000, "10.0.0.2", 143), ("10.0.0.2", 143, "10.0.0.2", 144),
             ("192.168.1.10", 143, "192.168.1.9", 143), ("fd00::1", 51000, "fd00::2", 143),
             ("::ffff:10.1.2.3", 143, "2001:db8::7", 61000)]


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h = ((h ^ byte) * 16777619) % 2**32
    return h


@pytest.mark.parametrize("src, sport, dst, dport", ENDPOINTS)
def test_both_directions_hash_alike(src, sport, dst, dport):
    assert flow_hash(src, sport, dst, dport) == flow_hash(dst, dport, src, sport)


def test_the_hash_is_fnv1a_over_the_lower_endpoint_then_the_higher():
    # As documented in flowshare.py (and README, Workers): a user can compute it by hand.
    lower = bytes([10, 0, 0, 1]) + (40000).to_bytes(2, "big")
    higher = bytes([10, 0, 0, 2]) + (143).to_bytes(2, "big")
    assert flow_hash("10.0.0.2", 143, "10.0.0.1", 40000) == fnv1a(lower + higher)
    six = socket.inet_pton(socket.AF_INET6, "fd00::1") + (143).to_bytes(2, "big")
    six_high = socket.inet_pton(socket.AF_INET6, "fd00::1") + (50000).to_bytes(2, "big")
    assert flow_hash("fd00::1", 50000, "fd00::1", 143) == fnv1a(six + six_high)


def test_ports_and_addresses_both_change_the_hash():
    hashes = {flow_hash("10.0.0.1", port, "10.0.0.2", 143) for port in range(40000, 40064)}
    assert len(hashes) == 64
    shares = [sum(1 for port in range(40000, 42000) if flow_hash("10.0.0.1", port, "10.0.0.2", 143) % 3 == i)
              for i in range(3)]
    assert min(shares) > 500, shares  # spread, not all on one worker


def test_even_client_ports_of_one_host_spread_over_a_power_of_two_workers():
    # Linux gives connect() even ports: the low bit of FNV-1a follows the parity of every byte,
    # so without the mixing the even ports of one high byte would all go to one of two workers
    even = range(0x9C00, 0x9D00, 2)
    assert len({flow_hash("10.0.0.1", port, "10.0.0.2", 143) % 2 for port in even}) == 1
    for workers in (2, 4, 8):
        shares = [sum(1 for port in even if share_of(flow_hash("10.0.0.1", port, "10.0.0.2", 143), workers) == i)
                  for i in range(workers)]
        assert min(shares) > 0.5 * len(even) / workers, shares


def test_a_share_names_its_worker():
    with pytest.raises(ValueError):
        FlowShare(2, 2)
    with pytest.raises(ValueError):
        FlowShare(0, 0)


CLASSIC = sorted(glob.glob(os.path.join(OWN_PCAPS, "*.pcap"))) + public_pcap_paths("**/*.pcap")


def _items(path, share, accelerated):
    """What the reader yields with ``share``: segments, and the times of the others' segments."""
    stats = ReplayStats()
    with accelerator(replay_module, "_pcapfast", accelerated), open_capture(path) as reader:
        items = list(reader.segments(None, PayloadPolicy(), stats, share=share))
    return items, stats


@pytest.mark.parametrize("path", CLASSIC)
@pytest.mark.parametrize("workers", [2, 3])
def test_c_and_python_readers_share_the_flows_alike(path, workers):
    whole, whole_stats = _items(path, None, False)
    owned = []
    for index in range(workers):
        got = {}
        for accelerated in (True, False):
            if accelerated and replay_module._pcapfast is None:
                continue
            share = FlowShare(workers, index)
            share.wake = float("-inf")  # every other worker's segment: its time handed over
            items, stats = _items(path, share, accelerated)
            got[accelerated] = (items, share.skipped, stats)
        (items, skipped, stats), *others = got.values()
        for other in others:
            assert other == (items, skipped, stats)
        segments = [s for s in items if not isinstance(s, float)]
        assert all(share_of(flow_hash(s.src, s.sport, s.dst, s.dport), workers) == index for s in segments)
        assert len(items) == len(whole) and skipped == len(whole) - len(segments)
        # the reader's counts are those of the whole file: any worker's stats record is one process's
        assert stats == whole_stats
        # a time in the place of each other worker's segment
        assert items == \
            [s.ts if share_of(flow_hash(s.src, s.sport, s.dst, s.dport), workers) != index else s for s in whole]
        owned += segments
    assert sorted(owned) == sorted(whole)


@pytest.mark.parametrize("accelerated", accelerator_params(replay_module, "_pcapfast"))
def test_only_times_from_the_wake_on_are_handed_over(accelerated):
    path = os.path.join(OWN_PCAPS, "password-spraying.pcap")
    whole, _ = _items(path, None, False)
    middle = whole[len(whole) // 2].ts
    share = FlowShare(2, 0)
    share.wake = middle
    items, _ = _items(path, share, accelerated)
    others = [s.ts for s in whole if share_of(flow_hash(s.src, s.sport, s.dst, s.dport), 2) == 1]
    assert others, "a capture with flows on both workers"
    assert [t for t in items if isinstance(t, float)] == [t for t in others if t >= middle]
    assert share.skipped == len(others)
