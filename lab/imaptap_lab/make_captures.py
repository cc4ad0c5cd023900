#!/usr/bin/env python3
"""Regenerate pcaps/: real IMAP clients against a real Dovecot in a lab namespace.

Usage (as root):  scripts/make-captures [--only NAME ...] [--keep-going]

Every capture is one scenario: a client (Python's imaplib, curl, mbsync, or a small raw
socket client where no real client produces the wire form wanted) runs against the Dovecot
of scripts/imaplab.py while tcpdump records the lab's veth. Next to each scenario's code
sit the facts it produces (user, mechanism, commands, mailboxes ...), written from how the
session was driven. The script then checks those facts against the capture with its own
small reassembler (literals, AUTHENTICATE, IDLE, STARTTLS and COMPRESS aware), runs tshark
on every capture to record what tshark reports differently, and writes pcaps/facts.json
and pcaps/MANIFEST.md. Any disagreement between the stated facts and the capture stops the
script with a non-zero exit: a capture whose facts are wrong is worse than none.

The lab's veth runs with TX checksum offload off, so the captures hold MTU-sized segments
with valid TCP checksums, like a physical wire (see Lab(offloads=False)).
Standard library only; tshark, curl and mbsync must be installed (scripts/setup).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import imaplib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from imaplab import ALT_IMAP_PORT, IMAP_PORT, Lab, LabError  # noqa: E402

PCAP_DIR = HERE.parent / "pcaps"
CLIENT_TIMEOUT = 15.0
"""Bound on any client operation; the lab answers in milliseconds."""
PART_PAUSE = 0.2
"""Pause between the parts of a deliberately split write: with TCP_NODELAY each part then
leaves as its own TCP segment."""
SMALL_MSS = 96
"""MSS the split-line client announces, so Dovecot's own responses are cut into several
segments (the kernel's floor is 88)."""
IDLE_SETTLE = 0.5
"""Time between entering IDLE and delivering the mail, so the EXISTS is clearly inside it."""
MAX_CAPTURE_BYTES = 64 * 1024
"""Captures are meant to stay small; one bigger than this means a scenario went wrong."""
TSHARK_TIMEOUT = 60.0

LAB_DATE = "Mon, 06 Jan 2025 10:00:00 +0000"
"""Fixed Date: header, so the mails (and the captures) do not change with the clock."""


# ------------------------------------------------------------------------------------------
# Facts
# ------------------------------------------------------------------------------------------
def flow(client_kind: str, username: str | None, *, commands: list[str],
         auth_command: str | None = "LOGIN", auth_mechanism: str | None = "LOGIN",
         login_ok: bool | None = True, login_failures: int = 0, starttls: str = "offered",
         compressed: bool = False, mailboxes: list[str] | None = None,
         mailboxes_wire: list[str] | None = None, client_id: dict | None = None,
         server_id: dict | None = None, cleartext_credentials: bool = True,
         port: int = IMAP_PORT, family: str = "ipv4") -> dict:
    """The facts a correct analyzer reports for one TCP connection (see MANIFEST.md)."""
    mailboxes = mailboxes or []
    return {
        "port": port, "family": family, "client_kind": client_kind, "username": username,
        "auth_command": auth_command, "auth_mechanism": auth_mechanism, "login_ok": login_ok,
        "login_failures": login_failures, "starttls": starttls, "compressed": compressed,
        "mailboxes": mailboxes,
        "mailboxes_wire": mailboxes_wire if mailboxes_wire is not None else list(mailboxes),
        "client_id": client_id, "server_id": server_id, "server_software": "Dovecot",
        "commands": commands, "cleartext_credentials": cleartext_credentials,
    }


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain_secret(user: str, password: str) -> list[str]:
    """The password and the base64 SASL PLAIN message that carries it."""
    return [password, b64(f"\0{user}\0{password}")]


def mutf7(name: str) -> str:
    """Mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3)."""
    out, pending = [], []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Scenario:
    name: str
    client: str
    description: str
    run: Callable[[Lab], "Outcome"]


@dataclass
class Outcome:
    flows: list[dict]
    secrets: list[str]
    decoys: list[str] = field(default_factory=list)
    notes: str = ""


SCENARIOS: list[Scenario] = []


def scenario(name: str, client: str, description: str):
    def register(func: Callable[[Lab], Outcome]) -> Callable[[Lab], Outcome]:
        SCENARIOS.append(Scenario(name, client, description, func))
        return func
    return register


# ------------------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------------------
def imap4(lab: Lab, port: int = IMAP_PORT, *, host: str | None = None) -> imaplib.IMAP4:
    return imaplib.IMAP4(host or lab.server4, port, timeout=CLIENT_TIMEOUT)


class RawClient:
    """A minimal IMAP client that writes exactly the bytes it is given, when it is told to."""

    def __init__(self, host: str, port: int = IMAP_PORT, *, mss: int | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mss:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect((host, port))
        self.buf = b""
        self.greeting = self.line()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        """One response line without CRLF; a trailing literal's bytes are appended raw."""
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        literal = re.search(rb"\{(\d+)\}$", line)
        if literal:
            size = int(literal.group(1))
            while len(self.buf) < size:
                self._fill()
            data, self.buf = self.buf[:size], self.buf[size:]
            return line + b"\r\n" + data + self.line()
        return line

    def until(self, prefix: bytes) -> list[bytes]:
        """Read lines until one starts with prefix (a tag plus space, or b'+')."""
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(prefix):
                return lines

    def send(self, *parts: bytes) -> None:
        """Send parts as separate TCP segments (a pause between them)."""
        for index, part in enumerate(parts):
            if index:
                time.sleep(PART_PAUSE)
            self.sock.sendall(part)

    def command(self, tag: str, text: str | bytes) -> bytes:
        """Send `tag text` and return the tagged completion line."""
        data = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.until(tag.encode() + b" ")[-1]

    def expect_ok(self, tag: str, text: str | bytes) -> bytes:
        status = self.command(tag, text)
        if not status.split(b" ", 2)[1:2] == [b"OK"]:
            raise RuntimeError(f"{tag} {text!r}: {status!r}")
        return status

    def close(self) -> None:
        self.sock.close()


def ok(result: tuple) -> list:
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"IMAP command failed: {typ} {data}")
    return data


def mail(subject: str, body: str, *, msgid: str, sender: str = "lab@imaptap.test",
         to: str = "user@imaptap.test", extra: str = "") -> bytes:
    text = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {LAB_DATE}\r\n"
            f"Message-ID: <{msgid}@imaptap.test>\r\n{extra}MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{body}")
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def seed_mailboxes(lab: Lab) -> None:
    """A few mails per user, so SELECT, FETCH and mbsync have something to show."""
    counts = {"alice": 3, "bob": 1, "carol": 2, "dave": 5}
    for user, count in counts.items():
        for n in range(1, count + 1):
            lab.deliver(user, mail(f"Lab mail {n} for {user}",
                                   f"Hello {user},\n\nthis is lab mail number {n}.\n",
                                   msgid=f"seed-{user}-{n}", to=f"{user}@imaptap.test"))


