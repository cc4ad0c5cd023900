"""Output files logrotate can move away: appending, and reopening between records on SIGUSR1.

The replay test runs Debian's logrotate itself in the middle of a run, with a postrotate
script that signals this process, through the command line's own handler.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from functools import partial

import pytest

from imaptap import cli
from imaptap.capture.pcapwrite import FILE_HEADER, MaskingWriter, SegmentWriter, open_for_append
from imaptap.capture.replay import ReplayStats, open_capture
from imaptap.output.jsonl import JsonlSink, JsonlWriter
from imaptap.output.rotation import NotAppendable, ReopenSink
from imaptap.output.rotation import open_for_append as open_jsonl_for_append
from imaptap.pipeline import Pipeline, Source
from imaptap.segment import PayloadPolicy
from imaptap.testing import conversation
from testenv import IN_CI, OWN_PCAPS

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
PORTS = frozenset(p for spec in FACTS.values() for p in spec["ports"])
CAPTURES = sorted(FACTS)
#: After which captures of the run logrotate rotates the files.
ROTATE_AFTER = (3, 9, 15)
#: Seconds the postrotate's signal may take to arrive.
SIGNAL_WAIT = 10.0


# --- appending -----------------------------------------------------------------------------------


def test_appending_cuts_a_last_line_cut_short_and_keeps_the_whole_ones(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    with open_jsonl_for_append(str(path)) as f:
        f.write('{"d":4}\n')
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n{"d":4}\n'
    path.write_bytes(b'{"cut short, and no newline at all"')
    with open_jsonl_for_append(str(path)) as f:
        f.write('{"e":5}\n')
    assert path.read_bytes() == b'{"e":5}\n'
    new = tmp_path / "new.jsonl"
    with open_jsonl_for_append(str(new)) as f:
        f.write("{}\n")
    assert new.read_bytes() == b"{}\n"


def test_a_line_longer_than_the_scan_block_is_found_whole(tmp_path):
    path = tmp_path / "out.jsonl"
    long_line = b'{"x":"' + b"y" * 200_000 + b'"}\n'
    path.write_bytes(long_line + b'{"cut')
    with open_jsonl_for_append(str(path)) as f:
        f.write("{}\n")
    assert path.read_bytes() == long_line + b"{}\n"


def segments_of(name: str, policy: PayloadPolicy | None = None) -> list:
    reader = open_capture(os.path.join(OWN_PCAPS, name))
    return list(reader.segments(set(PORTS), policy or PayloadPolicy(65535, 0), ReplayStats()))


def replayed(path) -> list:
    return list(open_capture(path).segments(None, PayloadPolicy(65535, 0), ReplayStats()))


def test_a_pcap_is_appended_to_a_record_cut_short_is_cut_off_and_a_foreign_file_is_refused(tmp_path):
    segs = segments_of("login-atom.pcap")
    path = tmp_path / "w.pcap"
    w = SegmentWriter(str(path))
    for s in segs[:5]:
        w.write(s)
    w.close()
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03\x04" * 7)  # a record header and a little of its data: a killed run
    w = SegmentWriter(str(path), append=True)
    for s in segs[5:]:
        w.write(s)
    w.close()
    assert path.stat().st_size > whole
    assert [s.payload for s in replayed(path)] == [s.payload for s in segs]
    foreign = tmp_path / "foreign.pcap"
    foreign.write_bytes(open(os.path.join(OWN_PCAPS, "login-atom.pcap"), "rb").read())  # Ethernet, not raw IP
    with pytest.raises(NotAppendable, match="not a pcap file as imaptap writes them"):
        open_for_append(str(foreign))
    assert foreign.read_bytes() == open(os.path.join(OWN_PCAPS, "login-atom.pcap"), "rb").read()
    short = tmp_path / "short.txt"
    short.write_bytes(b"notes\n")  # shorter than a header, and not one
    with pytest.raises(NotAppendable):
        open_for_append(str(short))
    for start in (b"", FILE_HEADER[:10]):  # empty, or a header cut short: a new file
        empty = tmp_path / "empty.pcap"
        empty.write_bytes(start)
        open_for_append(str(empty)).close()
        assert empty.read_bytes() == FILE_HEADER


def test_append_from_the_command_line_keeps_both_runs(imaptap, tmp_path):
    out, pcap = tmp_path / "out.jsonl", tmp_path / "w.pcap"
    capture = os.path.join(OWN_PCAPS, "login-atom.pcap")
    for _ in range(2):
        r = imaptap("-r", capture, "--json", str(out), "-w", str(pcap), "--append")
        assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["type"] for r in records].count("stats") == 2
    assert [r["username"] for r in records if r["type"] == "flow"] == ["alice", "alice"]
    assert len(replayed(pcap)) == 2 * records[-1]["written"]
    # without --append, the files are replaced
    r = imaptap("-r", capture, "--json", str(out), "-w", str(pcap))
    assert [json.loads(line)["type"] for line in out.read_text().splitlines()].count("stats") == 1


def test_append_to_a_foreign_w_file_is_one_line_and_status_2(imaptap, tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    r = imaptap("-r", os.path.join(OWN_PCAPS, "login-atom.pcap"), "--json", "-", "-w", str(foreign), "--append")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot append to" in r.stderr
    assert foreign.read_text() == "my notes\n"


# --- reopening -----------------------------------------------------------------------------------


class Captures(Source):
    """Every capture of pcaps/ one after another, a tick after each; ``between(i)`` runs after
    capture ``i`` and before its tick, as if the signal came while the replay went on."""

    def __init__(self, between):
        self.between = between
        self.ports = PORTS
        self.policy = PayloadPolicy(256, 128)

    def segments(self):
        for i, name in enumerate(CAPTURES):
            yield from segments_of(name, self.policy)
            self.between(i)
            yield None


def run(tmp_path, between) -> tuple[str, MaskingWriter]:
    """The capture run through the command line's sinks into out.jsonl and out.pcap."""
    path = str(tmp_path / "out.jsonl")
    writer = JsonlWriter(open(path, "w", encoding="utf-8"), path, partial(open_jsonl_for_append, path))
    pcap = MaskingWriter(str(tmp_path / "out.pcap"), PORTS)
    cli._reopen.clear()
    sinks = [JsonlSink(writer), ReopenSink(cli._reopen.__len__, [writer], pytest.fail)]
    pipeline = Pipeline(Captures(between), sinks, pcap_writer=pcap)
    pipeline.run()
    writer.stats({k: v for k, v in pipeline.stats().items() if k != "seconds"})
    writer.flush()
    writer.out.close()
    return path, pcap


