"""Mails for the lab's mailboxes: the benchmarks' realistic ones, a plain filler, and the
dated mails of the captures in pcaps/."""

from __future__ import annotations

import base64
import random

#: Sizes of the mails put in every user's INBOX before benchmark sessions: the spread of a real
#: mailbox, from a short note to a message with a 150 KB attachment.
MAILBOX_SIZES = (1_500, 3_000, 6_000, 12_000, 25_000, 60_000, 150_000)
#: A realistic mail has one word of text for every 5 bytes of its size up to this size (about
#: 6 KB of text at most), and a base64 attachment for the rest: mail text seldom runs longer,
#: and attachments are what make real mailboxes big.
TEXT_CAP = 8000
#: Characters per text line (RFC 5322 recommends at most 78).
TEXT_WIDTH = 72
#: Common English words: the text of a realistic mail.
WORDS = "the of and to in is you that it he was for on are as with his they at be this from".split()
#: The filler mail's body line, and how many of them: about 4 KB.
FILLER_LINE = b"A line of a mail body that an analyzer must not read as IMAP.\r\n"
FILLER_LINES = 60
#: Fixed Date: header of the captures' mails, so the mails (and the captures) do not change with
#: the clock.
LAB_DATE = "Mon, 06 Jan 2025 10:00:00 +0000"


def realistic_mail(n: int, size: int) -> bytes:
    """A MIME mail of about ``size`` bytes: a text part (at most ~6 KB) and a base64 attachment."""
    rnd = random.Random(n)
    text = " ".join(rnd.choice(WORDS) for _ in range(min(size, TEXT_CAP) // 5))
    lines = [text[i : i + TEXT_WIDTH] for i in range(0, len(text), TEXT_WIDTH)]
    head = (f"From: sender{n}@imaptap.test\r\nTo: user@imaptap.test\r\nSubject: mail {n} of {size} bytes\r\n"
            f"Message-ID: <bench-{n}@imaptap.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n')
    body = head + "\r\n".join(lines) + "\r\n"
    rest = size - len(body)
    if rest > 0:
        blob = base64.encodebytes(rnd.randbytes(rest * 3 // 4)).decode().replace("\n", "\r\n")
        body += "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + blob
    return (body + "--b--\r\n").encode()


def filler_mail(subject: str) -> bytes:
    """A plain mail to alice of FILLER_LINES identical body lines: load without variety."""
    return (b"From: bench@imaptap.test\r\nTo: alice@imaptap.test\r\nSubject: " + subject.encode()
            + b"\r\n\r\n" + FILLER_LINE * FILLER_LINES)


def dated_mail(subject: str, body: str, *, msgid: str, sender: str = "lab@imaptap.test",
               to: str = "user@imaptap.test", extra: str = "") -> bytes:
    """A text/plain mail dated LAB_DATE, every line ending in CRLF; ``extra`` is more header lines."""
    text = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {LAB_DATE}\r\n"
            f"Message-ID: <{msgid}@imaptap.test>\r\n{extra}MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{body}")
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
