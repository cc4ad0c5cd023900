"""Cyrus IMAP for the lab: the second real server next to Dovecot (``Lab(server="cyrus")``).

Debian's cyrus-imapd conflicts with dovecot-imapd as a package, so it is never installed:
scripts/setup downloads its .debs (cyrus-common, cyrus-imapd, sasl2-bin for saslpasswd2, and
the libraries they need that the machine lacks) with ``apt-get download`` from the machine's
own mirror into `DEB_DIR`, and the lab unpacks them with ``dpkg-deb -x`` into a tree under
`TREE_DIR` the first time it needs them.  The binaries run from that tree with
LD_LIBRARY_PATH pointing into it; Cyrus' own paths (configuration, spool, SASL database,
sockets, the programs the master starts) all come from the lab's configuration files, so
nothing under /etc or /var/lib/cyrus is read or written.

The server runs as `MAIL_USER` (``cyrus_user``): the lab creates no system account.  It
offers LOGIN and AUTHENTICATE PLAIN/LOGIN/CRAM-MD5/SCRAM-SHA-1/SCRAM-SHA-256 in clear
(``allowplaintext``), STARTTLS with the lab's certificate, ID, IDLE, COMPRESS=DEFLATE; users
are in a sasldb made with saslpasswd2, and their INBOX is created at their first login.
Cyrus 3.6 answers LOGIN with one ~1 KB ``OK [CAPABILITY ...]`` and ID with ~600 bytes.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEB_DIR = Path("/var/cache/imaptap/cyrus-debs")
"""Where scripts/setup puts the .debs (a cache: removing it only means downloading again)."""
TREE_DIR = Path("/var/lib/imaptap-lab/cyrus")
"""Unpacked trees, one per cyrus-common version, made at run time."""
COMPLETE_MARK = ".imaptap-unpacked"
"""Written last into an unpacked tree: a tree without it was cut short and is made again."""
MAIL_USER, MAIL_GROUP = "nobody", "nogroup"
"""Cyrus' services run as this user (cyrus_user): the lab adds no account to the system."""
SERVER_NAME = "imaptap-lab"
"""The name in Cyrus' greeting and the SASL realm of the lab's users."""
BIN = "usr/lib/cyrus/bin"
"""Cyrus' programs inside an unpacked tree."""
SASLPASSWD = "usr/sbin/saslpasswd2"
IDLE_POLL_S = 1
"""Seconds between IDLE's looks at the mailbox (imapidlepoll, default 60): without idled a
delivered mail reaches an IDLE client only on the next poll."""
COMMAND_TIMEOUT = 60.0
"""Bound on unpacking the .debs and on saslpasswd2; unpacking takes a second or two."""
APPEND_TIMEOUT = 15.0
"""Bound on one delivery (an APPEND over the namespace's loopback)."""

REQUIRED_PACKAGES = ("cyrus-common", "cyrus-imapd", "sasl2-bin")


class CyrusError(RuntimeError):
    """Cyrus cannot be set up (the .debs are missing, a tool failed); the message says why."""


def _deb_version(path: Path) -> str:
    """The version in a .deb's file name (name_version_arch.deb; epochs come as %3a)."""
    return path.name.split("_")[1].replace("%3a", ":")


def debs() -> list[Path]:
    """The downloaded .debs; CyrusError naming scripts/setup when a required one is missing."""
    found = sorted(DEB_DIR.glob("*.deb")) if DEB_DIR.is_dir() else []
    names = {p.name.split("_")[0] for p in found}
    missing = [p for p in REQUIRED_PACKAGES if p not in names]
    if missing:
        raise CyrusError(f"the Cyrus .debs ({', '.join(missing)}) are not in {DEB_DIR}; run scripts/setup")
    return found


def version() -> str:
    """The Debian version of the downloaded cyrus-common, e.g. ``3.6.1-4+deb12u5``."""
    (common,) = [p for p in debs() if p.name.startswith("cyrus-common_")][-1:]
    return _deb_version(common)


def tree() -> Path:
    """The unpacked tree of the downloaded .debs, made now if it is not there yet."""
    packages = debs()
    target = TREE_DIR / version()
    if (target / COMPLETE_MARK).is_file():
        return target
    TREE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=TREE_DIR))
    try:
        for deb in packages:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], capture_output=True,
                                  timeout=COMMAND_TIMEOUT)
            if proc.returncode != 0:
                raise CyrusError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.decode(errors='replace').strip()}")
        (work / COMPLETE_MARK).write_text(json.dumps([p.name for p in packages]) + "\n")
        work.chmod(0o755)
        if target.exists():  # a half-made tree of a run that died
            shutil.rmtree(target, ignore_errors=True)
        try:
            work.rename(target)
        except OSError:
            if not (target / COMPLETE_MARK).is_file():  # else another lab unpacked it meanwhile
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def library_path(root: Path) -> str:
    """LD_LIBRARY_PATH for the tree's programs: its multiarch library directories."""
    dirs = [d for base in ("usr/lib", "lib") for d in sorted((root / base).glob("*-linux-gnu*")) if d.is_dir()]
    return ":".join(str(d) for d in dirs)


