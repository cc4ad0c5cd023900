"""The facts of each capture in pcaps/, and the files that hold them (facts.json, MANIFEST.md).

A scenario of make_captures states its facts from how it drove the session; capture_check then
derives them from the capture and compares.  Nothing here runs a program or touches the network.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imaptap_lab.lab import IMAP_PORT

if TYPE_CHECKING:
    from imaptap_lab.lab import Lab


def flow(client_kind: str, username: str | None, *, commands: list[str],
         auth_command: str | None = "LOGIN", auth_mechanism: str | None = "LOGIN",
         login_ok: bool | None = True, login_failures: int = 0, starttls: str = "offered",
         compressed: bool = False, mailboxes: list[str] | None = None,
         mailboxes_wire: list[str] | None = None, client_id: dict | None = None,
         server_id: dict | None = None, cleartext_credentials: bool = True,
         port: int = IMAP_PORT, family: str = "ipv4", authzid: str | None = None,
         server_software: str | None = "Dovecot", capabilities: list[str] | None = None,
         imap: bool = True, auth_plain_offered: bool = True, logindisabled_ignored: bool = False,
         commands_after_starttls: bool = False,
         attempts: list[tuple[str | None, str | None, bool | None]] | None = None) -> dict:
    """The facts a correct analyzer reports for one TCP connection (see MANIFEST.md);
    ``capabilities`` (the last list the server sent) only where a scenario states them, and
    ``attempts``, each login as (user, password or None, outcome), likewise.  The flow's
    ``findings`` follow from the rest (`expected_findings`)."""
    mailboxes = mailboxes or []
    if not imap:
        return {"port": port, "family": family, "client_kind": client_kind, "imap": False}
    extra = {} if capabilities is None else {"capabilities": capabilities}
    facts = {
        "port": port, "family": family, "client_kind": client_kind, "imap": True, "username": username,
        "authzid": authzid,
        "auth_command": auth_command, "auth_mechanism": auth_mechanism, "login_ok": login_ok,
        "login_failures": login_failures, "starttls": starttls, "compressed": compressed,
        "mailboxes": mailboxes,
        "mailboxes_wire": mailboxes_wire if mailboxes_wire is not None else list(mailboxes),
        "client_id": client_id, "server_id": server_id, "server_software": server_software,
        "commands": commands, "cleartext_credentials": cleartext_credentials, **extra,
        "auth_plain_offered": auth_plain_offered, "logindisabled_ignored": logindisabled_ignored,
        "commands_after_starttls": commands_after_starttls,
    }
    if attempts is not None:
        facts["attempts"] = [{"user": u, "password": p, "ok": ok} for u, p, ok in attempts]
    facts["findings"] = expected_findings(facts)
    return facts


def later_flow_facts(facts: dict) -> dict:
    """The facts added after the first captures, as they hold for every session made before:
    the lab's servers (Dovecot on its first two addresses, Cyrus) list STARTTLS and AUTH=PLAIN
    together before login, so a flow that saw STARTTLS offered saw AUTH=PLAIN too, and one that
    saw no list (a client-only capture: starttls none) saw neither; none of those clients
    ignored LOGINDISABLED or sent a command behind STARTTLS.  `complete` fills them into an
    entry written before; make_captures then checks them against the capture like any other fact."""
    return {"auth_plain_offered": facts["starttls"] != "none", "logindisabled_ignored": False,
            "commands_after_starttls": False}


def expected_findings(facts: dict) -> list[str]:
    """The findings imaptap must list for an IMAP flow with these facts, in its order."""
    out = []
    if facts["cleartext_credentials"]:
        out.append("cleartext_credentials")
    if facts["starttls"] == "offered":
        out.append("starttls_offered_not_used")
    elif facts["starttls"] == "refused":
        out.append("starttls_refused")
    if facts["login_failures"]:
        out.append("failed_logins")
    if facts["logindisabled_ignored"]:
        out.append("login_despite_logindisabled")
    if facts["auth_plain_offered"]:
        out.append("auth_plain_before_starttls")
    if facts["commands_after_starttls"]:
        out.append("commands_after_starttls")
    return out


def complete(facts: dict) -> dict:
    """An IMAP flow's facts with the later facts filled in (`later_flow_facts`) and its
    findings; the facts of a flow that is not IMAP (only ``imap: false``) as they are."""
    if not facts.get("imap", True):
        return dict(facts)
    out = {**later_flow_facts(facts), **facts}
    out["findings"] = expected_findings(out)
    return out


def complete_entry(entry: dict) -> dict:
    """A facts.json entry written before, its flows completed and its attacks (none) stated."""
    return {**entry, "flows": [complete(f) for f in entry["flows"]], "attacks": entry.get("attacks", [])}


def b64(data: str | bytes) -> str:
    """``data`` (UTF-8 when text) in base64, as SASL sends it."""
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
    """``text`` as an IMAP quoted string, backslashes and quotes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'




