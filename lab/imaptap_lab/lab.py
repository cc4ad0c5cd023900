#!/usr/bin/env python3
"""imaplab: a real Dovecot in a throw-away network namespace, for imaptap's tests and captures.

The lab is what imaptap watches when it is tested for real: a Dovecot IMAP server running
inside its own network namespace, reachable from the root namespace over a veth pair.  With
``Lab(server="cyrus")`` (``imaplab.py start --server cyrus``) the server is Cyrus IMAP instead,
unpacked from Debian's .debs (imaptap_lab.cyrus); everything else is the same.
Clients (imaplib, curl, mbsync, raw sockets) run in the root namespace and talk to the
namespace side; imaptap (or tcpdump) watches the root-namespace end of the veth, exactly as
it would watch a real interface. Nothing leaves the machine: the only addresses used are
inside a private /30 and a ULA /64 that exist only on the veth pair.

::

    root namespace                          network namespace <lab.netns>
    +---------------------------+           +-----------------------------------+
    | clients, imaptap, tcpdump |           |  dovecot -F -c <tmp>/dovecot.conf |
    |   lab.host_if             |-- veth ---|   ports 143 and 10143             |
    |   10.199.S.1/30           |           |   10.199.S.2/30                   |
    |   fd00:199:S::1/64        |           |   fd00:199:S::2/64                |
    |                           |           |   fd00:199:S::3/64 (strict)       |
    +---------------------------+           +-----------------------------------+

S is a "slot" (1..254) picked so that several labs coexist. Dovecot runs with its own
configuration, base_dir, state_dir, log, TLS certificate, passwd-file and Maildirs, all in
a temporary directory; the system's /etc/dovecot is never read. Every lab is recorded in a
state file under /run/imaptap-lab/, so a lab left behind by a killed process (its owner pid
is dead) is torn down by the next lab that starts, or by ``imaplab.py stop``.

Use it from Python (as root)::

    with Lab() as lab:
        with lab.capture("out.pcap"):
            imap = imaplib.IMAP4(lab.server4, 143)
            imap.login("alice", lab.users["alice"])
            ...
        lab.deliver("alice", b"Subject: hi\\r\\n\\r\\nbody\\r\\n")

or from the shell: ``scripts/imaplab.py start|stop|status`` (its entry point).

The server offers STARTTLS (self-signed certificate), LOGIN and AUTHENTICATE
PLAIN/LOGIN/CRAM-MD5/SCRAM-SHA-1/SCRAM-SHA-256 in clear text, LITERAL+, SASL-IR, ID, IDLE
and COMPRESS=DEFLATE. On its third address (``lab.server6_strict``) it is configured as an
auditor wants it: ``disable_plaintext_auth = yes``, so before STARTTLS it announces
LOGINDISABLED, offers no plaintext mechanism and refuses a password sent in clear.
This module uses the standard library only.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import enum
import fcntl
import grp
import json
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imaptap_lab import cyrus

# --- Names -------------------------------------------------------------------------------
NETNS_PREFIX = "imaptap-lab-"
"""Every lab namespace starts with this; leftovers are found by it."""
VETH_PREFIX = "itap"
"""Veth names are itap<slot>h (root side) and itap<slot>n (namespace side): at most 8
characters, well inside the kernel's 15-character IFNAMSIZ limit."""
VETH_NAME_RE = re.compile(r"^itap(\d{1,3})[hn]$")
STATE_DIR = Path("/run/imaptap-lab")
"""State files live on tmpfs: they vanish on reboot together with the namespaces."""
LOCK_PATH = STATE_DIR / "lock"
"""Serialises slot allocation and leftover removal between concurrent labs."""
TMPDIR_PREFIX = "imaptap-lab-"

# --- Addresses ---------------------------------------------------------------------------
SLOT_MIN, SLOT_MAX = 1, 254
"""The slot is the third octet of 10.199.S.0/30, so it must fit in one octet."""
IPV4_TEMPLATE = "10.199.{slot}.{host}"
IPV4_PREFIXLEN = 30
IPV6_TEMPLATE = "fd00:199:{slot}::{host}"
"""The slot is written with decimal digits inside a hex group: unique and easy to match
with the IPv4 address by eye."""
IPV6_PREFIXLEN = 64
HOST_SIDE, NS_SIDE = 1, 2
STRICT_SIDE = 3
"""The namespace side's second IPv6 address, where Dovecot disables plaintext logins (a
`local` block): in the same /64, so it needs no route."""