def environment(root: Path) -> dict[str, str]:
    """The environment the tree's programs run with."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = library_path(root)
    return env


IMAPD_CONF_TEMPLATE = """\
# Written by imaptap's lab (imaptap_lab/cyrus.py) for one lab; /etc/imapd.conf is not read.
configdirectory: {tmp}/conf
partition-default: {tmp}/spool
defaultpartition: default
servername: {servername}
cyrus_user: {user}
cyrus_group: {group}
# Plain-text authentication on port 143 is the point of the lab.
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {tmp}/sasldb2
sasl_mech_list: PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256
# Every user's INBOX is made at the first login.
autocreate_quota: 0
# The default 3 s pause after a failed login only slows failed-login tests down.
failedloginpause: 0
imapidlepoll: {idle_poll}
tls_server_cert: {tmp}/tls/cert.pem
tls_server_key: {tmp}/tls/key.pem
"""

CYRUS_CONF_TEMPLATE = """\
# Written by imaptap's lab (imaptap_lab/cyrus.py): the master's services, with this lab's paths.
START {{
  recover cmd="{bin}/ctl_cyrusdb -C {conf} -r"
}}
SERVICES {{
  imap cmd="{bin}/imapd -C {conf}" listen="{port}" prefork=0
  imapalt cmd="{bin}/imapd -C {conf}" listen="{alt_port}" prefork=0
}}
EVENTS {{
}}
"""


def write_files(tmp: Path, users: dict[str, str], port: int, alt_port: int) -> list[str]:
    """Write the configuration, spool, SASL database of ``users`` and a TLS certificate into
    ``tmp``; return the command line of the master (``tmp/cyrus.log`` its log)."""
    root = tree()
    uid = pwd.getpwnam(MAIL_USER).pw_uid
    gid = grp.getgrnam(MAIL_GROUP).gr_gid
    # conf/socket: each imapd binds a datagram socket there to hear from idled
    for sub in ("conf", "conf/socket", "spool", "run", "tls"):
        (tmp / sub).mkdir(mode=0o750)
    _certificate(tmp / "tls")
    sasldb = tmp / "sasldb2"
    for user, password in users.items():
        if any(c in user + password for c in "\r\n\0"):
            raise CyrusError(f"user {user!r}: CR, LF and NUL cannot go in a SASL password")
        proc = subprocess.run([str(root / SASLPASSWD), "-f", str(sasldb), "-p", "-c", "-u", SERVER_NAME, user],
                              input=password.encode() + b"\n", capture_output=True, env=environment(root),
                              timeout=COMMAND_TIMEOUT)
        if proc.returncode != 0:
            raise CyrusError(f"saslpasswd2 failed for {user}: {proc.stderr.decode(errors='replace').strip()}")
    for path in (tmp / "conf", tmp / "conf/socket", tmp / "spool", tmp / "run", tmp / "tls", sasldb,
                 *(tmp / "tls").iterdir()):
        os.chown(path, uid, gid)
    conf = tmp / "imapd.conf"
    conf.write_text(IMAPD_CONF_TEMPLATE.format(tmp=tmp, servername=SERVER_NAME, user=MAIL_USER, group=MAIL_GROUP,
                                               idle_poll=IDLE_POLL_S))
    services = tmp / "cyrus.conf"
    services.write_text(CYRUS_CONF_TEMPLATE.format(bin=root / BIN, conf=conf, port=port, alt_port=alt_port))
    # -D keeps stderr open (into the lab's cyrus.stderr); without -d the master stays in the foreground.
    return [str(root / BIN / "master"), "-C", str(conf), "-M", str(services), "-p", str(tmp / "run/master.pid"),
            "-D", "-L", str(tmp / "cyrus.log")]


def _certificate(directory: Path) -> None:
    proc = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "7", "-subj", "/CN=imaptap-lab", "-keyout", str(directory / "key.pem"),
         "-out", str(directory / "cert.pem")], capture_output=True, timeout=COMMAND_TIMEOUT)
    if proc.returncode != 0:
        raise CyrusError(f"openssl failed: {proc.stderr.decode(errors='replace').strip()}")


#: The delivery client, run inside the lab's namespace: it logs in over the namespace's loopback
#: (never seen on the veth that imaptap and tcpdump watch) and APPENDs the message.
APPEND_CLIENT = r"""
import imaplib, json, sys
job = json.loads(sys.stdin.buffer.readline())
imap = imaplib.IMAP4("127.0.0.1", job["port"], timeout=job["timeout"])
imap.login(job["user"], job["password"])
typ, data = imap.append(job["mailbox"], None, None, sys.stdin.buffer.read())
imap.logout()
if typ != "OK":
    sys.exit(f"APPEND: {typ} {data}")
"""


def append_command(netns: str) -> list[str]:
    """The delivery client's command line inside ``netns``; its stdin: `append_input`."""
    return ["ip", "netns", "exec", netns, sys.executable, "-c", APPEND_CLIENT]


def append_input(user: str, password: str, message: bytes, mailbox: str, port: int) -> bytes:
    """What the delivery client reads: the job as one JSON line, then the message."""
    job = {"user": user, "password": password, "mailbox": mailbox, "port": port, "timeout": APPEND_TIMEOUT}
    return json.dumps(job).encode() + b"\n" + message


def log_names() -> tuple[str, ...]:
    """The files of a lab's directory that hold what Cyrus said (its services log to syslog)."""
    return ("cyrus.stderr", "cyrus.log")
