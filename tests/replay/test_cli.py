"""The command line as users meet it: bad input gets one line and exit status 2, nothing seen is lost."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from imaptap.output.progress import PROGRESS_DELAY
from testenv import OWN_PCAPS, ROOT, captures_with_secrets

#: A real Dovecot session with one login (pcaps/facts.json).
CAPTURE = os.path.join(OWN_PCAPS, "login-atom.pcap")


def one_line_error(r, *words):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("imaptap: ") and "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0]


def test_truncated_capture_reports_what_it_saw(imaptap, tmp_path):
    data = open(CAPTURE, "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 2 // 3 + 7])
    r = imaptap("-r", str(cut), "--json", "-")
    one_line_error(r, "cut.pcap", "truncated")
    (f,) = r.flows  # the flow seen up to the cut is still reported
    assert f["username"] == "alice" and f["end"] == "end"
    assert r.stats["error"] and r.stats["segments"] > 5


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"this is not a capture file at all\n" * 10, ["not a pcap"]),
])
def test_not_a_capture(imaptap, tmp_path, content, words):
    p = tmp_path / "bad.pcap"
    p.write_bytes(content)
    r = imaptap("-r", str(p), "--json", "-")
    one_line_error(r, "bad.pcap", *words)
    assert r.flows == []


def test_missing_file(imaptap, tmp_path):
    one_line_error(imaptap("-r", str(tmp_path / "nope.pcap"), "--json", "-"), "nope.pcap")


@pytest.mark.parametrize("args, words", [
    (["--port", "0"], ["port out of range"]),
    (["--port", "70000"], ["port out of range"]),
    (["--port", "imap"], ["not a port"]),
    (["-s", "0"], ["snap length"]),
    (["-i", "lo"], ["not both"]),
    (["--bogus"], ["unrecognized arguments"]),
    (["--max-flows", "0"], ["max-flows"]),
    (["--flow-interval", "0"], ["must be positive"]),
    (["--flow-interval", "soon"], ["not a number"]),
    (["--json-format", "xml"], ["invalid choice", "ecs"]),
])
def test_bad_arguments(imaptap, args, words):
    one_line_error(imaptap("-r", CAPTURE, "--json", "-", *args), *words)


def test_unwritable_json_path(imaptap, tmp_path):
    one_line_error(imaptap("-r", CAPTURE, "--json", str(tmp_path / "no" / "such" / "dir.jsonl")), "cannot write")


def test_json_to_a_file_and_flows_only(imaptap, tmp_path):
    out = tmp_path / "out.jsonl"
    r = imaptap("-r", CAPTURE, "--json", str(out), "--flows-only")
    assert r.returncode == 0 and r.stdout == ""
    kinds = [line.split('"type":"')[1].split('"')[0] for line in out.read_text().splitlines()]
    assert kinds == ["flow", "stats"]


def test_without_a_tty_json_goes_to_stdout(imaptap):
    r = imaptap("-r", CAPTURE)
    assert r.returncode == 0 and len(r.flows) == 1 and r.messages


def test_a_closed_pipe_is_not_an_error():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    p = subprocess.run(f"{sys.executable} -m imaptap -r {CAPTURE} --json - | head -n 1", shell=True,
                       capture_output=True, text=True, env=env)
    assert p.stdout.count("\n") == 1 and "Traceback" not in p.stderr and "Error" not in p.stderr


@pytest.mark.parametrize("flows_only", [[], ["--flows-only"]])
def test_a_full_disk_is_one_line_not_a_traceback(imaptap, flows_only):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    one_line_error(imaptap("-r", CAPTURE, "--json", "/dev/full", *flows_only), "cannot write /dev/full",
                   "No space left on device")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "imaptap", "-r", CAPTURE, "--json", "-", *flows_only],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr == "imaptap: cannot write standard output: No space left on device\n"


CAPTURES, IDS = captures_with_secrets()


@pytest.mark.parametrize(("path", "ports", "secrets"), CAPTURES, ids=IDS)
def test_w_with_r_on_every_capture_with_a_login(imaptap, tmp_path, path, ports, secrets):
    """The sanitised copy replays to the same facts and holds none of the secrets."""
    out = tmp_path / "clean.pcap"
    port_args = [a for p in ports for a in ("--port", str(p))]
    r = imaptap("-r", path, *port_args, "-s", "65535", "-w", str(out), "--json", "-", "--flows-only")
    assert r.returncode == 0, r.stderr
    assert r.stats["written"] == r.stats["segments"] > 0
    raw = out.read_bytes()
    assert not [s for s in secrets if s.encode() in raw]
    again = imaptap("-r", str(out), *port_args, "-s", "65535", "--json", "-", "--flows-only")
    assert again.returncode == 0, again.stderr
    assert len(again.flows) == len(r.flows)
    for before, after in zip(r.flows, again.flows, strict=True):
        # the copy has '*' where the passwords were: their fingerprints are of the stars
        for attempts in (before["login_attempts"], after["login_attempts"]):
            for a in attempts:
                a.pop("password_hmac")
        assert after == before


def test_w_with_r_writes_a_sanitised_copy_that_replays_to_the_same_facts(imaptap, tmp_path):
    out = tmp_path / "clean.pcap"
    r = imaptap("-r", CAPTURE, "-s", "65535", "-w", str(out), "--json", "-")
    assert r.returncode == 0, r.stderr
    raw = out.read_bytes()
    assert b"Alice-Pw-7391" not in raw and b"*************" in raw  # the password, blanked
    assert r.stats["written"] == r.stats["segments"] > 0
    again = imaptap("-r", str(out), "--json", "-", "--flows-only")
    (f,) = again.flows
    assert (f["username"], f["login_ok"], f["cleartext_credentials"]) == ("alice", True, True)
    assert f["commands"] == r.flows[0]["commands"]


def test_an_unwritable_w_file_is_one_line(imaptap, tmp_path):
    one_line_error(imaptap("-r", CAPTURE, "-w", str(tmp_path / "no" / "dir.pcap"), "--json", "-"), "cannot write")


def test_flow_interval_from_the_command_line(imaptap):
    r = imaptap("-r", os.path.join(OWN_PCAPS, "idle.pcap"), "--json", "-", "--flows-only", "--flow-interval", "0.01")
    assert r.returncode == 0, r.stderr
    types = [rec["type"] for rec in r.records]
    assert types[-2:] == ["flow", "stats"] and set(types[:-2]) == {"flow_update"}
    update, flow = r.of_type("flow_update")[-1], r.flows[0]
    assert update["flow"] == flow["flow"] and update["end"] is None and update["ts"] <= flow["last_ts"]


# --- -r -: standard input ---------------------------------------------------------------------


def cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    return subprocess.Popen([sys.executable, "-m", "imaptap", *args], env=env, **kw)


def test_standard_input_replays_as_the_file(imaptap):
    want = imaptap("-r", CAPTURE, "--json", "-")
    p = cli("-r", "-", "--json", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(open(CAPTURE, "rb").read(), timeout=60)
    assert p.returncode == 0 and err == b""
    got = [json.loads(line) for line in out.splitlines()]
    assert got[-1]["source"] == "standard input" and got[-1]["packets"] == want.stats["packets"]
    assert got[:-1] == want.records[:-1]


def test_a_signal_ends_a_replay_from_a_quiet_pipe(tmp_path):
    """tcpdump -U -w - | imaptap -r -: the pipe stays open and quiet; SIGINT still ends the run."""
    p = cli("-r", "-", "--json", "-", "--flows-only", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
    data = open(CAPTURE, "rb").read()
    p.stdin.write(data)
    p.stdin.flush()
    time.sleep(2.0)  # the whole session went in; the writer stays silent
    p.send_signal(signal.SIGINT)
    p.wait(timeout=20)  # the pipe is still open: the reader saw the stop while waiting for data
    out, err = p.stdout.read(), p.stderr.read()
    p.stdin.close()
    assert p.returncode == 0 and b"Traceback" not in err
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["username"] == "alice" and records[-1]["stopped_by_signal"] is True


def slow_writer(data: bytes, seconds: float) -> Callable[[object], None]:
    def write(stdin) -> None:
        step = max(1, len(data) // 20)
        for i in range(0, len(data), step):
            stdin.write(data[i:i + step])
            stdin.flush()
            time.sleep(seconds / 20)
        stdin.close()
    return write


def test_a_long_replay_shows_progress_on_a_terminal_and_only_there(tmp_path):
    data = open(CAPTURE, "rb").read()
    out = tmp_path / "out.jsonl"
    # stderr on a pseudo-terminal: the progress line, erased at the end
    leader, follower = pty.openpty()
    p = cli("-r", "-", "--json", str(out), stdin=subprocess.PIPE, stderr=follower)
    os.close(follower)
    slow_writer(data, 3 * PROGRESS_DELAY)(p.stdin)
    p.wait(timeout=60)
    seen = b""
    while select.select([leader], [], [], 0.5)[0]:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert p.returncode == 0
    assert b"imaptap: standard input: " in seen and b" flows, " in seen and seen.endswith(b"\r\x1b[K")
    assert out.read_text().count('"type":"flow"') == 1
    # stderr a pipe: nothing
    p = cli("-r", "-", "--json", str(out), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    slow_writer(data, 3 * PROGRESS_DELAY)(p.stdin)
    assert p.wait(timeout=60) == 0 and p.stderr.read() == b""