@dataclass
class Outcome:
    """What a scenario did: the facts of each flow, every secret that crossed the wire, decoys."""

    flows: list[dict]
    secrets: list[str]
    decoys: list[str] = field(default_factory=list)
    notes: str = ""
    attacks: list[str] = field(default_factory=list)
    """The password attacks the capture's flows show together (report.py's names)."""


@dataclass
class Scenario:
    """One capture: its name (the file is NAME.pcap), the client, what happens, and the code."""

    name: str
    client: str
    description: str
    run: Callable[[Lab], Outcome]
    server: str = "dovecot"
    """The lab's server: ``dovecot`` or ``cyrus`` (imaptap_lab.lab.Server)."""
    port_filter: str | None = None
    """What tcpdump records (default: the lab's IMAP ports, both directions)."""


MANIFEST_INTRO = """\
# IMAP captures for imaptap's replay tests

Generated by `scripts/make-captures` (run as root; it rewrites this file, `facts.json` and
every `*.pcap` here; with `--only NAME ...` it remakes those and keeps the others' entries).
Each capture is one scenario recorded with tcpdump on the root-namespace end of the lab's veth
(`scripts/imaplab.py`): real clients in the root namespace, a real Dovecot 2.3 (the `cyrus-*`
captures: Cyrus IMAP 3.6, unpacked from Debian's packages) in a network namespace. The server
listens on 143 and 10143; the addresses are
10.199.S.1 (client) / 10.199.S.2 (server) and fd00:199:S::1 / ::2, S varying between runs;
on fd00:199:S::3 Dovecot runs with `disable_plaintext_auth = yes` (LOGINDISABLED, no
plaintext mechanism before STARTTLS).
TX checksum offload was off on the veth, so segments are MTU-sized and checksums valid.
The facts below were stated from how each session was driven and then checked against the
capture by the script's own reassembler; a mismatch fails the script.

Lab users: alice / `Alice-Pw-7391`, bob / `Bob Pw "quoted" 42`, carol / `Carol-Pw-5520`,
dave / `Dave-Pw-8812`. Dovecot greets with
`* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS
AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5] Dovecot (Debian) ready.` (since the SCRAM captures also
`AUTH=SCRAM-SHA-1 AUTH=SCRAM-SHA-256`) and offers COMPRESS=DEFLATE after login. Cyrus greets
with `* OK [CAPABILITY IMAP4rev1 LITERAL+ ID ENABLE STARTTLS AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5
AUTH=SCRAM-SHA-1 AUTH=SCRAM-SHA-256 SASL-IR] imaptap-lab Cyrus IMAP <version> server ready`,
answers a login with a ~1 KB `OK [CAPABILITY ...]` and ID with a ~500-byte list, the lines the
default snap length used to cut.
`scripts/make-captures --only NAME ...` re-records only those scenarios: the other captures
are kept as they are, checked again, and keep their entries here.

## facts.json

`{"<file>.pcap": {"description", "ports": [server ports], "flows": [...], "secrets": [...],
"decoys": [...], "attacks": [...]}}`; `attacks` names the password attacks the flows show
together (`brute_force`, `password_spraying`, `credential_stuffing`); flows in connection
(SYN) order, each with:

"""
#: The key table of facts.json in MANIFEST.md: (key, meaning).
FACT_KEYS = (
    ("`port`, `family`", "server port; `ipv4` or `ipv6`"),
    ("`client_kind`", "`imaplib` (Python 3.11), `curl` (7.88), `mbsync` (isync 1.4.4), `fetchmail` (6.4), "
                      "`offlineimap` (offlineimap3 8.0), `raw` (the script's own socket client, SCRAM "
                      "included)"),
    ("`imap`", "`false` for a connection that is not IMAP (a web server on the port): its entry has "
               "no other key; absent (true) in entries written before it existed"),
    ("`username`", "as the server received it (astring/literal decoded, SASL decoded); `null` if "
                   "not visible (inside TLS)"),
    ("`authzid`", "the authorization identity a SASL response carried, or `null`"),
    ("`auth_command`", "`LOGIN` or `AUTHENTICATE`; `null` if not visible"),
    ("`auth_mechanism`", "`LOGIN` for the LOGIN command, else the SASL mechanism (`PLAIN`, `LOGIN`, "
                         "`CRAM-MD5`, `SCRAM-SHA-1`, `SCRAM-SHA-256`)"),
    ("`login_ok`", "`true` if a LOGIN/AUTHENTICATE got OK, `false` if attempts all failed, `null` "
                   "if none visible"),
    ("`login_failures`", "tagged NO/BAD answers to LOGIN/AUTHENTICATE, not counting those sent "
                         "when already logged in (Dovecot answers them BAD for the state)"),
    ("`starttls`", "`offered` (in capabilities, not used), `requested`, `completed` (OK: the rest "
                   "is TLS), `refused` (NO/BAD); `none` only where no server byte was captured"),
    ("`compressed`", "COMPRESS DEFLATE completed"),
    ("`mailboxes`", "SELECT/EXAMINE targets in order, decoded (modified UTF-7 → Unicode)"),
    ("`mailboxes_wire`", "the same, as on the wire after astring decoding (`Entw&APw-rfe`)"),
    ("`client_id`, `server_id`", "ID parameters as a dict, or `null`"),
    ("`server_software`", "from the greeting: `Dovecot`, `Cyrus IMAP <version>`; `null` where no server "
                          "byte was captured"),
    ("`capabilities`", "stated by the Cyrus captures only: the last capability list the server sent, upper "
                       "case, as the client received it"),
    ("`commands`", "every command name the client sent, upper case, `UID FETCH` as one, including "
                   "those inside COMPRESS; not those inside TLS; not SASL responses or IDLE's DONE"),
    ("`cleartext_credentials`", "a password (or PLAIN/LOGIN SASL data) crossed the wire readable"),
    ("`auth_plain_offered`", "the server offered AUTH=PLAIN or AUTH=LOGIN before TLS"),
    ("`logindisabled_ignored`", "a password went in clear although the server announced LOGINDISABLED"),
    ("`commands_after_starttls`", "the client sent a command behind STARTTLS before the server answered it"),
    ("`findings`", "what imaptap must list in the flow's `findings`, derived from the facts above"),
    ("`attempts`", "where stated: each login as `user`, `password` (one of the secrets, or `null`), `ok`"),
)
MANIFEST_CAPTURES = """
`secrets`: every password and SASL secret of the capture, raw and in the base64 forms that
went on the wire (wrong passwords included): no output of imaptap may contain any of them.
`decoys`: strings that are in the capture as mail content and must never be reported as a
user or password.

## Captures

| file | client | what is in it | facts a correct analyzer reports | what tshark gets wrong |
|---|---|---|---|---|
"""
MANIFEST_HEAD = (MANIFEST_INTRO + "| key | meaning |\n|---|---|\n"
                 + "".join(f"| {key} | {meaning} |\n" for key, meaning in FACT_KEYS) + MANIFEST_CAPTURES)
