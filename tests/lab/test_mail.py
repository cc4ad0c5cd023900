"""imaptap_lab.mail: the mails the lab's mailboxes are filled with."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from imaptap_lab import mail


@pytest.mark.parametrize("size", mail.MAILBOX_SIZES)
def test_a_realistic_mail_is_about_the_size_asked(size):
    data = mail.realistic_mail(3, size)
    # the attachment is cut in whole base64 lines, so a few dozen bytes either way
    assert abs(len(data) - size) < size * 0.05 + 100, (len(data), size)


def test_a_realistic_mail_is_valid_mime_text_and_an_attachment():
    data = mail.realistic_mail(7, 60_000)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == "mail 7 of 60000 bytes"
    assert msg["Message-ID"] == "<bench-7@imaptap.test>"
    assert msg.is_multipart()
    text, attachment = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/octet-stream"
    raw = attachment.get_payload(decode=True)
    assert len(raw) > 40_000
    # lines are cut at TEXT_WIDTH characters, words and all
    words = text.get_content().replace("\r", "").replace("\n", "").split()
    assert len(words) == mail.TEXT_CAP // 5
    assert set(words) <= set(mail.WORDS)


def test_text_grows_with_the_size_up_to_its_cap_and_the_attachment_takes_the_rest():
    def parts(size: int) -> tuple[int, int]:
        text, attachment = email.message_from_bytes(mail.realistic_mail(1, size), policy=email.policy.default
                                                    ).get_payload()
        return len(text.get_content()), len(attachment.get_payload(decode=True))

    small, mid, large = parts(1_500), parts(6_000), parts(150_000)
    assert small[0] > small[1], "a short note is mostly text"
    assert small[0] < mid[0] < 8000
    assert large[0] == parts(25_000)[0], "text stops growing at TEXT_CAP"
    assert large[1] > 100_000


def test_realistic_mails_are_the_same_every_run_and_differ_from_each_other():
    assert mail.realistic_mail(4, 12_000) == mail.realistic_mail(4, 12_000)
    assert mail.realistic_mail(4, 12_000) != mail.realistic_mail(5, 12_000)


def test_realistic_mail_lines_end_in_crlf_and_stay_short():
    data = mail.realistic_mail(2, 25_000)
    lines = data.split(b"\r\n")
    assert b"\n" not in b"".join(lines), "a bare LF"
    assert max(len(line) for line in lines) <= 78  # RFC 5322's recommended limit
    assert data.endswith(b"--b--\r\n")


def test_the_filler_mail_repeats_one_line():
    data = mail.filler_mail("load")
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.endswith(b"Subject: load")
    assert body == mail.FILLER_LINE * mail.FILLER_LINES
    assert mail.FILLER_LINE.endswith(b"\r\n")


def test_a_dated_mail_has_the_fixed_date_and_only_crlf():
    data = mail.dated_mail("Hi", "line one\nline two\r\nline three\n", msgid="m1", to="bob@imaptap.test",
                           extra="X-Spam-Flag: NO\r\n")
    assert b"\r\nDate: Mon, 06 Jan 2025 10:00:00 +0000\r\n" in data
    assert b"\r\nX-Spam-Flag: NO\r\nMIME-Version: 1.0\r\n" in data
    assert data.endswith(b"\r\n\r\nline one\r\nline two\r\nline three\r\n")
    assert data.count(b"\n") == data.count(b"\r\n")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert (msg["To"], msg["Message-ID"]) == ("bob@imaptap.test", "<m1@imaptap.test>")


def test_the_attachment_is_base64_of_random_bytes():
    msg = email.message_from_bytes(mail.realistic_mail(9, 150_000), policy=email.policy.default)
    part = msg.get_payload()[1]
    encoded = part.get_payload(decode=False).replace("\r\n", "").replace("\n", "")
    assert base64.b64decode(encoded) == part.get_payload(decode=True)