# ------------------------------------------------------------------------------------------
# Scenarios (one capture each; facts written next to the code that produces them)
# ------------------------------------------------------------------------------------------
@scenario("login-atom", "imaplib",
          "LOGIN alice (atom user; imaplib always quotes the password), SELECT INBOX, "
          "FETCH, LOGOUT")
def login_atom(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab)
    ok(imap.login("alice", pw))
    ok(imap.select("INBOX"))
    ok(imap.fetch("1", "(FLAGS BODY.PEEK[])"))
    imap.logout()
    return Outcome([flow("imaplib", "alice", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "LOGIN", "SELECT", "FETCH", "LOGOUT"])], [pw])


@scenario("login-quoted", "imaplib",
          "LOGIN bob with a password that needs quoting and escaping; CREATE and SELECT a "
          'name with a space, one with quotes, and "Entwürfe" in modified UTF-7')
def login_quoted(lab: Lab) -> Outcome:
    pw = lab.users["bob"]
    names = ["Sent Items", 'Say "Hi"', "Entwürfe"]
    wire = [mutf7(n) for n in names]          # ['Sent Items', 'Say "Hi"', 'Entw&APw-rfe']
    imap = imap4(lab)
    ok(imap.login("bob", pw))                 # LOGIN bob "Bob Pw \"quoted\" 42"
    for name in wire:
        ok(imap.create(quote(name)))
    ok(imap.list('""', "*"))
    for name in wire:
        ok(imap.select(quote(name)))
    imap.logout()
    return Outcome([flow("imaplib", "bob", mailboxes=names, mailboxes_wire=wire,
                         commands=["CAPABILITY", "LOGIN", "CREATE", "CREATE", "CREATE", "LIST",
                                   "SELECT", "SELECT", "SELECT", "LOGOUT"])],
                   [pw, quote(pw)[1:-1]])  # and the escaped form that went on the wire


@scenario("login-literal", "raw",
          "LOGIN with user and password as synchronizing {n} literals (waits for '+'), then a "
          "second connection with non-synchronizing {n+} literals (LITERAL+), SELECT too")
def login_literal(lab: Lab) -> Outcome:
    alice, bob = lab.users["alice"], lab.users["bob"]
    raw = RawClient(lab.server4)
    raw.send(b"L1 LOGIN {5}\r\n")
    raw.until(b"+")
    raw.send(b"alice {%d}\r\n" % len(alice))
    raw.until(b"+")
    raw.send(alice.encode() + b"\r\n")
    raw.until(b"L1 ")
    raw.expect_ok("L2", "SELECT INBOX")
    raw.expect_ok("L3", "LOGOUT")
    raw.close()

    raw = RawClient(lab.server4)
    raw.send(b"L1 LOGIN {3+}\r\nbob {%d+}\r\n%s\r\n" % (len(bob.encode()), bob.encode()))
    status = raw.until(b"L1 ")[-1]
    if not status.startswith(b"L1 OK"):
        raise RuntimeError(f"LOGIN with LITERAL+ failed: {status!r}")
    raw.expect_ok("L2", "SELECT {5+}\r\nINBOX")
    raw.expect_ok("L3", "LOGOUT")
    raw.close()
    return Outcome([
        flow("raw", "alice", mailboxes=["INBOX"], commands=["LOGIN", "SELECT", "LOGOUT"]),
        flow("raw", "bob", mailboxes=["INBOX"], commands=["LOGIN", "SELECT", "LOGOUT"]),
    ], [alice, bob])


@scenario("auth-plain-ir", "curl",
          "curl --sasl-ir --login-options AUTH=PLAIN: AUTHENTICATE PLAIN with the credentials "
          "as initial response (SASL-IR), then fetches a message")
def auth_plain_ir(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    run_curl(["--sasl-ir", "--login-options", "AUTH=PLAIN", "-u", f"alice:{pw}",
              f"imap://{lab.server4}/INBOX;UID=1"])
    return Outcome([flow("curl", "alice", auth_command="AUTHENTICATE", auth_mechanism="PLAIN",
                         mailboxes=["INBOX"],
                         commands=["CAPABILITY", "AUTHENTICATE", "SELECT", "UID FETCH",
                                   "LOGOUT"])],
                   plain_secret("alice", pw))


@scenario("auth-plain", "imaplib",
          "AUTHENTICATE PLAIN without initial response: the credentials follow the server's "
          "'+ ' continuation")
def auth_plain(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    imap = imap4(lab)
    ok(imap.authenticate("PLAIN", lambda _challenge: f"\0carol\0{pw}".encode()))
    ok(imap.select("INBOX"))
    imap.logout()
    return Outcome([flow("imaplib", "carol", auth_command="AUTHENTICATE",
                         auth_mechanism="PLAIN", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "AUTHENTICATE", "SELECT", "LOGOUT"])],
                   plain_secret("carol", pw))


@scenario("auth-login", "imaplib",
          "AUTHENTICATE LOGIN: user and password as base64 answers to the 'Username:' and "
          "'Password:' continuations")
def auth_login(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab)
    ok(imap.authenticate("LOGIN", lambda challenge:
                         b"alice" if challenge.lower().startswith(b"user") else pw.encode()))
    ok(imap.select("INBOX"))
    imap.logout()
    return Outcome([flow("imaplib", "alice", auth_command="AUTHENTICATE",
                         auth_mechanism="LOGIN", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "AUTHENTICATE", "SELECT", "LOGOUT"])],
                   [pw, b64(pw)])


@scenario("starttls", "imaplib",
          "STARTTLS accepted, then LOGIN inside TLS: only CAPABILITY and STARTTLS are visible")
