"""Preflight: talk to the configured relay the way a real mail would, without sending one,
and explain in plain words what is wrong and how to fix it.

This module owns:

- :func:`probe` -- resolve, connect, banner, EHLO, STARTTLS + certificate check, AUTH,
  ``MAIL FROM`` + ``RCPT TO`` for every recipient, then ``RSET``/``QUIT``; plus, when the
  relay is the local Postfix, one hop further (:func:`check_local_postfix`): its
  ``relayhost``/``mydestination`` trap, its relayhost probed as Postfix's smtp client would
  reach it (``postfix-relay-*``, :func:`lookup_mx`), and mail already deferred in its queue
  (``postfix-deferred``). Synchronous (smtplib/ssl/socket), every step bounded by the
  notifier's ``smtp_timeout``. A conversation is a :class:`_Probe`: one method per step,
  one method (``explain``) that turns an exception into a :class:`Problem`;
  :class:`_PostfixRelayProbe` is the second hop's.
- :func:`run_at_config_load` -- called by the notifier's ``checkConfig``; runs the probe only
  while Buildbot loads ``master.cfg`` (``buildbot checkconfig``, and master start/reconfig,
  where Buildbot loads the config in a thread, so the reactor is never blocked). A notifier
  built directly in Python (unit tests) never reaches the network.
- :func:`run_at_start` -- the AUTH check that had to wait for secrets to be rendered
  (``util.Secret`` credentials), run in a thread from ``reconfigService``.
- :func:`check_preflight_mode` -- validation of ``preflight="fail"|"warn"|"off"``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import smtplib
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any, Iterator, Optional, Sequence

from buildbot_mailext import postfix
from buildbot_mailext.relay import SmtpSettings, format_endpoint

PREFLIGHT_MODES = ("fail", "warn", "off")
# Set to "1" to skip the config-load probe (e.g. on a machine that builds configs offline).
SKIP_ENV = "BUILDBOT_MAILEXT_SKIP_PREFLIGHT"

START_MTA_FIX = (
    "install and start an MTA such as Postfix on this machine (Debian/Ubuntu: apt-get install postfix; "
    "then systemctl start postfix or postfix start), or set relayhost to your site's relay, e.g. "
    "relayhost='[relay.example.org]:587' with useTls=True"
)
EXAMPLE_RELAY = "[relay.example.org]"


@dataclass
class Problem:
    kind: str  # dns refused timeout unreachable banner tls cert starttls auth sender recipient postfix ...
    what_happened: str
    fix: str


@dataclass
class PreflightResult:
    ok: bool
    endpoint: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    steps: list[str] = field(default_factory=list)  # what was done, in order, with timings
    title: str = ""  # e.g. "notifier 'mail'"; set by callers

    def render(self) -> str:
        """Human text: verdict line, then each problem with its fix, then notes."""
        who = f"{self.title} -> " if self.title else ""
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"mail preflight {who}{self.endpoint}: {verdict} ({self.elapsed:.3f}s)"]
        for p in self.problems:
            lines.append(f"  PROBLEM [{p.kind}] {p.what_happened}")
            lines.append(f"    fix: {p.fix}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.steps:
            lines.append("  steps: " + " | ".join(self.steps))
        return "\n".join(lines)


class _Abort(Exception):
    """Internal: a step failed in a way that makes later steps meaningless."""


class _ProbeSMTP(smtplib.SMTP):
    """smtplib.SMTP on a socket we connected ourselves (so that connect errors are ours to
    classify, and the TLS server name stays the configured host, not the resolved IP)."""

    def __init__(self, sock_factory: Any, timeout: float):
        self._sock_factory = sock_factory
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._sock_factory()


def _ssl_context(settings: SmtpSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=settings.tls_ca_file) if settings.tls_ca_file else ssl.create_default_context()
    if not settings.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
    """getaddrinfo bounded by ``timeout`` (getaddrinfo itself cannot be interrupted, so it
    runs in a daemon thread that we stop waiting for)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=work, name=f"preflight-resolve-{host}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer from the resolver within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    seen, out = set(), []
    for family, socktype, proto, _, sockaddr in box["result"]:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            out.append((family, socktype, proto, sockaddr))
    return out


def _nameservers() -> list[tuple[str, int]]:
    """The resolvers of /etc/resolv.conf, as ``(address, 53)``."""
    servers = []
    with contextlib.suppress(OSError):
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].split("%", 1)[0], 53))
    return servers or [("127.0.0.1", 53)]


