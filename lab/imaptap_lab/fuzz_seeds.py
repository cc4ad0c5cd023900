"""Seed inputs for the fuzz targets, made from the project's and the public captures."""

from __future__ import annotations

import glob
import os

from imaptap.capture.replay import CaptureFileError, ReplayStats, open_capture
from imaptap.segment import PayloadPolicy, TcpFlag

from imaptap_lab.checkout import PCAP_DIR, ROOT
from imaptap_lab.fuzz_targets import encode_feed

#: The third-party captures, where the test suite finds them (tests/testenv.py, README "Tests").
PUBLIC_PCAPS = os.environ.get("IMAPTAP_PUBLIC_PCAPS", os.path.join(os.path.dirname(ROOT), "shared", "pcaps-public"))
OWN_PCAPS = str(PCAP_DIR)
#: Zeek's IMAP fuzz corpus: raw stream chunks, each after b"\x01PKT" and a direction byte.
ZEEK_CORPUS = os.path.join(PUBLIC_PCAPS, "zeek", "fuzz-corpus")
_PKT = b"\x01PKT"
#: A snap length past any segment: seeds are made from whole payloads.
WHOLE_PAYLOADS = 1 << 30


def capture_paths() -> list[str]:
    """Every pcap/pcapng file of pcaps/ and the public captures, sorted."""
    own = glob.glob(os.path.join(OWN_PCAPS, "*.pcap"))
    public = [p for p in glob.glob(os.path.join(PUBLIC_PCAPS, "**", "*.pcap*"), recursive=True)
              if not p.endswith((".pkt", ".out"))]
    return sorted(own + public)


def zeek_paths() -> list[str]:
    """Every entry of Zeek's IMAP fuzz corpus, sorted (none where the public captures are absent)."""
    return sorted(glob.glob(os.path.join(ZEEK_CORPUS, "imap-000*.pcap.pkt")))


def zeek_to_stream(raw: bytes) -> bytes:
    """A Zeek corpus entry as imap_stream operations (direction 1: client, 2: server)."""
    out = bytearray()
    for chunk in raw.split(_PKT):
        if not chunk:
            continue
        out += encode_feed(chunk[0] == 2, chunk[1:])
    return bytes(out)


def capture_to_streams(path: str) -> list[bytes]:
    """One imap_stream input per TCP connection of a capture: its payloads in file order."""
    flows: dict[tuple, tuple[tuple, bytearray]] = {}
    try:
        with open_capture(path) as reader:
            for s in reader.segments(None, PayloadPolicy(WHOLE_PAYLOADS, 0), ReplayStats()):
                key = tuple(sorted([(s.src, s.sport), (s.dst, s.dport)]))
                if key not in flows:
                    # The SYN's sender is the client; else guess the side on the lower port is the server.
                    if s.flags & TcpFlag.SYN and not s.flags & TcpFlag.ACK:
                        client = (s.src, s.sport)
                    else:
                        client = max((s.src, s.sport), (s.dst, s.dport), key=lambda a: a[1])
                    flows[key] = (client, bytearray())
                client, ops = flows[key]
                if s.payload:
                    ops += encode_feed((s.src, s.sport) != client, s.payload)
    except CaptureFileError:
        pass
    return [bytes(ops) for _, ops in flows.values() if ops]


def stream_seeds() -> list[bytes]:
    """Seeds of imap_stream: every connection of every capture, and every Zeek corpus entry."""
    seeds = []
    for path in capture_paths():
        seeds += capture_to_streams(path)
    for path in zeek_paths():
        with open(path, "rb") as f:
            seeds.append(zeek_to_stream(f.read()))
    return seeds


def file_seeds() -> list[bytes]:
    """Seeds of capture_file: every capture file as it is."""
    seeds = []
    for path in capture_paths():
        with open(path, "rb") as f:
            seeds.append(f.read())
    return seeds


SEEDS = {"imap_stream": stream_seeds, "capture_file": file_seeds}