"""MANIFEST.md up to its table of captures."""


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
    """The facts of a capture's flows in one table cell, flows numbered and joined by <br>."""
    parts = []
    for index, f in enumerate(flows):
        if not f.get("imap", True):
            parts.append((f"{index + 1}: " if len(flows) > 1 else "")
                         + f"port {f['port']}/{f['family']}; not IMAP: no message, no IMAP fact")
            continue
        who = repr(f["username"]).replace("\\\\", "\\") if f["username"] is not None else "—"
        auth = (auth_label(f) if f["auth_command"] else "auth not visible")
        bits = [f"port {f['port']}/{f['family']}", f"user {who}", auth]
        if f.get("authzid"):
            bits.append(f"authzid {f['authzid']!r}")
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
        if f.get("logindisabled_ignored"):
            bits.append("password sent despite LOGINDISABLED")
        if f.get("commands_after_starttls"):
            bits.append("commands behind STARTTLS")
        if f.get("auth_plain_offered") is False and f["starttls"] != "none":  # a server that listed its offers
            bits.append("no plaintext mechanism offered")
        parts.append((f"{index + 1}: " if len(flows) > 1 else "") + "; ".join(bits))
    return "<br>".join(parts)


def facts_document(results: list[tuple[Scenario, Outcome, list[str]]]) -> dict:
    """The content of facts.json: per capture file its description, ports, flows, secrets, decoys."""
    facts = {}
    for sc, outcome, _ in results:
        facts[f"{sc.name}.pcap"] = {"description": sc.description,
                                    "ports": sorted({f["port"] for f in outcome.flows}),
                                    "flows": outcome.flows, "secrets": outcome.secrets,
                                    "decoys": outcome.decoys, "attacks": outcome.attacks}
    return facts


