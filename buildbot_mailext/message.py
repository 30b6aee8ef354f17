"""Message building: MIME assembly, header and body hygiene, size bounds.

This module owns turning rendered text into the bytes that go over SMTP:
``multipart/alternative`` (text/plain + text/html, UTF-8), optional attachments
(``multipart/mixed``), every header we set, and the checks on the finished bytes.

Values in headers come from hostile places (builder names, branches, commit authors,
properties). The ``email`` package decodes RFC 2047 encoded words (``=?utf-8?q?...?=``) in
any value it is handed, and Pythons 3.9-3.12 then write a decoded CR LF raw: a branch could
add a ``Bcc:`` line. So no value from a build is handed to the header machinery of the
``email`` package: :func:`header_text` reduces it to one line (:func:`one_line`) and
writes it itself, as plain ASCII when that is unambiguous, otherwise as our own encoded
words, which a reader decodes exactly once back to the literal text. The result is stored
with ``set_raw`` and flattened verbatim, the same bytes on every Python.

:func:`message_bytes` then checks the finished bytes: the header set parsed back must be
the one built (else the offending value is replaced and one line logged: the mail still
goes), every line at most 998 bytes, no control character but TAB and the CR LF line ends
(else the text parts are re-sent as base64). Bodies get C0 controls replaced by visible
symbols (U+2400...), a size bound per part, and the transfer encoding chosen from their
final bytes. One mail is at most :data:`MAX_MAIL_BYTES` whatever the build holds.
"""

from __future__ import annotations

import binascii
import re
import secrets
from email import policy, quoprimime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from email.utils import formatdate, make_msgid
from typing import Iterable, Mapping, Sequence

from twisted.python import log

from buildbot_mailext.addresses import (  # noqa: F401  (bare_address, envelope_recipients: re-exported)
    MailAddress,
    bare_address,
    envelope_recipients,
    parse_address,
    split_recipients,
)

# RFC 5322 2.1.1: 998 characters per line; header values are capped well below.
MAX_LINE_BYTES = 998
MAX_HEADER_VALUE = 900
MAX_SUBJECT = 200
# The documented bound on one mail (README: "What is guaranteed"). The parts below add up
# to less: two bodies of MAX_PART_BYTES (base64 at worst: x4/3 plus line ends), the
# attachments, To and Cc, and room for the fixed headers and extraHeaders.
MAX_MAIL_BYTES = 1_000_000
MAX_PART_BYTES = 240 * 1024  # UTF-8 bytes of one body part before transfer encoding
MAX_ATTACHMENT_BYTES = 128 * 1024  # all attachments of one mail together
MAX_ADDRESS_HEADER = 16 * 1024  # characters of To, of Cc (the envelope still has everyone)
# A header name and its value must fit on one line (RFC 5322 2.1.1): names are capped.
MAX_HEADER_NAME = 76
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
# What a header value that did not survive encoding is replaced with (never expected: the
# check in message_bytes is the net under header_text).
REPLACED_VALUE = "[value removed: it could not be sent safely]"
REPLACED_ADDRESSES = "undisclosed-recipients:;"

# C0/C1 control characters; removed after whitespace runs (CR, LF, TAB...) became spaces,
# so "a\r\nb" gives "a b".
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_SURROGATES = re.compile("[\ud800-\udfff]")
# In bodies: C0 controls but TAB and LF (CR was made a line end), and DEL.
_BODY_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")
# A header value written as is: printable ASCII that no reader takes for an encoded word.
_PLAIN_VALUE = re.compile(r"[\x20-\x7e]*\Z")
# A display name written as is: RFC 5322 atoms and spaces.
_PLAIN_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+\Z")
# Characters left as is inside our Q encoded words: RFC 2047 5(3), valid in any position.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+/-")
_EW_PREFIX, _EW_SUFFIX = "=?utf-8?q?", "?="
_EW_TEXT_MAX = 75 - len(_EW_PREFIX) - len(_EW_SUFFIX)  # RFC 2047 2: a word is <= 75 chars
_FOLD = "\r\n "
_FOLD_AT = 76
# Bytes quoted-printable writes as =XX (three bytes for one).
_QP_ESCAPED = re.compile(rb"[^\t\n\x20-\x3c\x3e-\x7e]")

