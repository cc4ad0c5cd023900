"""rtnetlink link messages as `LinkMonitor` reads them: built here byte by byte, as the kernel sends them."""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imaptap.capture.live import ordinal
from imaptap.capture.live.interfaces import (
    LINK_READ_BYTES,
    LinkChange,
    LinkMessage,
    LinkMonitor,
    parse_link_messages,
)

IFF_UP, IFF_RUNNING = 0x1, 0x40


def rtattr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def link_message(mtype: int, index: int, flags: int, name: str | None, extra: bytes = b"") -> bytes:
    attrs = extra + (rtattr(3, name.encode() + b"\0") if name is not None else b"")  # IFLA_IFNAME
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0xFFFFFFFF) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def test_new_and_deleted_links_with_names_and_flags():
    mtu = rtattr(4, struct.pack("=I", 1500))  # IFLA_MTU before the name, as the kernel orders them
    data = (link_message(16, 7, IFF_UP | IFF_RUNNING, "itap3h", mtu) + link_message(16, 7, IFF_UP, "itap3h")
            + link_message(17, 7, 0, "itap3h"))
    assert parse_link_messages(data) == [
        LinkMessage(LinkChange.NEW, 7, "itap3h", IFF_UP | IFF_RUNNING),
        LinkMessage(LinkChange.NEW, 7, "itap3h", IFF_UP),
        LinkMessage(LinkChange.DEL, 7, "itap3h", 0),
    ]
    new, carrier_lost, _ = parse_link_messages(data)
    assert new.usable and not carrier_lost.usable


def test_other_messages_are_skipped_and_a_name_may_be_missing():
    done = struct.pack("=IHHII", 20, 3, 0, 0, 0) + b"\0" * 4  # NLMSG_DONE
    data = done + link_message(16, 9, 0, None)
    assert parse_link_messages(data) == [LinkMessage(LinkChange.NEW, 9, None, 0)]


def test_a_cut_message_ends_the_list_without_an_error():
    whole = link_message(16, 7, IFF_UP, "itap3h")
    assert parse_link_messages(whole + whole[:-3]) == [LinkMessage(LinkChange.NEW, 7, "itap3h", IFF_UP)]
    bad_attr = link_message(16, 8, 0, None, extra=struct.pack("=HH", 200, 3))  # longer than the message
    assert parse_link_messages(bad_attr) == [LinkMessage(LinkChange.NEW, 8, None, 0)]
    assert parse_link_messages(struct.pack("=IHHII", 0, 16, 0, 0, 0)) == []  # a zero length cannot loop


@given(st.binary(max_size=400))
def test_any_bytes_give_a_list(data):
    assert all(isinstance(m, LinkMessage) for m in parse_link_messages(data))


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111, 112)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th", "112th"]


def test_monitor_reads_each_datagram_whole_from_its_one_buffer():
    if os.geteuid() != 0:
        pytest.skip("sending to another netlink socket takes CAP_NET_ADMIN")
    monitor = LinkMonitor()
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        port = monitor._sock.getsockname()[0]
        long_name = link_message(16, 7, IFF_UP | IFF_RUNNING, "a-long-interface-name" * 4)
        short_name = link_message(17, 9, 0, "v0")
        sender.sendto(long_name, (port, 0))
        sender.sendto(short_name, (port, 0))
        # The second, shorter datagram lands in the same buffer: nothing of the first may show.
        assert monitor.read() == [LinkMessage(LinkChange.NEW, 7, "a-long-interface-name" * 4, IFF_UP | IFF_RUNNING),
                                  LinkMessage(LinkChange.DEL, 9, "v0", 0)]
        assert monitor.read() == []
    finally:
        sender.close()
        monitor.close()


def test_monitor_allocates_nothing_large_while_nothing_comes():
    # read() runs before every poll of a capture; a fresh 64 KiB object per call fragmented
    # glibc's heap under load (README, Soak).
    monitor = LinkMonitor()
    try:
        monitor.read()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            for _ in range(100):
                assert monitor.read() == []
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < LINK_READ_BYTES // 16
    finally:
        monitor.close()
