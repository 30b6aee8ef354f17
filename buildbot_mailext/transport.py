"""Sending mail: one SMTP relay, Twisted's non-blocking SMTP client, classified outcomes.

This module owns :class:`MailTransport` (what finished messages are handed to),
:class:`Delivery` (the outcome of one attempt to send one message) and :class:`SendFailure`
(the classification of everything that can go wrong on the way: ``refused``, ``dns``,
``timeout``, ``tls``, ``auth``, ``transient`` (4xx) and ``permanent`` (5xx)).

Why not stock ``ESMTPSenderFactory``: it retries a refused connection five times within the
same second, errbacks into nobody's hands ("Unhandled error in Deferred") and sends one
message per connection, with Nagle's algorithm holding every closing dot ~40 ms. Here
messages wait in one queue shared by at most ``max_sessions`` SMTP sessions (an
``ESMTPClient`` subclass, :class:`_Session`, that runs the mail transactions itself:
PIPELINING, no RSET after success, TCP_NODELAY); a session without work waits
``cache_time`` in a connection cache, as Postfix's. Every attempt ends in one
:class:`Delivery` (the Deferred handed back never errbacks, and every wait is bounded by
``smtp_timeout``).

The transport does not retry and does not log per message: what happens after an attempt
(retry later, dead letter) belongs to the caller, which logs one line per outcome with
:func:`describe` so that the wording lives here, next to the classification.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field
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
    tls: Optional[str] = None  # e.g. "TLSv1.3 (TLS_AES_256_GCM_SHA384), certificate verified for relay"

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


# -- how the message goes on the wire

_BODY_CHUNK = 64 * 1024  # larger bodies are written as the socket drains (and reset the timeout)


def wire_form(message: bytes) -> bytes:
    """The message as it follows DATA: CRLF line ends, dot-stuffed, ending in ``CRLF.CRLF``.

    Built once per message, so that the body and the closing dot leave in ONE write: sent as
    two small segments, Nagle's algorithm would hold the dot until the server's delayed ACK.
    """
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _set_no_delay(transport: Any) -> bool:
    """TCP_NODELAY on the socket under ``transport`` (through a TLS wrapper, if any).

    SMTP is request/response: nothing is gained by coalescing, and a small last segment held
    back until the peer's delayed ACK costs ~40 ms per command."""
    t = transport
    for _ in range(3):
        if t is None:
            return False
        if hasattr(t, "setTcpNoDelay"):
            try:
                t.setTcpNoDelay(True)
                return True
            except (AttributeError, OSError):  # not a TCP socket (e.g. a test transport)
                return False
        t = getattr(t, "transport", None)
    return False


@dataclass(eq=False)
class _Job:
    envelope_from: str
    recipients: list[str]
    wire: bytes  # wire_form(message)
    label: str
    deferred: Optional[defer.Deferred]  # None once fired
    requeued: bool = False  # already moved once off a connection the server had closed

    def fire(self, delivery: Delivery) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            d.callback(delivery)


def _outcome(job: _Job, endpoint: str, code: int, resp: bytes, numOk: int, addresses: list) -> Delivery:
    """One message went through MAIL/RCPT/DATA (maybe only partly): its Delivery."""
    delivery = Delivery(job.label, endpoint)
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
    if rcpt_ok and isinstance(code, int) and code > 0:  # recipients OK, DATA refused
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


class _BodyWriter:
    """Writes a large body as the socket drains (a push producer), so that the wait for the
    reply is bounded by smtp_timeout per 64 KiB handed to the kernel, not for the whole body."""

    def __init__(self, session: "_Session", data: bytes):
        self._session = session
        self._data = data
        self._offset = 0
        self._paused = False

    def start(self) -> None:
        self._session.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._session.resetTimeout()
        transport = self._session.transport
        while not self._paused and self._offset < len(self._data):
            chunk = self._data[self._offset : self._offset + _BODY_CHUNK]
            self._offset += len(chunk)
            transport.write(chunk)  # may call pauseProducing() before it returns
        if self._offset >= len(self._data) and self._session.transport is not None:
            self._offset = len(self._data) + 1  # unregister once
            transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = True
        self._offset = len(self._data) + 1


