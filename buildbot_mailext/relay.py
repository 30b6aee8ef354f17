"""SMTP settings of a notifier: where mail goes (``relayhost``), how it is protected (TLS)
and how the notifier logs in (AUTH).

This module owns:

- :func:`parse_relayhost` -- Postfix-style ``relayhost`` syntax (``host``, ``host:port``,
  ``[host]``, ``[host]:port``, IPv6 only in brackets);
- :class:`SmtpSettings` -- the immutable, validated result of a notifier's SMTP arguments
  (stock ``MailNotifier`` names keep working: ``relayhost``, ``smtpPort``, ``useTls``,
  ``useSmtps``, ``smtpUser``, ``smtpPassword``);
- :func:`check_smtp_settings` -- the config errors a notifier reports from ``checkConfig``,
  each naming the setting and the fix.

It does no I/O except reading ``tls_ca_file`` to check that it holds a certificate.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_SMTP_TIMEOUT = 30.0
DEFAULT_CACHE_TIME = 2.0  # seconds an idle SMTP connection is kept for the next mail (Postfix: 2s)
DEFAULT_MAX_SESSIONS = 4  # concurrent SMTP sessions to the relay in a burst
TLS_MODES = ("none", "starttls", "smtps")

# A DNS name or IPv4 literal: letters, digits, '-', '_', '.'; no scheme, no spaces.
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")


def _parse_port(text: str, value: str) -> int:
    if not text.isdigit():
        raise ValueError(f"relayhost {value!r}: port {text!r} is not a number (example: 'relay.example.org:587')")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"relayhost {value!r}: port {port} is outside 1..65535")
    return port


def parse_relayhost(value: str, default_port: int = 25) -> tuple[str, int]:
    """Parse a Postfix-style relayhost into ``(host, port)``.

    Accepted: ``host``, ``host:port``, ``[host]``, ``[host]:port``, ``[2001:db8::1]:587``.
    As in Postfix, brackets around a name mean "this host, no MX lookup"; we never look up
    MX records anyway, so ``[relay]`` and ``relay`` reach the same machine. A bare IPv6
    literal without a port (``::1``) is accepted because stock MailNotifier accepted it;
    with a port it must be bracketed, otherwise ``::1:25`` would be ambiguous.

    Raises ValueError with a message that says what is wrong and what would be right.
    """
    if not isinstance(value, str):
        raise ValueError(f"relayhost must be a string like 'localhost' or '[relay.example.org]:587', not {value!r}")
    text = value.strip()
    if not text:
        raise ValueError("relayhost is empty: use 'localhost' for a local MTA or '[relay.example.org]:587'")
    if "://" in text:
        raise ValueError(
            f"relayhost {value!r}: no URL scheme please; write 'host:port', e.g. '[relay.example.org]:587' "
            "(and useTls=True / useSmtps=True for TLS)"
        )
    if not isinstance(default_port, int) or isinstance(default_port, bool) or not 1 <= default_port <= 65535:
        raise ValueError(f"smtpPort {default_port!r} must be an integer in 1..65535")

    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"relayhost {value!r}: '[' without matching ']' (example: '[relay.example.org]:587')")
        host = text[1:close]
        rest = text[close + 1 :]
        if rest == "":
            port = default_port
        elif rest.startswith(":"):
            port = _parse_port(rest[1:], value)
        else:
            raise ValueError(f"relayhost {value!r}: unexpected {rest!r} after ']' (example: '[{host}]:587')")
        if ":" in host:
            try:
                host = str(ipaddress.IPv6Address(host))  # accepts scope ids: fe80::1%eth0
            except ValueError:
                raise ValueError(f"relayhost {value!r}: {host!r} is not a valid IPv6 address") from None
            return host, port
    else:
        if text.count(":") > 1:
            try:
                return str(ipaddress.IPv6Address(text)), default_port
            except ValueError:
                raise ValueError(
                    f"relayhost {value!r}: an IPv6 address with a port must be in brackets, e.g. '[::1]:25'"
                ) from None
        if ":" in text:
            host, _, port_text = text.partition(":")
            port = _parse_port(port_text, value)
        else:
            host, port = text, default_port
    if not host:
        raise ValueError(f"relayhost {value!r}: the host name is empty")
    if not _HOSTNAME_RE.match(host) or ".." in host:
        raise ValueError(f"relayhost {value!r}: {host!r} is not a valid host name or IP address")
    return host, port


def _is_ipv6(host: str) -> bool:
    return ":" in host


def format_endpoint(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:25``)."""
    return f"[{host}]:{port}" if _is_ipv6(host) else f"{host}:{port}"


