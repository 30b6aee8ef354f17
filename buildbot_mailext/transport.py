"""Sending mail: one SMTP relay, Twisted's non-blocking SMTP client, classified outcomes.

This module owns :class:`MailTransport` (what finished messages are handed to),
:class:`Delivery` (the outcome of one attempt to send one message) and :class:`SendFailure`
(the classification of everything that can go wrong on the way: ``refused``, ``dns``,
``timeout``, ``tls``, ``auth``, ``transient`` (4xx) and ``permanent`` (5xx)).

Why not stock ``ESMTPSenderFactory``: it retries a refused connection five times within the
same second, errbacks into nobody's hands ("Unhandled error in Deferred") and sends one
message per connection. Here a small ``ESMTPClient`` subclass walks a list of messages, so
that messages due in the same reactor turn share one SMTP session; every attempt ends in one
:class:`Delivery` (the Deferred handed back never errbacks).

The transport does not retry and does not log per message: what happens after an attempt
(retry later, dead letter) belongs to the caller, which logs one line per outcome with
:func:`describe` so that the wording lives here, next to the classification.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Iterable, Optional, Sequence

from twisted.internet import defer, protocol
from twisted.internet import error as net_error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.mail import smtp
from twisted.python import failure as tw_failure
from twisted.python import log

from buildbot_mailext.relay import SmtpSettings

# kinds that may go away by themselves: worth another attempt later
TRANSIENT_KINDS = frozenset({"refused", "dns", "timeout", "transient"})
KINDS = ("refused", "dns", "timeout", "tls", "auth", "transient", "permanent")


class SendFailure(Exception):
    """A classified send failure. ``str()`` is the one-line cause an operator reads."""

    def __init__(
        self,
        kind: str,
        cause: str,
        reply: Optional[str] = None,
        recipients: Sequence[str] = (),
        transient: Optional[bool] = None,
    ):
        assert kind in KINDS, kind
        super().__init__(cause)
        self.kind = kind
        self.cause = cause
        self.reply = reply
        self.recipients = list(recipients)
        # A TLS handshake cut by the network is worth another attempt; a certificate that
        # does not verify is not. Other kinds follow TRANSIENT_KINDS.
        self._transient = transient

    @property
    def transient(self) -> bool:
        if self._transient is not None:
            return self._transient
        return self.kind in TRANSIENT_KINDS

    def __str__(self) -> str:
        return self.cause


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(str(value).split())  # one line, whatever the server sent


def _reply(code: Any, resp: Any) -> Optional[str]:
    text = _text(resp)
    if isinstance(code, int) and code > 0:
        return f"{code} {text}".strip()
    return text or None


_VERBS = {"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "NOOP", "."}


def _last_command(transcript: Any) -> Optional[str]:
    """The last command we sent, from Twisted's SMTP client log (for timeout messages).

    Only SMTP verbs are reported: the lines of an AUTH exchange carry base64 credentials
    and must never reach a log.
    """
    commands = re.findall(r"^>>> (\S*)", _text_lines(transcript), re.M)
    if not commands:
        return None
    verb = commands[-1]
    if verb == ".":
        return "end of DATA"
    return verb.upper() if verb.upper() in _VERBS else "AUTH exchange"


def _text_lines(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value or "")


def _ssl_error_text(exc: BaseException) -> str:
    """Readable text for an OpenSSL.SSL.Error or service_identity error."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):  # OpenSSL.SSL.Error([(lib, func, reason), ...])
        reasons = [item[-1] for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(str(r) for r in reasons)
    return _text(exc) or type(exc).__name__


def classify(exc: BaseException, settings: SmtpSettings) -> SendFailure:
    """Turn whatever Twisted reported into a :class:`SendFailure`."""
    if isinstance(exc, SendFailure):
        return exc
    ep = settings.endpoint_label()
    timeout = f"{settings.timeout:g}s"

    # An SMTPConnectError wrapping a socket-level error (what stock Twisted reports).
    cause = getattr(exc, "__cause__", None)
    if isinstance(exc, smtp.SMTPConnectError) and getattr(exc, "code", -1) == -1 and cause is not None:
        exc = cause

    if isinstance(exc, net_error.ConnectionRefusedError):
        return SendFailure(
            "refused",
            f"connection refused: nothing is listening on {ep} (start the MTA there, or set relayhost to your relay)",
        )
    if isinstance(exc, net_error.DNSLookupError):
        return SendFailure("dns", f"cannot resolve host name {settings.host!r} ({_text(exc)})")
    if isinstance(exc, (net_error.TimeoutError, defer.CancelledError)):
        return SendFailure("timeout", f"no TCP connection to {ep} within {timeout}")
    if isinstance(exc, smtp.SMTPTimeoutError):
        command = _last_command(getattr(exc, "log", b""))
        after = f"to {command}" if command else "(no greeting)"
        return SendFailure("timeout", f"server gave no answer {after} within {timeout}")
    if isinstance(exc, smtp.TLSRequiredError):
        return SendFailure(
            "tls",
            f"STARTTLS not offered by {ep}, and useTls=True requires it (mail not sent in clear text)",
            _reply(exc.code, exc.resp),
        )
    if isinstance(exc, smtp.TLSError):
        return SendFailure("tls", "server refused STARTTLS", _reply(exc.code, exc.resp))
    if isinstance(exc, (smtp.AUTHRequiredError, smtp.EHLORequiredError)):
        return SendFailure(
            "auth", f"{ep} offers no AUTH method we can use (CRAM-MD5, LOGIN, PLAIN)", _reply(exc.code, exc.resp)
        )
    if isinstance(exc, (smtp.AUTHDeclinedError, smtp.AuthenticationError)):
        reply = _reply(exc.code, exc.resp)
        if isinstance(exc.code, int) and 400 <= exc.code < 500:
            return SendFailure("transient", "temporary AUTH failure", reply)
        return SendFailure("auth", f"AUTH rejected for smtpUser {settings.user!r}", reply)
    if isinstance(exc, smtp.SMTPConnectError) and isinstance(exc.code, int) and exc.code > 0:
        reply = _reply(exc.code, exc.resp)
        if 400 <= exc.code < 500:
            return SendFailure("transient", "server refused the session for now (greeting)", reply)
        return SendFailure("permanent", "server refused the session (greeting)", reply)
    if isinstance(exc, smtp.SMTPClientError):
        reply = _reply(exc.code, exc.resp)
        if isinstance(exc.code, int) and exc.code >= 500:
            return SendFailure("permanent", "SMTP error", reply)
        return SendFailure("transient", f"SMTP protocol error ({type(exc).__name__})", reply)

    # TLS handshake and certificate problems surface as the reason the connection was lost.
    module = type(exc).__module__ or ""
    if module.startswith("OpenSSL") or module.startswith("service_identity") or "VerificationError" in type(exc).__name__:
        text = _ssl_error_text(exc)
        hint = ""
        network = False
        if "certificate verify failed" in text or "VerificationError" in type(exc).__name__ or "verif" in text.lower():
            hint = " (private CA? set tls_ca_file=; name mismatch? set relayhost to the name in the certificate)"
        elif "wrong version number" in text or "packet length too long" in text:
            hint = " (is this really an SMTPS port? for STARTTLS on 587 use useTls=True, not useSmtps)"
        elif "unexpected eof" in text or "reset" in text.lower() or "syscall" in text.lower():
            network = True  # the peer went away mid-handshake: a network error, not a policy one
        return SendFailure("tls", f"TLS handshake with {ep} failed: {text}{hint}", transient=network)
    if isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return SendFailure("transient", f"{ep} closed the connection unexpectedly")
    if isinstance(exc, net_error.ConnectError):
        return SendFailure("refused" if "refused" in _text(exc).lower() else "transient", f"cannot connect to {ep}: {_text(exc)}")
    return SendFailure("transient", f"unexpected error {type(exc).__name__}: {_text(exc)}")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _tls_creator(settings: SmtpSettings) -> Any:
    """The client TLS options: verify certificate and host name unless tls_verify=False."""
    from twisted.internet import ssl

    if not settings.tls_verify:
        return ssl.CertificateOptions(verify=False)
    if settings.tls_ca_file:
        with open(settings.tls_ca_file, "rb") as f:
            pem = f.read()
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(settings.host, trustRoot=trust)


_QUEUE_ID_PATTERNS = (
    re.compile(r"\bqueued as ([A-Za-z0-9._-]+)", re.I),  # Postfix, aiosmtpd's examples
    re.compile(r"\bid=([A-Za-z0-9-]+)"),  # Exim: "250 OK id=1rX2Yz-0004Ab-Cd"
    re.compile(r"^\d{3} [245]\.\d+\.\d+ ([A-Za-z0-9]{8,}) Message accepted", re.I),  # Sendmail
    re.compile(r"\bqp (\d+)"),  # qmail: "250 ok 1700000000 qp 1234"
)


def parse_queue_id(reply: Optional[str]) -> Optional[str]:
    """The relay's queue id in a reply to DATA, for the common MTAs; None when not recognised."""
    for pattern in _QUEUE_ID_PATTERNS:
        match = pattern.search(reply or "")
        if match:
            return match.group(1)
    return None


@dataclass
class Delivery:
    """The outcome of ONE attempt to send ONE message. Never raised, always returned."""

    label: str
    endpoint: str  # settings.route_label() at the time of the attempt
    accepted: list[str] = field(default_factory=list)  # accepted, with 250 after DATA
    refused_permanently: dict[str, str] = field(default_factory=dict)  # recipient -> reply or cause
    refused_temporarily: dict[str, str] = field(default_factory=dict)  # recipient -> reply or cause
    failure: Optional[SendFailure] = None  # session/message-level failure; None when DATA was accepted
    reply: Optional[str] = None  # final reply after DATA
    queue_id: Optional[str] = None  # parsed from reply, when the relay's wording is known

    @property
    def delivered(self) -> bool:
        """At least one recipient accepted after DATA."""
        return bool(self.accepted)

    @classmethod
    def failed(cls, label: str, endpoint: str, recipients: Iterable[str], failure: SendFailure) -> "Delivery":
        """Nothing went out: every recipient refused for the same cause, temporarily or not."""
        d = cls(label, endpoint, failure=failure)
        refused = d.refused_temporarily if failure.transient else d.refused_permanently
        cause = f"{failure.kind}: {failure}" + (f" ({failure.reply})" if failure.reply else "")
        for r in recipients:
            refused[r] = cause
        return d


def _recipient_list(refused: dict[str, str]) -> str:
    return "; ".join(f"{r} ({why})" for r, why in refused.items())


def describe(delivery: Delivery) -> str:
    """The head of the one log line for this outcome, e.g.
    ``mail LABEL: delivered via relay:25 (plain SMTP) to a, b; SMTP reply: 250 ...``.

    The caller appends what it decided (``; retry in 30s``, ``; dead letter``)."""
    d = delivery
    if d.delivered:
        parts = [f"mail {d.label}: delivered via {d.endpoint} to {', '.join(d.accepted)}", f"SMTP reply: {d.reply or 'none'}"]
        if d.refused_permanently:
            parts.append(f"REJECTED permanently: {_recipient_list(d.refused_permanently)}")
        if d.refused_temporarily:
            parts.append(f"temporarily refused: {_recipient_list(d.refused_temporarily)}")
        return "; ".join(parts)
    f = d.failure or SendFailure("transient", "no outcome")
    return f"mail {d.label}: NOT delivered via {d.endpoint}: {f.kind}: {f}; SMTP reply: {f.reply or 'none'}"


@dataclass(eq=False)
class _Job:
    envelope_from: str
    recipients: list[str]
    message: bytes
    label: str
    deferred: Optional[defer.Deferred]  # None once fired

    def fire(self, delivery: Delivery) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(delivery)


class _SessionProtocol(smtp.ESMTPClient):
    """One SMTP session that sends every job it was given, one after the other.

    Twisted's SMTPClient calls getMailFrom() again after each message and QUITs when it
    returns None, so a list of jobs is all it takes to share a session.
    """

    debug = True  # keeps the transcript (in memory) so a timeout can name the last command

    def __init__(self, transport: "MailTransport", jobs: list[_Job], session_done: defer.Deferred):
        s = transport.settings
        secret = s.password.encode("utf-8") if isinstance(s.password, str) else s.password
        super().__init__(secret, transport._starttls_context, smtp.DNSNAME, logsize=20)
        user = s.user.encode("utf-8") if isinstance(s.user, str) else s.user
        # most secure first, as Twisted's ESMTPSender does
        self.registerAuthenticator(smtp.CramMD5ClientAuthenticator(user))
        self.registerAuthenticator(smtp.LOGINAuthenticator(user))
        self.registerAuthenticator(smtp.PLAINAuthenticator(user))
        self.heloFallback = not (s.uses_auth or s.tls == "starttls")
        self.requireAuthentication = bool(s.uses_auth)
        self.requireTransportSecurity = s.tls == "starttls"
        self.timeout = s.timeout  # TimeoutMixin: bounds the wait for every server reply
        self._owner = transport
        self._jobs = list(jobs)
        self._current: Optional[_Job] = None
        self._error: Optional[BaseException] = None
        self._session_done = session_done

    # -- SMTPClient hooks
    def getMailFrom(self) -> Optional[str]:
        if not self._jobs:
            return None
        self._current = self._jobs.pop(0)
        return self._current.envelope_from

    def getMailTo(self) -> list[str]:
        return list(self._current.recipients)

    def getMailData(self) -> BytesIO:
        # SMTPClient turns "\n" into CRLF itself; feeding it CRLF would double the CR.
        return BytesIO(self._current.message.replace(b"\r\n", b"\n"))

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: list, log_: Any) -> None:
        job, self._current = self._current, None
        if job is not None:
            job.fire(self._owner._outcome(job, code, resp, numOk, addresses))

    def sendError(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        super().sendError(exc)

    def connectionLost(self, reason: tw_failure.Failure = tw_failure.Failure(net_error.ConnectionDone())) -> None:
        super().connectionLost(reason)
        unfinished = ([self._current] if self._current else []) + self._jobs
        self._current, self._jobs = None, []
        if unfinished:
            self._owner._session_failed(unfinished, self._error or reason.value)
        d, self._session_done = self._session_done, None
        if d is not None:
            d.callback(None)


class _SessionFactory(protocol.ClientFactory):
    # Not "Starting factory ..." / "Stopping factory ..." in twistd.log for every mail:
    # the outcome line says all an operator needs.
    noisy = False

    def __init__(self, transport: "MailTransport", jobs: list[_Job], session_done: defer.Deferred):
        self._transport = transport
        self._jobs = jobs
        self._session_done = session_done

    def buildProtocol(self, addr: Any) -> _SessionProtocol:
        p = _SessionProtocol(self._transport, self._jobs, self._session_done)
        p.factory = self
        return p


class MailTransport:
    """Send messages through one SMTP relay without blocking the reactor.

    ``send()`` returns a Deferred that fires with one :class:`Delivery` per call; it never
    errbacks, never retries and keeps nothing once it fired. It logs nothing per message:
    the caller logs the outcome (see :func:`describe`).
    """

    def __init__(self, settings: SmtpSettings, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self._due: list[_Job] = []
        self._flush_call: Any = None
        self._sessions: set[defer.Deferred] = set()
        self._stopping = False
        self.settings = settings  # property: also builds the TLS options
        # Start-up warnings (tls_verify=False, plaintext AUTH) are logged by the notifier
        # once per (re)configuration: see SmtpSettings.startup_warnings().

    @property
    def settings(self) -> SmtpSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: SmtpSettings) -> None:
        """Replace the relay settings (reconfig): the next sessions use the new relay."""
        starttls_context = tls_creator = None
        if settings.tls != "none":
            # Built once per configuration: reading tls_ca_file and the platform trust store
            # for every mail would be waste.
            tls_creator = _tls_creator(settings)
            if settings.tls == "starttls":
                starttls_context = tls_creator
        self._settings = settings
        self._tls_creator = tls_creator
        self._starttls_context = starttls_context

    # -- public API
    def send(self, envelope_from: str, recipients: list[str], message: bytes, label: str) -> defer.Deferred:
        """Try once to send ``message``; the Deferred fires with a :class:`Delivery`."""
        d: defer.Deferred = defer.Deferred()
        if isinstance(message, str):
            message = message.encode("utf-8")
        job = _Job(envelope_from, list(recipients), message, label, d)
        endpoint = self.settings.route_label()
        if not job.recipients:
            job.fire(Delivery.failed(label, endpoint, [], SendFailure("permanent", "no recipients")))
        elif self._stopping:
            failure = SendFailure("transient", "not sent: the mail transport is stopping")
            job.fire(Delivery.failed(label, endpoint, job.recipients, failure))
        else:
            self._enqueue(job)
        return d

    def stop(self) -> defer.Deferred:
        """Let running sessions finish (each bounded by smtp_timeout) and fire."""
        self._stopping = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush_call = None
        if self._due:  # due this very turn: still try them once
            self._start_session(self._due)
            self._due = []
        d = defer.DeferredList(list(self._sessions), consumeErrors=True)

        def stopped(_: Any) -> None:
            self._stopping = False  # stopped: a restarted service may use this transport again

        d.addCallback(stopped)
        return d

    # -- scheduling
    def _enqueue(self, job: _Job) -> None:
        self._due.append(job)
        if self._flush_call is None:
            # Messages queued in the same reactor turn (e.g. several routes for one build)
            # leave together in one SMTP session.
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        jobs, self._due = self._due, []
        if jobs:
            self._start_session(jobs)

    def _endpoint(self) -> Any:
        s = self.settings
        if _is_ip_literal(s.host):
            # HostnameEndpoint waits out its 0.3 s "happy eyeballs" delay before reporting a
            # refused connection; an IP literal needs no race, and "refused" should be instant.
            cls = TCP6ClientEndpoint if ":" in s.host else TCP4ClientEndpoint
            endpoint = cls(self.reactor, s.host, s.port, timeout=s.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, s.host, s.port, timeout=s.timeout)
        if s.tls == "smtps":
            endpoint = wrapClientTLS(self._tls_creator, endpoint)
        return endpoint

    def _start_session(self, jobs: list[_Job]) -> None:
        session_done: defer.Deferred = defer.Deferred()
        self._sessions.add(session_done)
        session_done.addBoth(self._forget_session, session_done)
        factory = _SessionFactory(self, jobs, session_done)
        try:
            connecting = self._endpoint().connect(factory)
        except Exception as e:  # e.g. an unreadable tls_ca_file, checked at config time
            connecting = defer.fail(e)
        # HostnameEndpoint bounds each TCP attempt, but not name resolution; this bounds both.
        watchdog = self.reactor.callLater(self.settings.timeout, connecting.cancel)

        def connected(proto: Any) -> Any:
            if watchdog.active():
                watchdog.cancel()
            return proto

        def failed(f: tw_failure.Failure) -> None:
            if watchdog.active():
                watchdog.cancel()
            self._session_failed(jobs, f.value)
            if not session_done.called:
                session_done.callback(None)

        connecting.addCallbacks(connected, failed)

    def _forget_session(self, result: Any, d: defer.Deferred) -> Any:
        self._sessions.discard(d)
        return result

    # -- outcomes
    def _outcome(self, job: _Job, code: int, resp: bytes, numOk: int, addresses: list) -> Delivery:
        """One message went through MAIL/RCPT/DATA (maybe only partly): its Delivery."""
        delivery = Delivery(job.label, self.settings.route_label())
        per_rcpt = [(_text(a), c, _reply(c, r) or "") for a, c, r in addresses]
        rcpt_ok = [a for a, c, _ in per_rcpt if c in smtp.SUCCESS]
        for a, c, r in per_rcpt:
            if c not in smtp.SUCCESS:
                (delivery.refused_permanently if isinstance(c, int) and c >= 500 else delivery.refused_temporarily)[a] = r
        reply = _reply(code, resp)
        permanent = isinstance(code, int) and code >= 500

        if code in smtp.SUCCESS and numOk > 0:
            delivery.accepted = rcpt_ok
            delivery.reply = reply
            delivery.queue_id = parse_queue_id(reply)
            return delivery
        if not addresses and isinstance(code, int) and code > 0:  # MAIL FROM refused
            failure = SendFailure("permanent" if permanent else "transient", "sender refused", reply, job.recipients)
            return Delivery.failed(job.label, delivery.endpoint, job.recipients, failure)
        if rcpt_ok and isinstance(code, int) and code > 0:  # recipients OK, end of DATA refused
            failure = SendFailure("permanent" if permanent else "transient", "message refused after DATA", reply, rcpt_ok)
            refused = delivery.refused_permanently if permanent else delivery.refused_temporarily
            for a in rcpt_ok:
                refused[a] = reply or ""
            delivery.failure = failure
            return delivery
        # Every recipient refused.
        if delivery.refused_temporarily:
            details = _recipient_list({**delivery.refused_temporarily, **delivery.refused_permanently})
            delivery.failure = SendFailure("transient", "recipient(s) temporarily refused", details, list(delivery.refused_temporarily))
        else:
            details = _recipient_list(delivery.refused_permanently) or _text(resp)
            delivery.failure = SendFailure("permanent", f"every recipient rejected: {details}", None, list(delivery.refused_permanently))
        return delivery

    def _session_failed(self, jobs: Iterable[_Job], exc: BaseException) -> None:
        failure = classify(exc, self.settings)
        endpoint = self.settings.route_label()
        for job in jobs:
            job.fire(Delivery.failed(job.label, endpoint, job.recipients, failure))