class _Session(smtp.ESMTPClient):
    """One SMTP connection. Twisted's ESMTPClient does the setup (greeting, EHLO or HELO,
    STARTTLS, AUTH); the mail transactions are ours, so that a session can:

    - ask its :class:`MailTransport` for the next message whenever it is free (the queue is
      shared between sessions), and wait in the connection cache when there is none;
    - pipeline MAIL, RCPT and DATA when the server offers PIPELINING (RFC 2920);
    - skip RSET after a transaction that ended with the reply to the message (RSET only
      when a transaction stays open: every RCPT refused, or DATA refused);
    - write the body and the closing dot in one go (TCP_NODELAY set at connect).
    """

    debug = True  # keeps the transcript (in memory) so a timeout can name the last command

    def __init__(self, owner: "MailTransport", settings: SmtpSettings, generation: int, starttls_context: Any):
        s = settings
        secret = s.password.encode("utf-8") if isinstance(s.password, str) else s.password
        super().__init__(secret, starttls_context, smtp.DNSNAME, logsize=20)
        user = s.user.encode("utf-8") if isinstance(s.user, str) else s.user
        # most secure first, as Twisted's ESMTPSender does
        self.registerAuthenticator(smtp.CramMD5ClientAuthenticator(user))
        self.registerAuthenticator(smtp.LOGINAuthenticator(user))
        self.registerAuthenticator(smtp.PLAINAuthenticator(user))
        self.heloFallback = not (s.uses_auth or s.tls == "starttls")
        self.requireAuthentication = bool(s.uses_auth)
        self.requireTransportSecurity = s.tls == "starttls"
        self.timeout = s.timeout  # TimeoutMixin: bounds the wait for every server reply
        self.settings = settings
        self.generation = generation
        self._owner = owner
        self.ready = False  # set up (EHLO, STARTTLS, AUTH done): can carry mail
        self.idle = False  # in the connection cache
        self.closed: defer.Deferred = defer.Deferred()  # fires once the connection is gone
        self.current: Optional[_Job] = None
        self.transactions = 0  # transactions finished on this connection
        self.pipelining = False
        self._error: Optional[BaseException] = None
        self._idle_timer: Any = None
        self._pending: deque = deque()  # replies still due, in order: (verb, argument)
        self._unsent: deque = deque()  # commands not yet sent (without PIPELINING)
        self._got_reply = False  # the current transaction had a reply
        self._reused = False  # the current transaction is not the first on this connection
        self._mail_reply: tuple = (-1, b"")
        self._rcpt: list = []  # (address, code, resp)

    # -- set-up, done by Twisted
    def connectionMade(self) -> None:
        _set_no_delay(self.transport)
        super().connectionMade()

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        # EHLO's answer (again after STARTTLS): which extensions the server offers
        self.pipelining = any(line.split()[:1] == [b"PIPELINING"] for line in resp.upper().splitlines())
        super().esmtpState_serverConfig(code, resp)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        """Twisted calls this when the session is set up: from here on, replies are ours."""
        self.ready = True
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = self._on_reply
        self._owner._session_free(self)

    def sendError(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        super().sendError(exc)

    def timeoutConnection(self) -> None:
        # No reply within smtp_timeout: nothing more is worth waiting for, not even a QUIT
        # or a TLS close_notify.
        if self._error is None:
            self._error = smtp.SMTPTimeoutError(-1, b"Timeout waiting for SMTP server response", self.log.str())
        self.transport.abortConnection()

    # -- the transport hands out work
    def begin(self, job: _Job) -> None:
        """Start the transaction for ``job``."""
        self._leave_cache()
        self.current = job
        self._reused = self.transactions > 0
        self._got_reply = False
        self._mail_reply, self._rcpt = (-1, b""), []
        commands = [("MAIL", None, b"MAIL FROM:" + smtp.quoteaddr(job.envelope_from))]
        commands += [("RCPT", r, b"RCPT TO:" + smtp.quoteaddr(r)) for r in job.recipients]
        commands.append(("DATA", None, b"DATA"))
        if self.pipelining:
            for verb, arg, line in commands:
                self.log.append(b">>> " + line)
                self._pending.append((verb, arg))
            self.transport.write(b"\r\n".join(line for _, _, line in commands) + b"\r\n")
        else:
            self._unsent.extend(commands)
            self._send_next()

    def park(self, idle_time: float, reactor: Any) -> None:
        """Wait in the connection cache for the next message, at most ``idle_time``."""
        self.idle = True
        self.setTimeout(None)  # idle is bounded by the cache time, not by smtp_timeout
        self._idle_timer = reactor.callLater(idle_time, self._owner._cache_expired, self)

    def quit(self) -> None:
        """Close cleanly with QUIT (the reply is awaited at most smtp_timeout)."""
        self._leave_cache()
        if self.transport is None or not self.connected:
            return
        self._unsent.clear()
        self._pending.append(("QUIT", None))
        self.sendLine(b"QUIT")

    def _leave_cache(self) -> None:
        self.idle = False
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self.setTimeout(self.timeout)

    # -- replies
    def _send_next(self) -> None:
        verb, arg, line = self._unsent.popleft()
        self._pending.append((verb, arg))
        self.sendLine(line)

    def _on_reply(self, code: int, resp: bytes) -> None:
        if not self._pending:
            # Nothing asked: a cached connection hears "421 idle timeout" before the server
            # closes it. Close our side too; the cache forgets it in connectionLost.
            self.transport.loseConnection()
            return
        verb, arg = self._pending.popleft()
        first, self._got_reply = not self._got_reply, True
        if first and self._reused and code == 421 and self.current is not None:
            # The server is closing this connection (idle too long, too many messages):
            # the message goes on a new session, without counting as an attempt.
            self._got_reply = False
            self.transport.loseConnection()
            return
        getattr(self, "_reply_" + verb)(code, resp, arg)

    def _reply_MAIL(self, code: int, resp: bytes, _: Any) -> None:
        self._mail_reply = (code, resp)
        if not self.pipelining:
            if code in smtp.SUCCESS:
                self._send_next()
            else:  # no transaction was opened: nothing to reset
                self._unsent.clear()
                self._finish(code, resp, rset=False)

    def _reply_RCPT(self, code: int, resp: bytes, address: str) -> None:
        self._rcpt.append((address, code, resp))
        if not self.pipelining:
            if self._unsent[0][0] == "RCPT" or self._accepted():
                self._send_next()
            else:  # every recipient refused: DATA is pointless, the transaction is open
                self._unsent.clear()
                self._finish(code, resp, rset=True)

    def _reply_DATA(self, code: int, resp: bytes, _: Any) -> None:
        if code == 354 and self._accepted():
            self._pending.append(("BODY", None))
            self.log.append(b">>> .")
            data = self.current.wire
            if len(data) <= _BODY_CHUNK:
                self.transport.write(data)
            else:
                _BodyWriter(self, data).start()
        elif code == 354:
            # A server that wants data for a refused transaction: end it empty, then reset.
            self._pending.append(("BODY", "aborted"))
            self.transport.write(b".\r\n")
        else:
            self._finish(code, resp, rset=self._mail_reply[0] in smtp.SUCCESS)

    def _reply_BODY(self, code: int, resp: bytes, aborted: Any) -> None:
        self._finish(code, resp, rset=bool(aborted))

    def _reply_RSET(self, code: int, resp: bytes, _: Any) -> None:
        self._owner._session_free(self)

    def _reply_QUIT(self, code: int, resp: bytes, _: Any) -> None:
        self.transport.loseConnection()

    def _tls_facts(self) -> Optional[str]:
        """What protected this session, for the CLI's send-test (None in clear text)."""
        if not self._tlsMode:
            return None
        try:
            conn = self.transport.getHandle()  # the OpenSSL connection under STARTTLS or SMTPS
            facts = f"{conn.get_protocol_version_name()} ({conn.get_cipher_name()})"
        except Exception:  # not an OpenSSL connection: say what we know
            facts = "TLS"
        if self.settings.tls_verify:
            return f"{facts}, certificate verified for {self.settings.host}"
        return f"{facts}, certificate NOT verified (tls_verify=False)"

    def _accepted(self) -> bool:
        return any(c in smtp.SUCCESS for _, c, _ in self._rcpt)

    def _finish(self, code: int, resp: bytes, rset: bool) -> None:
        """The transaction is over: hand its Delivery back, then go on."""
        job, self.current = self.current, None
        self.transactions += 1
        mail_ok = self._mail_reply[0] in smtp.SUCCESS
        if mail_ok:
            accepted = sum(1 for _, c, _ in self._rcpt if c in smtp.SUCCESS)
            outcome = _outcome(job, self.settings.route_label(), code, resp, accepted, self._rcpt)
        else:  # with PIPELINING, the RCPT replies only echo the refused MAIL
            outcome = _outcome(job, self.settings.route_label(), self._mail_reply[0], self._mail_reply[1], 0, [])
        outcome.tls = self._tls_facts()
        if rset:
            self._pending.append(("RSET", None))
            self.sendLine(b"RSET")
        job.fire(outcome)
        if not rset and self.connected and self.current is None and not self._pending:
            self._owner._session_free(self)

    def connectionLost(self, reason: tw_failure.Failure = tw_failure.Failure(net_error.ConnectionDone())) -> None:
        super().connectionLost(reason)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        job, self.current = self.current, None
        stale = job is not None and self._reused and not self._got_reply
        self._owner._session_lost(self, job, self._error or reason.value, stale)
        self.closed.callback(None)


class _SessionFactory(protocol.ClientFactory):
    # Not "Starting factory ..." / "Stopping factory ..." in twistd.log for every session:
    # the outcome line says all an operator needs.
    noisy = False

    def __init__(self, session: _Session):
        self._session = session

    def buildProtocol(self, addr: Any) -> _Session:
        self._session.factory = self
        return self._session


class MailTransport:
    """Send messages through one SMTP relay without blocking the reactor.

    ``send()`` returns a Deferred that fires with one :class:`Delivery` per call; it never
    errbacks, never retries and keeps nothing once it fired. It logs nothing per message:
    the caller logs the outcome (see :func:`describe`).

    Messages wait in one queue shared by at most ``settings.max_sessions`` SMTP sessions;
    a session that runs out of mail stays open ``settings.cache_time`` seconds for the next
    one (Postfix's connection cache), then says QUIT.
    """

    # Another session is opened when the queue holds more than this many messages per
    # session already open: a few mails share one session, a burst is split between several.
    SHARE = 4

    def __init__(self, settings: SmtpSettings, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self._queue: deque = deque()
        self._sessions: set[_Session] = set()  # every open or opening connection
        self._idle: list[_Session] = []  # the connection cache, most recently used last
        self._pump_call: Any = None
        self._stopping = False
        self._generation = 0
        self.settings = settings  # property: also builds the TLS options
        # Start-up warnings (tls_verify=False, plaintext AUTH) are logged by the notifier
        # once per (re)configuration: see SmtpSettings.startup_warnings().

    @property
    def settings(self) -> SmtpSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: SmtpSettings) -> None:
        """Replace the relay settings (reconfig): the next sessions use the new relay, the
        cached connections are closed, running sessions finish their message and close."""
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
        self._generation += 1
        self._session_limit = settings.max_sessions
        self._close_cache()
        if self._queue:
            self._schedule_pump()

    # -- public API
    def send(self, envelope_from: str, recipients: list[str], message: bytes, label: str) -> defer.Deferred:
        """Try once to send ``message``; the Deferred fires with a :class:`Delivery`."""
        d: defer.Deferred = defer.Deferred()
        if isinstance(message, str):
            message = message.encode("utf-8")
        recipients = list(recipients)
        if not recipients:
            failure = SendFailure("permanent", "no recipients")
            d.callback(Delivery.failed(label, self.settings.route_label(), [], failure))
        elif self._stopping:
            failure = SendFailure("transient", "not sent: the mail transport is stopping")
            d.callback(Delivery.failed(label, self.settings.route_label(), recipients, failure))
        else:
            self._queue.append(_Job(envelope_from, recipients, wire_form(message), label, d))
            self._schedule_pump()
        return d

    def stop(self) -> defer.Deferred:
        """Close the cached connections with QUIT, let running transactions finish (each
        reply bounded by smtp_timeout), answer what is still queued, and fire."""
        self._stopping = True
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self._fail_queue(SendFailure("transient", "not sent: the mail transport is stopping"))
        self._close_cache()
        d = defer.DeferredList([s.closed for s in self._sessions])

        def stopped(_: Any) -> None:
            self._stopping = False  # stopped: a restarted service may use this transport again

        return d.addCallback(stopped)

    # -- sessions
    def _schedule_pump(self) -> None:
        if self._pump_call is None:
            # Messages queued in the same reactor turn (e.g. several routes for one build)
            # are split between sessions together.
            self._pump_call = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        while self._queue and self._idle:
            self._idle.pop().begin(self._queue.popleft())
        if not self._queue:
            return
        busy = len(self._sessions) - len(self._idle)
        wanted = -(-len(self._queue) // self.SHARE)  # ceil
        for _ in range(min(self._session_limit - busy, wanted - busy)):
            self._open_session()

    def _session_free(self, session: _Session) -> None:
        """``session`` is set up, or finished a message: give it the next one, cache it, or close it."""
        if session.generation != self._generation or self._stopping:
            session.quit()
        elif self._queue:
            session.begin(self._queue.popleft())
        elif self.settings.cache_time > 0:
            session.park(self.settings.cache_time, self.reactor)
            self._idle.append(session)
        else:
            session.quit()
        if not self._queue:
            self._session_limit = self.settings.max_sessions

    def _cache_expired(self, session: _Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
        session.quit()

    def _close_cache(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            session.quit()

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

    def _open_session(self) -> None:
        session = _Session(self, self.settings, self._generation, self._starttls_context)
        self._sessions.add(session)
        try:
            connecting = self._endpoint().connect(_SessionFactory(session))
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
            self._session_lost(session, None, f.value, False)
            session.closed.callback(None)

        connecting.addCallbacks(connected, failed)

    def _session_lost(self, session: _Session, job: Optional[_Job], exc: BaseException, stale: bool) -> None:
        """A connection is gone (or never came): account for the message it carried."""
        self._sessions.discard(session)
        if session in self._idle:
            self._idle.remove(session)
        if job is not None:
            if stale and not job.requeued:
                # A reused connection the server had closed meanwhile: not an attempt.
                job.requeued = True
                self._queue.appendleft(job)
            else:
                self._fail([job], classify(exc, session.settings), session.settings.route_label())
        if not session.ready and session.generation == self._generation:
            others = [s for s in self._sessions if s.generation == self._generation]
            if not others:
                # Nobody can reach the relay: every queued message gets this outcome.
                self._fail_queue(classify(exc, self.settings))
            else:
                # The relay takes fewer sessions than we tried: carry on with those open.
                self._session_limit = max(1, len(others))
        if self._queue and not self._stopping:
            self._schedule_pump()

    # -- outcomes
    def _fail(self, jobs: Iterable[_Job], failure: SendFailure, endpoint: Optional[str] = None) -> None:
        endpoint = endpoint or self.settings.route_label()
        for job in jobs:
            job.fire(Delivery.failed(job.label, endpoint, job.recipients, failure))

    def _fail_queue(self, failure: SendFailure) -> None:
        jobs, self._queue = list(self._queue), deque()
        self._fail(jobs, failure)
