"""Past the knee, the TUI (part of ``scripts/bench-live --only ceiling``): imaptap's terminal UI
on a real pseudo-terminal while tcpreplay floods the lab's veth above what the analyzer takes.

What a user would check: it still answers keys (``?`` opens the help and closes it again, every
second or so, timed from the key to the screen showing it), its status line says segments are
being lost, and ``q`` ends it (and detaches) promptly.  One run per worker count asked for
(``imaptap -i IFACE --workers N`` on a terminal: the parent merges the workers' updates).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import statistics
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Sequence

from imaptap_lab.bench_live import PYTHON
from imaptap_lab.checkout import USERSPACE

#: The terminal's size: the status line shows the kernel counters at this width.
ROWS, COLUMNS = 40, 160
#: Seconds the TUI may take to attach (BCC compiles the program first).
ATTACH_TIMEOUT_S = 120.0
#: Seconds a key may take to show on screen before the TUI counts as not answering.
KEY_TIMEOUT_S = 10.0
#: Seconds between two key round trips while flooded.
KEY_INTERVAL_S = 1.0
#: Seconds ``q`` may take to end the TUI (it detaches and waits for the capture thread).
QUIT_TIMEOUT_S = 60.0
#: What the screen shows once the capture is attached (the kernel's counters in the status line),
#: with the help screen open, and with the main screen back.
ATTACHED = b"kernel seen"
HELP_SHOWN = b"imaptap keys"
MAIN_SHOWN = b"Details"
#: The status line's loss counter as drawn ("lost 12,345", "lost 1.2M").
LOST_SHOWN = re.compile(rb"lost (\d[\d,]*(?:\.\d)?M?)")


def shown_count(text: bytes) -> int:
    """The number a status line count shows (`imaptap.tui.display.count`: 12,345 or 1.2M)."""
    value = text.decode().replace(",", "")
    if value.endswith("M"):
        return round(float(value[:-1]) * 1_000_000)
    return int(value)


def last_lost(screen: bytes) -> int | None:
    """The last loss count the status line showed, if it showed one."""
    found = LOST_SHOWN.findall(screen)
    return shown_count(found[-1]) if found else None


class Terminal:
    """A command on a pseudo-terminal of ROWS x COLUMNS; its output gathered by a thread."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: never returns
            try:
                fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
                os.execvpe(cmd[0], list(cmd), env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = bytearray()
        self.lock = threading.Lock()
        self.status: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the child's side closed
                return
            if not data:
                return
            with self.lock:
                self.out += data

    def mark(self) -> int:
        with self.lock:
            return len(self.out)

    def wait_for(self, text: bytes, since: int, timeout: float) -> float | None:
        """Seconds until ``text`` appears after position ``since``; None if not within ``timeout``."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with self.lock:
                if self.out.find(text, since) >= 0:
                    return time.monotonic() - start
            if self.exited():
                return None
            time.sleep(0.01)
        return None

    def key(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exited(self) -> bool:
        if self.status is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is not None

    def wait_exit(self, timeout: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.exited():
                return time.monotonic() - start
            time.sleep(0.02)
        return None

    def kill(self) -> None:
        if not self.exited():
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            self.status = -9
        self._reader.join(timeout=5)
        os.close(self.fd)

    def screen(self) -> bytes:
        with self.lock:
            return bytes(self.out)


def tui_overload(iface: str, netns: str | None, tcpreplay: list[str], workers: int = 1) -> dict:
    """The TUI on ``iface`` (in ``netns``) while ``tcpreplay`` runs: its key round trips, the
    losses its status line showed, how ``q`` ended it."""
    cmd = [PYTHON, "-m", "imaptap", "-i", iface, *(["--workers", str(workers)] if workers > 1 else [])]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = dict(os.environ, PYTHONPATH=str(USERSPACE), TERM="xterm-256color", COLUMNS=str(COLUMNS), LINES=str(ROWS))
    term = Terminal(cmd, env)
    answers: list[float | None] = []
    try:
        if term.wait_for(ATTACHED, 0, ATTACH_TIMEOUT_S) is None:
            raise RuntimeError(f"the TUI did not attach: {term.screen()[-500:]!r}")
        before = last_lost(term.screen()) or 0
        sender = subprocess.Popen(tcpreplay, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while sender.poll() is None:
            start = time.monotonic()
            mark = term.mark()
            term.key(b"?")
            opened = term.wait_for(HELP_SHOWN, mark, KEY_TIMEOUT_S)
            mark = term.mark()
            term.key(b"?")
            closed = term.wait_for(MAIN_SHOWN, mark, KEY_TIMEOUT_S)
            answers.append(None if opened is None or closed is None else max(opened, closed))
            time.sleep(max(0.0, KEY_INTERVAL_S - (time.monotonic() - start)))
        sent = sender.communicate()[0]
        time.sleep(1.0)  # the status line's next redraw shows the last counts
        lost = last_lost(term.screen())
        term.key(b"q")
        quit_seconds = term.wait_exit(QUIT_TIMEOUT_S)
    finally:
        term.kill()
    timed = [a for a in answers if a is not None]
    return {"workers": workers, "keys": len(answers), "keys answered": len(timed),
            "answer seconds, median": round(statistics.median(timed), 3) if timed else None,
            "answer seconds, most": round(max(timed), 3) if timed else None,
            "lost shown before": before, "lost shown at the end": lost,
            "quit seconds": None if quit_seconds is None else round(quit_seconds, 2),
            "exit status": term.status, "tcpreplay": sent.strip().splitlines()[-1:] if sent else [],
            "checks": {
                "every key answered while flooded": bool(answers) and len(timed) == len(answers),
                "the status line shows the losses": lost is not None and lost > before,
                "q ends it": quit_seconds is not None and term.status == 0}}


def print_check(check: dict) -> None:
    """The TUI check's lines, as the ceiling section prints its own."""
    lost = check["lost shown at the end"]
    print(f"  past the knee, the TUI (--workers {check['workers']}): {check['keys answered']} of {check['keys']}"
          f" key round trips answered, median {check['answer seconds, median']} s, slowest"
          f" {check['answer seconds, most']} s; lost shown at the end: {'none' if lost is None else f'{lost:,}'};"
          f" q ended it in {check['quit seconds']} s, exit status {check['exit status']}")
    for name, ok in check["checks"].items():
        print(f"    {'ok  ' if ok else 'FAIL'} {name}")


__all__ = ["last_lost", "print_check", "shown_count", "tui_overload"]
