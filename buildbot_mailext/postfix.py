"""The local Postfix, as ``postconf`` describes it.

This module owns reading a local Postfix's settings: where ``postconf`` is, which ports its
``smtpd`` listens on, and the three parameters that decide where outside mail goes
(``relayhost``, ``mydestination``, ``default_transport``). It only reads; judging what
those settings mean for the notifier's recipients is the preflight's job.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

# Debian puts postconf in /usr/sbin, which is not on a non-root PATH.
EXTRA_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_postconf() -> Optional[str]:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(EXTRA_SBIN)
    return shutil.which("postconf", path=path)


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


@dataclass(frozen=True)
class PostfixSettings:
    relayhost: str
    mydestination: list[str]
    default_transport: str

    def is_local_domain(self, domain: str) -> bool:
        """Would Postfix deliver mail for ``domain`` locally (``mydestination``)? An empty
        domain (a bare local part) is local."""
        domain = domain.lower().rstrip(".")
        return not domain or any(domain == d.lower().rstrip(".") for d in self.mydestination)


def read_settings(postconf: str) -> PostfixSettings:
    """The parameters that decide where outside mail goes; raises when postconf fails."""
    # -x expands $myhostname & co.; one output line per parameter, in order.
    lines = run_postconf(postconf, "-hx", "relayhost", "mydestination", "default_transport")
    relayhost, mydestination, default_transport = (lines.splitlines() + ["", "", ""])[:3]
    return PostfixSettings(
        relayhost=relayhost.strip(),
        mydestination=[d for d in mydestination.replace(",", " ").split() if d],
        default_transport=default_transport.strip(),
    )
