"""MIME assembly and header hygiene (buildbot_mailext.message)."""

import email
import re
from email import policy

import pytest

from buildbot_mailext import message as mime

HOSTILE = "main\r\nBcc: victim@example.net\r\n\r\n<b>body</b>"


def parse(msg):
    return email.message_from_bytes(mime.message_bytes(msg), policy=policy.default)


def sample(**overrides):
    kwargs = dict(
        subject="Build failed",
        from_addr="Buildbot <buildbot@example.org>",
        to=["dev-list@example.org"],
        text="plain body",
        html="<p>html body</p>",
    )
    kwargs.update(overrides)
    return mime.build_email(**kwargs)


def test_multipart_alternative_with_text_then_html():
    received = parse(sample())
    assert received.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in received.iter_parts()]
    assert parts == ["text/plain", "text/html"]  # clients show the last one they can
    assert received.get_body(("plain",)).get_content().strip() == "plain body"
    assert received.get_body(("html",)).get_content().strip() == "<p>html body</p>"


def test_standard_headers_present():
    received = parse(sample(headers={"X-Buildbot-Builder": "runtests"}))
    assert received["Auto-Submitted"] == "auto-generated"
    assert received["Message-ID"].endswith("@example.org>")
    assert received["X-Buildbot-Builder"] == "runtests"
    assert received["Date"]
    assert received["To"] == "dev-list@example.org"


@pytest.mark.parametrize("field", ["subject", "header", "extra"])
def test_crlf_cannot_inject_headers(field):
    overrides = {
        "subject": {"subject": HOSTILE},
        "header": {"headers": {"X-Buildbot-Builder": HOSTILE}},
        "extra": {"extra_headers": {"X-Project": HOSTILE}},
    }[field]
    raw = mime.message_bytes(sample(**overrides))
    received = email.message_from_bytes(raw, policy=policy.default)
    assert "Bcc" not in received
    assert b"\r\nBcc:" not in raw
    # The hostile text survives, flattened onto one line.
    values = [v for _, v in received.items() if "victim@example.net" in v]
    assert values and all("\n" not in v and "\r" not in v for v in values)


def test_subject_is_capped_and_single_line():
    received = parse(sample(subject="x" * 5000 + "\n" + "y"))
    assert "\n" not in received["Subject"]
    assert len(received["Subject"]) <= mime.MAX_SUBJECT


def test_non_ascii_and_undecodable_text_survive():
    lone_surrogate = "bad byte: \udcff"
    received = parse(sample(subject="échec ☠", text="café " + lone_surrogate, html="<p>café</p>"))
    assert received["Subject"] == "échec ☠"
    body = received.get_body(("plain",)).get_content()
    assert "café" in body and "bad byte: \ufffd" in body


def test_long_lines_are_encoded_within_smtp_limit():
    raw = mime.message_bytes(sample(text="a" * 5000, subject="s" * 150))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    body_lines = raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n")
    assert max(len(line) for line in body_lines) <= 76  # RFC 2045 quoted-printable
    assert b"\r\nSubject: " + b"s" * 150 + b"\r\n" in raw  # not folded
    received = email.message_from_bytes(raw, policy=policy.default)
    assert received.get_body(("plain",)).get_content().strip() == "a" * 5000


def test_html_only_and_attachments_make_mixed():
    received = parse(sample(text=None, attachments=[("runtests.stdio", b"log\n")]))
    assert received.get_content_type() == "multipart/mixed"
    kinds = [p.get_content_type() for p in received.walk()]
    assert "text/html" in kinds and "text/plain" in kinds
    (attachment,) = list(received.iter_attachments())
    assert attachment.get_filename() == "runtests.stdio"
    assert attachment.get_content() in (b"log\n", "log\n")


def test_extra_headers_validation():
    assert mime.extra_header_errors(None) == []
    assert mime.extra_header_errors({"X-Project": "p", "Reply-To": "a@b.org"}) == []
    assert "must be a dictionary" in mime.extra_header_errors(["X"])[0]
    (bad_name,) = mime.extra_header_errors({"X Bad": "v"})
    assert "'X Bad' is not a valid header name" in bad_name
    (structural,) = mime.extra_header_errors({"Subject": "v"})
    assert "'Subject' is set by the notifier" in structural