# --- Server ------------------------------------------------------------------------------
IMAP_PORT = 143
ALT_IMAP_PORT = 10143
"""A second, non-standard port, so tests can check that imaptap follows the ports it is
told about rather than assuming 143."""
LAB_PORTS = (IMAP_PORT, ALT_IMAP_PORT)
DEFAULT_USERS = {
    # Recognisable passwords, so a test can grep any output for them.
    "alice": "Alice-Pw-7391",
    "bob": 'Bob Pw "quoted" 42',  # space and quotes: must be a quoted string or a literal
    "carol": "Carol-Pw-5520",
    "dave": "Dave-Pw-8812",
}
MAIL_USER, MAIL_GROUP = "nobody", "nogroup"
"""Owner of the Maildirs: Dovecot refuses to run mail processes as root."""
LOGIN_USER, INTERNAL_USER = "dovenull", "dovecot"
"""Dovecot refuses to run its login and internal processes as root; Debian creates both."""
DOVECOT = "dovecot"
DOVEADM = "doveadm"


class Server(enum.StrEnum):
    """The IMAP server a lab runs."""

    DOVECOT = "dovecot"
    CYRUS = "cyrus"


GREETING_PREFIX = b"* OK"

# --- Time bounds -------------------------------------------------------------------------
READY_TIMEOUT = 15.0
"""Dovecot normally answers within 0.5 s; the bound covers a loaded 2-core CI VM."""
READY_POLL = 0.05
STOP_TIMEOUT = 5.0
"""How long a process gets after SIGTERM before SIGKILL."""
COMMAND_TIMEOUT = 30.0
"""Bound on any helper command (ip, openssl, doveadm)."""
CAPTURE_START_TIMEOUT = 10.0
"""tcpdump prints "listening on" once the socket is open; wait at most this long."""
CAPTURE_SETTLE = 1.0
"""tcpdump gets this long before SIGINT: without it the last packets (FIN, final ACK)
are often still in the kernel buffer and never written."""
CAPTURE_BUFFER_KIB = 65536
"""tcpdump's kernel buffer (-B): large enough that thousands of benchmark sessions on a busy
two-core machine are recorded without drops (a drop fails the capture)."""
DEFAULT_PORT_FILTER = f"tcp port {IMAP_PORT} or tcp port {ALT_IMAP_PORT}"
LOG_TAIL_LINES = 40
"""How much of Dovecot's log goes into an error message."""

# --- ethtool ioctl (no ethtool binary on the target systems) ------------------------------
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x00000017
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux: 16-byte name + 24-byte union


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says why (with Dovecot's log)."""


# ------------------------------------------------------------------------------------------
# Small process helpers
# ------------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], *, check: bool = True, input: bytes | None = None,
         timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a helper command, capturing output; raise LabError with its stderr on failure."""
    proc = subprocess.run(list(cmd), input=input, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


def _proc_start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (field 22 of /proc/pid/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def _pid_alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if pid runs and, when start_time is given, is the same process (no pid reuse)."""
    if not pid:
        return False
    now = _proc_start_time(pid)
    if now is None:
        return False
    return start_time is None or now == start_time


def _stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM pid, then SIGKILL if it is still there after timeout."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            if not _pid_alive(pid) or _is_zombie(pid):
                return
            time.sleep(READY_POLL)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout.decode()
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout.decode()
    return [int(p) for p in out.split()]


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout.decode()
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _set_tx_checksum(ifname: str, enabled: bool) -> None:
    """Turn TX checksum offload on or off (as `ethtool -K IF tx on|off` does).

    With it off the kernel fills in TCP checksums and segments GSO packets before the veth,
    so a capture holds MTU-sized segments with valid checksums, like a real NIC's wire.
    """
    value = array.array("I", [ETHTOOL_STXCSUM, 1 if enabled else 0])
    ifreq = struct.pack("16sP", ifname.encode(), value.buffer_info()[0])
    ifreq += b"\0" * (IFREQ_SIZE - len(ifreq))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------
# State files
# ------------------------------------------------------------------------------------------
@dataclass
class LabState:
    """What is needed to find and tear down a lab from any process."""

    name: str
    slot: int
    owner_pid: int
    owner_start: int | None
    tmpdir: str = ""
    # The server's master process (Cyrus' too): the names are those every checkout's labs read,
    # since a lab tears down the leftovers of any other, and a state file it cannot read costs
    # the other lab its veth.
    dovecot_pid: int = 0
    dovecot_start: int | None = None
    users: dict | None = None
    offloads: bool = True
    detached: bool = False

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.name}.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.__dict__, out, indent=1)
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> LabState | None:
        try:
            fields = json.loads(path.read_text())
            # keys a newer checkout may add are ignored: its labs must still be told apart
            known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def owner_alive(self) -> bool:
        return _pid_alive(self.owner_pid, self.owner_start)