def lookup_mx(name: str, timeout: float, nameservers: Optional[Sequence[tuple[str, int]]] = None) -> list[str]:
    """The MX hosts of ``name``, best preference first, as Postfix's smtp client looks them
    up for an unbracketed relayhost; ``[]`` when the name has no MX record (then the name
    itself is the host, RFC 5321 5.1). The standard library has no MX lookup: one UDP query
    per resolver, built with Twisted's DNS message codec, bounded by ``timeout`` in all.

    Raises socket.gaierror (no such domain, resolver error) or TimeoutError (no answer).
    """
    from twisted.names import dns

    servers = list(nameservers or _nameservers())
    query = dns.Message(id=int.from_bytes(os.urandom(2), "big"), recDes=1)
    query.addQuery(name.encode("idna"), dns.MX)
    deadline = time.monotonic() + timeout
    for address, port in servers:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.settimeout(max(0.1, min(deadline - time.monotonic(), timeout / len(servers))))
                sock.sendto(query.toStr(), (address, port))
                data = sock.recv(65535)
            except OSError:  # timeout, unreachable resolver: try the next one
                continue
        answer = dns.Message()
        try:
            answer.fromStr(data)
        except Exception:  # noqa: BLE001 - a garbled answer is as good as none
            continue
        if answer.id != query.id:
            continue
        if answer.rCode == dns.ENAME:
            raise socket.gaierror(socket.EAI_NONAME, f"no such domain (DNS NXDOMAIN from {address})")
        if answer.rCode != dns.OK:
            raise socket.gaierror(socket.EAI_AGAIN, f"DNS error (rcode {answer.rCode} from {address})")
        records = [rr.payload for rr in answer.answers if rr.type == dns.MX]
        return [str(r.name).rstrip(".") for r in sorted(records, key=lambda r: r.preference)]
    raise TimeoutError(f"no answer to the MX query from {', '.join(a for a, _ in servers)} within {timeout:g}s")


def _reply_text(code: Any, resp: Any) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    text = " ".join(str(resp or "").split())
    return f"{code} {text}".strip() if code else text


def _cert_fix(settings: SmtpSettings, verify_message: str) -> str:
    msg = verify_message.lower()
    if "hostname mismatch" in msg or "ip address mismatch" in msg:
        return (
            f"set relayhost to a name the certificate was issued for (not {settings.host!r}), "
            "or have the relay's certificate re-issued to include this name"
        )
    if "expired" in msg:
        return "renew the relay's certificate (e.g. certbot renew / your CA), then restart the relay's MTA"
    return (
        "if the relay uses a private or self-signed CA, set tls_ca_file='/path/to/that-ca.pem'; "
        "otherwise install the missing intermediate certificate on the relay. Only as a last resort: "
        "tls_verify=False (logs a warning; anyone on the path can read the mail)"
    )


def check_local_postfix(
    settings: SmtpSettings,
    recipients: Sequence[str],
    banner: str = "",
    postconf: Optional[str] = None,
    fromaddr: str = "",
) -> tuple[list[Problem], list[str]]:
    """The local Postfix, one hop further: the notifier talks to it, but does the mail leave?

    - no relayhost and recipients outside ``mydestination``: the site-guide trap;
    - a relayhost: probed from here as Postfix's smtp client would (:func:`check_postfix_relay`);
    - mail from ``fromaddr`` already deferred in Postfix's queue (:func:`check_postfix_queue`).

    Only called when the relay is a loopback address. Returns (problems, notes).
    """
    postconf = postconf or postfix.find_postconf()
    if not postconf or not postfix.is_local_postfix(settings.port, banner, postconf):
        return [], []
    ep = settings.endpoint_label()
    try:
        local = postfix.read_settings(postconf)
    except Exception as e:  # noqa: BLE001 - a note, never a crash
        return [], [f"{ep} looks like the local Postfix, but 'postconf -h' failed ({e}); relayhost not checked"]
    problems, notes = _check_postfix_destination(ep, local, recipients)
    if local.relayhost:
        relay_problems, relay_notes = check_postfix_relay(local, ep, settings.timeout)
        problems += relay_problems
        notes += relay_notes
    if fromaddr:
        problems += check_postfix_queue(ep, fromaddr, settings.timeout)
    return problems, notes


def _check_postfix_destination(
    ep: str, local: postfix.PostfixSettings, recipients: Sequence[str]
) -> tuple[list[Problem], list[str]]:
    if local.relayhost:
        return [], [f"{ep} is the local Postfix; it relays all outside mail via relayhost = {local.relayhost} (postconf -h relayhost)"]
    transport = local.default_transport
    if transport and ":" in transport and transport.split(":", 1)[1].strip():
        return [], [f"{ep} is the local Postfix; default_transport = {transport} decides where outside mail goes"]
    destinations = local.mydestination
    tables = [d for d in destinations if ":" in d or d.startswith("/")]
    outside = [rcpt for rcpt in recipients if not local.is_local_domain(rcpt.rpartition("@")[2])]
    if not outside:
        return [], [f"{ep} is the local Postfix, without relayhost; every recipient is local (mydestination)"]
    notes = []
    if tables:
        notes.append(f"mydestination also uses lookup tables ({', '.join(tables)}) that this check cannot read")
    problem = Problem(
        "postfix-no-relayhost",
        f"{ep} is the local Postfix and it has no relayhost (postconf -h relayhost is empty); "
        f"recipient(s) {', '.join(outside)} are outside its mydestination ({', '.join(destinations) or 'empty'}). "
        "Postfix will accept these mails (250) and then try to deliver them itself, straight to each "
        "domain's MX on port 25, which site firewalls usually block: the mail waits in Postfix's queue "
        "(postqueue -p) and bounces days later. Nothing in the SMTP dialogue shows it.",
        f"tell Postfix to relay through your site's relay: postconf -e 'relayhost = {EXAMPLE_RELAY}' && "
        f"postfix reload (or set 'relayhost = {EXAMPLE_RELAY}' in /etc/postfix/main.cf); or bypass Postfix "
        f"and set the notifier's relayhost='{EXAMPLE_RELAY}:587' (with useTls=True, and smtpUser/"
        "smtpPassword if the relay needs them)",
    )
    return [problem], notes


