"""Regenerate pcaps/: real IMAP clients against a real Dovecot (or Cyrus) in a lab namespace.

Usage (as root):  scripts/make-captures [--only NAME ...] [--output-dir DIR]

Every capture is one scenario: a client (Python's imaplib, curl, mbsync, fetchmail,
offlineimap, or a small raw socket client where no real client produces the wire form wanted)
runs against the Dovecot of the lab (imaptap_lab.lab), or for the ``cyrus-*`` captures against
Cyrus IMAP (``Lab(server="cyrus")``), while tcpdump records the lab's veth. Next to each scenario's code
sit the facts it produces (user, mechanism, commands, mailboxes ...), written from how the
session was driven. The script then checks those facts against the capture with its own
small reassembler (literals, AUTHENTICATE, IDLE, STARTTLS and COMPRESS aware), runs tshark
on every capture to record what tshark reports differently, and writes pcaps/facts.json
and pcaps/MANIFEST.md (or all of it into --output-dir, to compare with pcaps/; with --only,
the entries of the other captures are kept as the files have them). Any
disagreement between the stated facts and the capture stops the script with a non-zero exit:
a capture whose facts are wrong is worse than none.

The lab's veth runs with TX checksum offload off, so the captures hold MTU-sized segments
with valid TCP checksums, like a physical wire (see Lab(offloads=False)).
Standard library and this package only; tshark and the clients must be installed (scripts/setup).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import imaplib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imaptap_lab.capture_check import check_capture, tshark_findings, tshark_version
from imaptap_lab.capture_facts import (
    Outcome,
    Scenario,
    b64,
    complete_entry,
    flow,
    merge_outputs,
    mutf7,
    plain_secret,
    quote,
    write_outputs,
)
from imaptap_lab.checkout import PCAP_DIR
from imaptap_lab.lab import ALT_IMAP_PORT, IMAP_PORT, LAB_PORTS, Lab, LabError, Server
from imaptap_lab.mail import dated_mail

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

SCENARIOS: list[Scenario] = []


def scenario(name: str, client: str, description: str, server: str = "dovecot",
             port_filter: str | None = None):
    """Register the decorated function as the scenario of capture NAME.pcap (run against the
    lab's ``server``, tcpdump recording ``port_filter``, by default the lab's IMAP ports)."""
    def register(func: Callable[[Lab], Outcome]) -> Callable[[Lab], Outcome]:
        SCENARIOS.append(Scenario(name, client, description, func, server=server, port_filter=port_filter))
        return func
    return register


# ------------------------------------------------------------------------------------------
# Clients
# ------------------------------------------------------------------------------------------
def imap4(lab: Lab, port: int = IMAP_PORT, *, host: str | None = None) -> imaplib.IMAP4:
    """An imaplib client connected to the lab's Dovecot (IPv4 unless ``host`` says otherwise)."""
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


SCRAM_NONCE_BYTES = 18
"""Random bytes of the client nonce (RFC 5802 wants it unpredictable; 24 base64 characters)."""
SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def _saslname(name: str) -> str:
    """A SCRAM user or authzid, with ``,`` and ``=`` escaped (RFC 5802 section 5.1)."""
    return name.replace("=", "=3D").replace(",", "=2C")


@dataclass
class ScramResult:
    """How a SCRAM exchange ended, and the secrets that crossed the wire (as base64)."""

    status: bytes
    """The tagged completion."""
    secrets: list[str]
    """The client-final message (it holds the proof) and the server-final one (the signature)."""