def test_bare_address_and_domain():
    assert mime.bare_address("Dev List <dev@example.org>") == "dev@example.org"
    assert parse(sample(from_addr="Buildbot <bb@ci.example.org>"))["Message-ID"].endswith(
        "@ci.example.org>"
    )


# --------------------------------------------------------------------------- issue 6

ENCODED_WORD = "=?utf-8?q?a=0D=0ABcc:_x@evil.example?="


def header_block(raw):
    return raw.split(b"\r\n\r\n", 1)[0]


def test_issue_reproduction_encoded_word_in_subject_adds_no_header():
    # The issue's reproduction, through build_email: on 3.11/3.12 the email package used
    # to decode the word and write "Bcc: x@evil.example failed" as a header line.
    raw = mime.message_bytes(sample(subject=f"main {ENCODED_WORD} failed"))
    assert not re.search(rb"(?im)^bcc\s*:", header_block(raw))
    received = email.message_from_bytes(raw, policy=policy.default)
    assert "Bcc" not in received
    assert str(received["Subject"]) == f"main {ENCODED_WORD} failed"  # literal, decoded once


@pytest.mark.parametrize(
    "value",
    [
        ENCODED_WORD,
        "=?utf-8?b?YQ0KQmNjOiB4QGV2aWwuZXhhbXBsZQ==?=",
        "=?iso-8859-1?q?=0D=0AReply-To:_evil@evil.example?=",
        "plain =? and ?= apart",
        "émoji 💥 \u202e rtl \u200b zero-width",
        "x" * 5000,
    ],
)
@pytest.mark.parametrize("where", ["subject", "header", "extra"])
def test_header_values_come_back_literally(value, where):
    overrides = {
        "subject": {"subject": value},
        "header": {"headers": {"X-Buildbot-Builder": value}},
        "extra": {"extra_headers": {"X-Project": value}},
    }[where]
    name = {"subject": "Subject", "header": "X-Buildbot-Builder", "extra": "X-Project"}[where]
    raw = mime.message_bytes(sample(**overrides))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()
    received = email.message_from_bytes(raw, policy=policy.default)
    limit = mime.MAX_SUBJECT if where == "subject" else mime.MAX_HEADER_VALUE
    assert str(received[name]) == mime.one_line(value, limit)


def test_plain_ascii_values_stay_readable_for_list_filters():
    raw = mime.message_bytes(sample(headers={"X-Buildbot-Builder": "linux-x86_64"}))
    assert b"\r\nX-Buildbot-Builder: linux-x86_64\r\n" in raw
    assert b"\r\nSubject: Build failed\r\n" in raw


def test_net_replaces_a_header_value_that_would_inject(monkeypatch):
    lines = []
    monkeypatch.setattr(mime.log, "msg", lambda text: lines.append(text))
    msg = sample()
    # What header_text never produces: a raw CR LF, and an encoded word that decodes to one.
    msg.set_raw("X-Raw", "a\r\nBcc: victim@example.net")
    msg.set_raw("X-Word", ENCODED_WORD)
    raw = mime.message_bytes(msg, label="route 'x' build 'linux' #7")
    received = email.message_from_bytes(raw, policy=policy.default)
    assert "Bcc" not in received
    assert received["X-Raw"] == received["X-Word"] == mime.REPLACED_VALUE
    assert received.get_body(("plain",)).get_content().strip() == "plain body"  # still sent
    (line,) = lines
    assert "route 'x' build 'linux' #7" in line and "X-Raw, X-Word" in line


def test_net_catches_a_spilled_header_line(monkeypatch):
    monkeypatch.setattr(mime.log, "msg", lambda text: None)
    msg = sample()
    msg.set_raw("X-Folded", "a\r\n Bcc: victim@example.net")  # folding: one header
    msg.set_raw("X-Spill", "b\r\n\r\nbody text")  # an empty line: ends the header block
    raw = mime.message_bytes(msg)
    received = email.message_from_bytes(raw, policy=policy.default)
    assert received["X-Spill"] == mime.REPLACED_VALUE
    assert received.get_content_type() == "multipart/alternative"


