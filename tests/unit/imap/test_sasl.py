"""SASL responses, mechanism by mechanism: the user they show, and the secret they hide.

Messages are written from the specifications: RFC 4616 (PLAIN), RFC 5802 section 5 (its
SCRAM-SHA-1 example exchange), MS-NLMP 2.2.1.3 (the AUTHENTICATE_MESSAGE layout), RFC 4121
section 4.2.6.2 and RFC 4752 section 3.1 (GSSAPI's last client message), RFC 4422 appendix A
(EXTERNAL).
"""

import base64
import struct

import pytest

from imaptap.imap import sasl

# RFC 5802 section 5, user "user", password "pencil"
SCRAM_CLIENT_FIRST = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
SCRAM_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
SCRAM_PROOF = b"v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
SCRAM_CLIENT_FINAL = b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=" + SCRAM_PROOF
SCRAM_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


def ntlm_authenticate(user: str, domain: str, workstation: str = "WS01", unicode: bool = True,
                      mic: bool = True) -> tuple[bytes, dict[str, bytes]]:
    """An AUTHENTICATE_MESSAGE as MS-NLMP 2.2.1.3 lays it out, and its secret parts."""
    enc = (lambda t: t.encode("utf-16-le")) if unicode else (lambda t: t.encode("ascii"))
    secrets = {"lm": b"\x11" * 24, "nt": b"\x22" * 16 + b"\x01\x01\x00\x00" + b"\x33" * 40, "key": b"\x44" * 16}
    payload = [("lm", secrets["lm"]), ("nt", secrets["nt"]), ("domain", enc(domain)), ("user", enc(user)),
               ("ws", enc(workstation)), ("key", secrets["key"])]
    offset = 88 if mic else 64
    fields, body = b"", b""
    for _, data in payload:
        fields += struct.pack("<HHI", len(data), len(data), offset + len(body))
        body += data
    flags = 0x00000001 if unicode else 0x00000002
    head = b"NTLMSSP\x00" + struct.pack("<I", 3) + fields + struct.pack("<I", flags)
    if mic:
        secrets["mic"] = b"\x55" * 16
        head += b"\x0a\x00\x63\x45\x00\x00\x00\x0f" + secrets["mic"]
    return head + body, secrets


def wrap_token(data: bytes, rrc: int = 0, flags: int = 0) -> bytes:
    """An RFC 4121 wrap token without confidentiality: header, data, a 12-byte checksum, rotated."""
    checksum = b"\xcc" * 12
    body = data + checksum
    if rrc:
        body = body[-rrc:] + body[:-rrc]
    return b"\x05\x04" + bytes([flags, 0xFF]) + struct.pack(">HHQ", len(checksum), rrc, 7) + body


@pytest.mark.parametrize(
    "mech, step, decoded, user, authzid",
    [
        ("PLAIN", 0, b"\x00alice\x00pw", "alice", None),
        ("PLAIN", 0, b"admin\x00alice\x00pw", "alice", "admin"),
        ("PLAIN", 0, b"alice-pw-no-nuls", None, None),
        ("LOGIN", 0, b"bob", "bob", None),
        ("LOGIN", 1, b"secret", None, None),
        ("CRAM-MD5", 0, b"carol 0123456789abcdef", "carol", None),
        ("XOAUTH2", 0, b"user=dave@example.org\x01auth=Bearer tok\x01\x01", "dave@example.org", None),
        ("OAUTHBEARER", 0, b"n,a=erin@example.org,\x01auth=Bearer t\x01\x01", "erin@example.org", None),
        ("SCRAM-SHA-1", 0, SCRAM_CLIENT_FIRST, "user", None),
        ("SCRAM-SHA-256", 0, b"n,a=admin,n=alice,r=rOprNGfwEbeRWgbNEkqO", "alice", "admin"),
        ("SCRAM-SHA-256", 0, b"y,,n=a=2Cb=3Dc,r=x", "a,b=c", None),  # saslname escapes
        ("SCRAM-SHA-256-PLUS", 0, b"p=tls-exporter,,n=alice,r=abc", "alice", None),
        ("SCRAM-SHA-256", 0, b"n,,m=ext,n=alice,r=abc", "alice", None),
        ("SCRAM-SHA-1", 1, SCRAM_CLIENT_FINAL, None, None),
        ("SCRAM-SHA-1", 0, b"x,,n=alice,r=abc", None, None),
        ("NTLM", 0, b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + b"\x00" * 16, None, None),
        ("NTLM", 1, ntlm_authenticate("carol", "LAB")[0], "LAB\\carol", None),
        ("NTLM", 1, ntlm_authenticate("carol", "")[0], "carol", None),
        ("NTLM", 1, ntlm_authenticate("Dörte", "LAB", unicode=True, mic=False)[0], "LAB\\Dörte", None),
        ("NTLM", 1, ntlm_authenticate("carol", "LAB", unicode=False)[0], "LAB\\carol", None),
        ("NTLM", 1, ntlm_authenticate("carol", "LAB")[0][:70], None, None),  # cut: fields point past the end
        ("GSSAPI", 0, b"\x60\x82\x02\x10\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01\x00" + b"\x6e" * 40,
         None, None),
        ("GSSAPI", 2, wrap_token(b"\x01\x00\x10\x00alice"), None, "alice"),
        ("GSSAPI", 2, wrap_token(b"\x01\x00\x10\x00alice", rrc=5), None, "alice"),
        ("GSSAPI", 2, wrap_token(b"\x01\x00\x10\x00"), None, None),  # no authzid: the principal's own
        ("GSSAPI", 2, wrap_token(b"\x01\x00\x10\x00alice", flags=0x02), None, None),  # sealed: not readable
        ("EXTERNAL", 0, b"alice@example.org", None, "alice@example.org"),
        ("EXTERNAL", 0, b"", None, None),
    ],
)
def test_the_identity_each_mechanism_shows(mech, step, decoded, user, authzid):
    assert sasl.identity(mech, step, decoded) == (user, authzid)


