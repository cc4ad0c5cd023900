"""SASL exchanges (RFC 4422) as AUTHENTICATE carries them: who logs in, and what is a secret.

For each mechanism: the user (and authorization identity) a client's response shows, and the
response with its secret part overwritten by ``*`` of the same length, so that a capture
written to disk still names the user and replays to the same facts.

- PLAIN (RFC 4616), LOGIN, XOAUTH2, OAUTHBEARER (RFC 7628): the password or token is the secret.
- CRAM-MD5 (RFC 2195): ``user digest``; the digest is the secret.
- SCRAM-* (RFC 5802, 7677): the client-first message ``n,a=authzid,n=user,r=nonce`` names
  both; the client-final message's proof ``p=`` and the server-final message's signature
  ``v=`` are secrets (each is enough for a dictionary attack on the password).
- NTLM (MS-NLMP 2.2.1.3): the AUTHENTICATE_MESSAGE (type 3) carries domain, user and
  workstation in clear; its challenge responses, session key and MIC are the secrets.
- GSSAPI (RFC 4752): the Kerberos tokens name no user; the last client message, an unsealed
  RFC 4121 wrap token, may carry an authorization identity.
- EXTERNAL (RFC 4422 appendix A): the message is the authorization identity, nothing secret.

Anything else is taken for a secret whole.  Nothing here raises on network input.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import NamedTuple

#: Mechanisms whose exchange carries a reusable secret readable by anyone on the path.
CLEARTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"})


class Identity(NamedTuple):
    """Who a SASL response says logs in: the authentication identity and the authorization one."""

    user: str | None
    authzid: str | None


NOBODY = Identity(None, None)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def b64(data: bytes) -> bytes | None:
    """Decoded base64 or None when it is not valid base64."""
    data = data.strip()
    if data == b"=":  # RFC 4959: an empty initial response
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def plain_user(decoded: bytes) -> tuple[str, str | None] | None:
    """``(authcid, authzid or None)`` from a decoded PLAIN message (RFC 4616)."""
    parts = decoded.split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return None
    return _text(parts[1]), (_text(parts[0]) if parts[0] else None)


def is_scram(mechanism: str) -> bool:
    """SCRAM-SHA-1, SCRAM-SHA-256, their -PLUS forms and the other SCRAM family members."""
    return mechanism.startswith("SCRAM-")


# --- SCRAM (RFC 5802) ------------------------------------------------------------------------

_SASLNAME_ESCAPE = re.compile(rb"=(2C|3D)")


def _saslname(raw: bytes) -> str:
    """A SCRAM saslname with its ``=2C`` and ``=3D`` escapes undone."""
    return _text(_SASLNAME_ESCAPE.sub(lambda m: b"," if m.group(1) == b"2C" else b"=", raw))


def scram_client_first(decoded: bytes) -> Identity | None:
    """The user and authzid of a client-first-message, None if ``decoded`` is not one."""
    parts = decoded.split(b",")
    if len(parts) < 4:
        return None
    flag, authz, bare = parts[0], parts[1], parts[2:]
    if flag not in (b"n", b"y") and not flag.startswith(b"p="):
        return None
    if authz and not authz.startswith(b"a="):
        return None
    if bare[0].startswith(b"m="):  # reserved-mext
        bare = bare[1:]
    if not bare or not bare[0].startswith(b"n="):
        return None
    return Identity(_saslname(bare[0][2:]) or None, _saslname(authz[2:]) or None if authz else None)


def _scram_blanked(decoded: bytes) -> bytes | None:
    if decoded.startswith(b"c="):  # client-final-message: the proof comes last
        proof = decoded.rfind(b",p=")
        if proof >= 0:
            return decoded[: proof + 3] + b"*" * (len(decoded) - proof - 3)
        return b"*" * len(decoded)
    if scram_client_first(decoded) is not None:
        return None  # user and nonce: nothing secret
    return b"*" * len(decoded)


def server_secret(mechanism: str, decoded: bytes) -> bool:
    """A server challenge that is itself a secret: SCRAM's server-final ``v=`` signature."""
    return is_scram(mechanism) and decoded.startswith(b"v=")


# --- NTLM (MS-NLMP) --------------------------------------------------------------------------