def scram_authenticate(raw: RawClient, tag: str, mechanism: str, user: str, password: str, *,
                       authzid: str | None = None, initial_response: bool = True) -> ScramResult:
    """AUTHENTICATE with SCRAM-SHA-1 or SCRAM-SHA-256 (RFC 5802, RFC 7677), computed here with
    hashlib and hmac: a real client of the lab's real Dovecot, which imaplib cannot be."""
    algorithm = SCRAM_HASHES[mechanism]
    nonce = base64.b64encode(secrets.token_bytes(SCRAM_NONCE_BYTES)).decode()
    gs2 = "n," + (f"a={_saslname(authzid)}" if authzid else "") + ","
    first_bare = f"n={_saslname(user)},r={nonce}"
    first = b64(gs2 + first_bare).encode()
    if initial_response:
        raw.send(f"{tag} AUTHENTICATE {mechanism} ".encode() + first + b"\r\n")
    else:
        raw.send(f"{tag} AUTHENTICATE {mechanism}\r\n".encode())
        raw.until(b"+")
        raw.send(first + b"\r\n")
    challenge = raw.until(b"+")[-1]
    server_first = base64.b64decode(challenge[1:].strip()).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    if not attrs["r"].startswith(nonce):
        raise RuntimeError(f"SCRAM: the server's nonce does not extend ours: {server_first!r}")
    salted = hashlib.pbkdf2_hmac(algorithm, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", algorithm).digest()
    stored_key = hashlib.new(algorithm, client_key).digest()
    final_bare = f"c={b64(gs2)},r={attrs['r']}"
    auth_message = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.new(stored_key, auth_message, algorithm).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = b64(f"{final_bare},p={base64.b64encode(proof).decode()}")
    raw.send(final.encode() + b"\r\n")
    answer = raw.until(b"")[-1]  # the server-final continuation, or the tagged NO
    if not answer.startswith(b"+"):
        return ScramResult(answer, [final])
    server_final = answer[1:].strip().decode()
    server_key = hmac.new(salted, b"Server Key", algorithm).digest()
    expected = "v=" + base64.b64encode(hmac.new(server_key, auth_message, algorithm).digest()).decode()
    if base64.b64decode(server_final).decode() != expected:
        raise RuntimeError("SCRAM: the server's signature is wrong")
    raw.send(b"\r\n")  # the client's empty final response
    return ScramResult(raw.until(tag.encode() + b" ")[-1], [final, server_final])


def ok(result: tuple) -> list:
    """The data of an imaplib result, which must be OK."""
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"IMAP command failed: {typ} {data}")
    return data


SEED_COUNTS = {"alice": 3, "bob": 1, "carol": 2, "dave": 5}
"""Mails each user has before the first scenario."""