def logrotate_config(tmp_path) -> str:
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"""\
{tmp_path}/out.jsonl {tmp_path}/out.pcap {{
    rotate 10
    missingok
    nocompress
    sharedscripts
    postrotate
        kill -USR1 {os.getpid()}
    endscript
}}
""")
    conf.chmod(0o644)
    return str(conf)


@pytest.fixture
def logrotate():
    tool = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
    if tool is None:
        if IN_CI:
            pytest.fail("CI=true and logrotate is missing (scripts/setup installs it)", pytrace=False)
        pytest.skip("needs logrotate (Debian package logrotate)")
    return tool


def test_logrotate_during_a_replay_moves_whole_records_and_loses_none(tmp_path, logrotate):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference, reference_pcap = run(reference_dir, lambda i: None)

    rotated_dir = tmp_path / "rotated"
    rotated_dir.mkdir()
    conf, state = logrotate_config(rotated_dir), str(rotated_dir / "state")
    old = signal.signal(cli.REOPEN_SIGNAL, cli._on_reopen)

    def rotate(i: int) -> None:
        if i not in ROTATE_AFTER:
            return
        asked = len(cli._reopen)
        r = subprocess.run([logrotate, "-f", "-s", state, conf], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + SIGNAL_WAIT
        while len(cli._reopen) == asked:  # the postrotate's kill, delivered to this process
            assert time.monotonic() < deadline, "the postrotate signal did not arrive"
            time.sleep(0.01)

    try:
        path, pcap = run(rotated_dir, rotate)
    finally:
        signal.signal(cli.REOPEN_SIGNAL, old)

    generations = [f"{path}.{n}" for n in range(len(ROTATE_AFTER), 0, -1)] + [path]
    assert all(os.path.exists(p) for p in generations), sorted(os.listdir(rotated_dir))
    texts = [open(p, encoding="utf-8").read() for p in generations]
    for text in texts:  # each file is JSON Lines by itself, every record whole
        assert text and text.endswith("\n")
        for line in text.splitlines():
            json.loads(line)
    # Oldest first, the files hold exactly what one file holds without rotation.
    assert "".join(texts) == open(reference, encoding="utf-8").read()

    pcaps = [f"{pcap.name}.{n}" for n in range(len(ROTATE_AFTER), 0, -1)] + [pcap.name]
    raws = [open(p, "rb").read() for p in pcaps]
    for p, raw in zip(pcaps, raws, strict=True):
        assert raw.startswith(FILE_HEADER)
        replayed(p)  # each one valid by itself
    assert sum(len(replayed(p)) for p in pcaps) == pcap.records == reference_pcap.records
    assert FILE_HEADER + b"".join(raw[len(FILE_HEADER):] for raw in raws) == open(reference_pcap.name, "rb").read()


def test_a_file_that_cannot_be_reopened_stays_in_use_and_says_so_once(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(open(path, "w", encoding="utf-8"), str(path), partial(open_jsonl_for_append, str(path)))
    warnings: list[str] = []
    asked: list[int] = []

    class Twice(Source):
        ports = frozenset({143})
        policy = PayloadPolicy(256, 128)

        def segments(self):
            yield from conversation([("s", b"* OK ready\r\n")], close=False)
            os.rename(path, tmp_path / "out.jsonl.1")
            os.mkdir(path)  # logrotate moved it, and no new file can take its place (root too)
            asked.append(1)
            yield None
            yield from conversation([("s", b"* OK again\r\n")], client=("192.0.2.11", 40001))

    Pipeline(Twice(), [JsonlSink(writer), ReopenSink(asked.__len__, [writer], warnings.append)]).run()
    writer.flush()
    (line,) = warnings
    assert line.startswith(f"cannot reopen {path}: ") and line.endswith("still writing to the file it had open")
    records = [json.loads(x) for x in open(tmp_path / "out.jsonl.1").read().splitlines()]
    assert sorted(r["greeting"] for r in records if r["type"] == "flow") == ["again", "ready"]