# CRLF on the wire. Bodies are encoded with a 76-column policy (quoted-printable and base64
# lines stay within RFC 2045's 76). Headers are written as stored (refold_source="none"):
# header_text() folds its own encoded words and caps plain values (MAX_HEADER_VALUE).
BODY_POLICY = policy.SMTP.clone(max_line_length=76)
SMTP_POLICY = policy.SMTP.clone(max_line_length=MAX_LINE_BYTES, refold_source="none")


def one_line(value: object, limit: int = MAX_HEADER_VALUE) -> str:
    """A header-safe rendering of ``value``: whitespace runs (CR and LF included) become one
    space, control characters and line separators go, and the result is capped at ``limit``.
    Every header value we set, the rendered subject included, goes through here."""
    text = "" if value is None else str(value)
    # Only the start can survive the cap: a megabyte value costs what a short one does.
    text = text[: limit * 4 + 64]
    text = _SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
    # \s does not match U+2028/U+2029 everywhere; some mail clients break lines on them.
    text = text.replace("\u2028", " ").replace("\u2029", " ")
    text = _SPACES.sub(" ", text).strip()
    # Lone surrogates (from undecodable bytes) cannot be encoded into a header.
    text = _SURROGATES.sub("\ufffd", text)
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


# --------------------------------------------------------------------------- headers