def check_postfix_relay(
    local: postfix.PostfixSettings,
    ep: str,
    timeout: float,
    nameservers: Optional[Sequence[tuple[str, int]]] = None,
) -> tuple[list[Problem], list[str]]:
    """Probe Postfix's ``relayhost`` from this machine the way Postfix's smtp client would:
    MX lookup unless bracketed (and unless Postfix does no DNS), connect, banner, EHLO, and
    STARTTLS when ``smtp_tls_security_level`` requires it. No MAIL/RCPT: we are not Postfix's
    client there, and no mail is sent. ``ep`` is the local Postfix's ``host:port``."""
    notes = [f"not checked: {what} may send some mail elsewhere" for what in local.unchecked_routing()]
    try:
        host, port, mx_lookup = local.relay_target()
    except ValueError as e:
        return [], notes + [f"Postfix's relayhost = {local.relayhost} not checked: {e}"]
    tls, verify, ca_file = local.tls_policy()
    relay = SmtpSettings(host=host, port=port, tls=tls, tls_verify=verify, tls_ca_file=ca_file, timeout=timeout)
    result = PreflightResult(ok=False, endpoint=local.relayhost)
    _PostfixRelayProbe(relay, local, ep, mx_lookup, nameservers, timeout, result).run()
    if not result.problems:
        notes.append(
            f"Postfix's relayhost {local.relayhost} answers from this machine: " + " | ".join(result.steps)
        )
    if local.get("smtp_sasl_auth_enable") == "yes":
        notes.append("Postfix logs in to its relayhost (smtp_sasl_auth_enable = yes): that login is not checked here")
    return result.problems, notes + result.notes


