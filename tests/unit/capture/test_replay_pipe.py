"""Replay from a pipe (replay.py): no seeking, pcap and pcapng alike, whatever the writes' sizes,
ticks while the writer is quiet, and a pipe cut mid-record told as a truncated file."""

import io
import os
import random
import threading
import time

import dpkt
import pytest

from imaptap.capture.replay import PIPE_WAIT, CaptureFileError, ReplayStats, open_capture
from imaptap.segment import PayloadPolicy
from testenv import OWN_PCAPS

CAPTURE = os.path.join(OWN_PCAPS, "failed-login.pcap")


def as_pcapng(path: str) -> bytes:
    out = io.BytesIO()
    writer = dpkt.pcapng.Writer(out)
    with open(path, "rb") as f:
        for ts, frame in dpkt.pcap.Reader(f):
            writer.writepkt(frame, ts)
    return out.getvalue()


def from_file(path: str) -> list:
    with open_capture(path) as reader:
        return list(reader.segments({143}, PayloadPolicy(), ReplayStats()))


def feed(data: bytes, chunks: list[int], pause: float = 0.0, close: bool = True) -> int:
    """A pipe's read end; a thread writes ``data`` into it in pieces of the given sizes."""
    r, w = os.pipe()

    def write():
        pos = 0
        try:
            for i, n in enumerate(chunks):
                os.write(w, data[pos:pos + n])
                pos += n
                if pause and i == 1:
                    time.sleep(pause)
            if pos < len(data):
                os.write(w, data[pos:])
        except BrokenPipeError:
            pass  # the reader stopped first (not a capture): nothing more to say
        finally:
            if close:
                os.close(w)

    threading.Thread(target=write, daemon=True).start()
    return r


def drips(total: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    out = [1, 1, 2, 3]  # the first reads see only part of the file header
    while sum(out) < total:
        out.append(rnd.choice([1, 7, 60, 500, 4000]))
    return out


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_pipe_gives_what_the_file_gives(kind, seed, tmp_path):
    data = open(CAPTURE, "rb").read() if kind == "pcap" else as_pcapng(CAPTURE)
    path = tmp_path / f"c.{kind}"
    path.write_bytes(data)
    want = from_file(str(path))
    assert len(want) > 10
    with open_capture("piped", feed(data, drips(len(data), seed))) as reader:
        assert not reader.seekable and reader.size is None
        got = [s for s in reader.segments({143}, PayloadPolicy(), ReplayStats()) if s is not None]
    assert got == want


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_quiet_pipe_gives_ticks_and_the_rest_after(kind):
    data = open(CAPTURE, "rb").read() if kind == "pcap" else as_pcapng(CAPTURE)
    fd = feed(data, [24 if kind == "pcap" else 200, 300], pause=5 * PIPE_WAIT)
    with open_capture("piped", fd) as reader:
        items = list(reader.segments({143}, PayloadPolicy(), ReplayStats(), ticks=True))
    segments = [s for s in items if s is not None]
    assert len(segments) == len(from_file(CAPTURE)) and items.count(None) >= 3


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_a_pipe_cut_mid_record_is_a_truncated_file(kind):
    data = open(CAPTURE, "rb").read() if kind == "pcap" else as_pcapng(CAPTURE)
    cut = data[: len(data) // 2 + 3]
    with open_capture("piped", feed(cut, [len(cut)])) as reader:
        got = []
        with pytest.raises(CaptureFileError, match="piped: truncated"):
            for seg in reader.segments({143}, PayloadPolicy(), ReplayStats()):
                got.append(seg)
    assert got  # what came before the cut is replayed


def test_a_pipe_that_is_no_capture_is_one_line():
    with pytest.raises(CaptureFileError, match="piped: not a pcap or pcapng file"):
        open_capture("piped", feed(b"hello there\n" * 3, [5]))