def _encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 Q encoded words (UTF-8), each at most 75 characters. A reader
    decodes them once, to ``text`` itself, even when ``text`` looks like an encoded word."""
    words, current = [], ""
    for char in text:
        piece = "".join(
            "_" if b == 0x20 else chr(b) if b in _Q_SAFE else f"={b:02X}"
            for b in char.encode("utf-8")
        )
        if current and len(current) + len(piece) > _EW_TEXT_MAX:
            words.append(current)
            current = ""
        current += piece
    words.append(current)
    return [_EW_PREFIX + w + _EW_SUFFIX for w in words]


def _plain(text: str) -> bool:
    # Printable ASCII that no reader takes for (part of) an encoded word.
    return _PLAIN_VALUE.match(text) is not None and "=?" not in text


def header_text(value: object, limit: int = MAX_HEADER_VALUE) -> str:
    """The raw header value for ``value`` (from a build or not): one line; then plain
    printable ASCII as it is, and every run of other words (non-ASCII, or anything a
    reader could take for an encoded word: ``=?``) as our own encoded words, folded at
    spaces. "hostile on =?utf-8?q?...?= failure" keeps its plain words readable."""
    text = one_line(value, limit)
    if _plain(text):
        return text  # never folded: a long subject stays on its line (<= 998 with the name)
    tokens: list[str] = []
    run: list[str] = []
    for word in text.split(" ") + [None]:
        if word is not None and not _plain(word):
            run.append(word)
            continue
        if run:  # the spaces between encoded words are encoded too, so they survive
            tokens.extend(_encoded_words(" ".join(run)))
            run = []
        if word is not None:
            tokens.append(word)
    lines = [""]
    for token in tokens:
        if lines[-1] and len(lines[-1]) + 1 + len(token) > _FOLD_AT:
            lines.append(token)  # unfolding keeps the space: "a CRLF SP b" reads "a b"
        else:
            lines[-1] = f"{lines[-1]} {token}" if lines[-1] else token
    return _FOLD.join(lines)


def _phrase(name: str) -> str:
    name = one_line(name)
    if _PLAIN_PHRASE.match(name) and "=?" not in name:
        return name
    if _plain(name):
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _FOLD.join(_encoded_words(name))


def _mailbox(address: MailAddress) -> str:
    if address.display_name:
        return f"{_phrase(address.display_name)} <{address.addr_spec}>"
    return address.addr_spec


def address_header(name: str, addresses: Sequence[MailAddress]) -> str:
    """The raw value of header ``name`` (From, To, Cc): every address, folded between
    addresses within 78 columns; past
    ``MAX_ADDRESS_HEADER`` characters the rest is counted in an empty group ("N more
    recipients:;"): they are still on the envelope."""
    items: list[str] = []
    used = 0
    for address in addresses:
        item = _mailbox(address)
        if used + len(item) > MAX_ADDRESS_HEADER:
            items.append(f"{len(addresses) - len(items)} more recipients:;")
            break
        items.append(item)
        used += len(item) + 2
    lines = [""]
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        used = len(lines[-1]) + (len(name) + 2 if len(lines) == 1 else 1)
        if lines[-1] and used + 1 + len(piece) > _FOLD_AT:
            lines.append(piece)
        else:
            lines[-1] = f"{lines[-1]} {piece}" if lines[-1] else piece
    return _FOLD.join(lines)


def buildbot_headers(builder: str, result: str, url: str) -> dict[str, str]:
    """The headers list filters sort on."""
    return {"X-Buildbot-Builder": builder, "X-Buildbot-Result": result, "X-Buildbot-URL": url}


def set_recipients(msg: EmailMessage, name: str, addresses: Sequence[object]) -> list[str]:
    """Set ``To`` or ``Cc`` of a composed message (``MailNotifier.processRecipients`` does
    it after ``createEmail``) through the address gate; returns the bare addresses set."""
    parsed = split_recipients(addresses)[0]
    if name in msg:
        del msg[name]
    if parsed:
        _set(msg, name, address_header(name, parsed))
    return [a.addr_spec for a in parsed]


def valid_header_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_HEADER_NAME and HEADER_NAME.match(name) is not None


def _set(msg: EmailMessage, name: str, raw: str) -> None:
    # Stored as written and flattened verbatim (SMTP_POLICY has refold_source="none"): the
    # email package never parses, decodes or refolds it.
    if name in msg:
        del msg[name]
    msg.set_raw(name, raw)


# --------------------------------------------------------------------------- bodies


def clean_body(text: str) -> str:
    """A body as it may travel: lone surrogates -> U+FFFD, CR LF and lone CR -> LF, other C0
    controls and DEL -> their visible symbols (NUL -> U+2400, BEL -> U+2407, DEL -> U+2421)."""
    text = _SURROGATES.sub("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _BODY_CONTROL.sub(lambda m: chr(0x2421 if m.group() == "\x7f" else 0x2400 + ord(m.group())), text)


def bounded_body(text: str, html: bool, limit: int = MAX_PART_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, with a line saying how much was left out."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    note = (
        f"[... {len(data) - len(kept.encode('utf-8')):,} more bytes not shown: one mail is at "
        f"most {MAX_MAIL_BYTES:,} bytes; the build page has everything]"
    )
    # Markup from the data is escaped (&lt;), so a cut never makes a tag out of it.
    return kept + (f"\n<p>{note}</p>\n" if html else f"\n\n{note}\n")


def body_cte(text: str) -> str:
    """The transfer encoding for these final body bytes: 7bit when they are ASCII with short
    lines; otherwise the shorter of quoted-printable (readable when mostly ASCII) and base64
    (never more than 4/3 of the bytes: the size bound relies on it)."""
    data = text.encode("utf-8")
    if data.isascii() and all(len(line) <= 990 for line in data.split(b"\n")):
        return "7bit"
    escaped = len(_QP_ESCAPED.findall(data))
    qp = (len(data) + 2 * escaped) * 77 // 75
    b64 = (len(data) + 2) // 3 * 4 * 78 // 76
    return "quoted-printable" if qp <= b64 else "base64"


def _attachment_name(filename: str) -> str:
    # A parameter value the email package writes as plain ASCII (no RFC 2231, no encoded
    # words a reader would decode): letters, digits, dot, dash, underscore and space.
    return re.sub(r"[^A-Za-z0-9._ -]", "_", one_line(filename, 200)) or "attachment"


def _bounded_attachments(attachments: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    out, budget = [], MAX_ATTACHMENT_BYTES
    for filename, payload in attachments:
        name = _attachment_name(filename)
        if len(payload) <= budget:
            budget -= len(payload)
            out.append((name, payload))
            continue
        noun = "patch" if "patch" in name.lower() else "attachment"
        note = (
            f"{noun} of {len(payload):,} bytes not attached: one mail carries at most "
            f"{MAX_ATTACHMENT_BYTES:,} bytes of attachments ({name}); the build page has it\n"
        )
        out.append((name, note.encode("utf-8")))
    return out


# --------------------------------------------------------------------------- the message


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

    ``to`` and ``cc`` may hold anything: only values that pass the address gate
    (:mod:`buildbot_mailext.addresses`) are written, each once (the notifier logs the
    others). ``from_addr`` must pass it (``AddressError`` otherwise: checkConfig refuses
    such a ``fromaddr``). ``headers`` are ours (X-Buildbot-*, ...); ``extra_headers`` are the
    user's (``extraHeaders``): they may not replace a structural header. Returns the
    message; :func:`message_bytes` turns it into what goes over SMTP.
    """
    sender = parse_address(from_addr)
    if text is None and html is None:
        text = ""
    msg = EmailMessage(policy=BODY_POLICY)
    _set(msg, "Date", formatdate(localtime=True))
    _set(msg, "From", address_header("From", [sender]))
    to_addresses = split_recipients(to)[0]
    if to_addresses:
        _set(msg, "To", address_header("To", to_addresses))
    cc_keys = {a.key for a in to_addresses}
    cc_addresses = [a for a in split_recipients(cc)[0] if a.key not in cc_keys]
    if cc_addresses:
        _set(msg, "Cc", address_header("Cc", cc_addresses))
    _set(msg, "Subject", header_text(subject, MAX_SUBJECT))
    _set(msg, "Message-ID", make_msgid(domain=sender.addr_spec.rpartition("@")[2]))
    _set(msg, "Auto-Submitted", "auto-generated")
    # Outlook/Exchange: no out-of-office replies or read receipts back to the build mail
    _set(msg, "X-Auto-Response-Suppress", "All")
    reply_addresses = split_recipients([reply_to])[0] if reply_to else []
    if reply_addresses:
        _set(msg, "Reply-To", address_header("Reply-To", reply_addresses[:1]))
    for name, value in (headers or {}).items():
        _set(msg, name, header_text(value))
    for name, value in (extra_headers or {}).items():
        if not valid_header_name(name) or name.lower() in STRUCTURAL_HEADERS:
            continue  # rejected at checkConfig; never reaches here from master.cfg
        _set(msg, name, header_text(value))

    bodies = []
    if text is not None:
        bodies.append(("plain", bounded_body(clean_body(text), html=False)))
    if html is not None or text is None:
        bodies.append(("html", bounded_body(clean_body(html or ""), html=True)))
    _set(msg, "MIME-Version", "1.0")
    if len(bodies) == 1:
        _set_text(msg, *bodies[0])
    else:
        _set_parsed(msg, "Content-Type", f'multipart/alternative; boundary="{_new_boundary()}"')
        parts = []
        for subtype, body in bodies:
            parts.append(EmailMessage(policy=BODY_POLICY))
            _set_text(parts[-1], subtype, body)
        msg.set_payload(parts)

    attached = _bounded_attachments(attachments)
    for filename, payload in attached:
        # patches and logs are UTF-8 text
        msg.add_attachment(payload, maintype="text", subtype="plain", filename=filename,
                           params={"charset": "utf-8"})
    if attached:
        _set_boundaries(msg)  # multipart/mixed, made by add_attachment
    return msg


def _set_text(part: EmailMessage, subtype: str, text: str) -> None:
    """What ``part.set_content(text, subtype=subtype, charset="utf-8", cte=body_cte(text))``
    makes, each header parsed once: set_content parses its own headers, parses the
    Content-Type again for the charset parameter and adds a MIME-Version to every part
    (~0.3 ms a part, issue 8)."""
    cte = body_cte(text)
    _set_parsed(part, "Content-Type", f'text/{subtype}; charset="utf-8"')
    _set_parsed(part, "Content-Transfer-Encoding", cte)
    part.set_payload(_encoded_body(text, cte))


def _set_parsed(part: EmailMessage, name: str, value: str) -> None:
    # Parsed once, when stored: flattening asks for the content type, its parameters and the
    # transfer encoding again and again, and a value stored raw is parsed anew each time.
    del part[name]
    part[name] = value


def _encoded_body(text: str, cte: str) -> str:
    # email.contentmanager's text encoding, for the three encodings body_cte chooses, at
    # BODY_POLICY's line length.
    lines = text.encode("utf-8").splitlines()
    if cte == "base64":
        data = b"\r\n".join(lines) + b"\r\n"  # base64 carries the line ends: CR LF, as on the wire
        chunk = BODY_POLICY.max_line_length // 4 * 3
        return "".join(binascii.b2a_base64(data[i:i + chunk]).decode("ascii") for i in range(0, len(data), chunk))
    body = b"\n".join(lines) + b"\n"
    if cte == "quoted-printable":
        return quoprimime.body_encode(body.decode("latin-1"), BODY_POLICY.max_line_length)
    return body.decode("ascii")  # 7bit: body_cte checked it is ASCII with short lines


# A multipart boundary the email package would otherwise choose when flattening, by
# compiling a regex for each candidate and searching the whole message with it (a quarter
# of a millisecond per mail, issue 8). "=_" cannot occur in quoted-printable or base64
# text, and 128 random bits cannot be guessed by whoever writes a commit message;
# message_bytes still checks the bytes (_boundaries_ok) and lets the package choose again
# if a boundary line shows up anywhere else.
_BOUNDARY_PREFIX = "=_mailext_"


def _new_boundary() -> str:
    return _BOUNDARY_PREFIX + secrets.token_hex(16)


def _set_boundaries(msg: EmailMessage) -> None:
    for part in msg.walk():
        if part.is_multipart() and part.get_boundary() is None:
            part.set_boundary(_new_boundary())


def _our_multiparts(msg: EmailMessage) -> list[EmailMessage]:
    """The multiparts whose boundary we chose (``_set_boundaries``)."""
    return [part for part in msg.walk()
            if part.is_multipart() and (part.get_boundary() or "").startswith(_BOUNDARY_PREFIX)]


def _boundaries_ok(msg: EmailMessage, data: bytes) -> bool:
    # Each delimiter line exactly where the parts are: one before each subpart, one closing.
    return all(data.count(b"\r\n--" + part.get_boundary().encode("ascii")) == len(part.get_payload()) + 1
               for part in _our_multiparts(msg))


def _forget_boundaries(msg: EmailMessage) -> None:
    # The email package then chooses each one, checked against the whole text.
    for part in _our_multiparts(msg):
        part.del_param("boundary")


# --------------------------------------------------------------------------- the bytes


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def _raw_value_ok(name: str, raw: str) -> bool:
    """Printable ASCII lines, folded with CR LF + space, each within the line limit."""
    lines = raw.split(_FOLD)
    lines[0] = f"{name}: {lines[0]}"
    return all(_PLAIN_VALUE.match(line) and len(line) <= MAX_LINE_BYTES for line in lines)


# Only encoded words can decode to something else than the raw text: a value without
# them is printable ASCII already (``_raw_value_ok``), so decoding it (the costly part of
# this check, ~0.4 ms a mail) is skipped.
_ENCODED_WORD_START = "=?"


def _decoded_ok(name: str, raw: str) -> bool:
    # What a reader sees once encoded words are decoded: still one line, no controls.
    try:
        value = str(policy.default.header_factory(name, _unfold(raw)))
    except Exception:
        return False
    return _CONTROL.search(value) is None and "\r" not in value and "\n" not in value


def header_value(msg: Message, name: str) -> str:
    """``str(msg[name])`` (the first such header; "" if there is none), without the email
    package parsing the value: ``msg[name]`` builds a header object through the header
    registry each time (a Message-ID's parse alone is a quarter of a millisecond), and the
    send path reads the Message-ID and the Subject of every mail (issue 8). A value we
    stored (``_set``) is read as the registry would give it: unfolded, its encoded words
    decoded (the registry is asked only when there are any)."""
    wanted = name.lower()
    for key, value in msg.raw_items():
        if key.lower() != wanted:
            continue
        if not _ours(value):
            return str(value)
        text = "".join(value.splitlines())  # as policy.header_fetch_parse unfolds
        if _ENCODED_WORD_START in text:
            return str(policy.default.header_factory(name, text))
        return text
    return ""


def _ours(value: object) -> bool:
    # A value we stored with set_raw (a str), not a MIME header object of the email package.
    return isinstance(value, str) and not hasattr(value, "name")


def _header_problems(msg: EmailMessage, data: bytes) -> list[int]:
    """Indexes of the headers we stored whose value did not come back as built."""
    built = list(msg.raw_items())
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    parsed = list(BytesHeaderParser(policy=policy.compat32).parsebytes(head).raw_items())
    problems = []
    for i, (name, value) in enumerate(built):
        if i >= len(parsed) or parsed[i][0].lower() != name.lower():
            # An extra or missing header: the value before it spilled over.
            problems.append(max(i - 1, 0))
            break
        if _ours(value) and (
            _unfold(parsed[i][1]) != _unfold(value) or (_ENCODED_WORD_START in value and not _decoded_ok(name, value))
        ):
            problems.append(i)
    if not problems and len(parsed) != len(built):
        problems.append(len(built) - 1)
    return problems


def _replace_values(msg: EmailMessage, indexes: Sequence[int]) -> list[str]:
    if not indexes:
        return []
    items = list(msg.raw_items())
    names = []
    for index in indexes:
        name = items[index][0]
        names.append(name)
        items[index] = (name, REPLACED_ADDRESSES if name.lower() in ("to", "cc") else REPLACED_VALUE)
    for name in set(msg.keys()):
        del msg[name]
    for name, value in items:
        msg.set_raw(name, value)
    return names


# TAB, CR, LF and printable ASCII: what may travel (CR and LF only as CR LF).
_WIRE_BYTES = b"\t\r\n" + bytes(range(0x20, 0x7F))


def _wire_ok(data: bytes) -> bool:
    """Every CR LF line of ``data`` within MAX_LINE_BYTES, of TAB and printable ASCII only.
    (C-level passes over the bytes: a regex search per line cost ~0.1 ms a mail.)"""
    crlf = data.count(b"\r\n")
    return (
        not data.translate(None, _WIRE_BYTES)  # nothing left once those are deleted
        and data.count(b"\r") == crlf == data.count(b"\n")  # no CR or LF outside CR LF
        and max(map(len, data.split(b"\r\n"))) <= MAX_LINE_BYTES
    )


def _text_parts_as_base64(msg: EmailMessage) -> None:
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.is_multipart() and not part.get_filename():
            part.set_content(
                part.get_content(), subtype=part.get_content_subtype(), charset="utf-8", cte="base64"
            )


def message_bytes(msg: EmailMessage, label: str = "") -> bytes:
    """The message as sent: CRLF line ends, every line within SMTP's limit, printable ASCII,
    and the header set parsed back exactly the one built. A header value that does not come
    back as built is replaced (one log line, naming ``label``): the mail is never lost for it."""
    # Values that cannot be written as they are (not printable ASCII, a line too long, a
    # CR or LF that is not folding) would make the flattening fail or write them raw.
    replaced = _replace_values(
        msg, [i for i, (n, v) in enumerate(msg.raw_items()) if _ours(v) and not _raw_value_ok(n, v)]
    )
    for _ in range(len(msg.keys()) + 1):
        data = msg.as_bytes(policy=SMTP_POLICY)
        if not _boundaries_ok(msg, data):
            log.msg(f"buildbot-mailext: {label or 'mail'}: a body holds a line of its multipart "
                    "boundary; sent with another boundary")
            _forget_boundaries(msg)
            data = msg.as_bytes(policy=SMTP_POLICY)
        problems = _header_problems(msg, data)
        if not problems:
            break
        replaced += _replace_values(msg, problems)
    if replaced:
        log.msg(
            f"buildbot-mailext: {label or 'mail ' + header_value(msg, 'Message-ID')}: header "
            f"{', '.join(sorted(set(replaced)))} did not come back as built; sent with its "
            "value replaced (a bug in buildbot-mailext: please report it)"
        )
    if not _wire_ok(data):
        # Never expected (bodies are encoded from their final bytes); base64 always fits.
        _text_parts_as_base64(msg)
        data = msg.as_bytes(policy=SMTP_POLICY)
        log.msg(f"buildbot-mailext: {label or 'mail'}: a body line was not valid SMTP; sent as base64")
    return data


def extra_header_errors(extra_headers: object) -> list[str]:
    """Config errors for ``extraHeaders`` (checked at ``buildbot checkconfig``)."""
    if extra_headers is None:
        return []
    if not isinstance(extra_headers, dict):
        return ["extraHeaders must be a dictionary of header name -> value"]
    errors = []
    for name in extra_headers:
        if isinstance(name, str) and len(name) > MAX_HEADER_NAME:
            errors.append(
                f"extraHeaders: {name[:40]!r}... is longer than {MAX_HEADER_NAME} characters; "
                "use a shorter header name"
            )
        elif not valid_header_name(name):
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