def check_postfix_queue(ep: str, fromaddr: str, timeout: float, postqueue: Optional[str] = None) -> list[Problem]:
    """Mail from ``fromaddr`` already deferred in Postfix's queue (``postqueue -j``): how
    many, how old the oldest is, and Postfix's ``delay_reason``, grouped."""
    sender = (parseaddr(fromaddr)[1] or fromaddr).lower()
    try:
        queue = postfix.read_queue(postqueue, timeout=timeout)
    except postfix.QueueUnreadable:
        return []  # the tracker says so, once, where it matters (at send time)
    stuck = [e for e in queue if e.get("queue_name") == "deferred" and str(e.get("sender", "")).lower() == sender]
    if not stuck:
        return []
    reasons: dict[str, int] = {}
    for entry in stuck:
        for reason in postfix.delay_reasons(entry) or ["no reason given yet"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    oldest = min(float(e.get("arrival_time") or time.time()) for e in stuck)
    grouped = "; ".join(f"{n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    ids = ", ".join(str(e["queue_id"]) for e in stuck[:5]) + (", ..." if len(stuck) > 5 else "")
    return [Problem(
        "postfix-deferred",
        f"{ep} is the local Postfix and {len(stuck)} mail(s) from {sender} wait in its deferred queue "
        f"(queue id {ids}); the oldest for {postfix.format_age(time.time() - oldest)}. Postfix says: {grouped}",
        "fix what Postfix says above (see the postfix-relay-* problem, if any), then send them now with "
        "postqueue -f; list them with postqueue -p; delete one with postsuper -d QUEUEID",
    )]


def probe(
    settings: SmtpSettings,
    fromaddr: str,
    recipients: list[str],
    check_auth: bool = True,
    timeout: Optional[float] = None,
) -> PreflightResult:
    """Run the SMTP dialogue up to RCPT TO (no mail is sent) and explain what is wrong.

    ``timeout`` (default: ``settings.timeout``) bounds name resolution, the TCP connect and
    every SMTP reply. Never raises for network trouble: everything becomes a Problem.
    """
    timeout = float(timeout or settings.timeout)
    if isinstance(recipients, str):  # one address, not a sequence of characters
        recipients = [recipients]
    result = PreflightResult(ok=False, endpoint=f"{settings.endpoint_label()} ({_mode_label(settings)})")
    start = time.monotonic()
    _Probe(settings, fromaddr, recipients, check_auth, timeout, result).run()
    result.elapsed = time.monotonic() - start
    result.ok = not result.problems
    return result


def _mode_label(settings: SmtpSettings) -> str:
    label = {"none": "plain SMTP", "starttls": "STARTTLS", "smtps": "SMTPS"}[settings.tls]
    if settings.tls != "none" and not settings.tls_verify:
        label += ", certificate NOT verified"
    if settings.uses_auth:
        label += ", AUTH"
    return label


class _ConnectFailed(Exception):
    """Internal: no address of the relay took the TCP connection; ``errors`` says why, per address."""

    def __init__(self, errors: list[tuple[str, BaseException]]):
        super().__init__("; ".join(f"{a}: {e}" for a, e in errors))
        self.errors = errors


def _is_timeout(exc: Optional[BaseException]) -> bool:
    # Before Python 3.10 socket.timeout is not a TimeoutError: name both.
    return isinstance(exc, (socket.timeout, TimeoutError))


class _Probe:
    """One preflight conversation with one SMTP server.

    A method per SMTP step (:meth:`steps` lists them in order). A step that finds a fault
    in the server's *answer* (a 5xx, a missing extension) reports it with :meth:`fail` or
    :meth:`report`; a step that *raises* leaves the wording to :meth:`explain`, the one place
    that turns an exception into a :class:`Problem`. Every problem goes through
    :meth:`report`, so a subclass can reword all of them in one place.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        fromaddr: str,
        recipients: Sequence[str],
        check_auth: bool,
        timeout: float,
        result: PreflightResult,
    ):
        self.settings = settings
        self.host, self.port = settings.host, settings.port
        self.ep = settings.endpoint_label()
        self.fromaddr = fromaddr
        self.recipients = list(recipients)
        self.check_auth = check_auth
        self.timeout = timeout
        self.result = result
        self.addrs: list[tuple] = []
        self.sock: Optional[socket.socket] = None
        self.smtp: Optional[_ProbeSMTP] = None
        self.banner_text = ""
        self._start = time.monotonic()

    # -- the conversation
    def steps(self) -> list[Any]:
        return [
            self.resolve, self.connect, self.greet, self.ehlo, self.starttls, self.auth,
            self.mail_and_rcpt, self.quit, self.local_postfix,
        ]

    def run(self) -> None:
        try:
            for step in self.steps():
                try:
                    step()
                except _Abort:
                    raise
                except Exception as e:  # noqa: BLE001 - every exception becomes one problem
                    self.explain(step.__name__, e)
                    raise _Abort from None
        except _Abort:
            pass
        finally:
            self.close()

    def close(self) -> None:
        for thing in (self.smtp, self.sock):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()

    # -- bookkeeping
    def step(self, text: str) -> None:
        self.result.steps.append(f"{text} @{time.monotonic() - self._start:.3f}s")

    def report(self, problem: Problem) -> None:
        self.result.problems.append(problem)

    def problem(self, kind: str, what: str, fix: str) -> None:
        self.report(Problem(kind, what, fix))

    def fail(self, kind: str, what: str, fix: str, step: Optional[str] = None) -> None:
        """Report a problem that makes the later steps meaningless, and stop."""
        self.problem(kind, what, fix)
        if step:
            self.step(step)
        raise _Abort

    def offered(self) -> str:
        return " ".join(sorted(k.upper() for k in self.smtp.esmtp_features)) or "nothing"

    # -- 1. resolve
    def resolve(self) -> None:
        self.addrs = _resolve(self.host, self.port, self.timeout)
        self.step("resolved " + ", ".join(a[3][0] for a in self.addrs))

    # -- 2. connect (every address, as an MTA client would)
    def connect(self) -> None:
        errors: list[tuple[str, BaseException]] = []
        for family, socktype, proto, sockaddr in self.addrs:
            s = socket.socket(family, socktype, proto)
            s.settimeout(self.timeout)
            try:
                s.connect(sockaddr)
            except BaseException as e:  # noqa: BLE001
                s.close()
                errors.append((sockaddr[0], e))
                continue
            self.sock = s
            break
        if self.sock is None:
            raise _ConnectFailed(errors)
        connected_ip = self.sock.getpeername()[0]
        self.step(f"connected to {format_endpoint(connected_ip, self.port)}")
        for a, e in errors:
            self.result.notes.append(f"{format_endpoint(a, self.port)} failed ({e}); {connected_ip} worked")

    # -- 3. banner (and the implicit TLS handshake for SMTPS)
    def greet(self) -> None:
        settings, sock = self.settings, self.sock
        self.ctx = _ssl_context(settings) if settings.tls != "none" else None

        def sock_factory() -> socket.socket:
            if settings.tls == "smtps":
                return self.ctx.wrap_socket(sock, server_hostname=self.host)
            return sock

        self.smtp = _ProbeSMTP(sock_factory, self.timeout)
        self.smtp._host = self.host  # smtplib uses it as the TLS server name for STARTTLS
        code, banner = self.smtp.connect(self.host, self.port)
        self.banner_text = _reply_text(code, banner)
        self.step(f"banner {self.banner_text[:60]}")
        if code != 220:
            self.fail(
                "banner",
                f"{self.ep}: the server refuses the session: {self.banner_text}",
                "the MTA does not accept mail from this machine now; read its log and access rules",
            )

    # -- 4. EHLO
    def ehlo(self) -> None:
        code, resp = self.smtp.ehlo()
        self.step(f"EHLO {code}")
        if code != 250:
            self.fail("protocol", f"{self.ep}: EHLO refused: {_reply_text(code, resp)}", "check the MTA's log; it should accept EHLO")

    # -- 5. STARTTLS
    def starttls(self) -> None:
        if self.settings.tls == "smtps":
            self.step("TLS (SMTPS) certificate " + ("verified" if self.settings.tls_verify else "NOT verified"))
            return
        if self.settings.tls != "starttls":
            return
        if not self.smtp.has_extn("starttls"):
            self.fail(
                "starttls",
                f"{self.ep}: STARTTLS not offered (the EHLO reply lists: {self.offered()}), and {self.tls_requirement()} requires it",
                self.default_port_fix()
                + "enable TLS on the relay (Postfix: smtpd_tls_security_level = may, with smtpd_tls_cert_file and "
                "smtpd_tls_key_file), use the relay's submission port (587), use useSmtps=True if this is an "
                "implicit-TLS port (465), or drop useTls=True for a local MTA on loopback",
                step="no STARTTLS",
            )
        self.smtp.starttls(context=self.ctx)
        self.step("STARTTLS ok, certificate " + ("verified" if self.settings.tls_verify else "NOT verified"))
        code, resp = self.smtp.ehlo()
        self.step(f"EHLO (TLS) {code}")

    # -- 6. AUTH
    def auth(self) -> None:
        settings = self.settings
        if not settings.uses_auth:
            return
        if not settings.credentials_are_plain():
            self.result.notes.append("AUTH not checked at config load (credentials come from secrets); checked at start")
        elif not self.check_auth:
            self.result.notes.append("AUTH not checked (check_auth=False)")
        elif not self.smtp.has_extn("auth"):
            self.fail(
                "auth",
                f"{self.ep}: smtpUser is set but the server offers no AUTH (EHLO lists: {self.offered()})",
                "the relay may not need a login (remove smtpUser/smtpPassword), or offers AUTH only after "
                "STARTTLS (set useTls=True), or only on its submission port 587",
            )
        else:
            code, resp = self.smtp.login(_as_text(settings.user), _as_text(settings.password))
            self.step(f"AUTH {code}")

    # -- 7. MAIL FROM / RCPT TO (never DATA)
    def mail_and_rcpt(self) -> None:
        sender = parseaddr(self.fromaddr)[1] or self.fromaddr
        code, resp = self.smtp.mail(sender)
        self.step(f"MAIL FROM {code}")
        if code != 250:
            self.problem(
                "sender",
                f"{self.ep}: MAIL FROM:<{sender}> refused: {_reply_text(code, resp)}",
                "set fromaddr to an address the relay accepts as sender (often one of your site's domain, or "
                "the address smtpUser may send as)",
            )
            return
        if not self.recipients:
            self.result.notes.append("no fixed recipients to check (RCPT TO not tried)")
        for rcpt in self.recipients:
            code, resp = self.smtp.rcpt(rcpt)
            if code not in (250, 251):
                self.recipient_refused(rcpt, code, _reply_text(code, resp))
        self.step(f"RCPT TO x{len(self.recipients)}")

    def recipient_refused(self, rcpt: str, code: int, reply: str) -> None:
        if 400 <= code < 500:
            self.problem(
                "recipient-temporary",
                f"{self.ep}: recipient {rcpt} temporarily refused: {reply}",
                "the relay defers this recipient (greylisting, full queue, unknown-user lookup down); "
                "read the relay's log; mails will be retried",
            )
        elif "relay" in reply.lower() or code in (554,):
            self.problem(
                "recipient",
                f"{self.ep}: recipient {rcpt} refused, relay denied: {reply}",
                "the relay does not relay for this machine: have its admin allow this host (Postfix: add "
                "its address to mynetworks), or log in (smtpUser/smtpPassword with useTls=True), or use "
                "the relay your site designates for machines (relayhost=...)",
            )
        else:
            self.problem(
                "recipient",
                f"{self.ep}: recipient {rcpt} refused: {reply}",
                f"check the address {rcpt} in the route's recipients (typo? list renamed?)",
            )

    # -- 8. RSET / QUIT
    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.smtp.rset()
        with contextlib.suppress(Exception):
            self.smtp.quit()
        self.step("RSET, QUIT")

    # -- 9. the local-Postfix trap
    def local_postfix(self) -> None:
        if not _is_loopback(self.addrs):
            return
        try:
            problems, notes = check_local_postfix(self.settings, self.recipients, self.banner_text, fromaddr=self.fromaddr)
        except Exception as e:  # noqa: BLE001
            problems, notes = [], [f"local Postfix check failed: {e}"]
        for p in problems:
            self.report(p)
        self.result.notes.extend(notes)
        if problems or notes:
            self.step("postconf checked")

    # -- the one place where an exception becomes a problem
    def explain(self, step: str, e: BaseException) -> None:
        ep, settings = self.ep, self.settings
        if isinstance(e, _ConnectFailed):
            self.connect_failed(e.errors)
        elif isinstance(e, ssl.SSLCertVerificationError):
            verify_message = getattr(e, "verify_message", "") or str(e)
            self.problem(
                "cert",
                f"{ep}: the server certificate is not valid: {verify_message}"
                + (f" (trusted CA file: {settings.tls_ca_file})" if settings.tls_ca_file else " (trusting the system CAs)"),
                _cert_fix(settings, verify_message),
            )
            self.step("STARTTLS: certificate rejected" if step == "starttls" else "TLS handshake: certificate rejected")
        elif isinstance(e, ssl.SSLError) and step == "greet":
            self.problem(
                "tls",
                f"{ep}: TLS handshake failed ({getattr(e, 'reason', None) or e})",
                self.default_port_fix()
                + "useSmtps=True expects implicit TLS (usually port 465); for a port that starts in plain text and "
                "offers STARTTLS (usually 587 or 25) use useTls=True instead",
            )
            self.step("TLS handshake failed")
        elif isinstance(e, ssl.SSLError) and step == "starttls":
            self.problem("tls", f"{ep}: TLS handshake after STARTTLS failed ({getattr(e, 'reason', None) or e})", "check the relay's TLS setup and log")
            self.step("STARTTLS handshake failed")
        elif isinstance(e, smtplib.SMTPResponseException) and step == "starttls":
            self.problem("tls", f"{ep}: STARTTLS refused: {_reply_text(e.smtp_code, e.smtp_error)}", "check the relay's TLS setup and log")
        elif isinstance(e, socket.gaierror) and step == "resolve":
            self.problem(
                "dns",
                f"{ep}: the host name {self.host!r} does not resolve ({e.strerror or e})",
                f"check the spelling of relayhost (getent hosts {self.host} must answer on this machine), fix the DNS "
                "resolver in /etc/resolv.conf, or give the relay's IP address: relayhost='[192.0.2.25]:587'",
            )
            self.step("resolve failed")
        elif _is_timeout(e) and step == "resolve":
            self.problem(
                "dns",
                f"{ep}: resolving {self.host!r} got {e}",
                "the DNS resolver of this machine does not answer: fix /etc/resolv.conf, or give the relay's IP address",
            )
            self.step("resolve timed out")
        elif step == "greet" and (_is_timeout(e) or isinstance(e, smtplib.SMTPServerDisconnected)):
            self.no_greeting(e)
        elif isinstance(e, smtplib.SMTPAuthenticationError) and step == "auth":
            self.problem(
                "auth",
                f"{ep}: AUTH rejected for smtpUser {_as_text(settings.user)!r}: {_reply_text(e.smtp_code, e.smtp_error)}",
                "check smtpUser/smtpPassword (or the secret they come from); some relays want the full "
                "address as user name, or an application password",
            )
            self.step("AUTH rejected")
        elif isinstance(e, smtplib.SMTPException) and step == "auth":
            self.problem("auth", f"{ep}: AUTH failed: {e}", "check which AUTH mechanisms the relay offers (LOGIN/PLAIN/CRAM-MD5)")
        else:
            self.problem("unexpected", f"{ep}: {type(e).__name__}: {e}", "report this to buildbot-mailext with the steps below")

    def connect_failed(self, errors: list[tuple[str, BaseException]]) -> None:
        ep, host, port = self.ep, self.host, self.port
        where = ", ".join(format_endpoint(a, port) for a, _ in errors)
        refused = [a for a, e in errors if isinstance(e, ConnectionRefusedError)]
        timed_out = [a for a, e in errors if _is_timeout(e)]
        if len(refused) == len(errors):
            self.problem(
                "refused",
                f"{ep}: connection refused ({where}): nothing is listening there",
                (START_MTA_FIX if _is_loopback(self.addrs) else f"start the MTA on {host}, or fix relayhost")
                + f"; {self.port_hint()}",
            )
            self.step("connect refused")
        elif timed_out:
            self.problem(
                "timeout",
                f"{ep}: no TCP connection within {self.timeout:g}s ({where}): a firewall drops the packets, or the "
                "host is down",
                f"check that this machine may reach {ep} (firewall rules for outgoing port {port}; many sites "
                "block outgoing port 25), or set relayhost to your site's relay",
            )
            self.step("connect timed out")
        else:
            text = "; ".join(f"{a}: {e}" for a, e in errors)
            self.problem(
                "unreachable",
                f"{ep}: cannot connect ({text})",
                "check routing/network to the relay, or set relayhost to a relay this machine can reach",
            )
            self.step("connect failed")

    def port_hint(self) -> str:
        return (
            f"check the port: this is port {self.port} (25 unless relayhost or smtpPort names one; "
            "587 for STARTTLS, 465 for SMTPS)"
        )

    def default_port_fix(self) -> str:
        """Stock MailNotifier's meaning, kept: useTls/useSmtps without a port still use port 25.
        When TLS fails there, the likely fix is the port, so say it first."""
        if self.port != 25 or self.settings.tls == "none":
            return ""
        host = f"[{self.host}]"
        if self.settings.tls == "smtps":
            return (
                f"useSmtps=True without a port connects to port 25 (as stock MailNotifier does); SMTPS is "
                f"usually on port 465: set smtpPort=465 or relayhost='{host}:465'. Otherwise: "
            )
        return (
            f"useTls=True without a port connects to port 25 (as stock MailNotifier does); relays offer "
            f"STARTTLS for clients on their submission port: set relayhost='{host}:587' (or smtpPort=587). "
            "Otherwise: "
        )

    def tls_requirement(self) -> str:
        return "useTls=True"

    def smtps_hint(self) -> str:
        if self.settings.tls == "smtps":
            return " (a TLS handshake got no answer: is this port really SMTPS?)"
        return " (if this is an SMTPS port such as 465, set useSmtps=True)"

    def no_greeting(self, e: BaseException) -> None:
        # smtplib reports a read timeout as SMTPServerDisconnected("... timed out")
        timed_out = not isinstance(e, smtplib.SMTPServerDisconnected) or _is_timeout(e.__context__)
        if not timed_out:
            self.problem(
                "banner",
                f"{self.ep}: the server closed the connection before greeting ({e})",
                "the MTA refuses this client (check its access rules and its log, e.g. /var/log/mail.log)",
            )
            self.step("disconnected before banner")
            return
        hint = self.smtps_hint()
        self.problem(
            "timeout",
            f"{self.ep}: connected, but no SMTP greeting came within {self.timeout:g}s: something is listening that "
            f"does not speak SMTP, or the server is hung{hint}",
            f"check what listens on {self.ep} (ss -ltnp), restart the MTA, or correct relayhost / port",
        )
        self.step("no banner")


# Each second-hop fault class, from the kind the first-hop wording gave it.
_RELAY_KINDS = {
    "dns": "postfix-relay-dns",
    "refused": "postfix-relay-refused",
    "unreachable": "postfix-relay-refused",
    "banner": "postfix-relay-refused",
    "protocol": "postfix-relay-refused",
    "timeout": "postfix-relay-timeout",
    "tls": "postfix-relay-tls",
    "cert": "postfix-relay-tls",
    "starttls": "postfix-relay-tls",
}


class _PostfixRelayProbe(_Probe):
    """The second hop: Postfix's ``relayhost`` probed from this machine as Postfix's smtp
    client would reach it (resolve with MX lookup unless bracketed, connect, banner, EHLO,
    STARTTLS if Postfix requires TLS), then QUIT. Every problem is reworded for the
    operator of the local Postfix: what Postfix will do with the mail, and Postfix's
    settings as the fix."""

    def __init__(
        self,
        relay: SmtpSettings,
        local: postfix.PostfixSettings,
        local_ep: str,
        mx_lookup: bool,
        nameservers: Optional[Sequence[tuple[str, int]]],
        timeout: float,
        result: PreflightResult,
    ):
        super().__init__(relay, "", [], False, timeout, result)
        self.local = local
        self.local_ep = local_ep
        self.mx_lookup = mx_lookup
        self.nameservers = nameservers

    def steps(self) -> list[Any]:
        return [self.resolve, self.connect, self.greet, self.ehlo, self.starttls, self.quit]

    def step(self, text: str) -> None:
        super().step(f"relay {text}")

    def resolve(self) -> None:
        hosts = [self.host]
        if self.mx_lookup:
            mx = lookup_mx(self.host, self.timeout, self.nameservers)
            if mx:
                hosts = mx
                self.step(f"MX {self.host}: {', '.join(mx)}")
            else:
                self.step(f"no MX for {self.host}: the name itself")
        for host in hosts:
            with contextlib.suppress(socket.gaierror):
                self.addrs += _resolve(host, self.port, self.timeout)
        if not self.addrs:
            self.addrs = _resolve(hosts[0], self.port, self.timeout)  # raises: say why
        self.step("resolved " + ", ".join(a[3][0] for a in self.addrs))

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.smtp.quit()
        self.step("QUIT")

    def smtps_hint(self) -> str:
        return ""  # the notifier's useSmtps is no fix for Postfix's relayhost

    def tls_requirement(self) -> str:
        return f"Postfix's smtp_tls_security_level = {self.local.get('smtp_tls_security_level')}"

    def report(self, problem: Problem) -> None:
        kind = _RELAY_KINDS.get(problem.kind, "postfix-relay-" + problem.kind)
        lifetime = self.local.get("maximal_queue_lifetime", "5d")
        inner = problem.what_happened
        if inner.startswith(f"{self.ep}: "):  # relayhost was just named
            inner = inner[len(self.ep) + 2:]
        super().report(Problem(
            kind,
            f"{self.local_ep} is the local Postfix; it relays all outside mail via relayhost = "
            f"{self.local.relayhost}, and from this machine that relay fails: {inner}. "
            f"Postfix will accept every mail (250 ... queued as ...) and keep it deferred in its queue "
            f"(postqueue -p); after maximal_queue_lifetime ({lifetime}) it bounces to the sender.",
            self.relay_fix(kind) + f"; or bypass Postfix with the notifier's own relayhost='{EXAMPLE_RELAY}:587' "
            "(useTls=True, smtpUser/smtpPassword if needed). Then postqueue -f sends what waits in the queue",
        ))

    def relay_fix(self, kind: str) -> str:
        set_relay = f"postconf -e 'relayhost = {EXAMPLE_RELAY}:587' && postfix reload"
        if kind == "postfix-relay-dns":
            mx = f", host -t MX {self.host}" if self.mx_lookup else ""
            return (
                f"check the name in Postfix's relayhost (getent hosts {self.host}{mx}); in brackets ([name]) "
                f"Postfix looks up no MX record: {set_relay}"
            )
        if kind == "postfix-relay-timeout":
            return (
                f"a firewall drops the packets to {self.ep}, or the relay hangs: many sites block outgoing "
                f"port 25; use the relay's submission port: {set_relay}, with smtp_sasl_auth_enable = yes and "
                "smtp_tls_security_level = encrypt if it wants a login"
            )
        if kind == "postfix-relay-tls":
            level = self.local.get("smtp_tls_security_level") or "none"
            return (
                f"Postfix's smtp_tls_security_level = {level} needs TLS that this relay does not give: enable "
                "STARTTLS on the relay, trust its CA (smtp_tls_CAfile = /path/to/ca.pem), use its submission "
                f"port ({set_relay}), or lower the level: postconf -e 'smtp_tls_security_level = may'"
            )
        return (
            f"start the MTA on {self.ep}, or point Postfix at your site's relay: {set_relay} (check the port: "
            "25 unless relayhost names one; 587 for submission)"
        )


def _as_text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _is_loopback(addrs: Sequence[tuple]) -> bool:
    try:
        return bool(addrs) and all(ipaddress.ip_address(a[3][0].split("%", 1)[0]).is_loopback for a in addrs)
    except ValueError:
        return False


# ---------------------------------------------------------------------------- config load


def check_preflight_mode(mode: Any) -> list[str]:
    if mode in PREFLIGHT_MODES:
        return []
    return [f"preflight={mode!r}: must be 'fail' (default: a broken mail setup stops the master), 'warn' or 'off'"]


_suppress_depth = 0
_auth_pending: dict[str, bool] = {}  # notifier name -> AUTH still to check once secrets are rendered
_lock = threading.Lock()


@contextlib.contextmanager
def suppressed() -> Iterator[None]:
    """Load a master.cfg without the config-load probe (the CLI probes by itself)."""
    global _suppress_depth
    with _lock:
        _suppress_depth += 1
    try:
        yield
    finally:
        with _lock:
            _suppress_depth -= 1


def config_load_basedir() -> Optional[str]:
    """The master directory whose master.cfg is being executed, when called (indirectly)
    from buildbot.config.master.loadConfigDict, i.e. while ``buildbot checkconfig`` or a
    master (start/reconfig) loads it; None otherwise (e.g. a notifier built in a test)."""
    from buildbot_mailext.masterconfig import loading_basedir

    return loading_basedir()


def _inside_config_load() -> bool:
    return config_load_basedir() is not None


def _under_checkconfig() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == "buildbot.scripts.checkconfig":
            return True
        frame = frame.f_back
    return False


def _banner(text: str, headline: str) -> str:
    bar = "*" * 78
    return f"\n{bar}\n* {headline}\n{bar}\n{text}\n{bar}"


def _log(text: str) -> None:
    from twisted.python import log

    log.msg(text)


def run_at_config_load(
    settings: SmtpSettings, fromaddr: str, recipients: list[str], mode: str, notifier_name: str
) -> None:
    """Probe the relay if (and only if) master.cfg is being loaded by Buildbot.

    ``fail``: problems become Buildbot config errors (checkconfig prints them; ``buildbot
    start`` halts). ``warn``: a banner in twistd.log (and on stderr under checkconfig).
    """
    if mode == "off" or mode not in PREFLIGHT_MODES:
        return
    if _suppress_depth or os.environ.get(SKIP_ENV) == "1":
        return
    if not _inside_config_load():
        return
    check_auth = settings.credentials_are_plain()
    with _lock:
        if settings.uses_auth and not check_auth:
            _auth_pending[notifier_name] = True
        else:
            _auth_pending.pop(notifier_name, None)
    result = probe(settings, fromaddr, recipients, check_auth=check_auth)
    result.title = f"notifier {notifier_name!r}"
    text = result.render()
    if result.ok:
        _log(text)
        return
    if mode == "fail":
        from buildbot import config

        config.error(
            text + "\n  (preflight='fail': fix the problem, or set preflight='warn' to start anyway)"
        )
        return
    banner = _banner(text, f"MAIL PREFLIGHT WARNING for notifier {notifier_name!r}: mail will not arrive")
    _log(banner)
    if _under_checkconfig():
        print(banner, file=sys.stderr)


def run_at_start(
    settings: SmtpSettings, fromaddr: str, recipients: list[str], mode: str, notifier_name: str
) -> Any:
    """From ``reconfigService``: finish the AUTH check that config load had to skip because
    the credentials were secrets. Runs the probe in a thread; returns a Deferred that never
    errbacks. Does nothing for notifiers that config load already probed completely, so unit
    tests that call reconfigService never reach the network.
    """
    from twisted.internet import defer, threads

    with _lock:
        pending = _auth_pending.pop(notifier_name, False)
    if not pending or mode == "off" or not settings.credentials_are_plain():
        return defer.succeed(None)

    def done(result: PreflightResult) -> None:
        result.title = f"notifier {notifier_name!r} (AUTH with rendered secrets, at start)"
        text = result.render()
        if result.ok:
            _log(text)
            return
        headline = f"MAIL PREFLIGHT {'FAILED' if mode == 'fail' else 'WARNING'} at start for notifier {notifier_name!r}"
        if mode == "fail":
            headline += " (secrets are only known now, so the master could not be halted: mail will fail until fixed)"
        _log(_banner(text, headline))

    def crashed(f: Any) -> None:
        _log(f"mail preflight at start for notifier {notifier_name!r} could not run: {f.getErrorMessage()}")

    d = threads.deferToThread(probe, settings, fromaddr, recipients, True)
    d.addCallbacks(done, crashed)
    return d