def seed_mailboxes(lab: Lab) -> None:
    """A few mails per user, so SELECT, FETCH and mbsync have something to show."""
    for user, count in SEED_COUNTS.items():
        for n in range(1, count + 1):
            lab.deliver(user, dated_mail(f"Lab mail {n} for {user}",
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
    lab.deliver("alice", dated_mail("Arrived during IDLE", "New mail while idling.\n",
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
    """A mail whose body quotes IMAP protocol lines, far past the first 256 bytes."""
    body = FILLER + FAKE_LINES + FILLER + FAKE_LINES + FILLER[:300] + FAKE_LINES
    return dated_mail(f"Protocol lines quoted in a mail ({variant})", body,
                      msgid=f"fake-commands-{variant}", sender="mallory@imaptap.test",
                      extra="X-Spam-Flag: NO\r\n")


@scenario("fake-commands", "imaplib + raw",
          f"APPEND a {len(fake_body('imaplib')) / 1000:.1f} KB mail whose body holds IMAP-looking lines "
          "(a1 LOGIN mallory evilpw, "
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
    parts = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)], strict=True)]
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
    """Run curl with ``args``, bounded by CLIENT_TIMEOUT; its output, or RuntimeError."""
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


@scenario("auth-scram", "raw (SCRAM)",
          "AUTHENTICATE SCRAM-SHA-256 with SASL-IR as carol, then SELECT; a second connection "
          "AUTHENTICATE SCRAM-SHA-1 without initial response and with authzid alice, first with a "
          "wrong password (NO), then the right one. The client is the script's own (hashlib, hmac): "
          "client-first n,a=alice,n=alice,r=..., server-first, client-final with the proof, "
          "server-final v=..., the client's empty response, the tagged completion")
def auth_scram(lab: Lab) -> Outcome:
    carol, alice = lab.users["carol"], lab.users["alice"]
    found: list[str] = []
    raw = RawClient(lab.server4)
    result = scram_authenticate(raw, "c1", "SCRAM-SHA-256", "carol", carol)
    if not result.status.startswith(b"c1 OK"):
        raise RuntimeError(f"SCRAM-SHA-256 failed: {result.status!r}")
    found += result.secrets
    raw.expect_ok("c2", "SELECT INBOX")
    raw.expect_ok("c3", "LOGOUT")
    raw.close()
    raw = RawClient(lab.server4)
    wrong = scram_authenticate(raw, "s1", "SCRAM-SHA-1", "alice", WRONG_PASSWORDS[0], authzid="alice",
                               initial_response=False)
    if not wrong.status.startswith(b"s1 NO"):
        raise RuntimeError(f"SCRAM-SHA-1 with a wrong password: {wrong.status!r}")
    right = scram_authenticate(raw, "s2", "SCRAM-SHA-1", "alice", alice, authzid="alice", initial_response=False)
    if not right.status.startswith(b"s2 OK"):
        raise RuntimeError(f"SCRAM-SHA-1 failed: {right.status!r}")
    found += wrong.secrets + right.secrets
    raw.expect_ok("s3", "LOGOUT")
    raw.close()
    return Outcome([
        flow("raw", "carol", auth_command="AUTHENTICATE", auth_mechanism="SCRAM-SHA-256", mailboxes=["INBOX"],
             cleartext_credentials=False, commands=["AUTHENTICATE", "SELECT", "LOGOUT"]),
        flow("raw", "alice", authzid="alice", auth_command="AUTHENTICATE", auth_mechanism="SCRAM-SHA-1",
             login_failures=1, cleartext_credentials=False, commands=["AUTHENTICATE", "AUTHENTICATE", "LOGOUT"]),
    ], [carol, alice, WRONG_PASSWORDS[0], *found],
        notes="Secrets: the passwords, and each client-final message (its proof) and server-final one "
              "(its signature) as base64, as they crossed the wire.")


MULTIAPPEND_MAILS = [dated_mail(f"MULTIAPPEND part {n}", f"Mail {n} of one APPEND command.\n",
                                msgid=f"multiappend-{n}", to="bob@imaptap.test") for n in (1, 2)]
CATENATE_TEXT = b"\r\nThis line came in the APPEND itself, between two URL parts.\r\n"


@scenario("multiappend-catenate", "raw",
          "several literals in one command: APPEND of two mails at once (MULTIAPPEND, RFC 3502), "
          "each a synchronising literal after its own '+ OK'; then APPEND CATENATE (RFC 4469) of a "
          "message made of a URL to mail 1's header, a TEXT literal and a URL to its body")
def multiappend_catenate(lab: Lab) -> Outcome:
    pw = lab.users["bob"]
    first, second = MULTIAPPEND_MAILS
    raw = RawClient(lab.server4)
    raw.expect_ok("m1", f"LOGIN bob {quote(pw)}")
    raw.send(b"m2 APPEND INBOX (\\Seen) {%d}\r\n" % len(first))
    raw.until(b"+")
    raw.send(first + b" (\\Seen) {%d}\r\n" % len(second))
    raw.until(b"+")
    raw.send(second + b"\r\n")
    status = raw.until(b"m2 ")[-1]
    if not re.match(rb"m2 OK \[APPENDUID \d+ \d+:\d+\]", status):
        raise RuntimeError(f"MULTIAPPEND: {status!r}")
    raw.send(b"m3 SELECT INBOX\r\n")
    selected = raw.until(b"m3 ")
    validity = next(m.group(1) for line in selected if (m := re.search(rb"UIDVALIDITY (\d+)", line)))
    url = b'URL "/INBOX;UIDVALIDITY=%s/;UID=1/;SECTION=%s"'
    raw.send(b"m4 APPEND INBOX CATENATE (" + url % (validity, b"HEADER") + b" TEXT {%d}\r\n" % len(CATENATE_TEXT))
    raw.until(b"+")
    raw.send(CATENATE_TEXT + b" " + url % (validity, b"TEXT") + b")\r\n")
    status = raw.until(b"m4 ")[-1]
    if not status.startswith(b"m4 OK [APPENDUID"):
        raise RuntimeError(f"CATENATE: {status!r}")
    raw.expect_ok("m5", "LOGOUT")
    raw.close()
    return Outcome([flow("raw", "bob", mailboxes=["INBOX"], commands=["LOGIN", "APPEND", "SELECT", "APPEND",
                                                                     "LOGOUT"])], [pw, quote(pw)[1:-1]])


@scenario("wrong-state", "raw",
          "commands sent in the wrong state, each answered BAD by Dovecot: SELECT before login; "
          "after LOGIN carol, a second LOGIN, an AUTHENTICATE PLAIN with initial response and a "
          "FETCH with no mailbox selected; then NOOP and LOGOUT. The login stays the first one, "
          "with no failure")
def wrong_state(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    raw = RawClient(lab.server4)
    refused = [raw.command("w1", "SELECT INBOX")]
    raw.expect_ok("w2", f"LOGIN carol {pw}")
    refused.append(raw.command("w3", f"LOGIN carol {pw}"))
    refused.append(raw.command("w4", "AUTHENTICATE PLAIN " + plain_secret("carol", pw)[1]))
    refused.append(raw.command("w5", "FETCH 1 (FLAGS)"))
    if not all(line.split(b" ", 2)[1] == b"BAD" for line in refused):
        raise RuntimeError(f"expected BAD for each command in the wrong state: {refused!r}")
    raw.expect_ok("w6", "NOOP")
    raw.expect_ok("w7", "LOGOUT")
    raw.close()
    return Outcome([flow("raw", "carol", mailboxes=["INBOX"],
                         commands=["SELECT", "LOGIN", "LOGIN", "AUTHENTICATE", "FETCH", "NOOP", "LOGOUT"])],
                   plain_secret("carol", pw),
                   notes="mailboxes lists the SELECT sent before login: the targets clients asked for, "
                         "whatever the answer.")


HTTP_PORT = 8143
"""The web server's port, watched as if it were IMAP (README: --port 8143)."""
HTTP_PASSWORD = "Http-Pw-4242"
HTTP_READY_TIMEOUT = 10.0


def _http_exchange(addr: str, request: bytes) -> bytes:
    """Send ``request`` to the web server and read its whole answer (it closes)."""
    with socket.create_connection((addr, HTTP_PORT), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@scenario("http-on-imap-port", "curl + raw",
          f"a web server (python3 -m http.server) on port {HTTP_PORT}, watched as IMAP: curl fetches "
          f"its directory listing, then a client sends 'a1 LOGIN x {HTTP_PASSWORD}' to it, which "
          "answers with an HTTP error page (400, the password quoted in it; as for HTTP/0.9, without "
          "a status line). Neither is IMAP: no "
          "message, no user, no credentials",
          port_filter=f"tcp port {HTTP_PORT}")
def http_on_imap_port(lab: Lab) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="imaptap-http-") as root:
        (Path(root) / "index.txt").write_text("a1 OK not IMAP\r\n")
        server = lab.popen_in_ns([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", lab.server4,
                                  "--directory", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # asked of the namespace's sockets, not by connecting: a probe would be a flow too
            deadline = time.monotonic() + HTTP_READY_TIMEOUT
            while not lab.run_in_ns(["ss", "-Htln", f"sport = :{HTTP_PORT}"], capture_output=True).stdout:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the web server did not start")
                time.sleep(0.1)
            listing = run_curl([f"http://{lab.server4}:{HTTP_PORT}/"])
            if b"index.txt" not in listing:
                raise RuntimeError(f"curl got no directory listing: {listing[:200]!r}")
            answer = _http_exchange(lab.server4, f"a1 LOGIN x {HTTP_PASSWORD}\r\n".encode())
            # a line that is no HTTP request line is answered as HTTP/0.9 would be: the error
            # page alone, no status line
            if b"Error code: 400" not in answer:
                raise RuntimeError(f"the web server answered {answer[:100]!r}")
        finally:
            server.terminate()
            server.wait(timeout=CLIENT_TIMEOUT)
    return Outcome([flow("curl", None, commands=[], port=HTTP_PORT, imap=False),
                    flow("raw", None, commands=[], port=HTTP_PORT, imap=False)], [HTTP_PASSWORD])


@scenario("client-only", "imaplib",
          "a one-sided capture: only what the client sent (tcpdump 'tcp dst port 143'), LOGIN alice, "
          "SELECT INBOX, LOGOUT. With no server byte, the client's commands decide that it is IMAP; "
          "no greeting, so no server software, and no login outcome",
          port_filter=f"tcp dst port {IMAP_PORT}")
def client_only(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab)
    ok(imap.login("alice", pw))
    ok(imap.select("INBOX"))
    imap.logout()
    return Outcome([flow("imaplib", "alice", login_ok=None, starttls="none", server_software=None,
                         mailboxes=["INBOX"], commands=["CAPABILITY", "LOGIN", "SELECT", "LOGOUT"])], [pw])


@scenario("logindisabled", "imaplib",
          "a server that announces LOGINDISABLED and offers only AUTH=CRAM-MD5 before STARTTLS "
          "(Dovecot with disable_plaintext_auth = yes): imaplib sends LOGIN in clear anyway and is "
          "refused (PRIVACYREQUIRED); a second connection does STARTTLS first")
def logindisabled(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imap = imap4(lab, host=lab.server6_strict)
    if "LOGINDISABLED" not in imap.capabilities:
        raise RuntimeError(f"the strict address announces {imap.capabilities}")
    with contextlib.suppress(imaplib.IMAP4.error):
        imap.login("alice", pw)
        raise RuntimeError("a password in clear was accepted despite LOGINDISABLED")
    imap.logout()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE       # the lab's certificate is self-signed
    imap = imap4(lab, host=lab.server6_strict)
    ok(imap.starttls(ssl_context=context))
    ok(imap.login("alice", pw))
    imap.logout()
    return Outcome([
        flow("imaplib", "alice", family="ipv6", login_ok=False, login_failures=1, auth_plain_offered=False,
             logindisabled_ignored=True, commands=["CAPABILITY", "LOGIN", "LOGOUT"], attempts=[("alice", pw, False)]),
        flow("imaplib", None, family="ipv6", auth_command=None, auth_mechanism=None, login_ok=None,
             starttls="completed", cleartext_credentials=False, auth_plain_offered=False,
             commands=["CAPABILITY", "STARTTLS"]),
    ], [pw])


INJECTED_PASSWORD = "Injected-Pw-6502"


@scenario("starttls-injection", "raw",
          "STARTTLS with a LOGIN pipelined behind it in the same segment, in clear, before the "
          "server's OK (the plaintext command injection of CVE-2011-0411); then the TLS handshake")
def starttls_injection(lab: Lab) -> Outcome:
    raw = RawClient(lab.server4)
    raw.send(b"x1 STARTTLS\r\nx2 LOGIN mallory " + INJECTED_PASSWORD.encode() + b"\r\n")
    status = raw.until(b"x1 ")[-1]
    if not status.startswith(b"x1 OK"):
        raise RuntimeError(f"STARTTLS: {status!r}")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:  # Dovecot may take the pipelined bytes for the handshake and fail it: either is fine
        tls = context.wrap_socket(raw.sock, server_hostname="imaptap-lab")
        tls.sendall(b"x3 LOGOUT\r\n")
        tls.recv(4096)
        tls.close()
    except (ssl.SSLError, OSError):
        raw.close()
    return Outcome([flow("raw", "mallory", login_ok=None, starttls="completed", commands_after_starttls=True,
                         commands=["STARTTLS", "LOGIN"], attempts=[("mallory", INJECTED_PASSWORD, None)])],
                   [INJECTED_PASSWORD])


def failing_logins(lab: Lab, tries: list[tuple[str, str]]) -> dict:
    """One imaplib connection trying (user, password) pairs that all fail; its facts."""
    imap = imap4(lab)
    for user, password in tries:
        with contextlib.suppress(imaplib.IMAP4.error):
            imap.login(user, password)
            raise RuntimeError(f"{user} logged in with a wrong password")
    imap.logout()
    return flow("imaplib", tries[-1][0], login_ok=False, login_failures=len(tries),
                commands=["CAPABILITY", *["LOGIN"] * len(tries), "LOGOUT"],
                attempts=[(u, p, False) for u, p in tries])


BRUTE_FORCE_PASSWORDS = [f"Guess-Pw-{n:02d}" for n in range(1, 7)]


@scenario("brute-force", "imaplib",
          "brute force from one address: six wrong passwords for alice over three connections (two "
          "each), then a fourth connection logs in with the right one")
def brute_force(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    flows = [failing_logins(lab, [("alice", p) for p in BRUTE_FORCE_PASSWORDS[i:i + 2]]) for i in range(0, 6, 2)]
    imap = imap4(lab)
    ok(imap.login("alice", pw))
    imap.logout()
    flows.append(flow("imaplib", "alice", commands=["CAPABILITY", "LOGIN", "LOGOUT"], attempts=[("alice", pw, True)]))
    return Outcome(flows, [pw, *BRUTE_FORCE_PASSWORDS], attacks=["brute_force"])


SPRAYED_PASSWORD = "Spring-2026!"
SPRAYED_USERS = ["alice", "bob", "carol", "dave", "erin", "frank"]


@scenario("password-spraying", "imaplib",
          f"password spraying from one address: {SPRAYED_PASSWORD!r} against six users (two of "
          "them unknown to the server), one connection each; all refused")
def password_spraying(lab: Lab) -> Outcome:
    flows = [failing_logins(lab, [(user, SPRAYED_PASSWORD)]) for user in SPRAYED_USERS]
    return Outcome(flows, [SPRAYED_PASSWORD], attacks=["password_spraying"])


LEAKED_PAIRS = [("alice", "Leak-Pw-a1x"), ("bob", "Leak-Pw-b2y"), ("erin", "Leak-Pw-e5z"),
                ("frank", "Leak-Pw-f6w"), ("grace", "Leak-Pw-g7v")]


@scenario("credential-stuffing", "imaplib",
          "credential stuffing from one address: five user/password pairs from a leak, each refused, "
          "then a sixth pair, carol's real one, logs in")
def credential_stuffing(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    flows = [failing_logins(lab, [pair]) for pair in LEAKED_PAIRS]
    imap = imap4(lab)
    ok(imap.login("carol", pw))
    imap.logout()
    flows.append(flow("imaplib", "carol", commands=["CAPABILITY", "LOGIN", "LOGOUT"], attempts=[("carol", pw, True)]))
    return Outcome(flows, [pw, *(p for _, p in LEAKED_PAIRS)], attacks=["credential_stuffing"])


# ------------------------------------------------------------------------------------------
# Cyrus IMAP (Lab(server="cyrus")): the lines longer than the default snap length
# ------------------------------------------------------------------------------------------
CYRUS_GREETING_RE = re.compile(r" (Cyrus IMAP \S+) server ready")
ID_PAIR_RE = re.compile(rb'"((?:[^"\\]|\\.)*)" (?:"((?:[^"\\]|\\.)*)"|NIL)')


def cyrus_software(greeting: bytes) -> str:
    """``Cyrus IMAP <version>`` as the greeting the client received names it."""
    m = CYRUS_GREETING_RE.search(greeting.decode("latin-1"))
    if m is None:
        raise RuntimeError(f"not a Cyrus greeting: {greeting!r}")
    return m.group(1)


def id_list(data: bytes) -> dict:
    """The field/value pairs of an ID list as the client received it (quoted strings here)."""
    return {k.decode(): None if v is None else v.decode() for k, v in ID_PAIR_RE.findall(data)}


def login_capabilities(data: list) -> list[str]:
    """The capability list in the code of a LOGIN/AUTHENTICATE completion imaplib returned."""
    m = re.match(rb"\[CAPABILITY ([^\]]*)\]", data[-1])
    if m is None:
        raise RuntimeError(f"no capabilities in the login's completion: {data!r}")
    return m.group(1).decode().upper().split()


@scenario("cyrus-imaplib", "imaplib",
          "Cyrus: LOGIN alice, answered with a ~1 KB OK [CAPABILITY ...]; ID after the login, answered "
          "with a ~500-byte list; SELECT INBOX (~450 bytes of data), FETCH, LOGOUT", server="cyrus")
def cyrus_imaplib(lab: Lab) -> Outcome:
    pw = lab.users["alice"]
    imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))
    imap = imap4(lab)
    software = cyrus_software(imap.welcome)
    capabilities = login_capabilities(ok(imap.login("alice", pw)))
    ok(imap._simple_command("ID", '("name" "imaptap-lab" "version" "1.2")'))
    server_id = id_list(imap.untagged_responses.pop("ID")[0])
    ok(imap.select("INBOX"))
    ok(imap.fetch("1", "(FLAGS BODY.PEEK[])"))
    imap.logout()
    return Outcome([flow("imaplib", "alice", mailboxes=["INBOX"], server_software=software,
                         client_id={"name": "imaptap-lab", "version": "1.2"}, server_id=server_id,
                         capabilities=capabilities,
                         commands=["CAPABILITY", "LOGIN", "ID", "SELECT", "FETCH", "LOGOUT"])], [pw])


@scenario("cyrus-curl", "curl",
          "Cyrus: curl --login-options AUTH=PLAIN lists the mailboxes and fetches a message on one "
          "connection; AUTHENTICATE PLAIN after the server's '+', its OK [CAPABILITY ...] ~1 KB",
          server="cyrus")
def cyrus_curl(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    run_curl(["--login-options", "AUTH=PLAIN", "-u", f"carol:{pw}", f"imap://{lab.server4}/",
              f"imap://{lab.server4}/INBOX;UID=1"])
    return Outcome([flow("curl", "carol", auth_command="AUTHENTICATE", auth_mechanism="PLAIN",
                         mailboxes=["INBOX"], server_software=lab_software(lab),
                         commands=["CAPABILITY", "AUTHENTICATE", "LIST", "SELECT", "UID FETCH", "LOGOUT"])],
                   plain_secret("carol", pw))


FETCHMAIL_RC = """\
poll {host} protocol IMAP port {port} auth password
  user "{user}" password "{password}" is {user} here
  keep fetchall
  # no STARTTLS (fetchmail 6.4 tries it whenever it is offered)
  sslproto ''
  mda "/bin/cat > /dev/null"
"""


@scenario("cyrus-fetchmail", "fetchmail",
          "Cyrus: fetchmail 6.4 (keep, fetchall, no STARTTLS) downloads carol's 2 mails: LOGIN, SELECT, "
          "FETCH sizes, then a header FETCH, a body FETCH and a STORE \\Seen per mail", server="cyrus")
def cyrus_fetchmail(lab: Lab) -> Outcome:
    pw = lab.users["carol"]
    with tempfile.TemporaryDirectory(prefix="imaptap-fetchmail-") as tmp:
        rc = Path(tmp) / "fetchmailrc"
        rc.write_text(FETCHMAIL_RC.format(host=lab.server4, port=IMAP_PORT, user="carol", password=pw))
        rc.chmod(0o600)  # fetchmail refuses a readable rc file
        proc = subprocess.run(["fetchmail", "-f", str(rc), "--nodetach", "--idfile", f"{tmp}/ids",
                               "--pidfile", f"{tmp}/pid"], capture_output=True, timeout=CLIENT_TIMEOUT * 2,
                              env={**os.environ, "HOME": tmp})
        if proc.returncode != 0:
            raise RuntimeError("fetchmail failed: " + (proc.stderr + proc.stdout).decode(errors="replace"))
    mails = SEED_COUNTS["carol"]
    return Outcome([flow("fetchmail", "carol", mailboxes=["INBOX"], server_software=lab_software(lab),
                         commands=["LOGIN", "SELECT", "FETCH", *["FETCH", "FETCH", "STORE"] * mails,
                                   "LOGOUT"])], [pw])


OFFLINEIMAP_RC = """\
[general]
accounts = lab
metadata = {tmp}/metadata
ui = quiet

[Account lab]
localrepository = near
remoterepository = far

[Repository near]
type = Maildir
localfolders = {tmp}/mail

[Repository far]
type = IMAP
remotehost = {host}
remoteport = {port}
remoteuser = {user}
remotepass = {password}
ssl = no
starttls = no
auth_mechanisms = PLAIN
folderfilter = lambda name: name == "INBOX"
"""


def offlineimap_version() -> str:
    """offlineimap's version, as it sends it in ID."""
    out = subprocess.run(["offlineimap", "--version"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    return out.stdout.strip().split()[-1]


@scenario("cyrus-offlineimap", "offlineimap",
          "Cyrus: offlineimap3 pulls dave's INBOX (5 mails) into a Maildir; ID before the login (the "
          "~500-byte answer), AUTHENTICATE PLAIN, CAPABILITY, LIST, SELECT, EXAMINE, FETCH",
          server="cyrus")
def cyrus_offlineimap(lab: Lab) -> Outcome:
    pw = lab.users["dave"]
    version = offlineimap_version()
    with tempfile.TemporaryDirectory(prefix="imaptap-offlineimap-") as tmp:
        rc = Path(tmp) / "offlineimaprc"
        rc.write_text(OFFLINEIMAP_RC.format(tmp=tmp, host=lab.server4, port=IMAP_PORT, user="dave", password=pw))
        proc = subprocess.run(["offlineimap", "-c", str(rc), "-o"], capture_output=True,
                              timeout=CLIENT_TIMEOUT * 4, env={**os.environ, "HOME": tmp})
        if proc.returncode != 0:
            raise RuntimeError("offlineimap failed: " + (proc.stderr + proc.stdout).decode(errors="replace"))
        got = list((Path(tmp) / "mail" / "INBOX").glob("*/*"))
        if len(got) != SEED_COUNTS["dave"]:
            raise RuntimeError(f"offlineimap fetched {len(got)} mails, expected {SEED_COUNTS['dave']}")
    return Outcome([flow("offlineimap", "dave", auth_command="AUTHENTICATE", auth_mechanism="PLAIN",
                         mailboxes=["INBOX", "INBOX"], server_software=lab_software(lab),
                         client_id={"name": "OfflineIMAP", "version": version}, server_id=lab_server_id(lab),
                         commands=OFFLINEIMAP_COMMANDS)], plain_secret("dave", pw),
                   notes="offlineimap SELECTs the mailbox, then EXAMINEs it; both are in mailboxes.")


OFFLINEIMAP_COMMANDS = ["CAPABILITY", "ID", "AUTHENTICATE", "CAPABILITY", "LIST", "LIST", "SELECT", "EXAMINE",
                        "FETCH", *["UID FETCH"] * SEED_COUNTS["dave"], "LOGOUT"]
"""What offlineimap3 (imaplib2) sends for a first pull of dave's mailbox: the capability list
again after the login, the hierarchy delimiter (LIST "" ""), the mailboxes, then flags and UIDs
of every mail, and one UID FETCH per mail for its body."""


SERVER_FACTS: dict[str, tuple[str, dict]] = {}
"""Per lab (namespace): the software its greeting names and its answer to ID, learnt by
`learn_server` before any capture, for scenarios whose client does not show them."""


def learn_server(lab: Lab) -> None:
    """Ask the lab's server for its greeting and ID once, outside any capture."""
    raw = RawClient(lab.server4)
    raw.send(b"z1 ID NIL\r\n")
    answer = raw.until(b"z1 ")
    raw.expect_ok("z2", "LOGOUT")
    raw.close()
    server_id = id_list(next(line for line in answer if line.startswith(b"* ID ")))
    SERVER_FACTS[lab.netns] = (cyrus_software(raw.greeting), server_id)


def lab_software(lab: Lab) -> str:
    """The server software the lab's greeting names (see `learn_server`)."""
    return SERVER_FACTS[lab.netns][0]


def lab_server_id(lab: Lab) -> dict:
    """The lab's answer to ID (see `learn_server`)."""
    return SERVER_FACTS[lab.netns][1]


def build_parser() -> argparse.ArgumentParser:
    """The command line of scripts/make-captures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="make only these captures; the others are kept, checked again, and keep "
                             "their entries in facts.json and MANIFEST.md")
    parser.add_argument("--output-dir", type=Path, default=PCAP_DIR, metavar="DIR",
                        help="write the captures, facts.json and MANIFEST.md here (default: pcaps/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """scripts/make-captures: record every scenario, check its facts, write the files."""
    args = build_parser().parse_args(argv)
    out_dir = args.output_dir
    if os.geteuid() != 0:
        print("make-captures: needs root (network namespace, tcpdump)", file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    unknown = sorted(set(args.only or ()) - {s.name for s in SCENARIOS})
    if unknown:
        print(f"make-captures: no scenario named {', '.join(unknown)}", file=sys.stderr)
        return 2
    tools = {"tcpdump", "tshark"} | {CLIENT_TOOLS[s.client] for s in chosen if s.client in CLIENT_TOOLS}
    for tool in sorted(tools):
        if not shutil.which(tool):
            print(f"make-captures: {tool} not found; run scripts/setup", file=sys.stderr)
            return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for server in Server:
            mine = [sc for sc in chosen if sc.server == server]
            if not mine:
                continue
            with Lab(offloads=False, server=server) as lab:
                seed_mailboxes(lab)
                if server is Server.CYRUS:
                    learn_server(lab)
                for sc in mine:
                    results.append(record(lab, sc, out_dir))
    except (LabError, RuntimeError, OSError, subprocess.SubprocessError,
            imaplib.IMAP4.error) as err:
        print(f"make-captures: {err}", file=sys.stderr)
        return 1
    order = [s.name for s in SCENARIOS]
    results.sort(key=lambda r: order.index(r[0].name))
    if args.only:
        try:
            recheck_kept(out_dir, {s.name for s in chosen}, set(LAB_PORTS))
        except RuntimeError as err:
            print(f"make-captures: {err}", file=sys.stderr)
            return 1
        merge_outputs(results, out_dir, tshark_version(), order)
    else:
        stale = {p.name for p in out_dir.glob("*.pcap")} - {f"{s.name}.pcap" for s in SCENARIOS}
        for name in sorted(stale):
            (out_dir / name).unlink()
        write_outputs(results, out_dir, tshark_version())
    print(f"wrote {out_dir / 'facts.json'} and {out_dir / 'MANIFEST.md'}")
    return 0


#: The program each client kind needs (the others are Python's imaplib and raw sockets).
CLIENT_TOOLS = {"curl": "curl", "mbsync": "mbsync", "fetchmail": "fetchmail", "offlineimap": "offlineimap"}


def record(lab: Lab, sc: Scenario, out_dir: Path) -> tuple[Scenario, Outcome, list[str]]:
    """Run one scenario under tcpdump, check the capture against its facts, ask tshark."""
    path = out_dir / f"{sc.name}.pcap"
    with lab.capture(path, *([sc.port_filter] if sc.port_filter else [])):
        outcome = sc.run(lab)
    check_capture(path, outcome, set(lab.ports) | {f["port"] for f in outcome.flows})
    size = path.stat().st_size
    if size > MAX_CAPTURE_BYTES:
        raise RuntimeError(f"{path.name} is {size} bytes; keep captures small")
    findings = tshark_findings(path, outcome)
    print(f"{path.name:28} {size:6} bytes  {len(outcome.flows)} flow(s)", flush=True)
    return sc, outcome, findings


def recheck_kept(out_dir: Path, remade: set[str], ports: set[int]) -> None:
    """Check every capture ``--only`` keeps against its facts again (the checker may have
    learnt something since it was made), completed with the facts added since
    (`capture_facts.complete_entry`, as merge_outputs writes them); RuntimeError on a difference."""
    facts_path = out_dir / "facts.json"
    if not facts_path.exists():
        return
    for name, entry in json.loads(facts_path.read_text()).items():
        path = out_dir / name
        if name.removesuffix(".pcap") in remade or not path.exists():
            continue
        entry = complete_entry(entry)
        outcome = Outcome(entry["flows"], list(entry["secrets"]), entry.get("decoys", []), attacks=entry["attacks"])
        check_capture(path, outcome, ports | set(entry["ports"]))
        print(f"{name:28} kept, facts checked again", flush=True)


if __name__ == "__main__":
    sys.exit(main())

