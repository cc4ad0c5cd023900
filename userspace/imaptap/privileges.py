"""Giving up root once the kernel programs are attached (tcpdump's -Z, for imaptap).

Live capture needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) to load and attach its
programs.  After that, the process only reads a ring buffer through descriptors it already
holds, writes to files it already opened, updates one BPF map (a flow turned encrypted or
compressed), attaches its loaded programs to an interface that came back and, at the end,
detaches them.  `drop` takes it down to that:

- the user and group become an unprivileged user's (``nobody`` by default), with no
  supplementary groups;
- of all capabilities, only CAP_NET_ADMIN (detaching the programs, and attaching them again to
  an interface that came back) and CAP_BPF (the map updates and BPF links; CAP_SYS_ADMIN on
  kernels older than CAP_BPF) stay, and every other one leaves the bounding set too;
- no_new_privs is set, so nothing it could execute gains privileges.

Python imports modules lazily, so the new user must be able to read the interpreter's
directories: if it cannot (a virtualenv under /root, say), the user stays root but the
capabilities are dropped all the same, and the note returned says so.  ``-Z root`` keeps
everything, as with tcpdump.

A process that is not root but was given the capabilities (a systemd unit's
AmbientCapabilities, file capabilities) cannot change its user; it still gives up every
capability but the kept ones, clears its ambient set and sets no_new_privs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import stat
import sys
from typing import NamedTuple

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_BPF: "CAP_BPF"}
DEFAULT_USER = "nobody"

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """Privileges could not be dropped as asked."""


class Dropped(NamedTuple):
    """What `drop` left: the user the process runs as, its capabilities, and a note for the user
    when it could not do all it was asked (None otherwise).  ``capabilities`` is None when they
    were left as they were."""

    user: str
    capabilities: list[str] | None
    note: str | None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def lookup(user: str) -> pwd.struct_passwd:
    """The password entry of ``user`` (a name or a number); `PrivilegeError` if there is none."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise PrivilegeError(f"no such user: {user}") from None


def _user_name(uid: int) -> str:
    """The name of ``uid``, or the number where it has none (a container's arbitrary uid)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def kept_capabilities() -> list[int]:
    """The capabilities a capture keeps after `drop`."""
    return [CAP_NET_ADMIN, CAP_BPF if _last_cap() >= CAP_BPF else CAP_SYS_ADMIN]


def _can_enter(path: str, uid: int, gids: set[int], need: int) -> bool:
    """``path`` and every directory above it are searchable by uid/gids, and ``path`` grants ``need``
    (a mask of r=4, x=1) as well.  Root-less mode bits only: ACLs are not consulted."""
    path = os.path.abspath(path)
    parts = []
    while True:
        parts.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for i, p in enumerate(parts):
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_uid == uid:
            bits = st.st_mode >> 6
        elif st.st_gid in gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        want = need if i == 0 else 1
        if stat.S_ISDIR(st.st_mode) and bits & want != want:
            return False
    return True


def python_readable_by(uid: int, gid: int) -> bool:
    """Every directory Python may import from is readable by this user."""
    dirs = {p for p in sys.path if p and os.path.isdir(p)}
    return all(_can_enter(d, uid, {gid}, 5) for d in dirs)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: ctypes.CDLL, *args: int) -> None:
    if libc.prctl(*(ctypes.c_ulong(a) for a in args), *(ctypes.c_ulong(0) for _ in range(5 - len(args)))) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"prctl({args[0]}) failed: {os.strerror(err)}")


def drop(user: str = DEFAULT_USER) -> Dropped:
    """Drop to ``user`` keeping only `kept_capabilities`.

    Call it from the thread that will detach the programs: capabilities belong to threads, and
    the other threads of the process lose all of theirs when the user changes.
    """
    entry = lookup(user)
    if entry.pw_uid == 0:  # -Z root: left as they are
        return Dropped(_user_name(os.geteuid()), None, None)
    libc = _libc()
    keep = kept_capabilities()
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    if os.geteuid() != 0:
        return _narrow(libc, keep, mask)
    # The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            _prctl(libc, _PR_CAPBSET_DROP, cap)
    try:
        _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except PrivilegeError:
        pass  # kernels before 4.3 have no ambient set
    switch = python_readable_by(entry.pw_uid, entry.pw_gid)
    if switch:
        _prctl(libc, _PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
        os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
        _prctl(libc, _PR_SET_KEEPCAPS, 0)
    _capset(libc, mask)
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    kept = [CAP_NAMES[c] for c in keep]
    if switch:
        return Dropped(entry.pw_name, kept, None)
    return Dropped("root", kept, f"staying root (with only {' and '.join(kept)}): {entry.pw_name} cannot read"
                   " this Python's directories, so it could not import the modules still to come")


def drop_thread_capabilities() -> None:
    """Give up every capability of the calling thread (a thread that only serves, such as the
    metrics server's): it inherited those of the thread that made it."""
    _capset(_libc(), 0)


def keep_map_access() -> None:
    """A live worker's capabilities: of those it holds, only CAP_BPF (CAP_SYS_ADMIN before it)
    stays, for its flows' updates of the payload map; attaching and detaching are the parent's."""
    _capset(_libc(), _permitted() & 1 << kept_capabilities()[1])


def _capset(libc: ctypes.CDLL, mask: int) -> None:
    """Effective and permitted set to ``mask``, inheritable emptied (this thread)."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def _permitted() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return 0


def _narrow(libc: ctypes.CDLL, keep: list[int], mask: int) -> Dropped:
    """Not root: no user to change to, but capabilities beyond ``keep`` go (those it has)."""
    name = _user_name(os.geteuid())
    held = _permitted()
    if not held:  # an ordinary user: nothing to give up
        return Dropped(name, None, None)
    try:
        _prctl(libc, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    except PrivilegeError:
        pass  # kernels before 4.3 have no ambient set
    _capset(libc, mask & held)
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    return Dropped(name, [CAP_NAMES[c] for c in keep if held >> c & 1], None)
