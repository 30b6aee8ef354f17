"""Message building: MIME assembly and header hygiene.

This module owns turning rendered text into the bytes that go over SMTP:
``multipart/alternative`` (text/plain + text/html, UTF-8), optional attachments
(``multipart/mixed``), and every header we set. Header values come from hostile places
(builder names, branches, commit authors, properties): each one is reduced to a single
line with no control characters before it reaches the message, so no header can be
injected, whatever the input.
"""

from __future__ import annotations

import re
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Iterable, Mapping, Sequence

# RFC 5322 2.1.1: 998 characters per line; we keep header values well below.
MAX_HEADER_VALUE = 900
MAX_SUBJECT = 200
# RFC 5322 3.6.8 field name: printable ASCII except colon.
HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# Headers the message structure depends on: extraHeaders may not replace them.
STRUCTURAL_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
    )
)
# C0/C1 control characters; removed after whitespace runs (CR, LF, TAB...) became spaces,
# so "a\r\nb" gives "a b".
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
# CRLF on the wire. Bodies are encoded with a 76-column policy (quoted-printable lines
# stay within RFC 2045's 76). Headers are written with the 998 one: values are capped
# (MAX_HEADER_VALUE) and single-line, and folding at 78 put long subjects on a
# continuation line of their own, which some clients show with a leading space.
BODY_POLICY = policy.SMTP.clone(max_line_length=76)
SMTP_POLICY = policy.SMTP.clone(max_line_length=998)


def one_line(value: object, limit: int = MAX_HEADER_VALUE) -> str:
    """A header-safe rendering of ``value``: whitespace runs (CR and LF included) become one
    space, control characters and line separators go, and the result is capped at ``limit``.
    Every header value we set, the rendered subject included, goes through here."""
    text = "" if value is None else str(value)
    text = _SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    # \s does not match U+2028/U+2029 everywhere; some mail clients break lines on them.
    text = text.replace("\u2028", " ").replace("\u2029", " ")
    text = _SPACES.sub(" ", text).strip()
    # Lone surrogates (from undecodable bytes) cannot be encoded into a header.
    text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def envelope_recipients(addresses: Iterable[str]) -> list[str]:
    """Bare addresses for RCPT TO, each once, in the order given."""
    unique: list[str] = []
    for address in addresses:
        bare = bare_address(address)
        if bare and bare not in unique:
            unique.append(bare)
    return unique


def buildbot_headers(builder: str, result: str, url: str) -> dict[str, str]:
    """The headers list filters sort on."""
    return {"X-Buildbot-Builder": builder, "X-Buildbot-Result": result, "X-Buildbot-URL": url}


def bare_address(address: str) -> str:
    """``Name <user@example.org>`` -> ``user@example.org`` (for the SMTP envelope)."""
    return parseaddr(one_line(address))[1]


def address_domain(address: str) -> str:
    addr = bare_address(address)
    return addr.rpartition("@")[2] or "buildbot.localdomain"


def _format_addresses(addresses: Iterable[str]) -> str:
    rendered = []
    for raw in addresses:
        name, addr = parseaddr(one_line(raw))
        if not addr:
            continue
        try:
            rendered.append(str(Address(display_name=name, addr_spec=addr)))
        except (ValueError, IndexError):
            # An address the header registry cannot represent: keep its bare form.
            rendered.append(addr)
    return ", ".join(rendered)


# Public name: the notifier's processRecipients() sets To/Cc on a composed message.
format_addresses = _format_addresses


def valid_header_name(name: object) -> bool:
    return isinstance(name, str) and HEADER_NAME.match(name) is not None


def _body_cte(text: str) -> str:
    # 7bit when it really is 7bit with short lines, else quoted-printable: it survives
    # relays without 8BITMIME and keeps the text readable in a raw dump.
    if text.isascii() and all(len(line) <= 990 for line in text.splitlines()):
        return "7bit"
    return "quoted-printable"


def _clean_body(text: str) -> str:
    # Lone surrogates (undecodable bytes from logs) would make the encoder fail.
    return text.encode("utf-8", "replace").decode("utf-8")


def build_email(
    *,
    subject: str,
    from_addr: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    text: str | None,
    html: str | None,
    headers: Mapping[str, object] | None = None,
    extra_headers: Mapping[str, object] | None = None,
    attachments: Sequence[tuple[str, bytes]] = (),
    reply_to: str | None = None,
) -> EmailMessage:
    """Assemble one mail.

    ``headers`` are ours (X-Buildbot-*, ...); ``extra_headers`` are the user's
    (``extraHeaders``): they may not replace a structural header. Returns the message;
    ``message_bytes()`` turns it into what goes over SMTP.
    """
    if text is None and html is None:
        text = ""
    msg = EmailMessage(policy=BODY_POLICY)
    msg["Date"] = formatdate(localtime=True)
    msg["From"] = _format_addresses([from_addr])
    if to:
        msg["To"] = _format_addresses(to)
    if cc:
        msg["Cc"] = _format_addresses(cc)
    msg["Subject"] = one_line(subject, MAX_SUBJECT)
    msg["Message-ID"] = make_msgid(domain=address_domain(from_addr))
    msg["Auto-Submitted"] = "auto-generated"
    # Outlook/Exchange: no out-of-office or read receipts back to the build mail
    msg["X-Auto-Response-Suppress"] = "All"
    if reply_to:
        msg["Reply-To"] = _format_addresses([reply_to])
    for name, value in (headers or {}).items():
        msg[name] = one_line(value)
    for name, value in (extra_headers or {}).items():
        if not valid_header_name(name) or name.lower() in STRUCTURAL_HEADERS:
            continue  # rejected at checkConfig; never reaches here from master.cfg
        if name in msg:
            del msg[name]
        msg[name] = one_line(value)

    if text is not None:
        text = _clean_body(text)
        msg.set_content(text, subtype="plain", charset="utf-8", cte=_body_cte(text))
        if html is not None:
            html = _clean_body(html)
            msg.add_alternative(html, subtype="html", charset="utf-8", cte=_body_cte(html))
    else:
        html = _clean_body(html or "")
        msg.set_content(html, subtype="html", charset="utf-8", cte=_body_cte(html))

    for filename, payload in attachments:
        msg.add_attachment(
            payload,
            maintype="text",
            subtype="plain",
            filename=one_line(filename, 200),
            params={"charset": "utf-8"},  # patches and logs are UTF-8 text
        )
    return msg


def message_bytes(msg: EmailMessage) -> bytes:
    """The message as sent: CRLF line ends, every line within SMTP's limit."""
    return msg.as_bytes(policy=SMTP_POLICY)


def extra_header_errors(extra_headers: object) -> list[str]:
    """Config errors for ``extraHeaders`` (checked at ``buildbot checkconfig``)."""
    if extra_headers is None:
        return []
    if not isinstance(extra_headers, dict):
        return ["extraHeaders must be a dictionary of header name -> value"]
    errors = []
    for name in extra_headers:
        if not valid_header_name(name):
            errors.append(
                f"extraHeaders: {name!r} is not a valid header name (printable ASCII, no "
                "spaces or colons), e.g. 'X-Project'"
            )
        elif name.lower() in STRUCTURAL_HEADERS:
            errors.append(
                f"extraHeaders: {name!r} is set by the notifier itself and cannot be "
                "replaced; use another header name (e.g. 'Reply-To' or 'X-...')"
            )
    return errors