@dataclass(frozen=True)
class SmtpSettings:
    """How the notifier talks SMTP: one relay, one TLS mode, optional credentials.

    ``user``/``password`` may be ``util.Secret`` (or other renderables) at config time;
    the notifier renders them in ``reconfigService`` and builds settings with plain strings
    for the transport (see :meth:`with_credentials`).
    """

    host: str = "localhost"
    port: int = 25
    tls: str = "none"  # "none" | "starttls" | "smtps"
    tls_verify: bool = True
    tls_ca_file: Optional[str] = None
    user: Any = None
    password: Any = field(default=None, repr=False)  # never in logs or reprs
    timeout: float = DEFAULT_SMTP_TIMEOUT
    allow_plaintext_auth: bool = False
    cache_time: float = DEFAULT_CACHE_TIME  # 0: QUIT as soon as the queue is empty
    max_sessions: int = DEFAULT_MAX_SESSIONS

    @classmethod
    def from_notifier_args(
        cls,
        relayhost: str = "localhost",
        smtpPort: int = 25,
        useTls: bool = False,
        useSmtps: bool = False,
        smtpUser: Any = None,
        smtpPassword: Any = None,
        tls_ca_file: Optional[str] = None,
        tls_verify: bool = True,
        allow_plaintext_auth: bool = False,
        smtp_timeout: float = DEFAULT_SMTP_TIMEOUT,
        smtp_cache_time: float = DEFAULT_CACHE_TIME,
        smtp_max_sessions: int = DEFAULT_MAX_SESSIONS,
        **_ignored: Any,
    ) -> "SmtpSettings":
        """Build settings from MailNotifier-style keyword arguments.

        Raises ValueError for settings that cannot describe a connection at all (bad
        relayhost, useTls together with useSmtps); policy problems such as plaintext AUTH
        are reported by :func:`check_smtp_settings`, which the notifier calls first.
        Unknown keywords are ignored so that a notifier can pass its whole kwargs.
        """
        host, port = parse_relayhost(relayhost, smtpPort)
        if useTls and useSmtps:
            raise ValueError("useTls=True (STARTTLS) and useSmtps=True (implicit TLS) exclude each other; pick one")
        tls = "smtps" if useSmtps else "starttls" if useTls else "none"
        return cls(
            host=host,
            port=port,
            tls=tls,
            tls_verify=bool(tls_verify),
            tls_ca_file=tls_ca_file,
            user=smtpUser,
            password=smtpPassword,
            timeout=float(smtp_timeout),
            allow_plaintext_auth=bool(allow_plaintext_auth),
            cache_time=float(smtp_cache_time),
            max_sessions=int(smtp_max_sessions),
        )

    def endpoint_label(self) -> str:
        """``host:port`` as operators type it (``[::1]:25`` for IPv6)."""
        return format_endpoint(self.host, self.port)

    def route_label(self) -> str:
        """Endpoint plus protection, for log lines: ``relay.example.org:587 (STARTTLS, AUTH)``."""
        parts = {"none": "plain SMTP", "starttls": "STARTTLS", "smtps": "SMTPS"}[self.tls]
        if self.tls != "none" and not self.tls_verify:
            parts += " UNVERIFIED"
        if self.user:
            parts += ", AUTH"
        return f"{self.endpoint_label()} ({parts})"

    @property
    def uses_auth(self) -> bool:
        return bool(self.user) or bool(self.password)

    def credentials_are_plain(self) -> bool:
        """True when user and password are usable strings (not yet-unrendered secrets)."""
        return isinstance(self.user, (str, bytes)) and isinstance(self.password, (str, bytes))

    def with_credentials(self, user: Any, password: Any) -> "SmtpSettings":
        """A copy with rendered credentials (called once secrets are resolved)."""
        return type(self)(**{**self.__dict__, "user": user, "password": password})

    def startup_warnings(self) -> list[str]:
        """Things that are allowed but that the operator must hear about at start."""
        warnings = []
        if self.tls != "none" and not self.tls_verify:
            warnings.append(
                f"WARNING: tls_verify=False: the certificate of {self.endpoint_label()} is NOT verified; anyone "
                "on the network path can read the mails"
                + (" and the SMTP password" if self.uses_auth else "")
                + ". Prefer tls_ca_file='/path/to/ca.pem' for a private CA."
            )
        if self.uses_auth and self.tls == "none" and self.allow_plaintext_auth:
            warnings.append(
                f"WARNING: allow_plaintext_auth=True: the SMTP password goes to {self.endpoint_label()} "
                "unencrypted"
            )
        return warnings