_NTLM_SIGNATURE = b"NTLMSSP\x00"
_NTLM_AUTHENTICATE = 3
_NTLM_FIELDS = struct.Struct("<HHI")
# AUTHENTICATE_MESSAGE: the offsets of its fields (length, room, offset of the payload)
_NTLM_LM, _NTLM_NT, _NTLM_DOMAIN, _NTLM_USER, _NTLM_WORKSTATION, _NTLM_KEY = 12, 20, 28, 36, 44, 52
_NTLM_FLAGS = 60
_NTLM_MIC = 72  # after the 8-byte Version, when the payload starts past it
_NTLM_MIC_LEN = 16
_NTLM_HEADER = 64
_NTLMSSP_NEGOTIATE_UNICODE = 0x00000001


def _ntlm_field(msg: bytes, at: int) -> tuple[int, int] | None:
    """(start, end) of a field's payload, None where it lies outside the message."""
    length, _, offset = _NTLM_FIELDS.unpack_from(msg, at)
    if offset + length > len(msg):
        return None
    return offset, offset + length


def ntlm_authenticate(decoded: bytes) -> tuple[str, str] | None:
    """``(user, domain)`` of an NTLM AUTHENTICATE_MESSAGE, None if ``decoded`` is not one."""
    if len(decoded) < _NTLM_HEADER or not decoded.startswith(_NTLM_SIGNATURE):
        return None
    if struct.unpack_from("<I", decoded, 8)[0] != _NTLM_AUTHENTICATE:
        return None
    unicode = struct.unpack_from("<I", decoded, _NTLM_FLAGS)[0] & _NTLMSSP_NEGOTIATE_UNICODE
    out = []
    for at in (_NTLM_USER, _NTLM_DOMAIN):
        span = _ntlm_field(decoded, at)
        if span is None:
            return None
        raw = decoded[span[0] : span[1]]
        out.append(raw.decode("utf-16-le", "backslashreplace") if unicode else _text(raw))
    return out[0], out[1]


def _ntlm_blanked(decoded: bytes) -> bytes | None:
    if not decoded.startswith(_NTLM_SIGNATURE) or len(decoded) < 12:
        return b"*" * len(decoded)
    kind = struct.unpack_from("<I", decoded, 8)[0]
    if kind != _NTLM_AUTHENTICATE:
        return None  # NEGOTIATE_MESSAGE: flags, perhaps a domain and workstation; nothing secret
    if ntlm_authenticate(decoded) is None:
        return b"*" * len(decoded)
    out = bytearray(decoded)
    starts = []
    for at in (_NTLM_LM, _NTLM_NT, _NTLM_DOMAIN, _NTLM_USER, _NTLM_WORKSTATION, _NTLM_KEY):
        span = _ntlm_field(decoded, at)
        if span is None:
            return b"*" * len(decoded)
        if span[1] > span[0]:
            starts.append(span[0])
        if at in (_NTLM_LM, _NTLM_NT, _NTLM_KEY):
            out[span[0] : span[1]] = b"*" * (span[1] - span[0])
    if min(starts, default=len(decoded)) >= _NTLM_MIC + _NTLM_MIC_LEN:
        out[_NTLM_MIC : _NTLM_MIC + _NTLM_MIC_LEN] = b"*" * _NTLM_MIC_LEN
    return bytes(out)


def ntlm_user(user: str, domain: str) -> str:
    """The user as Windows writes a down-level logon name: ``DOMAIN\\user``, or ``user``."""
    return f"{domain}\\{user}" if domain else user


# --- GSSAPI (RFC 4752, RFC 4121) -------------------------------------------------------------

_WRAP_TOKEN = b"\x05\x04"
_WRAP_SENT_BY_ACCEPTOR = 0x01
_WRAP_SEALED = 0x02
_WRAP_HEADER = 16
_GSSAPI_LAYERS = 4  # security layer mask and the 3-byte maximum message size before the authzid