def _all_states() -> list[LabState]:
    if not STATE_DIR.is_dir():
        return []
    return [s for p in sorted(STATE_DIR.glob("*.json")) if (s := LabState.load(p))]


def _host_if(slot: int) -> str:
    return f"{VETH_PREFIX}{slot}h"


def _ns_if(slot: int) -> str:
    return f"{VETH_PREFIX}{slot}n"


def _teardown(state: LabState) -> None:
    """Remove everything a lab made; every step tolerates the thing being gone already."""
    if _pid_alive(state.dovecot_pid, state.dovecot_start):
        _stop_pid(state.dovecot_pid)
    if state.name in _netns_list():
        for pid in _netns_pids(state.name):
            _stop_pid(pid)
        _run(["ip", "netns", "delete", state.name], check=False)
    # Deleting the namespace destroys the veth pair; this covers a half-built lab.
    if _host_if(state.slot) in _link_names():
        _run(["ip", "link", "delete", _host_if(state.slot)], check=False)
    if state.tmpdir and Path(state.tmpdir).name.startswith(TMPDIR_PREFIX):
        shutil.rmtree(state.tmpdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state.path.unlink()


def _reap_leftovers_locked() -> list[str]:
    """Tear down labs whose owner died; caller holds the lock. Returns the names removed."""
    removed = []
    live_slots = set()
    known = set()
    for state in _all_states():
        known.add(state.name)
        if state.owner_alive():
            live_slots.add(state.slot)
        else:
            _teardown(state)
            removed.append(state.name)
    for netns in _netns_list():
        if not netns.startswith(NETNS_PREFIX) or netns in known:
            continue
        # No state file: named imaptap-lab-<pid>-<rand>; reap only if that pid is gone.
        match = re.match(re.escape(NETNS_PREFIX) + r"(\d+)-", netns)
        if match and _pid_alive(int(match.group(1))):
            continue
        for pid in _netns_pids(netns):
            _stop_pid(pid)
        _run(["ip", "netns", "delete", netns], check=False)
        removed.append(netns)
    for link in _link_names():
        match = VETH_NAME_RE.match(link)
        if match and int(match.group(1)) not in live_slots:
            _run(["ip", "link", "delete", link], check=False)
            removed.append(link)
    return removed


def reap_leftovers() -> list[str]:
    """Remove labs (namespace, veth, Dovecot, temp dir) whose owning process is dead."""
    with _locked():
        return _reap_leftovers_locked()


def _used_slots() -> set[int]:
    used = {s.slot for s in _all_states()}
    for link in _link_names():
        if match := VETH_NAME_RE.match(link):
            used.add(int(match.group(1)))
    addrs = _run(["ip", "-o", "addr", "show"], check=False).stdout.decode()
    used.update(int(m) for m in re.findall(r"inet 10\.199\.(\d+)\.", addrs))
    return used


# ------------------------------------------------------------------------------------------
# Dovecot configuration
# ------------------------------------------------------------------------------------------
DOVECOT_CONF_TEMPLATE = """\
# Written by imaptap's lab (imaptap_lab/lab.py) for one lab; the system configuration is not read.
base_dir = {tmp}/run
state_dir = {tmp}/state
log_path = {tmp}/dovecot.log
protocols = imap
listen = *, ::

# Dovecot refuses to run login and internal processes as root.
default_login_user = {login_user}
default_internal_user = {internal_user}

# Plain-text authentication on port 143 is the point of the lab.
disable_plaintext_auth = no
# ... except on this address: LOGINDISABLED and no plaintext mechanism before STARTTLS.
local {strict} {{
  disable_plaintext_auth = yes
}}
# SCRAM works from the passwd-file's plain passwords (Debian builds Dovecot without NTLM).
auth_mechanisms = plain login cram-md5 scram-sha-1 scram-sha-256
# The default 2 s delay after a failed login only slows failed-login tests down (a failure is
# still answered up to 0.5 s late: the auth process flushes failures on that interval).
auth_failure_delay = 0
auth_verbose = yes
imap_id_log = *

# A certificate made at start, so STARTTLS is offered and works.
ssl = yes
ssl_cert = <{tmp}/tls/cert.pem
ssl_key = <{tmp}/tls/key.pem

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {tmp}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {tmp}/users
}}
mail_location = maildir:~/Maildir

# zlib + imap_zlib make Dovecot offer COMPRESS=DEFLATE (mbsync then turns it on).
mail_plugins = $mail_plugins zlib
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
}}

# anvil's auth penalty delays every login from an address that failed before by 2, 4, 8,
# then 15 s (for 29 s): tests that fail logins on purpose would stall. Dovecot's documented
# switch is to make the penalty socket unreachable. (login_trusted_networks does not lift
# the penalty in 2.3.19, and would mark the connections "secured".)
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

service imap-login {{
  # The default chroot (login/ under base_dir) is not needed in a throw-away lab.
  chroot =
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imap_alt {{
    port = {alt_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


def _write_dovecot_files(tmp: Path, users: dict[str, str], strict: str) -> Path:
    """Write config, passwd-file, Maildir homes and a TLS certificate; return the config path."""
    mail_uid = pwd.getpwnam(MAIL_USER).pw_uid
    mail_gid = grp.getgrnam(MAIL_GROUP).gr_gid
    for sub in ("run", "state", "tls", "home"):
        (tmp / sub).mkdir(mode=0o755)
    lines = []
    for user, password in users.items():
        if any(c in user + password for c in ":\r\n\0"):
            raise LabError(f"user {user!r}: ':', CR, LF and NUL cannot go in a passwd-file")
        home = tmp / "home" / user
        home.mkdir(mode=0o700)
        os.chown(home, mail_uid, mail_gid)
        lines.append(f"{user}:{{PLAIN}}{password}:{mail_uid}:{mail_gid}::{home}::\n")
    users_path = tmp / "users"
    users_path.write_text("".join(lines))
    # The auth process runs as default_internal_user and must read it; nobody else may.
    users_path.chmod(0o640)
    os.chown(users_path, 0, grp.getgrnam(INTERNAL_USER).gr_gid)
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-days", "7", "-subj", "/CN=imaptap-lab", "-keyout", str(tmp / "tls/key.pem"),
          "-out", str(tmp / "tls/cert.pem")])
    conf = tmp / "dovecot.conf"
    conf.write_text(DOVECOT_CONF_TEMPLATE.format(
        tmp=tmp, login_user=LOGIN_USER, internal_user=INTERNAL_USER,
        port=IMAP_PORT, alt_port=ALT_IMAP_PORT, strict=strict))
    return conf


# ------------------------------------------------------------------------------------------
# The lab
# ------------------------------------------------------------------------------------------
class Lab:
    """A Dovecot (or Cyrus) in a fresh network namespace, reachable over a veth pair; see the
    module doc.

    Attributes (valid after start()):
      netns     name of the network namespace
      host_if   root-namespace end of the veth (capture / attach imaptap here)
      ns_if     namespace end of the veth
      server4, server6   the server's addresses (inside the namespace)
      client4, client6   the root namespace's addresses on host_if
      ports     (143, 10143): the server listens on both, on both address families
      users     user -> password
      server    `Server.DOVECOT` or `Server.CYRUS`
      tmpdir    the lab's directory (config, log, mail)
      conf      path of the server's configuration
    """

    def __init__(self, name: str | None = None, *, users: dict[str, str] | None = None,
                 offloads: bool = True, server: Server | str = Server.DOVECOT) -> None:
        """name: namespace name (default: imaptap-lab-<pid>-<random>); users: replaces
        DEFAULT_USERS; offloads=False turns off TX checksum offload on both veth ends, so
        captures hold MTU-sized segments with valid checksums (True keeps kernel defaults);
        server: which IMAP server runs in the namespace."""
        self.netns = name or f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.offloads = offloads
        try:
            self.server = Server(server)
        except ValueError:
            raise LabError(f"unknown server {server!r}: {', '.join(Server)}") from None
        self.ports = LAB_PORTS
        self._state: LabState | None = None
        self._server_proc: subprocess.Popen | None = None
        self._command: list[str] = []
        """The server's command line, written by _build with its configuration."""
        self._owner = True

    # -- derived attributes --
    @property
    def slot(self) -> int:
        return self._require_state().slot

    @property
    def host_if(self) -> str:
        return _host_if(self.slot)

    @property
    def ns_if(self) -> str:
        return _ns_if(self.slot)

    @property
    def client4(self) -> str:
        return IPV4_TEMPLATE.format(slot=self.slot, host=HOST_SIDE)

    @property
    def server4(self) -> str:
        return IPV4_TEMPLATE.format(slot=self.slot, host=NS_SIDE)

    @property
    def client6(self) -> str:
        return IPV6_TEMPLATE.format(slot=self.slot, host=HOST_SIDE)

    @property
    def server6(self) -> str:
        return IPV6_TEMPLATE.format(slot=self.slot, host=NS_SIDE)

    @property
    def server6_strict(self) -> str:
        """The address where Dovecot announces LOGINDISABLED and takes no password in clear."""
        return IPV6_TEMPLATE.format(slot=self.slot, host=STRICT_SIDE)

    @property
    def tmpdir(self) -> Path:
        return Path(self._require_state().tmpdir)

    @property
    def conf(self) -> Path:
        return self.tmpdir / ("imapd.conf" if self.server is Server.CYRUS else "dovecot.conf")

    @property
    def log_path(self) -> Path:
        return self.tmpdir / ("cyrus.log" if self.server is Server.CYRUS else "dovecot.log")

    @property
    def server_pid(self) -> int:
        """The server's master process (Dovecot's or Cyrus')."""
        return self._require_state().dovecot_pid

    def _require_state(self) -> LabState:
        if self._state is None:
            raise LabError("the lab is not started")
        return self._state

    # -- life cycle --
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Lab:
        """Build namespace, veth, addresses and the server; return once it greets."""
        if os.geteuid() != 0:
            raise LabError(f"the lab needs root (network namespaces, {self.server})")
        tools = ("ip", DOVECOT, DOVEADM, "openssl") if self.server is Server.DOVECOT else ("ip", "openssl", "dpkg-deb")
        for tool in tools:
            if not shutil.which(tool):
                raise LabError(f"{tool} not found; run scripts/setup")
        try:
            self._build()
            self._start_server()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        with _locked():
            _reap_leftovers_locked()
            if self.netns in _netns_list():
                raise LabError(f"network namespace {self.netns} exists and is in use")
            used = _used_slots()
            free = [s for s in range(SLOT_MIN, SLOT_MAX + 1) if s not in used]
            if not free:
                raise LabError("no free lab slot (10.199.1-254.0/30 all taken)")
            # Start from a pid-derived slot so labs started together spread out.
            start = os.getpid() % len(free)
            slot = free[start]
            state = LabState(name=self.netns, slot=slot, owner_pid=os.getpid(),
                             owner_start=_proc_start_time(os.getpid()),
                             users=self.users, offloads=self.offloads)
            # The state file comes first, so a crash at any later point leaves a reapable lab.
            state.save()
            self._state = state
            _run(["ip", "netns", "add", self.netns])
            _run(["ip", "link", "add", self.host_if, "type", "veth",
                  "peer", "name", self.ns_if, "netns", self.netns])
        _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self._configure_veth()
        state.tmpdir = tempfile.mkdtemp(prefix=TMPDIR_PREFIX)
        state.save()
        os.chmod(state.tmpdir, 0o755)  # login, auth and mail processes run unprivileged
        if self.server is Server.DOVECOT:
            _write_dovecot_files(self.tmpdir, self.users, self.server6_strict)
            # -F keeps the master in the foreground, so it is our child and its pid is known.
            self._command = [DOVECOT, "-F", "-c", str(self.conf)]
        else:
            try:
                self._command = cyrus.write_files(self.tmpdir, self.users, IMAP_PORT, ALT_IMAP_PORT)
            except (cyrus.CyrusError, OSError, subprocess.SubprocessError) as err:
                raise LabError(f"Cyrus: {err}") from None

    def _configure_veth(self) -> None:
        """Addresses on both ends of the veth, both up, offloads as the lab was asked for."""
        ns = ["ip", "-n", self.netns]
        _run(["ip", "addr", "add", f"{self.client4}/{IPV4_PREFIXLEN}", "dev", self.host_if])
        _run(["ip", "addr", "add", f"{self.client6}/{IPV6_PREFIXLEN}", "dev", self.host_if,
              "nodad"])
        _run(ns + ["addr", "add", f"{self.server4}/{IPV4_PREFIXLEN}", "dev", self.ns_if])
        _run(ns + ["addr", "add", f"{self.server6}/{IPV6_PREFIXLEN}", "dev", self.ns_if,
                   "nodad"])
        _run(ns + ["addr", "add", f"{self.server6_strict}/{IPV6_PREFIXLEN}", "dev", self.ns_if,
                   "nodad"])
        _run(ns + ["link", "set", self.ns_if, "up"])
        _run(["ip", "link", "set", self.host_if, "up"])
        if not self.offloads:
            _set_tx_checksum(self.host_if, False)
            self.run_in_ns([sys.executable, "-m", "imaptap_lab.lab", "_tx-checksum", self.ns_if,
                            "off"])

    # -- the veth, as a container's restart treats it --
    def remove_veth(self) -> None:
        """Delete the veth pair, as a container's restart does (both ends go; the server stays)."""
        _run(["ip", "link", "del", self.host_if])

    def restore_veth(self) -> None:
        """Make the veth pair again, same names and addresses: a new interface of the same name."""
        with _locked():  # the reaper of dead labs looks at veth names
            _run(["ip", "link", "add", self.host_if, "type", "veth",
                  "peer", "name", self.ns_if, "netns", self.netns])
        self._configure_veth()

    def set_link(self, up: bool) -> None:
        """Take the root end of the veth down, or up again (``ip link set ... down|up``)."""
        _run(["ip", "link", "set", self.host_if, "up" if up else "down"])

    def _start_server(self) -> None:
        state = self._require_state()
        stderr = open(self.tmpdir / f"{self.server}.stderr", "wb")
        env = cyrus.environment(cyrus.tree()) if self.server is Server.CYRUS else None
        # A new session keeps a Ctrl-C meant for the caller from reaching the server first.
        self._server_proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *self._command],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True, env=env)
        stderr.close()
        state.dovecot_pid = self._server_proc.pid
        state.dovecot_start = _proc_start_time(self._server_proc.pid)
        state.save()

    def _wait_ready(self) -> None:
        """Wait until every address and port answers with the server's `* OK` greeting."""
        deadline = time.monotonic() + READY_TIMEOUT
        # the strict address is Dovecot's configuration (a local block); Cyrus has none there
        addrs = (self.server4, self.server6) + ((self.server6_strict,) if self.server is Server.DOVECOT else ())
        pending = [(addr, port) for addr in addrs for port in self.ports]
        while pending:
            if self._server_proc is not None and self._server_proc.poll() is not None:
                raise LabError(f"{self.server} exited with {self._server_proc.returncode}\n"
                               + self.log_tail())
            addr, port = pending[0]
            try:
                with socket.create_connection((addr, port), timeout=READY_POLL * 20) as sock:
                    if sock.recv(512).startswith(GREETING_PREFIX):
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"{self.server} did not greet on [{addr}]:{port} within "
                               f"{READY_TIMEOUT} s\n" + self.log_tail())
            time.sleep(READY_POLL)

    def stop(self) -> None:
        """Tear everything down (idempotent). A detached lab is left alone."""
        if self._state is None or not self._owner:
            return
        state = self._state
        with _locked():
            _teardown(state)
        if self._server_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server_proc.wait(timeout=STOP_TIMEOUT)
        self._state = None
        self._server_proc = None

    close = stop

    def detach(self) -> None:
        """Hand the lab over to its server's master: it outlives this process (CLI start) and
        counts as a leftover once the server dies. Stop it with `imaplab.py stop NAME`."""
        state = self._require_state()
        state.owner_pid, state.owner_start = state.dovecot_pid, state.dovecot_start
        state.detached = True
        state.save()
        self._owner = False

    @classmethod
    def attach(cls, name: str) -> Lab:
        """A Lab object for a running lab started elsewhere (e.g. by `imaplab.py start`)."""
        state = LabState.load(STATE_DIR / f"{name}.json")
        if state is None:
            raise LabError(f"no lab named {name} (see `imaplab.py status`)")
        server = Server.CYRUS if (Path(state.tmpdir) / "imapd.conf").exists() else Server.DOVECOT
        lab = cls(name, users=state.users, offloads=state.offloads, server=server)
        lab._state = state
        lab._owner = True
        return lab

    # -- helpers for tests --
    def run_in_ns(self, cmd: Sequence[str], *, check: bool = True, timeout: float | None =
                  COMMAND_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(cmd) inside the lab's namespace; kwargs go to subprocess.run."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], check=check,
                              timeout=timeout, **kwargs)

    def popen_in_ns(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen(cmd) inside the lab's namespace; the caller waits for it."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], **kwargs)

    def doveadm(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run `doveadm -c <lab conf> ARGS` (talks to this lab's Dovecot via base_dir)."""
        try:
            return _run([DOVEADM, "-c", str(self.conf), *args], input=input)
        except LabError as err:
            raise LabError(f"{err}\n{self.log_tail()}") from None

    def deliver(self, user: str, message: bytes, mailbox: str = "INBOX") -> None:
        """Put a mail into user's mailbox out of sight of the veth (an IDLE client sees EXISTS):
        doveadm for Dovecot; for Cyrus an APPEND over the namespace's loopback."""
        if user not in self.users:
            raise LabError(f"unknown lab user {user!r}")
        if self.server is Server.DOVECOT:
            self.doveadm("save", "-u", user, "-m", mailbox, input=message)
            return
        proc = subprocess.run(cyrus.append_command(self.netns), capture_output=True, timeout=COMMAND_TIMEOUT,
                              input=cyrus.append_input(user, self.users[user], message, mailbox, IMAP_PORT))
        if proc.returncode != 0:
            raise LabError(f"delivery to {user} failed: {proc.stderr.decode(errors='replace').strip()}\n"
                           + self.log_tail())

    def syn_flood(self, count: int, port: int, pace: int = 2000) -> None:
        """``count`` SYNs from ``count`` distinct addresses and ports of 198.18.0.0/15 (the
        benchmarking range) to the lab's IPv4 address, sent into the host end of the veth, with a
        20 ms pause after every ``pace`` of them so a shared 2-core machine keeps up.

        Nothing leaves the veth: the namespace has no default route, so its answers to the
        spoofed sources die inside it (checked before the first SYN).
        """
        routes = self.run_in_ns(["ip", "-4", "route"], capture_output=True).stdout.decode()
        if "default" in routes:
            raise LabError(f"the lab namespace has a default route ({routes!r}): no flood")
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.host_if.encode())
            dst = socket.inet_aton(self.server4)
            for i in range(count):
                src = struct.pack("!I", (198 << 24 | 18 << 16) + i % (1 << 17))
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)
                tcp = struct.pack("!HHIIBBHHH", 1024 + i % 60000, port, i * 7919 & 0xFFFFFFFF, 0, 0x50, 2,
                                  65535, 0, 0)
                s.sendto(ip + tcp, (self.server4, 0))
                if i % pace == pace - 1:
                    time.sleep(0.02)
        finally:
            s.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the server's log and stderr, for error messages."""
        out = []
        names = cyrus.log_names() if self.server is Server.CYRUS else ("dovecot.stderr", "dovecot.log")
        for name in names:
            with contextlib.suppress(OSError, LabError):
                text = (self.tmpdir / name).read_text(errors="replace").splitlines()
                if text:
                    out.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    @contextlib.contextmanager
    def capture(self, path: str | os.PathLike, port_filter: str = DEFAULT_PORT_FILTER
                ) -> Iterator[Path]:
        """Record host_if to a pcap file while the block runs (tcpdump, full snap length)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            ["tcpdump", "-i", self.host_if, "--immediate-mode", "-U", "-s", "0", "-n",
             "-B", str(CAPTURE_BUFFER_KIB), "-Z", "root", "-w", str(path), port_filter],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait_listening(proc)
            yield path
            time.sleep(CAPTURE_SETTLE)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        dropped = re.search(rb"(\d+) packets? dropped by kernel", err or b"")
        if dropped and int(dropped.group(1)):
            raise LabError(f"tcpdump dropped {dropped.group(1).decode()} packets for {path}")

    @staticmethod
    def _wait_listening(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + CAPTURE_START_TIMEOUT
        seen = b""
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                raise LabError("tcpdump did not start: " + seen.decode(errors="replace"))
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    continue
                seen += chunk

    def describe(self) -> dict:
        """The lab's public attributes, JSON-ready."""
        return {"netns": self.netns, "host_if": self.host_if, "ns_if": self.ns_if,
                "server4": self.server4, "server6": self.server6,
                "server6_strict": self.server6_strict, "client4": self.client4,
                "client6": self.client6, "ports": list(self.ports), "users": self.users,
                "conf": str(self.conf), "log": str(self.log_path),
                "server": str(self.server), "server_pid": self.server_pid}


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
EPILOG = """examples:
  imaplab.py start            # start a lab that outlives the command; prints its details
  imaplab.py start --json     # the same as JSON (netns, host_if, server4, ports, users ...)
  imaplab.py status           # list labs, live or left over
  imaplab.py stop             # stop labs made by `start`, remove leftovers of dead owners
  imaplab.py stop --all       # also stop labs that running tests own
  imaplab.py stop imaptap-lab-1234-abcdef

A detached lab's Dovecot is re-parented to init; where init does not reap (some containers
and VMs), a stopped one can linger as a zombie for a while.
"""


def _cmd_start(args: argparse.Namespace) -> int:
    lab = Lab(args.name, offloads=not args.no_offloads, server=args.server).start()
    lab.detach()
    info = lab.describe()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:10} {value}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    with _locked():
        states = {s.name: s for s in _all_states()}
        if args.names:
            names = args.names
        else:
            # Labs of running test processes belong to them; --all takes those too.
            names = [n for n, s in states.items() if args.all or s.detached]
        missing = [n for n in names if n not in states]
        for name in names:
            if name in states:
                _teardown(states[name])
                print(f"stopped {name}")
        for name in _reap_leftovers_locked():
            print(f"removed leftover {name}")
    for name in missing:
        print(f"imaplab: no lab named {name}", file=sys.stderr)
    return 1 if missing else 0