def manifest_row(sc: Scenario, outcome: Outcome, findings: list[str]) -> str:
    """The table row of MANIFEST.md for one capture, with tshark's findings."""
    what = sc.description + (f". {outcome.notes}" if outcome.notes else "")
    return (f"| `{sc.name}.pcap` | {sc.client} | {md_escape(what)} | {md_escape(summarize(outcome.flows))} | "
            f"{md_escape('<br>'.join(findings) or 'nothing')} |\n")


def manifest(results: list[tuple[Scenario, Outcome, list[str]]], tshark_version: str) -> str:
    """The text of MANIFEST.md: one table row per capture, with tshark's findings."""
    rows = [manifest_row(*result) for result in results]
    return MANIFEST_HEAD + "".join(rows) + MANIFEST_TAIL.format(tshark_version=tshark_version)


def write_outputs(results: list[tuple[Scenario, Outcome, list[str]]], directory: Path, tshark_version: str) -> None:
    """Write facts.json and MANIFEST.md into ``directory``."""
    (directory / "facts.json").write_text(json.dumps(facts_document(results), indent=1, ensure_ascii=True) + "\n")
    (directory / "MANIFEST.md").write_text(manifest(results, tshark_version))


def merge_outputs(results: list[tuple[Scenario, Outcome, list[str]]], directory: Path, tshark_version: str,
                  order: list[str]) -> None:
    """Write facts.json and MANIFEST.md for the captures remade (``results``), keeping what the
    files in ``directory`` say of every other one; entries in the order of the scenario names
    ``order``, then any the scenarios no longer name."""
    facts_path, manifest_path = directory / "facts.json", directory / "MANIFEST.md"
    old_facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    old_rows = {}
    if manifest_path.exists():
        for line in manifest_path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith("| `") and ".pcap` |" in line:
                old_rows[line[3:line.index("` |")]] = line
    new_facts = facts_document(results)
    new_rows = {f"{sc.name}.pcap": manifest_row(sc, outcome, findings) for sc, outcome, findings in results}
    files = [f"{name}.pcap" for name in order] + [f for f in old_facts if f not in {f"{n}.pcap" for n in order}]
    facts, rows = {}, []
    for file in files:
        if file in new_facts:
            facts[file], row = new_facts[file], new_rows[file]
        elif file in old_facts and file in old_rows:
            # an entry made before: with the facts added since (make_captures checked them)
            facts[file], row = complete_entry(old_facts[file]), old_rows[file]
        else:
            continue
        rows.append(row)
    facts_path.write_text(json.dumps(facts, indent=1, ensure_ascii=True) + "\n")
    manifest_path.write_text(MANIFEST_HEAD + "".join(rows) + MANIFEST_TAIL.format(tshark_version=tshark_version))


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

