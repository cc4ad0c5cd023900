"""Reading a capture of pcaps/ back: pcap -> TCP connections -> IMAP facts, checked against the
facts a scenario stated; and what tshark reports differently.

The reader and the reassembler are this module's own (standard library only), independent of
imaptap's, so a capture's facts never rest on the code they test.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imaptap_lab.capture_facts import Outcome, auth_label, expected_findings, flow

TSHARK_TIMEOUT = 60.0
"""Bound on one tshark run; a capture of pcaps/ takes it well under a second."""


@dataclass
class Connection:
    """One TCP connection of a capture: its ends, family and payloads in order."""
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


def _scram_name(raw: bytes) -> str:
    """A SCRAM saslname with its =2C and =3D escapes undone (RFC 5802 5.1)."""
    return raw.replace(b"=2C", b",").replace(b"=3D", b"=").decode()


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
        self.authenticated = False  # a login's OK seen: LOGIN/AUTHENTICATE are then out of state
        self.sasl_challenges: list[bytes] = []
        self.server_lines = 0
        self.greeting: bytes | None = None
        self.capabilities: set[bytes] = set()
        self.last_capabilities: list[str] = []
        """The last capability list the server sent, upper case (greeting, * CAPABILITY, a code)."""
        self.facts = flow("?", None, commands=[], auth_command=None, auth_mechanism=None,
                          login_ok=None, starttls="none", cleartext_credentials=False,
                          port=conn.server[1], family=conn.family, server_software=None)
        self.facts.pop("client_kind")
        self.facts["logindisabled_ignored"] = False
        self.facts["commands_after_starttls"] = False
        self.facts["attempts"] = []
        self.attempt_of: dict[bytes, int] = {}  # open LOGIN/AUTHENTICATE tag -> its attempt
        self.sasl_logindisabled = False
        self.sasl_secrets: list[str] = []
        self.cleartext = b""  # everything readable, for the secrets check
        for from_client, payload in conn.chunks:
            self.feed(from_client, payload)
        if self.facts["starttls"] == "none" and b"STARTTLS" in self.capabilities:
            self.facts["starttls"] = "offered"
        # IMAP when the server greets first; without a byte from the server (a one-sided
        # capture), when the client sent commands
        server_spoke = any(not c for c, _ in conn.chunks)
        greets = self.greeting is not None and re.match(rb"\* (OK|PREAUTH|BYE)\b", self.greeting, re.I)
        self.facts["imap"] = bool(greets) if server_spoke else bool(self.facts["commands"])
        # self.capabilities holds only what was seen before TLS: feed() stops there
        self.facts["auth_plain_offered"] = bool({b"AUTH=PLAIN", b"AUTH=LOGIN"} & self.capabilities)
        self.facts["findings"] = expected_findings(self.facts)

    def feed(self, side: bool, data: bytes) -> None:
        """Take payload bytes of one side (True: the client), inflated once COMPRESS is on."""
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
        """One client command (its line and literals): command names, user, mailboxes, ID, STARTTLS."""
        if self.sasl_tag is not None and not re.match(rb"\S+ \S", pieces[0]):
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
        if "STARTTLS" in self.tags.values():
            self.facts["commands_after_starttls"] = True  # behind a STARTTLS not yet answered
        self.facts["commands"].append(name)
        self.tags[tag] = name
        if name in ("LOGIN", "AUTHENTICATE") and self.authenticated:
            self.tags[tag] = "OUT-OF-STATE " + name  # answered BAD for the state: no attempt
            if name == "LOGIN" and len(args) >= 2:
                self.facts["cleartext_credentials"] = True
        elif name == "LOGIN" and len(args) >= 2:
            self.facts["username"] = args[0].decode("utf-8", "replace")
            self.facts["auth_command"] = self.facts["auth_mechanism"] = "LOGIN"
            self.facts["cleartext_credentials"] = True
            if b"LOGINDISABLED" in self.capabilities:
                self.facts["logindisabled_ignored"] = True
            self.attempt(tag, self.facts["username"], args[1].decode("utf-8", "replace"))
        elif name == "AUTHENTICATE":
            # what the server had announced when the exchange began: its completion brings a new list
            self.sasl_logindisabled = b"LOGINDISABLED" in self.capabilities
            self.facts["auth_command"] = "AUTHENTICATE"
            self.facts["auth_mechanism"] = args[0].decode().upper()
            self.sasl_tag = tag
            self.sasl_lines = [args[1]] if len(args) > 1 else []
            self.sasl_challenges = []
        elif name in ("SELECT", "EXAMINE"):
            self.facts["mailboxes_wire"].append(args[0].decode())
        elif name == "IDLE":
            self.idle = True
        elif name == "ID" and args[:1] == ["("]:
            items = [a.decode() for a in args[1:-1]]
            # Field and value pairs; a stray last item is dropped.
            self.facts["client_id"] = dict(zip(items[::2], items[1::2], strict=False))
        elif name == "STARTTLS":
            self.facts["starttls"] = "requested"

    def server_line(self, pieces: list[bytes]) -> None:
        """One server line: greeting, capabilities, ID, and the tagged completions."""
        line = pieces[0]
        self.server_lines += 1
        if self.sasl_tag is not None and line.startswith(b"+"):
            self.sasl_challenges.append(line[1:].strip())
        if self.greeting is None and self.server_lines == 1:
            self.greeting = line
            if b"Dovecot" in line:
                self.facts["server_software"] = "Dovecot"
            elif m := re.search(rb" Cyrus IMAP (\S+) server ready", line):
                self.facts["server_software"] = "Cyrus IMAP " + m.group(1).decode()
        if m := re.search(rb"CAPABILITY ([^\]]*)", line):
            self.capabilities.update(m.group(1).split())
            self.last_capabilities = m.group(1).decode().upper().split()
        if line.startswith(b"* ID ("):
            toks = tokens(pieces)
            items = [a.decode() for a in toks[toks.index("(") + 1:-1]]
            self.facts["server_id"] = dict(zip(items[::2], items[1::2], strict=False))
        words = line.split(b" ", 2)
        if len(words) < 2 or words[0] in (b"*", b"+") or words[0] not in self.tags:
            return
        tag, status = words[0], words[1].upper()
        name = self.tags.pop(tag)
        if tag in self.attempt_of:
            self.facts["attempts"][self.attempt_of.pop(tag)]["ok"] = status == b"OK"
        if name in ("LOGIN", "AUTHENTICATE"):
            if status == b"OK":
                self.authenticated = True
                self.facts["login_ok"] = True
            else:
                self.facts["login_failures"] += 1
                if self.facts["login_ok"] is None:
                    self.facts["login_ok"] = False
        if name == "AUTHENTICATE":
            self.sasl_done(status)
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

    def attempt(self, tag: bytes, user: str | None, password: str | None) -> None:
        """A login began: its outcome comes with the tag's completion."""
        self.attempt_of[tag] = len(self.facts["attempts"])
        self.facts["attempts"].append({"user": user, "password": password, "ok": None})

    def sasl_done(self, status: bytes) -> None:
        """An AUTHENTICATE ended: the user (and CRAM-MD5's secrets) from its SASL lines."""
        mech = self.facts["auth_mechanism"]
        decoded = [base64.b64decode(x) if x not in (b"=", b"*") else b"" for x in self.sasl_lines]
        password = None
        if mech == "PLAIN" and decoded:
            self.facts["username"] = decoded[0].split(b"\0")[1].decode()
            self.facts["authzid"] = decoded[0].split(b"\0")[0].decode() or None
            password = decoded[0].split(b"\0")[2].decode()
            self.facts["cleartext_credentials"] = True
        elif mech == "LOGIN" and decoded:
            self.facts["username"] = decoded[0].decode()
            password = decoded[1].decode() if len(decoded) > 1 else None
            self.facts["cleartext_credentials"] = True
        elif mech.startswith("SCRAM-") and decoded:
            # client-first: gs2 header "n,[a=authzid]," then "n=user,r=nonce"
            attrs = dict(p.split(b"=", 1) for p in decoded[0].split(b",")[2:] if b"=" in p)
            self.facts["username"] = _scram_name(attrs[b"n"])
            gs2_authzid = decoded[0].split(b",")[1]
            self.facts["authzid"] = _scram_name(gs2_authzid[2:]) if gs2_authzid else None
            # the client-final message (its proof) and the server-final one (its signature)
            self.sasl_secrets += [x.decode() for x in self.sasl_lines[1:2] if x]
            self.sasl_secrets += [c.decode() for c in self.sasl_challenges
                                  if base64.b64decode(c).startswith(b"v=")]
        elif mech == "CRAM-MD5" and decoded:
            self.facts["username"] = decoded[0].rsplit(b" ", 1)[0].decode()
            self.sasl_secrets += [self.sasl_lines[0].decode(), decoded[0].rsplit(b" ", 1)[1]
                                  .decode()]
        if password is not None and self.sasl_logindisabled:
            self.facts["logindisabled_ignored"] = True
        self.facts["attempts"].append({"user": self.facts["username"] if decoded else None, "password": password,
                                       "ok": status == b"OK"})
        self.sasl_tag = None


