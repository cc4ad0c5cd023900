"""The installation's password-fingerprint key: made once, kept in a file only its owner reads.

A password's fingerprint (`imaptap.imap.audit.PasswordFingerprint`) is an HMAC under this key,
so the same password gives the same fingerprint in every run of this installation and the
fingerprints of two installations cannot be compared.  The key never appears in any output.

Where it lives, the first that applies (README, "Password fingerprints"):

1. ``--password-key FILE``;
2. ``$STATE_DIRECTORY/password-key`` (systemd's ``StateDirectory=imaptap``);
3. ``$XDG_STATE_HOME/imaptap/password-key``;
4. ``/var/lib/imaptap/password-key`` for root;
5. ``~/.local/state/imaptap/password-key``.

The file holds the key as 64 hex digits and a newline, mode 0600, in a directory made 0700.
A file that others may read is refused, as ssh refuses such a private key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Bytes of key made: HMAC-SHA256's output length (RFC 2104 section 3).
KEY_BYTES = 32
FILE_NAME = "password-key"
#: Where root keeps it when no state directory is named.
ROOT_STATE_DIR = Path("/var/lib/imaptap")
#: Permission bits a key file must not have: anything for group or others.
FORBIDDEN_MODE = 0o077


class PasswordKeyError(Exception):
    """The key file cannot be used: one line, naming the file."""


def default_path(env: dict[str, str] | None = None, uid: int | None = None) -> Path:
    """Where the key lives when no ``--password-key`` is given (the module's list, 2 to 5)."""
    env = dict(os.environ) if env is None else env
    uid = os.geteuid() if uid is None else uid
    if env.get("STATE_DIRECTORY"):
        # systemd may name several, separated by colons: the first is this service's own
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / FILE_NAME
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "imaptap" / FILE_NAME
    if uid == 0:
        return ROOT_STATE_DIR / FILE_NAME
    return Path(env.get("HOME") or os.path.expanduser("~")) / ".local" / "state" / "imaptap" / FILE_NAME


def load(path: Path) -> bytes:
    """The key in ``path``; PasswordKeyError if it is unreadable, malformed or readable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PasswordKeyError(f"cannot read the password key {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise PasswordKeyError(f"the password key {path} is not a regular file")
        if mode & FORBIDDEN_MODE:
            raise PasswordKeyError(f"the password key {path} is open to others (mode {stat.S_IMODE(mode):04o}):"
                                   f" chmod 600 {path}")
        text = f.read(4 * KEY_BYTES).strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < KEY_BYTES:
        raise PasswordKeyError(f"{path} is not a password key ({2 * KEY_BYTES} hex digits)")
    return key


def load_or_create(path: Path) -> tuple[bytes, bool]:
    """The key in ``path``, made there first if there is none: (key, made now).

    Made in a private temporary file and linked into place, so two runs starting at once end
    with the same key and neither ever reads a half-written one.  PasswordKeyError (one line)
    when it can be neither read nor made.
    """
    if os.path.lexists(path):
        return load(path), False
    try:
        _make_dirs(path.parent)
        # os.urandom is the kernel's CSPRNG, as the secrets module's; that module would import
        # hashlib and OpenSSL into every run for this once-per-installation step
        key = os.urandom(KEY_BYTES)
        tmp = path.parent / f".{FILE_NAME}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(key.hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another run made it first: theirs stands
                return load(path), False
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise PasswordKeyError(f"cannot make the password key {path}: {exc.strerror or exc}") from None
    return key, True


def _make_dirs(directory: Path) -> None:
    """``directory`` and its missing parents; the ones made here are 0700."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