def gssapi_authzid(decoded: bytes) -> str | None:
    """The authorization identity of a client's last GSSAPI message, where it is an unsealed
    RFC 4121 wrap token (RFC 4752 section 3.1 has the client wrap it without confidentiality)."""
    if len(decoded) < _WRAP_HEADER + _GSSAPI_LAYERS or not decoded.startswith(_WRAP_TOKEN):
        return None
    flags = decoded[2]
    if flags & (_WRAP_SENT_BY_ACCEPTOR | _WRAP_SEALED) or decoded[3] != 0xFF:
        return None
    ec, rrc = struct.unpack_from(">HH", decoded, 4)
    body = decoded[_WRAP_HEADER:]
    if body and rrc:
        rrc %= len(body)
        body = body[rrc:] + body[:rrc]  # undo the rotation to the right
    if ec > len(body) - _GSSAPI_LAYERS:
        return None
    data = body[: len(body) - ec]
    return _text(data[_GSSAPI_LAYERS:]) or None


# --- every mechanism -------------------------------------------------------------------------

def identity(mechanism: str, step: int, decoded: bytes) -> Identity:
    """Who a client's SASL response says logs in, where this mechanism and step show it.

    ``step`` counts the client's responses from 0 (the initial response, when there is one).
    """
    if mechanism == "PLAIN":
        got = plain_user(decoded)
        return Identity(*got) if got else NOBODY
    if mechanism == "LOGIN":
        return Identity(_text(decoded), None) if step == 0 and decoded else NOBODY
    if mechanism == "CRAM-MD5":
        user, sep, _digest = decoded.rpartition(b" ")
        return Identity(_text(user), None) if sep and user else NOBODY
    if mechanism == "XOAUTH2":
        for part in decoded.split(b"\x01"):
            if part.startswith(b"user="):
                return Identity(_text(part[5:]), None)
        return NOBODY
    if mechanism == "OAUTHBEARER":
        head = decoded.split(b"\x01", 1)[0]
        for part in head.split(b","):
            if part.startswith(b"a="):
                return Identity(_text(part[2:]), None)
        return NOBODY
    if is_scram(mechanism):
        return scram_client_first(decoded) or NOBODY
    if mechanism == "NTLM":
        got = ntlm_authenticate(decoded)
        return Identity(ntlm_user(*got), None) if got and got[0] else NOBODY
    if mechanism == "GSSAPI":
        return Identity(None, gssapi_authzid(decoded))
    if mechanism == "EXTERNAL":
        return Identity(None, _text(decoded) or None) if step == 0 else NOBODY
    return NOBODY


def _blanked(mechanism: str, step: int, decoded: bytes) -> bytes | None:
    """``decoded`` with its secret part replaced by ``*`` (same length); None if it holds none.
    The user name stays where the mechanism has one, so a blanked capture still names it."""
    if not decoded:
        return None
    if mechanism == "LOGIN" and step == 0:
        return None  # the user name
    if mechanism == "PLAIN":
        parts = decoded.split(b"\x00")
        if len(parts) == 3:
            return parts[0] + b"\x00" + parts[1] + b"\x00" + b"*" * len(parts[2])
    elif mechanism == "CRAM-MD5":
        user, sep, digest = decoded.rpartition(b" ")
        if sep:
            return user + sep + b"*" * len(digest)
    elif mechanism in ("XOAUTH2", "OAUTHBEARER"):
        parts = decoded.split(b"\x01")
        if any(p.startswith(b"auth=") for p in parts):
            return b"\x01".join(b"auth=" + b"*" * (len(p) - 5) if p.startswith(b"auth=") else p for p in parts)
    elif is_scram(mechanism):
        return _scram_blanked(decoded)
    elif mechanism == "NTLM":
        return _ntlm_blanked(decoded)
    elif mechanism == "EXTERNAL":
        return None  # an authorization identity
    return b"*" * len(decoded)


def blanked_wire(mechanism: str, step: int, word: bytes, decoded: bytes | None) -> bytes | None:
    """What replaces a client's SASL response ``word`` (base64, as on the wire; ``decoded`` is
    `b64` of it) in a capture written to disk: the same length, the secret part ``*`` in the
    decoded message (so the user name survives), or all ``*`` when that cannot be done; None
    when it holds no secret."""
    if decoded is None:
        return b"*" * len(word)
    blanked = _blanked(mechanism, step, decoded)
    if blanked is None:
        return None
    wire = base64.b64encode(blanked)
    return wire if len(wire) == len(word) else b"*" * len(word)