def starttls(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE       # the lab's certificate is self-signed
    imap = imap4(lab)
    ok(imap.starttls(ssl_context=context))
    ok(imap.login("alice", pw))
    ok(imap.select("INBOX"))
    imap.logout()
    return Outcome([flow("imaplib", None, auth_command=None, auth_mechanism=None,
                         login_ok=None, starttls="completed", cleartext_credentials=False,
                         commands=["CAPABILITY", "STARTTLS"])], [pw],
                   notes="CAPABILITY, LOGIN, SELECT and LOGOUT happen inside TLS.")


@scenario("starttls-not-used", "imaplib",
          "STARTTLS offered in the greeting and in CAPABILITY, but the client logs in in clear")
def starttls_not_used(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    imap = imap4(lab)
    ok(imap.login("carol", pw))
    ok(imap.capability())
    ok(imap.noop())
    imap.logout()
    return Outcome([flow("imaplib", "carol",
                         commands=["CAPABILITY", "LOGIN", "CAPABILITY", "NOOP", "LOGOUT"])],
                   [pw])


@scenario("compress", "mbsync",
          "mbsync (isync 1.4) pulls dave's INBOX (5 mails) into a local Maildir; it turns on "
          "COMPRESS DEFLATE right after LOGIN, so everything after is deflated")
def compress(lab: Lab) -> Outcome:
    pw = lab.users["dave"]
    with tempfile.TemporaryDirectory(prefix="imaptap-mbsync-") as tmp:
        conf = Path(tmp) / "mbsyncrc"
        conf.write_text(MBSYNC_CONF.format(host=lab.server4, port=IMAP_PORT, user="dave",
                                           password=pw, tmp=tmp))
        proc = subprocess.run(["mbsync", "-c", str(conf), "-a"], capture_output=True,
                              timeout=CLIENT_TIMEOUT * 2)
        if proc.returncode != 0:
            raise RuntimeError("mbsync failed: " + proc.stderr.decode(errors="replace"))
        got = list((Path(tmp) / "INBOX").glob("*/*"))
        if len(got) != 5:
            raise RuntimeError(f"mbsync fetched {len(got)} mails, expected 5")
    return Outcome([flow("mbsync", "dave", compressed=True, mailboxes=["INBOX"],
                         commands=MBSYNC_COMMANDS)], [pw],
                   notes="Commands after COMPRESS are only readable after inflating "
                         "(raw deflate, one stream per direction).")


MBSYNC_CONF = """\
IMAPAccount lab
Host {host}
Port {port}
User {user}
Pass "{password}"
# isync 1.4 spells it SSLType (TLSType is 1.5); None = no STARTTLS.
SSLType None
# LOGIN = the IMAP LOGIN command; mbsync warns and then sends it in clear.
AuthMechs LOGIN

IMAPStore lab-far
Account lab

MaildirStore lab-near
Path {tmp}/
Inbox {tmp}/INBOX

Channel lab
Far :lab-far:
Near :lab-near:
Sync Pull
Create Near
SyncState *
"""
MBSYNC_COMMANDS = ["LOGIN", "COMPRESS", "NAMESPACE", "SELECT", "UID FETCH",
                   *["UID FETCH"] * 5, "LOGOUT"]
"""What mbsync 1.4.4 sends for a one-mailbox pull of 5 mails (checked against the inflated
stream): no CAPABILITY (the greeting has them), then one UID FETCH for UIDs and flags and
five pipelined UID FETCH BODY.PEEK[], whose responses interleave with the tagged OKs."""


@scenario("id", "imaplib",
          'ID ("name" "imaptap-lab" "version" "1.2") before LOGIN; Dovecot answers '
          '* ID ("name" "Dovecot")')
def client_id(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
    imap = imap4(lab)
    ok(imap._simple_command("ID", '("name" "imaptap-lab" "version" "1.2")'))
    ok(imap.login("alice", pw))
    imap.logout()
    return Outcome([flow("imaplib", "alice", client_id={"name": "imaptap-lab", "version": "1.2"},
                         server_id={"name": "Dovecot"},
                         commands=["CAPABILITY", "ID", "LOGIN", "LOGOUT"])], [pw])


@scenario("idle", "raw",
          "SELECT INBOX, IDLE; a mail is delivered meanwhile (doveadm save) so the server "
          "sends * 4 EXISTS inside IDLE; DONE, FETCH the new mail")
def idle(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    raw = RawClient(lab.server4)
    raw.expect_ok("i1", f"LOGIN alice {pw}")
    raw.expect_ok("i2", "SELECT INBOX")
    raw.send(b"i3 IDLE\r\n")
    raw.until(b"+")
    time.sleep(IDLE_SETTLE)
    lab.deliver("alice", mail("Arrived during IDLE", "New mail while idling.\n",
                              msgid="idle-delivery", to="alice@imaptap.test"))
    exists = raw.until(b"* ")[-1]
    if not exists.endswith(b" EXISTS"):
        raise RuntimeError(f"expected EXISTS during IDLE, got {exists!r}")
    count = int(exists.split()[1])
    raw.send(b"DONE\r\n")
    raw.until(b"i3 ")
    raw.expect_ok("i4", f"FETCH {count} (FLAGS ENVELOPE)")
    raw.expect_ok("i5", "LOGOUT")
    raw.close()
    return Outcome([flow("raw", "alice", mailboxes=["INBOX"],
                         commands=["LOGIN", "SELECT", "IDLE", "FETCH", "LOGOUT"])], [pw])


WRONG_PASSWORDS = ["Alice-Pw-0000", "alice-pw-7391", "Wrong-Pw-3141"]


@scenario("failed-login", "imaplib",
          "two wrong passwords then the right one on one connection; a second connection "
          "that only fails")
def failed_login(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab)
    for wrong in WRONG_PASSWORDS[:2]:
        with contextlib.suppress(imaplib.IMAP4.error):
            imap.login("alice", wrong)
            raise RuntimeError("a wrong password was accepted")
    ok(imap.login("alice", pw))
    ok(imap.select("INBOX"))
    imap.logout()
    imap = imap4(lab)
    with contextlib.suppress(imaplib.IMAP4.error):
        imap.login("alice", WRONG_PASSWORDS[2])
        raise RuntimeError("a wrong password was accepted")
    imap.logout()
    return Outcome([
        flow("imaplib", "alice", login_failures=2, mailboxes=["INBOX"],
             commands=["CAPABILITY", "LOGIN", "LOGIN", "LOGIN", "SELECT", "LOGOUT"]),
        flow("imaplib", "alice", login_ok=False, login_failures=1,
             commands=["CAPABILITY", "LOGIN", "LOGOUT"]),
    ], [pw, *WRONG_PASSWORDS])


FAKE_LINES = (
    "a1 LOGIN mallory evilpw\r\n"
    "* OK [CAPABILITY IMAP4rev1 STARTTLS] Evil ready\r\n"
    "a2 STARTTLS\r\n"
    "a2 OK Begin TLS negotiation\r\n"
    "* BYE bye\r\n"
    "+ go ahead\r\n"
    "X-Spam-Flag: NO\r\n"
    "{5}\r\n"
    "a3 COMPRESS DEFLATE\r\n"
)
FILLER = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
          "incididunt ut labore et dolore magna aliqua.\r\n") * 8  # ~1 KB of harmless text


def fake_body(variant: str) -> bytes:
    body = FILLER + FAKE_LINES + FILLER + FAKE_LINES + FILLER[:300] + FAKE_LINES
    return mail(f"Protocol lines quoted in a mail ({variant})", body,
                msgid=f"fake-commands-{variant}", sender="mallory@imaptap.test",
                extra="X-Spam-Flag: NO\r\n")


@scenario("fake-commands", "imaplib + raw",
          f"APPEND a {len(fake_body('imaplib')) / 1000:.1f} KB mail whose body holds IMAP-looking lines (a1 LOGIN mallory evilpw, "
          "* BYE, + go ahead, a2 STARTTLS, a3 COMPRESS DEFLATE, {5} ...) far past the first 256 "
          "bytes, then FETCH it back; second connection APPENDs with {n+} in three segments "
          "that each start with a fake line")
def fake_commands(lab: Lab) -> Outcome:
    alice, carol = lab.users["alice"], lab.users["carol"]
    imap = imap4(lab)
    ok(imap.login("alice", alice))
    data = ok(imap.append("INBOX", None, None, fake_body("imaplib")))
    uid = re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1).decode()
    ok(imap.select("INBOX"))
    fetched = ok(imap.uid("FETCH", uid, "(BODY[])"))
    if b"a1 LOGIN mallory evilpw" not in fetched[0][1]:
        raise RuntimeError("the fake lines did not come back")
    imap.logout()

    body = fake_body("raw")
    # Cut the literal right before fake lines, so segments begin with "a1 LOGIN mallory".
    cuts = [m.start() for m in re.finditer(rb"a1 LOGIN mallory", body)]
    parts = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    raw = RawClient(lab.server4)
    raw.expect_ok("f1", f"LOGIN carol {carol}")
    raw.send(b"f2 APPEND INBOX (\\Seen) {%d+}\r\n" % len(body), *parts[:-1],
             parts[-1] + b"\r\n")
    status = raw.until(b"f2 ")[-1]
    uid = re.search(rb"APPENDUID \d+ (\d+)", status).group(1).decode()
    raw.expect_ok("f3", "SELECT INBOX")
    raw.expect_ok("f4", f"UID FETCH {uid} (BODY.PEEK[])")
    raw.expect_ok("f5", "LOGOUT")
    raw.close()
    return Outcome([
        flow("imaplib", "alice", mailboxes=["INBOX"],
             commands=["CAPABILITY", "LOGIN", "APPEND", "SELECT", "UID FETCH", "LOGOUT"]),
        flow("raw", "carol", mailboxes=["INBOX"],
             commands=["LOGIN", "APPEND", "SELECT", "UID FETCH", "LOGOUT"]),
    ], [alice, carol], decoys=["mallory", "evilpw"],
        notes="starttls stays 'offered' and compressed stays false: the STARTTLS and "
              "COMPRESS lines are mail content.")


@scenario("split-line", "raw",
          "client lines cut across TCP segments (LOG|IN ..., SEL|ECT ..., a FETCH cut between "
          "CR and LF); the client announces MSS 96, so Dovecot's greeting and responses are "
          "split across segments too")
def split_line(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    raw = RawClient(lab.server4, mss=SMALL_MSS)
    raw.send(b"s1 CAPABILITY\r\n")
    raw.until(b"s1 ")
    raw.send(b"s2 LOG", b"IN alice " + pw.encode() + b"\r\n")
    raw.until(b"s2 OK")
    raw.send(b"s3 SEL", b"ECT INBOX\r\n")
    raw.until(b"s3 OK")
    raw.send(b"s4 FETCH 1:* (FL", b"AGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r", b"\n")
    raw.until(b"s4 OK")
    raw.send(b"s5 LOGOUT\r\n")
    raw.until(b"s5 ")
    raw.close()
    return Outcome([flow("raw", "alice", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "LOGIN", "SELECT", "FETCH", "LOGOUT"])], [pw])


@scenario("ipv6", "imaplib",
          "a whole session over IPv6: LOGIN alice, SELECT, FETCH, LOGOUT")
def ipv6(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab, host=lab.server6)
    ok(imap.login("alice", pw))
    ok(imap.select("INBOX"))
    ok(imap.fetch("1:2", "(FLAGS ENVELOPE)"))
    imap.logout()
    return Outcome([flow("imaplib", "alice", family="ipv6", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "LOGIN", "SELECT", "FETCH", "LOGOUT"])], [pw])


@scenario("nonstandard-port", "imaplib",
          f"a session on port {ALT_IMAP_PORT}: LOGIN carol, LIST, EXAMINE INBOX, FETCH, LOGOUT")
def nonstandard_port(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    imap = imap4(lab, ALT_IMAP_PORT)
    ok(imap.login("carol", pw))
    ok(imap.list())
    ok(imap.select("INBOX", readonly=True))
    ok(imap.fetch("1", "(BODY.PEEK[HEADER])"))
    imap.logout()
    return Outcome([flow("imaplib", "carol", port=ALT_IMAP_PORT, mailboxes=["INBOX"],
                         commands=["CAPABILITY", "LOGIN", "LIST", "EXAMINE", "FETCH",
                                   "LOGOUT"])], [pw])


@scenario("curl", "curl",
          "curl imap:// lists the mailboxes and fetches a message on one reused connection; "
          "curl picks AUTHENTICATE CRAM-MD5 by itself, so no password crosses the wire")
def curl(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    run_curl(["-u", f"carol:{pw}", f"imap://{lab.server4}/",
              f"imap://{lab.server4}/INBOX;UID=2"])
    return Outcome([flow("curl", "carol", auth_command="AUTHENTICATE",
                         auth_mechanism="CRAM-MD5", cleartext_credentials=False,
                         mailboxes=["INBOX"],
                         commands=["CAPABILITY", "AUTHENTICATE", "LIST", "SELECT", "UID FETCH",
                                   "LOGOUT"])], [pw],
                   notes="The CRAM-MD5 response (base64 of 'carol <hmac>') is added to the "
                         "secrets from the capture, since the challenge is random.")


def run_curl(args: list[str]) -> bytes:
    proc = subprocess.run(["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT), *args],
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError("curl failed: " + proc.stderr.decode(errors="replace"))
    return proc.stdout


HOSTILE_USERS = ["[bold red]root[/]", "\x1b[31mevil\x1b[0m", "\x1b]0;pwned\x07ctl\x08\x7fuser"]
HOSTILE_PASSWORDS = ["Hostile-Pw-0001", "Hostile-Pw-0002", "Hostile-Pw-0003"]


@scenario("hostile-strings", "raw",
          "three connections logging in as '[bold red]root[/]' (quoted), ESC[31mevilESC[0m "
          "(literals) and an OSC title sequence with BEL/BS/DEL (quoted); all refused")
def hostile_strings(lab: Lab) -> Outcome:
    flows = []
    raw = RawClient(lab.server4)
    raw.command("h1", f"LOGIN {quote(HOSTILE_USERS[0])} {quote(HOSTILE_PASSWORDS[0])}")
    raw.expect_ok("h2", "LOGOUT")
    raw.close()
    flows.append(flow("raw", HOSTILE_USERS[0], login_ok=False, login_failures=1,
                      commands=["LOGIN", "LOGOUT"]))

    raw = RawClient(lab.server4)
    user = HOSTILE_USERS[1].encode()
    raw.send(b"h1 LOGIN {%d}\r\n" % len(user))
    raw.until(b"+")
    raw.send(user + b" {%d}\r\n" % len(HOSTILE_PASSWORDS[1]))
    raw.until(b"+")
    raw.send(HOSTILE_PASSWORDS[1].encode() + b"\r\n")
    raw.until(b"h1 ")
    raw.expect_ok("h2", "LOGOUT")
    raw.close()
    flows.append(flow("raw", HOSTILE_USERS[1], login_ok=False, login_failures=1,
                      commands=["LOGIN", "LOGOUT"]))

    raw = RawClient(lab.server4)
    raw.command("h1", f"LOGIN {quote(HOSTILE_USERS[2])} {quote(HOSTILE_PASSWORDS[2])}")
    raw.expect_ok("h2", "LOGOUT")
    raw.close()
    flows.append(flow("raw", HOSTILE_USERS[2], login_ok=False, login_failures=1,
                      commands=["LOGIN", "LOGOUT"]))
    return Outcome(flows, list(HOSTILE_PASSWORDS))


LONG_TAG = "T" + "0123456789" * 6


@scenario("odd-tags", "raw",
          f"tags '.', 'a0000', 'C00000', 'A001' and a {len(LONG_TAG)}-character tag; "
          "CAPABILITY, LOGIN, SELECT, NOOP, FETCH, LOGOUT")
def odd_tags(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    raw = RawClient(lab.server4)
    raw.expect_ok(".", "CAPABILITY")
    raw.expect_ok("a0000", f"LOGIN alice {pw}")
    raw.expect_ok("C00000", "SELECT INBOX")
    raw.expect_ok("A001", "NOOP")
    raw.expect_ok(LONG_TAG, "FETCH 1 (FLAGS)")
    raw.expect_ok(".", "LOGOUT")
    raw.close()
    return Outcome([flow("raw", "alice", mailboxes=["INBOX"],
                         commands=["CAPABILITY", "LOGIN", "SELECT", "NOOP", "FETCH",
                                   "LOGOUT"])], [pw])


@scenario("starttls-refused", "raw",
          "LOGIN carol in clear, then STARTTLS after login, which Dovecot refuses (BAD); the "
          "session goes on in clear (NOOP, LOGOUT)")
def starttls_refused(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    raw = RawClient(lab.server4)
    raw.expect_ok("r1", f"LOGIN carol {pw}")
    status = raw.command("r2", "STARTTLS")
    if b" OK" in status:
        raise RuntimeError("Dovecot accepted STARTTLS after login")
    raw.expect_ok("r3", "NOOP")
    raw.expect_ok("r4", "LOGOUT")
    raw.close()
    return Outcome([flow("raw", "carol", starttls="refused",
                         commands=["LOGIN", "STARTTLS", "NOOP", "LOGOUT"])], [pw])


# ------------------------------------------------------------------------------------------
# Reading captures back: pcap -> TCP connections -> IMAP facts
# ------------------------------------------------------------------------------------------
@dataclass
class Connection:
    client: tuple
    server: tuple
    family: str
    chunks: list = field(default_factory=list)  # (from_client: bool, payload) in order
    next_seq: dict = field(default_factory=dict)


def read_connections(path: Path, ports: set[int]) -> list[Connection]:
    """TCP payloads per connection, in capture order, retransmissions trimmed (stdlib only)."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != 1:
        raise RuntimeError(f"{path}: link type {linktype}, expected Ethernet")
    conns: dict[tuple, Connection] = {}
    offset = 24
    while offset < len(data):
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        ethertype = struct.unpack("!H", frame[12:14])[0]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            total = struct.unpack("!H", frame[16:18])[0]
            if frame[23] != 6:
                continue
            src, dst = socket.inet_ntop(socket.AF_INET, frame[26:30]), \
                socket.inet_ntop(socket.AF_INET, frame[30:34])
            tcp, end, family = 14 + ihl, 14 + total, "ipv4"
        elif ethertype == 0x86DD:
            if frame[20] != 6:
                continue
            plen = struct.unpack("!H", frame[18:20])[0]
            src, dst = socket.inet_ntop(socket.AF_INET6, frame[22:38]), \
                socket.inet_ntop(socket.AF_INET6, frame[38:54])
            tcp, end, family = 54, 54 + plen, "ipv6"
        else:
            continue
        sport, dport, seq = struct.unpack("!HHI", frame[tcp:tcp + 8])
        flags = frame[tcp + 13]
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4:end]
        from_client = dport in ports
        key = ((src, sport), (dst, dport)) if from_client else ((dst, dport), (src, sport))
        if key not in conns:
            if not (flags & 0x02 and not flags & 0x10):
                continue  # only connections whose SYN is in the capture
            conns[key] = Connection(key[0], key[1], family)
        conn = conns[key]
        if flags & 0x02:
            conn.next_seq[from_client] = (seq + 1) & 0xFFFFFFFF
            continue
        if not payload:
            continue  # pure ACK, or a FIN after the last data
        expected = conn.next_seq.get(from_client, seq)
        skip = (expected - seq) & 0xFFFFFFFF
        if skip >= 0x80000000:
            raise RuntimeError(f"{path}: gap in {key}")  # lost data: never on a veth
        payload = payload[skip:] if skip < len(payload) else b""
        if payload:
            conn.chunks.append((from_client, payload))
            conn.next_seq[from_client] = (seq + skip + len(payload)) & 0xFFFFFFFF
    return list(conns.values())


TOKEN_RE = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')


def tokens(pieces: list[bytes]) -> list[bytes | str]:
    """Arguments of a command: atoms and quoted strings (unescaped) as bytes, literals'
    contents as bytes too, and '(' / ')' as str markers. pieces alternate line, literal."""
    out: list[bytes | str] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            out.append(piece)
            continue
        text = re.sub(rb"\{\d+\+?\}$", b"", piece)
        for m in TOKEN_RE.finditer(text):
            if m.group(1):
                out.append("(")
            elif m.group(2):
                out.append(")")
            elif m.group(3) is not None:
                out.append(re.sub(rb"\\(.)", rb"\1", m.group(3)))
            elif m.group(4):
                out.append(m.group(4))
    return out


class Observer:
    """Derives the facts from one connection's bytes, independently of how it was driven.

    It follows literals in both directions, AUTHENTICATE exchanges, IDLE ... DONE, stops at
    a completed STARTTLS and inflates after a completed COMPRESS.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.buf = {True: b"", False: b""}
        self.pending: dict[bool, list[bytes]] = {True: [], False: []}
        self.literal_left = {True: 0, False: 0}
        self.inflate: dict[bool, zlib._Decompress] = {}
        self.tls = False
        self.tags: dict[bytes, str] = {}  # open tag -> command
        self.sasl_tag: bytes | None = None
        self.sasl_lines: list[bytes] = []
        self.idle = False
        self.greeting: bytes | None = None
        self.capabilities: set[bytes] = set()
        self.facts = flow("?", None, commands=[], auth_command=None, auth_mechanism=None,
                          login_ok=None, starttls="none", cleartext_credentials=False,
                          port=conn.server[1], family=conn.family)
        self.facts.pop("client_kind")
        self.sasl_secrets: list[str] = []
        self.cleartext = b""  # everything readable, for the secrets check
        for from_client, payload in conn.chunks:
            self.feed(from_client, payload)
        if self.facts["starttls"] == "none" and b"STARTTLS" in self.capabilities:
            self.facts["starttls"] = "offered"

    def feed(self, side: bool, data: bytes) -> None:
        if self.tls:
            return
        if side in self.inflate:
            data = self.inflate[side].decompress(data)
        self.cleartext += data
        self.buf[side] += data
        while self.buf[side] and not self.tls:
            if self.literal_left[side]:
                take = self.buf[side][:self.literal_left[side]]
                self.buf[side] = self.buf[side][len(take):]
                self.literal_left[side] -= len(take)
                if side:
                    self.pending[side][-1] += take
                continue
            if b"\r\n" not in self.buf[side]:
                return
            line, self.buf[side] = self.buf[side].split(b"\r\n", 1)
            literal = re.search(rb"\{(\d+)\+?\}$", line)
            self.pending[side].append(line)
            if literal:
                self.literal_left[side] = int(literal.group(1))
                self.pending[side].append(b"")
                continue
            pieces, self.pending[side] = self.pending[side], []
            (self.client_line if side else self.server_line)(pieces)

    def client_line(self, pieces: list[bytes]) -> None:
        if self.sasl_tag is not None:
            self.sasl_lines.append(pieces[0])
            return
        if self.idle:
            self.idle = pieces[0].upper() != b"DONE"
            return
        words = pieces[0].split(b" ", 2)
        if len(words) < 2:
            return
        tag, name = words[0], words[1].upper().decode()
        args = tokens([words[2] if len(words) > 2 else b"", *pieces[1:]])
        if name == "UID" and args:
            name = "UID " + args.pop(0).decode().upper()
        self.facts["commands"].append(name)
        self.tags[tag] = name
        if name == "LOGIN" and len(args) >= 2:
            self.facts["username"] = args[0].decode("utf-8", "replace")
            self.facts["auth_command"] = self.facts["auth_mechanism"] = "LOGIN"
            self.facts["cleartext_credentials"] = True
        elif name == "AUTHENTICATE":
            self.facts["auth_command"] = "AUTHENTICATE"
            self.facts["auth_mechanism"] = args[0].decode().upper()
            self.sasl_tag = tag
            self.sasl_lines = [args[1]] if len(args) > 1 else []
        elif name in ("SELECT", "EXAMINE"):
            self.facts["mailboxes_wire"].append(args[0].decode())
        elif name == "IDLE":
            self.idle = True
        elif name == "ID" and args[:1] == ["("]:
            items = [a.decode() for a in args[1:-1]]
            self.facts["client_id"] = dict(zip(items[::2], items[1::2]))
        elif name == "STARTTLS":
            self.facts["starttls"] = "requested"

    def server_line(self, pieces: list[bytes]) -> None:
        line = pieces[0]
        if self.greeting is None:
            self.greeting = line
            if b"Dovecot" in line:
                self.facts["server_software"] = "Dovecot"
        if m := re.search(rb"CAPABILITY ([^\]]*)", line):
            self.capabilities.update(m.group(1).split())
        if line.startswith(b"* ID ("):
            toks = tokens(pieces)
            items = [a.decode() for a in toks[toks.index("(") + 1:-1]]
            self.facts["server_id"] = dict(zip(items[::2], items[1::2]))
        words = line.split(b" ", 2)
        if len(words) < 2 or words[0] in (b"*", b"+") or words[0] not in self.tags:
            return
        tag, status = words[0], words[1].upper()
        name = self.tags.pop(tag)
        if name in ("LOGIN", "AUTHENTICATE"):
            if status == b"OK":
                self.facts["login_ok"] = True
            else:
                self.facts["login_failures"] += 1
                if self.facts["login_ok"] is None:
                    self.facts["login_ok"] = False
        if name == "AUTHENTICATE":
            self.sasl_done()
        elif name == "STARTTLS":
            self.facts["starttls"] = "completed" if status == b"OK" else "refused"
            self.tls = status == b"OK"
        elif name == "COMPRESS" and status == b"OK":
            self.facts["compressed"] = True
            for side in (True, False):
                self.inflate[side] = zlib.decompressobj(-zlib.MAX_WBITS)
            rest, self.buf[False] = self.buf[False], b""
            if rest:
                self.feed(False, rest)

    def sasl_done(self) -> None:
        mech = self.facts["auth_mechanism"]
        decoded = [base64.b64decode(x) if x not in (b"=", b"*") else b"" for x in self.sasl_lines]
        if mech == "PLAIN" and decoded:
            self.facts["username"] = decoded[0].split(b"\0")[1].decode()
            self.facts["cleartext_credentials"] = True
        elif mech == "LOGIN" and decoded:
            self.facts["username"] = decoded[0].decode()
            self.facts["cleartext_credentials"] = True
        elif mech == "CRAM-MD5" and decoded:
            self.facts["username"] = decoded[0].rsplit(b" ", 1)[0].decode()
            self.sasl_secrets += [self.sasl_lines[0].decode(), decoded[0].rsplit(b" ", 1)[1]
                                  .decode()]
        self.sasl_tag = None


COMPARED = ["port", "family", "username", "auth_command", "auth_mechanism", "login_ok",
            "login_failures", "starttls", "compressed", "mailboxes_wire", "client_id",
            "server_id", "server_software", "commands", "cleartext_credentials"]


def check_capture(path: Path, outcome: Outcome, ports: set[int]) -> None:
    """Compare the stated facts with what the capture shows; raise on any difference."""
    conns = read_connections(path, ports)
    if len(conns) != len(outcome.flows):
        raise RuntimeError(f"{path.name}: {len(conns)} connections, facts list "
                           f"{len(outcome.flows)}")
    for index, (conn, facts) in enumerate(zip(conns, outcome.flows)):
        seen = Observer(conn)
        for key in COMPARED:
            if seen.facts[key] != facts[key]:
                raise RuntimeError(f"{path.name} flow {index}: {key} is {seen.facts[key]!r} "
                                   f"in the capture but {facts[key]!r} in the facts")
        for secret in seen.sasl_secrets:
            if secret not in outcome.secrets:
                outcome.secrets.append(secret)
        if facts["cleartext_credentials"]:
            blob = seen.cleartext
            if not any(s.encode() in blob for s in outcome.secrets):
                raise RuntimeError(f"{path.name} flow {index}: no listed secret in clear")
        for decoy in outcome.decoys:
            if decoy.encode() not in seen.cleartext:
                raise RuntimeError(f"{path.name}: decoy {decoy!r} is not in the capture")


# ------------------------------------------------------------------------------------------
# tshark comparison
# ------------------------------------------------------------------------------------------
TSHARK_FIELDS = ["tcp.stream", "imap.isrequest", "imap.request.command",
                 "imap.request.username", "imap.request.password", "imap.line"]


def tshark_findings(path: Path, outcome: Outcome) -> list[str]:
    """What tshark reports differently from the facts, in one line per finding."""
    # JSON, because imap.line may hold any byte (deflate data, newlines) and breaks columns.
    proc = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-Y", "imap", "-T", "json",
         *sum((["-e", f] for f in TSHARK_FIELDS), [])],
        capture_output=True, timeout=TSHARK_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError("tshark failed: " + proc.stderr.decode(errors="replace"))
    streams: dict[int, dict] = {}
    for packet in json.loads(proc.stdout.decode("utf-8", "replace") or "[]"):
        layers = packet["_source"]["layers"]
        stream = streams.setdefault(int(layers["tcp.stream"][0]),
                                    {"commands": [], "users": [], "pws": [], "lines": 0})
        if layers.get("imap.isrequest", ["0"])[0] in ("1", "True"):
            stream["commands"] += [c.upper() for c in layers.get("imap.request.command", [])]
            stream["users"] += layers.get("imap.request.username", [])
            stream["pws"] += layers.get("imap.request.password", [])
        stream["lines"] += len(layers.get("imap.line", []))
    findings = []
    for index, facts in enumerate(outcome.flows):
        got = streams.get(index, {"commands": [], "users": [], "pws": [], "lines": 0})
        prefix = f"flow {index}: " if len(outcome.flows) > 1 else ""
        expected_user = facts["username"]
        wrong_users = sorted({u for u in got["users"] if u != expected_user})
        if wrong_users:
            findings.append(prefix + "username shown as " + ", ".join(map(repr, wrong_users))
                            + f" (facts: {expected_user!r})")
        elif expected_user and not got["users"]:
            findings.append(prefix + f"no username (facts: {expected_user!r}, via "
                            f"{auth_label(facts)})")
        if got["pws"]:
            shown = sorted(set(got["pws"]))
            real = [p for p in shown if p in outcome.secrets]
            mangled = [p for p in shown if p not in outcome.secrets]
            if real:
                findings.append(prefix + "prints the password " + ", ".join(map(repr, real)))
            if mangled:
                findings.append(prefix + "prints passwords mangled: "
                                + ", ".join(map(repr, mangled)))
        # Deflate bytes taken for a command differ on every run: count them, don't print them.
        got["commands"] = [c if c.isprintable() and "\ufffd" not in c else "(binary)"
                           for c in got["commands"]]
        extra = Counter(got["commands"]) - Counter(c.split()[0] for c in facts["commands"])
        missing = Counter(c.split()[0] for c in facts["commands"]) - Counter(got["commands"])
        if extra:
            findings.append(prefix + "commands that were never sent: "
                            + ", ".join(f"{c} x{n}" for c, n in sorted(extra.items())))
        if missing:
            findings.append(prefix + "misses commands: "
                            + ", ".join(f"{c} x{n}" for c, n in sorted(missing.items())))
        if facts["compressed"]:
            findings.append(prefix + f"shows {got['lines']} IMAP lines, most of them deflate "
                            "bytes printed as text; no inflating")
    return findings


# ------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------
MANIFEST_HEAD = """\
# IMAP captures for imaptap's replay tests

Generated by `scripts/make-captures` (run as root; it rewrites this file, `facts.json` and
every `*.pcap` here). Each capture is one scenario recorded with tcpdump on the root-namespace
end of the lab's veth (`scripts/imaplab.py`): real clients in the root namespace, a real
Dovecot 2.3 in a network namespace. Dovecot listens on 143 and 10143; the addresses are
10.199.S.1 (client) / 10.199.S.2 (server) and fd00:199:S::1 / ::2, S varying between runs.
TX checksum offload was off on the veth, so segments are MTU-sized and checksums valid.
The facts below were stated from how each session was driven and then checked against the
capture by the script's own reassembler; a mismatch fails the script.

Lab users: alice / `Alice-Pw-7391`, bob / `Bob Pw "quoted" 42`, carol / `Carol-Pw-5520`,
dave / `Dave-Pw-8812`. Dovecot greets with
`* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS
AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5] Dovecot (Debian) ready.` and offers COMPRESS=DEFLATE
after login.

## facts.json

`{"<file>.pcap": {"description", "ports": [server ports], "flows": [...], "secrets": [...],
"decoys": [...]}}`; flows in connection (SYN) order, each with:

| key | meaning |
|---|---|
| `port`, `family` | server port; `ipv4` or `ipv6` |
| `client_kind` | `imaplib` (Python 3.11), `curl` (7.88), `mbsync` (isync 1.4.4), `raw` (the script's own socket client) |
| `username` | as the server received it (astring/literal decoded, SASL decoded); `null` if not visible (inside TLS) |
| `auth_command` | `LOGIN` or `AUTHENTICATE`; `null` if not visible |
| `auth_mechanism` | `LOGIN` for the LOGIN command, else the SASL mechanism (`PLAIN`, `LOGIN`, `CRAM-MD5`) |
| `login_ok` | `true` if a LOGIN/AUTHENTICATE got OK, `false` if attempts all failed, `null` if none visible |
| `login_failures` | tagged NO/BAD answers to LOGIN/AUTHENTICATE |
| `starttls` | `offered` (in capabilities, not used), `requested`, `completed` (OK: the rest is TLS), `refused` (NO/BAD); `none` never happens with this Dovecot |
| `compressed` | COMPRESS DEFLATE completed |
| `mailboxes` | SELECT/EXAMINE targets in order, decoded (modified UTF-7 → Unicode) |
| `mailboxes_wire` | the same, as on the wire after astring decoding (`Entw&APw-rfe`) |
| `client_id`, `server_id` | ID parameters as a dict, or `null` |
| `server_software` | from the greeting |
| `commands` | every command name the client sent, upper case, `UID FETCH` as one, including those inside COMPRESS; not those inside TLS; not SASL responses or IDLE's DONE |
| `cleartext_credentials` | a password (or PLAIN/LOGIN SASL data) crossed the wire readable |

`secrets`: every password and SASL secret of the capture, raw and in the base64 forms that
went on the wire (wrong passwords included): no output of imaptap may contain any of them.
`decoys`: strings that are in the capture as mail content and must never be reported as a
user or password.

## Captures

| file | client | what is in it | facts a correct analyzer reports | what tshark gets wrong |
|---|---|---|---|---|
"""


def md_escape(text: str) -> str:
    """Table-cell safe: no pipes, no newlines, no control or undecodable characters."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return "".join(c if c.isprintable() and c != "\ufffd" else
                   ("\\ufffd" if c == "\ufffd" else f"\\x{ord(c):02x}") for c in text)


def auth_label(facts: dict) -> str:
    """'LOGIN' for the LOGIN command, 'AUTHENTICATE PLAIN' and so on for SASL."""
    if facts["auth_command"] == "LOGIN":
        return "LOGIN"
    return f"{facts['auth_command']} {facts['auth_mechanism']}"


def summarize(flows: list[dict]) -> str:
    parts = []
    for index, f in enumerate(flows):
        who = repr(f["username"]).replace("\\\\", "\\") if f["username"] is not None else "—"
        auth = (auth_label(f) if f["auth_command"] else "auth not visible")
        bits = [f"port {f['port']}/{f['family']}", f"user {who}", auth]
        if f["login_ok"] is not None:
            bits.append("ok" if f["login_ok"] else "failed")
        if f["login_failures"]:
            bits.append(f"{f['login_failures']} failure(s)")
        bits.append(f"STARTTLS {f['starttls']}")
        if f["compressed"]:
            bits.append("compressed")
        if f["mailboxes"]:
            bits.append("mailboxes " + ", ".join(f["mailboxes"]))
        if f["client_id"]:
            bits.append(f"ID {f['client_id']}")
        bits.append("cleartext credentials" if f["cleartext_credentials"]
                    else "no cleartext credentials")
        parts.append((f"{index + 1}: " if len(flows) > 1 else "") + "; ".join(bits))
    return "<br>".join(parts)


def write_outputs(results: list[tuple[Scenario, Outcome, list[str]]]) -> None:
    facts = {}
    rows = []
    for sc, outcome, findings in results:
        name = f"{sc.name}.pcap"
        facts[name] = {"description": sc.description,
                       "ports": sorted({f["port"] for f in outcome.flows}),
                       "flows": outcome.flows, "secrets": outcome.secrets,
                       "decoys": outcome.decoys}
        what = sc.description + (f". {outcome.notes}" if outcome.notes else "")
        rows.append(f"| `{name}` | {sc.client} | {md_escape(what)} | "
                    f"{md_escape(summarize(outcome.flows))} | "
                    f"{md_escape('<br>'.join(findings) or 'nothing')} |\n")
    (PCAP_DIR / "facts.json").write_text(json.dumps(facts, indent=1, ensure_ascii=True) + "\n")
    out = subprocess.run(["tshark", "--version"], capture_output=True, text=True,
                         timeout=TSHARK_TIMEOUT).stdout
    version = re.search(r"\) (\d[\w.]*)", out)
    tail = MANIFEST_TAIL.format(tshark_version="tshark " + (version.group(1) if version else "?"))
    (PCAP_DIR / "MANIFEST.md").write_text(MANIFEST_HEAD + "".join(rows) + tail)


MANIFEST_TAIL = """
## Notes on the tshark column

{tshark_version} with default preferences (`tshark -r F -Y imap -T json -e imap.request.command
-e imap.request.username -e imap.request.password ...`), compared flow by flow with the facts
by `scripts/make-captures`. In short, tshark:

- decodes port 143 only: the 10143 session shows nothing unless told `-d tcp.port==10143,imap`;
- prints LOGIN passwords ("prints the password" above: a leak imaptap must not repeat) and
  strips their first and last character, which is right for a quoted string and mangles an
  atom (`Alice-Pw-7391` → `lice-Pw-739`) or cuts a quoted one at its first space (`Bo`);
- keeps the quotes of a quoted username (`"dave"`), cuts one at its first space (`"[bold`),
  and takes a literal marker (`{{5}}`) for the username, reading the next one as a command;
- decodes no AUTHENTICATE exchange (no username for PLAIN, LOGIN or CRAM-MD5), and names
  `UID FETCH` as `FETCH`;
- parses APPEND bodies and FETCH literal data as commands: a mail body line
  `a1 LOGIN mallory evilpw` becomes the username `mallory`;
- prints the deflate bytes after COMPRESS as IMAP lines and commands.
"""


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="make only these captures (facts/MANIFEST are then not written)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make-captures: needs root (network namespace, tcpdump)", file=sys.stderr)
        return 2
    for tool in ("tcpdump", "tshark", "curl", "mbsync"):
        if not shutil.which(tool):
            print(f"make-captures: {tool} not found; run scripts/setup", file=sys.stderr)
            return 2
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    PCAP_DIR.mkdir(exist_ok=True)
    results = []
    try:
        with Lab(offloads=False) as lab:
            seed_mailboxes(lab)
            for sc in chosen:
                path = PCAP_DIR / f"{sc.name}.pcap"
                with lab.capture(path):
                    outcome = sc.run(lab)
                check_capture(path, outcome, set(lab.ports))
                size = path.stat().st_size
                if size > MAX_CAPTURE_BYTES:
                    raise RuntimeError(f"{path.name} is {size} bytes; keep captures small")
                findings = tshark_findings(path, outcome)
                results.append((sc, outcome, findings))
                print(f"{path.name:28} {size:6} bytes  {len(outcome.flows)} flow(s)", flush=True)
    except (LabError, RuntimeError, OSError, subprocess.SubprocessError,
            imaplib.IMAP4.error) as err:
        print(f"make-captures: {err}", file=sys.stderr)
        return 1
    if not args.only:
        stale = {p.name for p in PCAP_DIR.glob("*.pcap")} - {f"{s.name}.pcap" for s in SCENARIOS}
        for name in sorted(stale):
            (PCAP_DIR / name).unlink()
        write_outputs(results)
        print(f"wrote {PCAP_DIR / 'facts.json'} and {PCAP_DIR / 'MANIFEST.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
