"""The local Postfix, as ``postconf`` describes it.

This module owns reading a local Postfix: where ``postconf`` and ``postqueue`` are, which
ports its ``smtpd`` listens on, the parameters that decide where outside mail goes and how
Postfix's own ``smtp`` client reaches it (``relayhost``, ``mydestination``,
``default_transport``, ``transport_maps``, ``smtp_tls_security_level``, DNS use, ...), and
its queue as ``postqueue -j`` lists it. It only reads; judging what that means for the
notifier's mail is the preflight's and the queue tracker's job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any, Optional

from buildbot_mailext.relay import parse_relayhost

# Debian puts postconf in /usr/sbin, which is not on a non-root PATH.
EXTRA_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_program(name: str) -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(EXTRA_SBIN)
    return shutil.which(name, path=path)


def find_postconf() -> Optional[str]:
    return find_program("postconf")


def run_postconf(postconf: str, *args: str, timeout: float = 10.0) -> str:
    # timeout: Postfix programs sleep up to ~2 s after main.cf changed ("cool-down").
    out = subprocess.run(
        [postconf, *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return out.stdout


def listen_ports(postconf: str) -> set[int]:
    """Ports of smtpd inet services in master.cf (``smtp`` -> 25, ``127.0.0.1:10025`` -> 10025)."""
    ports: set[int] = set()
    try:
        text = run_postconf(postconf, "-M", "*/inet")
    except Exception:
        return ports
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[7] == "smtpd":
            service = fields[0].rsplit(":", 1)[-1]
            if service.isdigit():
                ports.add(int(service))
            else:
                try:
                    ports.add(socket.getservbyname(service, "tcp"))
                except OSError:
                    if service == "smtp":
                        ports.add(25)
    return ports


def is_local_postfix(port: int, banner: str, postconf: str) -> bool:
    """Is the server on this loopback port the local Postfix? Its banner usually says so;
    if the banner was customised, the port being one of its smtpd listeners is enough."""
    return "postfix" in banner.lower() or port in listen_ports(postconf)


# Parameters read at once with ``postconf -x``; the last ones only to say "not checked".
_PARAMETERS = (
    "relayhost", "mydestination", "default_transport", "smtp_tls_security_level",
    "smtp_tls_wrappermode", "smtp_tls_CAfile", "smtp_dns_support_level", "smtp_host_lookup",
    "disable_dns_lookups", "smtp_sasl_auth_enable", "maximal_queue_lifetime",
    "transport_maps", "sender_dependent_relayhost_maps",
)
# smtp_tls_security_level values that make Postfix's smtp client insist on TLS (TLS_README).
TLS_REQUIRED_LEVELS = ("encrypt", "dane-only", "fingerprint", "verify", "secure")
TLS_VERIFIED_LEVELS = ("verify", "secure")


@dataclass(frozen=True)
class PostfixSettings:
    relayhost: str
    mydestination: list[str]
    default_transport: str
    parameters: dict[str, str] = field(default_factory=dict)  # every one of _PARAMETERS

    def get(self, name: str, default: str = "") -> str:
        return self.parameters.get(name, default)

    def is_local_domain(self, domain: str) -> bool:
        """Would Postfix deliver mail for ``domain`` locally (``mydestination``)? An empty
        domain (a bare local part) is local."""
        domain = domain.lower().rstrip(".")
        return not domain or any(domain == d.lower().rstrip(".") for d in self.mydestination)

    def relay_target(self) -> tuple[str, int, bool]:
        """``(host, port, mx_lookup)`` of the first ``relayhost`` entry, as Postfix's smtp
        client reads it: port 25 unless given (a service name such as ``submission`` is
        looked up), and an MX lookup unless the name is in brackets or Postfix does no DNS.
        Raises ValueError for a value this cannot read."""
        first = self.relayhost.replace(",", " ").split()[0]
        bracketed = first.startswith("[")
        head, colon, service = first.rpartition(":") if first.count(":") == 1 or "]:" in first else ("", "", "")
        if colon and not service.isdigit():  # relayhost = [relay]:submission
            try:
                first = f"{head}:{socket.getservbyname(service, 'tcp')}"
            except OSError:
                raise ValueError(f"unknown port/service {service!r} in relayhost = {self.relayhost}") from None
        host, port = parse_relayhost(first, 25)
        return host, port, not bracketed and self.uses_dns()

    def uses_dns(self) -> bool:
        """Does Postfix's smtp client look names up in DNS (MX records), or only with the
        system resolver (``smtp_dns_support_level = disabled``, ``disable_dns_lookups``)?"""
        if self.get("smtp_dns_support_level") == "disabled" or self.get("disable_dns_lookups") == "yes":
            return False
        return "dns" in self.get("smtp_host_lookup", "dns").replace(",", " ").split()

    def tls_policy(self) -> tuple[str, bool, Optional[str]]:
        """``(tls, verify, ca_file)`` for a probe that behaves like Postfix's smtp client:
        tls is "smtps" (``smtp_tls_wrappermode``), "starttls" when the security level
        requires TLS, else "none"."""
        level = self.get("smtp_tls_security_level")
        verify = level in TLS_VERIFIED_LEVELS
        ca_file = self.get("smtp_tls_CAfile") or None
        if self.get("smtp_tls_wrappermode") == "yes":
            return "smtps", verify, ca_file
        return ("starttls" if level in TLS_REQUIRED_LEVELS else "none"), verify, ca_file

    def unchecked_routing(self) -> list[str]:
        """Settings that may send some mail elsewhere than ``relayhost``: not checked."""
        return [f"{name} = {self.get(name)}" for name in ("transport_maps", "sender_dependent_relayhost_maps")
                if self.get(name)]


def read_settings(postconf: str) -> PostfixSettings:
    """The parameters that decide where outside mail goes; raises when postconf fails."""
    # -x expands $myhostname & co.; one "name = value" line per parameter.
    parameters = {}
    for line in run_postconf(postconf, "-x", *_PARAMETERS).splitlines():
        name, sep, value = line.partition(" = ")
        if not sep and line.endswith(" ="):
            name, value = line[:-2], ""
        parameters[name.strip()] = value.strip()
    return PostfixSettings(
        relayhost=parameters.get("relayhost", ""),
        mydestination=[d for d in parameters.get("mydestination", "").replace(",", " ").split() if d],
        default_transport=parameters.get("default_transport", ""),
        parameters=parameters,
    )


# ---------------------------------------------------------------------------- the queue


class QueueUnreadable(Exception):
    """``postqueue -j`` cannot be run or read; ``str()`` says why and what to do."""


def read_queue(postqueue: Optional[str] = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every message in Postfix's queue, as ``postqueue -j`` (Postfix >= 3.1) describes it:
    one dict per message with ``queue_name``, ``queue_id``, ``arrival_time``, ``sender``
    and ``recipients`` (each with its ``delay_reason`` once deferred).

    Blocking (a subprocess bounded by ``timeout``): call it from a thread. Raises
    :class:`QueueUnreadable` with the reason when the queue cannot be read.
    """
    postqueue = postqueue or find_program("postqueue")
    if not postqueue:
        raise QueueUnreadable("postqueue is not installed (no Postfix on this machine?)")
    try:
        out = subprocess.run([postqueue, "-j"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise QueueUnreadable(f"{postqueue} -j could not run: {e}") from None
    # With Postfix stopped it still reads the queue and only warns ("Mail system is down").
    if out.returncode != 0:
        why = " ".join(out.stderr.split())[-300:] or f"exit status {out.returncode}"
        raise QueueUnreadable(
            f"{postqueue} -j failed: {why} (Postfix >= 3.1 is needed, and the master's user must be "
            "allowed to read the queue: authorized_mailq_users)"
        )
    entries = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise QueueUnreadable(f"{postqueue} -j printed something that is not JSON: {line[:100]!r}") from None
        if isinstance(entry, dict) and entry.get("queue_id"):
            entries.append(entry)
    return entries


def delay_reasons(entry: dict[str, Any]) -> list[str]:
    """The distinct ``delay_reason`` texts of one queue entry, one line each."""
    seen: list[str] = []
    for rcpt in entry.get("recipients") or []:
        reason = " ".join(str(rcpt.get("delay_reason") or "").split())
        if reason and reason not in seen:
            seen.append(reason)
    return seen


def format_age(seconds: float) -> str:
    """``42s``, ``5m 3s``, ``2h 10m``, ``3d 4h``: how long a mail has waited."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
