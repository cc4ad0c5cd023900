"""rtnetlink link messages as `LinkMonitor` reads them: built here byte by byte, as the kernel sends them."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from imaptap.capture.live import ordinal
from imaptap.capture.live.interfaces import LinkChange, LinkMessage, parse_link_messages

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