def test_body_controls_are_replaced_visibly_and_line_ends_normalised():
    received = parse(sample(text="a\x00b\x07c\x1bd\x7fe\tf\r\ng\rh", html="<p>x\x00y</p>"))
    text = received.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n") == "a\u2400b\u2407c\u241bd\u2421e\tf\ng\nh\n"
    assert "x\u2400y" in received.get_body(("html",)).get_content()


@pytest.mark.parametrize(
    "text, cte",
    [
        ("plain ascii\n", "7bit"),
        ("x" * 2000, "quoted-printable"),  # a long line: QP keeps it readable
        ("café, mostly ascii\n" * 20, "quoted-printable"),
        ("中文" * 500, "base64"),  # QP would triple it
        ("\U0001f4a5" * 500, "base64"),
    ],
)
def test_transfer_encoding_is_chosen_from_the_final_bytes(text, cte):
    assert mime.body_cte(text) == cte
    raw = mime.message_bytes(sample(text=text, html=None))
    assert f"Content-Transfer-Encoding: {cte}".encode() in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert parse(sample(text=text, html=None)).get_content().replace("\r\n", "\n").rstrip("\n") == text.rstrip("\n")


def test_bodies_and_attachments_are_bounded():
    huge = "\U0001f4a5<" * 1_000_000  # 5 MB of UTF-8, the worst case for every encoding
    raw = mime.message_bytes(
        sample(text=huge, html=huge, attachments=[("source patch 0", b"+" * 4_000_000), ("log", b"ok\n")])
    )
    assert len(raw) <= mime.MAX_MAIL_BYTES
    received = email.message_from_bytes(raw, policy=policy.default)
    assert "more bytes not shown" in received.get_body(("plain",)).get_content()
    notes = {a.get_filename(): a.get_content() for a in received.iter_attachments()}
    assert "patch of 4,000,000 bytes not attached" in notes["source patch 0"]
    assert notes["log"] in ("ok\n", b"ok\n", "ok\r\n")


def test_attachment_names_are_plain():
    received = parse(sample(attachments=[(f"a/{ENCODED_WORD}\r\nb.log", b"x")]))
    (attachment,) = list(received.iter_attachments())
    assert attachment.get_filename() == "a___utf-8_q_a_0D_0ABcc__x_evil.example__ b.log"


def test_addresses_in_headers():
    msg = sample(
        from_addr="Buildbot CI <buildbot@localhost>",
        to=["Jörg Müller <jm@example.org>", '"Doe, John" <john@example.org>', "=?utf-8?q?a=0D=0A?= <e@example.org>",
            "root@[127.0.0.1]", "üser@example.org", "bad\x07@example.org", "JM <jm@EXAMPLE.org>"],
        cc=["john@example.org", "ops@example.org"],
    )
    raw = mime.message_bytes(msg)
    received = email.message_from_bytes(raw, policy=policy.default)
    assert [(a.display_name, a.addr_spec) for a in received["To"].addresses] == [
        ("Jörg Müller", "jm@example.org"),
        ("Doe, John", "john@example.org"),
        ("=?utf-8?q?a=0D=0A?=", "e@example.org"),  # literally: decoded once, from ours
        ("", "root@[127.0.0.1]"),
    ]
    assert [a.addr_spec for a in received["Cc"].addresses] == ["ops@example.org"]
    assert str(received["From"]) == "Buildbot CI <buildbot@localhost>"
    assert received["Message-ID"].endswith("@localhost>")


def test_a_long_recipient_list_is_folded_and_capped():
    to = [f"user{i}@example.org" for i in range(2000)]
    raw = mime.message_bytes(sample(to=to))
    head = header_block(raw).split(b"\r\n")
    to_lines = [line for line in head if line.startswith((b"To:", b" "))]
    assert len(to_lines) > 100 and max(len(line) for line in to_lines) <= 78
    received = email.message_from_bytes(raw, policy=policy.default)
    value = str(received["To"])
    assert "user0@example.org" in value and value.endswith("more recipients:;")
    assert len(value) < mime.MAX_ADDRESS_HEADER + 100
