"""--workers N: the same bytes as one process on every capture, and the same errors.

The bench captures (out/bench-replay-3000-*.pcap, made by scripts/bench-replay) are compared
by scripts/bench-workers, which checks the outputs it times.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import imaptap.capture.replay as replay_module
from imaptap import cli
from testenv import OWN_PCAPS, ROOT, accelerator, accelerator_params, public_pcap_paths

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))
CAPTURES = [pytest.param((os.path.join(OWN_PCAPS, name), spec["ports"]), id=name)
            for name, spec in sorted(FACTS.items())]
CAPTURES += [pytest.param((path, [143]), id=os.path.relpath(path, os.path.dirname(os.path.dirname(path))))
             if isinstance(path, str) else pytest.param((path.values[0], [143]), marks=path.marks, id=path.id)
             for path in public_pcap_paths()]
#: Option sets: the defaults; rounds of flow_update records and flows that end idle within the
#: capture (the clock of every worker follows the others' segments); flows only, cut short.
OPTIONS = {"default": [], "rounds": ["--flow-interval", "0.5", "--idle-timeout", "2"],
           "flows-only": ["--flows-only", "-s", "40", "--tail", "0"]}


def _without_seconds(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines and lines[-1].startswith('{"type":"stats"'), lines[-1:]
    stats = json.loads(lines[-1])
    del stats["seconds"]
    return lines[:-1] + [json.dumps(stats)]


def _run(tmp_path, path, ports, options, workers):
    out = tmp_path / f"out-{workers}.jsonl"
    args = ["-r", path, "--json", str(out), *[a for p in ports for a in ("--port", str(p))], *options,
            "--workers", str(workers)]
    status = cli.main(args)
    return status, _without_seconds(out.read_text())


@pytest.mark.parametrize("accelerated", accelerator_params(replay_module, "_pcapfast"))
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("capture", CAPTURES)
def test_workers_write_the_bytes_of_one_process(tmp_path, capture, options, accelerated):
    path, ports = capture
    with accelerator(replay_module, "_pcapfast", accelerated):
        status, one = _run(tmp_path, path, ports, options, 1)
        for workers in (2, 3):
            assert _run(tmp_path, path, ports, options, workers) == (status, one), workers
    if options == OPTIONS["rounds"] and path.endswith("arkime/imap.pcap"):
        # the capture exercises what the merge key orders: flows ending idle, rounds of updates
        records = [json.loads(line) for line in one]
        assert records[-1]["expired"] > 1 and sum(r["type"] == "flow_update" for r in records) > 1


REPORT_OPTIONS = {"report": ["--report", "--format", "json"],
                  "gate": ["--json", "-", "--fail-on", "any"]}


@pytest.mark.parametrize("options", REPORT_OPTIONS.values(), ids=REPORT_OPTIONS.keys())
@pytest.mark.parametrize("capture", CAPTURES)
def test_the_report_and_the_gate_are_those_of_one_process(capture, options):
    path, ports = capture
    args = ["-r", path, *[a for p in ports for a in ("--port", str(p))], *options]
    one = _imaptap(*args)
    for workers in (3,):  # 2 and 3 alike in the test above; this one runs whole commands
        more = _imaptap(*args, "--workers", str(workers))
        assert (more.returncode, more.stderr) == (one.returncode, one.stderr)
        if "--report" in options:
            assert more.stdout == one.stdout
        else:
            assert _without_seconds(more.stdout) == _without_seconds(one.stdout)


def _imaptap(*args):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    return subprocess.run([sys.executable, "-m", "imaptap", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)


def _same_failure(*args):
    one, two = _imaptap(*args, "--json", "-"), _imaptap(*args, "--json", "-", "--workers", "2")
    assert (two.returncode, two.stderr) == (one.returncode, one.stderr)
    assert _without_seconds(two.stdout) == _without_seconds(one.stdout)
    return one


def test_a_missing_file_fails_as_in_one_process(tmp_path):
    one = _same_failure("-r", str(tmp_path / "missing.pcap"))
    assert one.returncode == 2 and one.stderr.count("\n") == 1 and "No such file" in one.stderr


def test_a_cut_file_gives_what_came_before_then_the_error_as_in_one_process(tmp_path):
    data = open(os.path.join(OWN_PCAPS, "password-spraying.pcap"), "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    one = _same_failure("-r", str(cut))
    assert one.returncode == 2 and "truncated packet record" in one.stderr
    assert '"type":"message"' in one.stdout


@pytest.mark.parametrize("args, what", [
    (["-r", "-"], "a pipe"),
    (["-r", "{tmp}/fifo"], "a pipe"),
    (["-w", "{tmp}/copy.pcap"], "-w"),
    (["--metrics", "0"], "--metrics"),
    (["--json-format", "ecs"], "--json-format ecs"),
])
def test_what_workers_do_not_share_yet_is_a_usage_error(tmp_path, args, what):
    os.mkfifo(tmp_path / "fifo")  # never opened: refused before any worker reads it
    args = [a.format(tmp=tmp_path) for a in args]
    if "-r" not in args and "-i" not in args:
        args = ["-r", os.path.join(OWN_PCAPS, "login-atom.pcap"), *args]
    r = _imaptap(*args, "--json", str(tmp_path / "out.jsonl"), "--workers", "2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and what in r.stderr, r.stderr
    assert not (tmp_path / "copy.pcap").exists()


def _long_capture(path, copies):
    """A classic pcap of ``copies`` copies of a real capture, each on other client ports and later."""
    import struct

    data = open(os.path.join(OWN_PCAPS, "password-spraying.pcap"), "rb").read()
    header, records, off = data[:24], [], 24
    while off < len(data):
        sec, usec, caplen, wire = struct.unpack_from("<IIII", data, off)
        records.append((sec, usec, wire, bytearray(data[off + 16: off + 16 + caplen])))
        off += 16 + caplen
    with open(path, "wb") as f:
        f.write(header)
        for copy in range(copies):
            for sec, usec, wire, frame in records:
                frame = bytearray(frame)
                for at in (34, 36):  # the TCP ports of an untagged IPv4 frame: the client's moves
                    port = struct.unpack_from("!H", frame, at)[0]
                    if port != 143:
                        struct.pack_into("!H", frame, at, 1024 + (port + copy * 7) % 60000)
                f.write(struct.pack("<IIII", sec + copy * 3, usec, len(frame), wire) + frame)


def test_sigint_stops_every_worker_and_the_output_is_whole(tmp_path):
    path = tmp_path / "long.pcap"
    _long_capture(path, 3000)
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    proc = subprocess.Popen([sys.executable, "-m", "imaptap", "-r", str(path), "--json", str(out), "--workers", "2"],
                            env=env, stderr=subprocess.PIPE, text=True)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(open(children).read().split()) < 2:
        time.sleep(0.01)
    workers = [int(p) for p in open(children).read().split()]
    assert len(workers) == 2
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived the run"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    stats = records[-1]
    assert stats["type"] == "stats" and stats["stopped_by_signal"] is True
    assert 0 < stats["flows"] < 3000 * 6, "stopped before the end"
    flows = [r for r in records if r["type"] == "flow"]
    # every flow begun is reported (the open ones as ended by the stop), each once
    assert len(flows) == stats["flows"] and sorted(f["flow"] for f in flows) == list(range(1, len(flows) + 1))


def test_a_worker_that_fails_inside_is_one_line_and_exit_status_1(tmp_path, monkeypatch, capsys):
    import imaptap.workers as workers

    def broken(spec, share, fd, stop=None):
        if share.index == 1:
            raise MemoryError("out of memory")
        return real(spec, share, fd)

    real = workers.run_worker
    monkeypatch.setattr(workers, "run_worker", broken)
    status = cli.main(["-r", os.path.join(OWN_PCAPS, "password-spraying.pcap"), "--json", str(tmp_path / "o.jsonl"),
                       "--workers", "2"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_INTERNAL
    assert err == "imaptap: worker 2 of 2 failed: MemoryError: out of memory\n"