COMPARED = ["port", "family", "imap", "username", "authzid", "auth_command", "auth_mechanism",
            "login_ok", "login_failures", "starttls", "compressed", "mailboxes_wire", "client_id",
            "server_id", "server_software", "commands", "cleartext_credentials", "capabilities",
            "auth_plain_offered", "logindisabled_ignored", "commands_after_starttls", "findings", "attempts"]
"""Compared where the stated facts have them (entries older than a key lack it; only the Cyrus
captures state ``capabilities``, only some scenarios ``attempts``)."""


def check_capture(path: Path, outcome: Outcome, ports: set[int]) -> None:
    """Compare the stated facts with what the capture shows; raise on any difference."""
    conns = read_connections(path, ports)
    if len(conns) != len(outcome.flows):
        raise RuntimeError(f"{path.name}: {len(conns)} connections, facts list "
                           f"{len(outcome.flows)}")
    for index, (conn, facts) in enumerate(zip(conns, outcome.flows, strict=True)):
        seen = Observer(conn)
        seen.facts["capabilities"] = seen.last_capabilities
        for key in COMPARED:
            if key in facts and seen.facts[key] != facts[key]:
                raise RuntimeError(f"{path.name} flow {index}: {key} is {seen.facts[key]!r} "
                                   f"in the capture but {facts[key]!r} in the facts")
        for secret in seen.sasl_secrets:
            if secret not in outcome.secrets:
                outcome.secrets.append(secret)
        if facts.get("cleartext_credentials"):
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
        if not facts.get("imap", True):
            if got["lines"] or got["commands"]:
                findings.append(prefix + f"takes it for IMAP: {got['lines']} lines, commands "
                                + ", ".join(sorted(set(got["commands"]))))
            continue
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



def tshark_version() -> str:
    """"tshark X.Y.Z" of the installed tshark, for MANIFEST.md ("tshark ?" where it says none)."""
    out = subprocess.run(["tshark", "--version"], capture_output=True, text=True,
                         timeout=TSHARK_TIMEOUT).stdout
    version = re.search(r"\) (\d[\w.]*)", out)
    return "tshark " + (version.group(1) if version else "?")