def check_smtp_settings(
    relayhost: str = "localhost",
    smtpPort: int = 25,
    useTls: bool = False,
    useSmtps: bool = False,
    smtpUser: Any = None,
    smtpPassword: Any = None,
    tls_ca_file: Optional[str] = None,
    tls_verify: bool = True,
    allow_plaintext_auth: bool = False,
    smtp_timeout: float = DEFAULT_SMTP_TIMEOUT,
    smtp_cache_time: float = DEFAULT_CACHE_TIME,
    smtp_max_sessions: int = DEFAULT_MAX_SESSIONS,
    **_ignored: Any,
) -> list[str]:
    """Return config-error strings (empty list = fine), each naming the setting and the fix."""
    errors: list[str] = []
    port_ok = isinstance(smtpPort, int) and not isinstance(smtpPort, bool) and 1 <= smtpPort <= 65535
    if not port_ok:
        errors.append(f"smtpPort={smtpPort!r}: must be an integer in 1..65535 (25, 587 for STARTTLS, 465 for SMTPS)")
    else:
        try:
            host, port = parse_relayhost(relayhost, smtpPort)
        except ValueError as e:
            errors.append(str(e))
        else:
            if isinstance(relayhost, str) and port != smtpPort and smtpPort != 25:
                errors.append(
                    f"relayhost={relayhost!r} says port {port} but smtpPort={smtpPort}: give the port in one place only"
                )
    if useTls and useSmtps:
        errors.append(
            "useTls=True (STARTTLS, usually port 587) and useSmtps=True (implicit TLS, usually port 465) "
            "exclude each other: set only one"
        )
    if not isinstance(tls_verify, bool):
        errors.append(f"tls_verify={tls_verify!r}: must be True or False")
    if isinstance(smtp_timeout, bool) or not isinstance(smtp_timeout, (int, float)) or not (
        math.isfinite(smtp_timeout) and smtp_timeout > 0
    ):
        errors.append(f"smtp_timeout={smtp_timeout!r}: must be a positive number of seconds (default 30)")
    if isinstance(smtp_cache_time, bool) or not isinstance(smtp_cache_time, (int, float)) or not (
        math.isfinite(smtp_cache_time) and smtp_cache_time >= 0
    ):
        errors.append(
            f"smtp_cache_time={smtp_cache_time!r}: must be a number of seconds >= 0 that an idle SMTP "
            f"connection is kept for the next mail (default {DEFAULT_CACHE_TIME:g}; 0 closes it at once)"
        )
    if isinstance(smtp_max_sessions, bool) or not isinstance(smtp_max_sessions, int) or smtp_max_sessions < 1:
        errors.append(
            f"smtp_max_sessions={smtp_max_sessions!r}: must be an integer >= 1, the most SMTP sessions "
            f"opened to the relay at once (default {DEFAULT_MAX_SESSIONS})"
        )

    tls = bool(useTls or useSmtps)
    if tls_ca_file is not None:
        if not tls:
            errors.append(
                f"tls_ca_file={tls_ca_file!r} has no effect without TLS: set useTls=True (STARTTLS) or "
                "useSmtps=True, or remove tls_ca_file"
            )
        errors.extend(_check_ca_file(tls_ca_file))

    has_user = smtpUser is not None and smtpUser != ""
    has_password = smtpPassword is not None and smtpPassword != ""
    if has_user != has_password:
        missing = "smtpPassword" if has_user else "smtpUser"
        errors.append(f"{missing} is missing: SMTP AUTH needs both smtpUser and smtpPassword (util.Secret is fine)")
    if (has_user or has_password) and not tls and not allow_plaintext_auth:
        errors.append(
            "smtpUser/smtpPassword without TLS would send the password in clear text to "
            f"{relayhost!r}: set useTls=True (STARTTLS, port 587) or useSmtps=True (port 465); if the relay "
            "is on a trusted network and cannot do TLS, set allow_plaintext_auth=True"
        )
    return errors


def _check_ca_file(path: Any) -> list[str]:
    if not isinstance(path, str) or not path:
        return [f"tls_ca_file={path!r}: must be the path of a PEM file holding your CA certificate"]
    if not os.path.isfile(path):
        return [f"tls_ca_file={path!r}: no such file; give the PEM file of the CA that signed the relay's certificate"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return [f"tls_ca_file={path!r}: cannot read it ({e.strerror}); the master's user must be able to read it"]
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return [f"tls_ca_file={path!r}: holds no PEM certificate ('-----BEGIN CERTIFICATE-----' not found)"]
    return []
