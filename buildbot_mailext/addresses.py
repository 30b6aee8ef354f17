"""The address gate: one strict rule for every email address, configured or from a build.

This module owns deciding whether a string is *one* valid mail address, and what goes on
the SMTP envelope for it. The same rule applies to what the administrator writes in
``master.cfg`` (``fromaddr``, ``extraRecipients``, ``MailRoute(to=...)``, the CLI's
``--from``/``--to``) and to what a build carries (change authors, owners, ``lookup``
results, a worker's ``notify``): a configured address that fails it is a ``config.error``,
an address from a build that fails it is dropped alone (the notifier logs it) and the mail
goes to everyone else.

The rule, the same on every Python (it does not use the ``email`` package's parser, whose
verdicts differ between 3.9 and 3.13, e.g. on ``root@[127.0.0.1]``)::

    address      = addr-spec | [display-name] "<" addr-spec ">"
    addr-spec    = local-part "@" domain                    (at most 254 characters)
    local-part   = dot-atom of RFC 5322 atext, ASCII only   (at most 64 characters)
    domain       = host name: LDH labels, one label is fine (buildbot@localhost)
                 | "[" IPv4 "]" | "[IPv6:" IPv6 "]"          (RFC 5321 address literals)
    display-name = words (any letters, digits, atext, ".") | a quoted string

Never accepted: control characters (CR, LF, NUL, ...), anything before or after the
address (so ``"a@x.org, b@x.org"``, ``"a@x.org;b@x.org"`` and ``"a@x.org>"`` are errors,
not their first address), quoted local parts, comments, and non-ASCII in the address
itself. A non-ASCII local part (``üser@example.org``) would need SMTPUTF8, which the
transport does not speak yet: such an address is refused with that reason.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = [
    "AddressError",
    "MailAddress",
    "address_errors",
    "bare_address",
    "envelope_recipients",
    "is_valid_address",
    "parse_address",
    "split_recipients",
]

MAX_ADDR_SPEC = 254  # RFC 5321 4.5.3.1.3: a path is at most 256 octets, with the <>
MAX_LOCAL_PART = 64
MAX_DOMAIN = 253
MAX_DISPLAY_NAME = 200  # longer display names (from a build) are shortened, not refused

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
# Control characters (C0, DEL, C1) and the Unicode line separators: never in an address.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A display name written as words: no specials of RFC 5322 outside a quoted string.
_PHRASE_SPECIALS = re.compile(r'[<>@,;:\\"()\[\]]')
_QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"\Z')


class AddressError(ValueError):
    """Why a string is not one valid address; ``str()`` is the reason, for a log line or a
    config error."""


@dataclass(frozen=True)
class MailAddress:
    """One address that passed the gate. ``addr_spec`` is what goes on the envelope."""

    addr_spec: str
    display_name: str = ""

    @property
    def key(self) -> str:
        """Identity for de-duplication: the domain part is case-insensitive."""
        local, _, domain = self.addr_spec.rpartition("@")
        return f"{local}@{domain.lower()}"


def _check_domain(domain: str) -> None:
    if not domain:
        raise AddressError("nothing after the '@'")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"unclosed address literal {domain!r}")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError(
                f"{domain!r} is not an address literal ([192.0.2.1] or [IPv6:2001:db8::1])"
            ) from None
        return
    if not domain.isascii():
        raise AddressError(f"non-ASCII domain {domain!r}: write its xn-- (IDNA) form")
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} characters")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"{domain!r} is not a host name")


def _check_addr_spec(addr: str) -> None:
    if not addr:
        raise AddressError("empty address")
    if any(c.isspace() for c in addr):
        raise AddressError("a space inside the address")
    if "@" not in addr:
        raise AddressError("no '@'")
    local, _, domain = addr.rpartition("@")
    if not local:
        raise AddressError("nothing before the '@'")
    if not local.isascii():
        raise AddressError(
            "non-ASCII local part: it needs SMTPUTF8, which buildbot-mailext does not use yet"
        )
    if not _LOCAL_PART.match(local):
        raise AddressError(f"{local!r} is not a valid local part (before the '@')")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError(f"local part longer than {MAX_LOCAL_PART} characters")
    _check_domain(domain)
    if len(addr) > MAX_ADDR_SPEC:
        raise AddressError(f"longer than {MAX_ADDR_SPEC} characters")


def _display_name(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    quoted = _QUOTED_STRING.match(text)
    if quoted:
        name = re.sub(r"\\(.)", r"\1", quoted.group(1))
    elif _PHRASE_SPECIALS.search(text):
        raise AddressError(
            f"display name {text!r} has special characters: put it in double quotes"
        )
    else:
        name = " ".join(text.split())
    if len(name) > MAX_DISPLAY_NAME:
        name = name[: MAX_DISPLAY_NAME - 1].rstrip() + "…"
    return name


def parse_address(value: Any) -> MailAddress:
    """The one address ``value`` holds, or :class:`AddressError` saying why it is not one."""
    if not isinstance(value, str):
        raise AddressError(f"not a string but {type(value).__name__}")
    if _CONTROL.search(value):
        raise AddressError("contains a control character (CR, LF, NUL, ...)")
    text = value.strip()
    if text.endswith(">"):
        # The '<' that opens the address is the last one outside a quoted display name.
        start = _angle_start(text)
        if start < 0:
            raise AddressError("a '>' without its '<'")
        name = _display_name(text[:start])
        addr = text[start + 1 : -1]
    else:
        name, addr = "", text
    _check_addr_spec(addr)
    return MailAddress(addr_spec=addr, display_name=name)


def _angle_start(text: str) -> int:
    in_quotes = escaped = False
    start = -1
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and in_quotes:
            escaped = True
        elif c == '"':
            in_quotes = not in_quotes
        elif c == "<" and not in_quotes:
            start = i
    return start


def is_valid_address(value: Any) -> bool:
    """Does ``value`` hold exactly one valid address (see the module docstring)?"""
    try:
        parse_address(value)
    except AddressError:
        return False
    return True


def bare_address(value: Any) -> str:
    """``Name <user@example.org>`` -> ``user@example.org``; ``""`` for anything that is not
    one valid address (never a repaired or partial one)."""
    try:
        return parse_address(value).addr_spec
    except AddressError:
        return ""


def _split_list(value: str) -> list[str]:
    # Split at commas and semicolons outside double quotes.
    pieces, current, in_quotes = [], "", False
    for c in value:
        if c == '"':
            in_quotes = not in_quotes
        if c in ",;" and not in_quotes:
            pieces.append(current.strip())
            current = ""
        else:
            current += c
    pieces.append(current.strip())
    return [p for p in pieces if p]


def address_errors(value: Any, where: str, setting: str) -> list[str]:
    """Config errors for one configured address: ``where`` names the object (e.g.
    ``"MailRoute 'ops'"``), ``setting`` the argument (``"to"``). Several addresses in one
    string get an error that shows the list to write instead."""
    try:
        parse_address(value)
        return []
    except AddressError as e:
        reason = str(e)
    if isinstance(value, str):
        pieces = _split_list(value)
        if len(pieces) > 1 and all(is_valid_address(p) for p in pieces):
            if setting.startswith("--"):  # a command-line option: repeat it
                fix = "repeat the option: " + " ".join(f"{setting} '{p}'" for p in pieces)
            else:
                fix = f"write a list: {setting}={pieces!r}"
            return [
                f"{where}: {value!r} in '{setting}' is {len(pieces)} addresses in one string "
                f"(a string is one address); {fix}"
            ]
    return [
        f"{where}: {value!r} in '{setting}' is not a valid email address ({reason}); write "
        "it as 'user@example.org' or 'Name <user@example.org>'"
    ]


def split_recipients(
    values: Iterable[Any],
) -> tuple[list[MailAddress], list[tuple[Any, str]]]:
    """(accepted, rejected): every value that is one valid address, each address once (the
    first spelling wins), in the order given; and every other value with its reason."""
    accepted: list[MailAddress] = []
    seen: set[str] = set()
    rejected: list[tuple[Any, str]] = []
    for value in values:
        try:
            address = parse_address(value)
        except AddressError as e:
            rejected.append((value, str(e)))
            continue
        if address.key not in seen:
            seen.add(address.key)
            accepted.append(address)
    return accepted, rejected


def envelope_recipients(values: Sequence[Any]) -> list[str]:
    """Bare addresses for RCPT TO, each once, in the order given; invalid values left out."""
    return [a.addr_spec for a in split_recipients(values)[0]]