def _cmd_status(args: argparse.Namespace) -> int:
    states = _all_states()
    namespaces = [n for n in _netns_list() if n.startswith(NETNS_PREFIX)]
    for state in states:
        if not state.owner_alive():
            alive = "left over (owner dead)"
        else:
            alive = "running, detached" if state.detached else f"running, pid {state.owner_pid}"
        print(f"{state.name}  {_host_if(state.slot)}  "
              f"{IPV4_TEMPLATE.format(slot=state.slot, host=NS_SIDE)}  "
              f"{IPV6_TEMPLATE.format(slot=state.slot, host=NS_SIDE)}  {alive}")
    for netns in namespaces:
        if netns not in {s.name for s in states}:
            print(f"{netns}  (namespace without a state file)")
    if not states and not namespaces:
        print("no labs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/imaplab.py."""
    parser = argparse.ArgumentParser(
        prog="imaplab.py", description="Run a Dovecot (or Cyrus) IMAP lab in a network namespace.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a lab and leave it running")
    start.add_argument("--name", help="namespace name (default: imaptap-lab-<pid>-<random>)")
    start.add_argument("--no-offloads", action="store_true",
                       help="turn off TX checksum offload on the veth (MTU-sized segments)")
    start.add_argument("--json", action="store_true", help="print the details as JSON")
    start.add_argument("--server", choices=list(Server), default=Server.DOVECOT,
                       help="the IMAP server (default dovecot; cyrus is unpacked from the .debs scripts/setup fetched)")
    stop = sub.add_parser("stop", help="stop labs started by `start`, and leftovers")
    stop.add_argument("names", nargs="*", help="stop these labs (any owner)")
    stop.add_argument("--all", action="store_true",
                      help="also stop labs that running processes (tests) own")
    sub.add_parser("status", help="list labs")
    # Internal: run inside the namespace by Lab._build (no ethtool binary needed).
    txc = sub.add_parser("_tx-checksum", help=argparse.SUPPRESS)
    txc.add_argument("ifname")
    txc.add_argument("state", choices=("on", "off"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """scripts/imaplab.py: start, stop or list labs."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("imaplab: needs root", file=sys.stderr)
        return 2
    try:
        if args.command == "_tx-checksum":
            _set_tx_checksum(args.ifname, args.state == "on")
            return 0
        return {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status}[args.command](args)
    except LabError as err:
        print(f"imaplab: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
