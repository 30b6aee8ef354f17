"""MIME assembly and header hygiene (buildbot_mailext.message)."""

import email
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
    assert "café" in body and "bad byte: ?" in body


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
    assert mime.address_domain("Buildbot <bb@ci.example.org>") == "ci.example.org"


# --- exact headers and parts (gaps found by `make mutate`) --------------------------------


def test_address_headers_exact():
    received = parse(sample(
        from_addr="Buildbot CI <buildbot@example.org>",
        to=["Dev List <dev@example.org>", "", "qa@example.org"],
        cc=["Ops <ops@example.org>"],
    ))
    assert received["From"] == "Buildbot CI <buildbot@example.org>"
    # an empty entry is dropped, the rest kept in order, names kept
    assert received["To"] == "Dev List <dev@example.org>, qa@example.org"
    assert received["Cc"] == "Ops <ops@example.org>"
    assert "Cc" not in parse(sample())


def test_date_header_is_local_time_rfc5322():
    from email.utils import localtime, parsedate_to_datetime

    date = parsedate_to_datetime(parse(sample())["Date"])
    assert date.utcoffset() == localtime().utcoffset()


def test_extra_headers_replace_ours_but_skip_invalid_names_one_by_one():
    received = parse(sample(
        headers={"X-Buildbot-Result": "failure"},
        extra_headers={"Bad Name": "x", "X-Buildbot-Result": "custom", "X-Project": "demo",
                       "Subject": "not allowed"},
    ))
    assert received.get_all("X-Buildbot-Result") == ["custom"]  # replaced, not doubled
    assert received["X-Project"] == "demo"  # after a skipped name: skipping is per header
    assert received["Subject"] == "Build failed"


def test_html_only_and_empty_mails():
    html_only = parse(sample(text=None))
    assert html_only.get_content_type() == "text/html"
    assert html_only.get_content().strip() == "<p>html body</p>"
    empty = parse(sample(text=None, html=None))
    assert empty.get_content_type() == "text/plain"
    assert empty.get_content().strip() == ""


@pytest.mark.parametrize("length, cte", [(990, "7bit"), (991, "quoted-printable")])
def test_seven_bit_up_to_990_characters_a_line(length, cte):
    received = parse(sample(text="x" * length, html="y" * length))
    assert [p["Content-Transfer-Encoding"] for p in received.iter_parts()] == [cte, cte]
    html_only = parse(sample(text=None, html="y" * length))
    assert html_only["Content-Transfer-Encoding"] == cte


def test_attachment_file_name_is_one_line_and_capped():
    received = parse(sample(attachments=[("a\r\nb" + "n" * 300, b"log")]))
    (attachment,) = list(received.iter_attachments())
    name = attachment.get_filename()
    assert name.startswith("a b") and "\n" not in name and len(name) == 200
    assert attachment.get_content_type() == "text/plain"


def test_address_domain_and_envelope_recipients():
    assert mime.address_domain('"a@b" <bb@example.org>') == "example.org"
    assert mime.address_domain('"a@b"@example.org') == "example.org"
    assert mime.address_domain("") == "buildbot.localdomain"
    assert mime.envelope_recipients(["", "a@example.org", "A <a@example.org>"]) == ["a@example.org"]


def test_one_line_edges():
    assert mime.one_line("a\u2028b\u2029c") == "a b c"
    assert mime.one_line("x" * 10, 10) == "x" * 10
    assert mime.one_line("x" * 11, 10) == "x" * 9 + "\u2026"
    assert mime.one_line("abc      defghij", 10) == "abc defgh\u2026"
    assert mime.one_line("ab cdef", 4) == "ab\u2026"  # no space left before the ellipsis
    assert mime.one_line("a\udcff") == "a?"


def test_extra_header_error_texts():
    assert mime.extra_header_errors(["X-A"]) == ["extraHeaders must be a dictionary of header name -> value"]
    assert mime.extra_header_errors({"Bad Name": "x", "From": "y"}) == [
        "extraHeaders: 'Bad Name' is not a valid header name (printable ASCII, no spaces or colons), "
        "e.g. 'X-Project'",
        "extraHeaders: 'From' is set by the notifier itself and cannot be replaced; use another "
        "header name (e.g. 'Reply-To' or 'X-...')",
    ]


def test_html_only_part_is_utf8_html():
    received = parse(sample(text=None, html="<p>\u00e9</p>"))
    assert received.get_content_type() == "text/html"
    assert received.get_content_charset() == "utf-8"
    assert parse(sample(text=None, html="")).get_content().strip() == ""