def blanked(mech, step, decoded):
    word = base64.b64encode(decoded)
    out = sasl.blanked_wire(mech, step, word, sasl.b64(word))
    assert out is None or len(out) == len(word)
    return None if out is None else base64.b64decode(out) if b"*" not in out else out


def test_responses_blanked_for_a_written_capture_keep_the_user():
    assert blanked("PLAIN", 0, b"admin\0alice\0Pw-1") == b"admin\0alice\0****"
    assert blanked("LOGIN", 0, b"alice") is None
    assert blanked("LOGIN", 1, b"Pw-1") == b"****"
    assert blanked("CRAM-MD5", 0, b"alice 4afbeaaf4a863a1a3d8ba7d8345bf903") == b"alice " + b"*" * 32
    assert blanked("XOAUTH2", 0, b"user=alice\x01auth=Bearer tok\x01\x01") == b"user=alice\x01auth=**********\x01\x01"
    assert sasl.blanked_wire("PLAIN", 0, b"not base64!", sasl.b64(b"not base64!")) == b"*" * 11
    assert blanked("EXTERNAL", 0, b"alice") is None
    assert blanked("GSSAPI", 0, b"\x60\x82kerberos") == b"*" * 10


def test_scram_the_proof_is_blanked_and_the_rest_kept():
    assert blanked("SCRAM-SHA-1", 0, SCRAM_CLIENT_FIRST) is None
    out = blanked("SCRAM-SHA-1", 1, SCRAM_CLIENT_FINAL)
    assert out == SCRAM_CLIENT_FINAL[: -len(SCRAM_PROOF)] + b"*" * len(SCRAM_PROOF)
    assert blanked("SCRAM-SHA-1", 1, b"something else") == b"*" * 14
    assert sasl.server_secret("SCRAM-SHA-1", SCRAM_SERVER_FINAL)
    assert not sasl.server_secret("SCRAM-SHA-1", SCRAM_SERVER_FIRST)
    assert not sasl.server_secret("SCRAM-SHA-1", b"e=invalid-proof")
    assert not sasl.server_secret("CRAM-MD5", b"v=1")


def test_ntlm_the_responses_key_and_mic_are_blanked_user_and_domain_kept():
    msg, secrets = ntlm_authenticate("carol", "LAB")
    out = blanked("NTLM", 1, msg)
    assert len(out) == len(msg)
    for secret in secrets.values():
        assert secret not in out
        assert b"*" * len(secret) in out
    assert "carol".encode("utf-16-le") in out and "LAB".encode("utf-16-le") in out
    assert sasl.identity("NTLM", 1, out) == ("LAB\\carol", None)  # a blanked capture still names them
    negotiate = b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + b"\x00" * 16
    assert blanked("NTLM", 0, negotiate) is None
    assert blanked("NTLM", 1, msg[:70]) == b"*" * 70
    without_mic, secrets = ntlm_authenticate("carol", "LAB", mic=False)
    assert blanked("NTLM", 1, without_mic)[:64] == without_mic[:64]


def test_b64():
    assert sasl.b64(b"=") == b""
    assert sasl.b64(b"not base64!") is None
    assert sasl.b64(base64.b64encode(b"x") + b"\r") == b"x"
