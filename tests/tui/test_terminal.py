"""The real command on a pseudo-terminal: the TUI starts, shows the capture, and q ends it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any

from harness import ROOT, pcap

PYTHON = sys.executable


def run_on_terminal(*args: str, steps: tuple[tuple[bytes, Any], ...] = ((b"finished", b"q"),),
                    timeout: float = 20.0, stdin: bytes | None = None) -> tuple[int, bytes]:
    """Run ``imaptap ARGS`` on a 160x40 pty; for each (text, keys) step, once the text is on
    screen (since the previous step) type the keys, or call them with the pid; (exit status,
    all output).  With ``stdin``, standard input is a pipe carrying those bytes (the pty stays
    the controlling terminal)."""
    pipe = os.pipe() if stdin is not None else None
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        if pipe is not None:
            os.dup2(pipe[0], 0)
            os.close(pipe[0])
            os.close(pipe[1])
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        os.environ.update(TERM="xterm-256color", PYTHONPATH=os.path.join(ROOT, "userspace"), COLUMNS="160", LINES="40")
        os.execv(PYTHON, [PYTHON, "-m", "imaptap", *args])
    if pipe is not None:
        os.close(pipe[0])
        os.write(pipe[1], stdin)
        os.close(pipe[1])
    out = b""
    deadline = time.monotonic() + timeout
    todo = list(steps)
    since = 0
    try:
        while time.monotonic() < deadline:
            if todo and todo[0][0] in out[since:]:
                since = len(out)
                action = todo.pop(0)[1]
                if callable(action):  # a signal, say
                    action(pid)
                else:
                    os.write(fd, action)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), out
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    out += os.read(fd, 1 << 16)
                except OSError:
                    pass
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError(f"imaptap did not end; steps left: {todo}; output ends {out[-500:]!r}")
    finally:
        os.close(fd)


def test_a_terminal_gets_the_tui_and_q_quits():
    status, out = run_on_terminal("-r", pcap("login-atom.pcap"))
    assert status == 0
    assert b"alice" in out and b"IMAP LOGIN" in out and b"finished" in out
    assert b"\x1b[?1049l" in out  # the alternate screen was left: the terminal is back


def test_the_tui_reads_a_capture_from_a_pipe_and_keys_from_the_terminal():
    status, out = run_on_terminal("-r", "-", stdin=open(pcap("login-atom.pcap"), "rb").read())
    assert status == 0
    assert b"standard input" in out and b"alice" in out and b"IMAP LOGIN" in out and b"finished" in out


def test_hostile_strings_never_reach_the_terminal():
    # Enter: the details show the whole user name; q once it is drawn (the row after it too)
    status, out = run_on_terminal("-r", pcap("hostile-strings.pcap"),
                                  steps=((b"finished", b"\r"), (b"authzid", b"q")))
    assert status == 0
    assert b"\x1b[31mevil" not in out and b"\x1b]0;pwned" not in out and b"\x07ctl" not in out
    assert b"[bold red]root[/]" in out  # shown as the characters it is
    assert b"\\x1b" in out  # the escape character, spelled out


def test_sigusr1_leaves_the_tui_running_and_a_hang_up_still_stops_it(tmp_path):
    # SIGUSR1 asks for the output files to be reopened (logrotate); SIGHUP stays "stop".
    status, out = run_on_terminal("-r", pcap("login-atom.pcap"), "-w", str(tmp_path / "w.pcap"),
                                  steps=((b"finished", lambda pid: os.kill(pid, signal.SIGUSR1)), (b"", b"?"),
                                         (b"imaptap keys", lambda pid: os.kill(pid, signal.SIGHUP))))
    assert status == 0
    assert b"\x1b[?1049l" in out  # the terminal is back


def test_a_bad_capture_file_fails_before_the_tui_starts(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    status, out = run_on_terminal("-r", str(bad), steps=())
    assert status == 2
    assert b"not a pcap or pcapng file" in out and b"\x1b[?1049h" not in out


def test_json_runs_do_not_import_textual():
    code = ("import sys, os; from imaptap import cli; "
            f"cli.main(['-r', {pcap('login-atom.pcap')!r}, '--json', os.devnull]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich') or m == 'imaptap.tui'))")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
