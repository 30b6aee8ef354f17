"""Real SMTP servers on loopback for tests: aiosmtpd in its own thread, plus the two ways a
relay fails before SMTP even starts (a closed port, a listener that never answers).

Reusable by every test module::

    from smtp_servers import SmtpServer, TestCA, closed_port, BlackHole   # tests/ is on sys.path under pytest

    with SmtpServer() as srv:                       # plain SMTP on 127.0.0.1:<free port>
        ...send to srv.host, srv.port...
        srv.messages[0].mail_from / .rcpt_tos / .data (raw bytes as received)

    ca = TestCA(tmpdir)                             # a CA made in the test, with `cryptography`
    with SmtpServer(tls=ca.server_context()) ...    # STARTTLS (ca.ca_file is the PEM to trust)
    with SmtpServer(smtps=ca.server_context()) ...  # implicit TLS
    with SmtpServer(auth={"user": "secret"}) ...    # AUTH PLAIN/LOGIN (over plain TCP too)
    with SmtpServer(rcpt_replies={"bad@x": "550 5.1.1 <bad@x>: unknown"}) ...
    with SmtpServer(rcpt_replies={"*": "451 4.3.0 try later"}) ...    # every recipient
    with SmtpServer(data_reply="451 4.3.0 queue full") ...
    srv.data_replies = ["451 4.3.0 later"] * 2       # the next two DATA get 451, then 250
    with SmtpServer(mail_reply="553 5.7.1 <x@y>: Sender address rejected") ...

    with SmtpServer(pipelining=True) ...            # advertise PIPELINING (aiosmtpd reads commands in order anyway)
    with SmtpServer(idle_timeout=0.3) ...           # close a connection silent for 0.3 s, as MTAs do
    with SmtpServer(messages_per_connection=1) ...  # drop the connection, unanswered, at the next MAIL
    with SmtpServer(delays={"DATA": 2.0}) ...       # answer these commands late ("*": every one)

    with closed_port() as port: ...                 # connecting is refused at once
    with BlackHole() as bh: ...bh.port...           # TCP connects, no greeting ever comes

Each server records what it received in ``messages`` (thread-safe list of
:class:`Received`) and, in ``commands``, each command as ``(client address, VERB)`` in
order (EHLO, HELO, MAIL, RCPT, DATA, RSET, QUIT): ``len({peer for peer, _ in commands})`` is
the number of SMTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

LOOPBACK = "127.0.0.1"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # the message as it went over the wire (after dot-unstuffing), CRLF line ends


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (aiosmtpd's Controller cannot bind port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, server: "SmtpServer"):
        self.server = server

    async def _saw(self, session, verb: str) -> None:
        with self.server._lock:
            self.server.commands.append((session.peer, verb))
        delays = self.server.delays
        delay = delays.get(verb, delays.get("*", 0))
        if delay:
            await asyncio.sleep(delay)

    async def handle_EHLO(self, srv, session, envelope, hostname, responses):
        await self._saw(session, "EHLO")
        session.host_name = hostname  # what aiosmtpd does when there is no hook
        if self.server.pipelining:
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, srv, session, envelope, hostname):
        await self._saw(session, "HELO")
        session.host_name = hostname
        return f"250 {srv.hostname}"

    async def handle_RSET(self, srv, session, envelope):
        await self._saw(session, "RSET")
        return "250 OK"

    async def handle_QUIT(self, srv, session, envelope):
        await self._saw(session, "QUIT")
        return "221 Bye"

    async def handle_MAIL(self, srv, session, envelope, address, mail_options):
        await self._saw(session, "MAIL")
        limit = self.server.messages_per_connection
        if limit is not None and sum(1 for peer, verb in self.server.commands if peer == session.peer and verb == "DATA") >= limit:
            srv.transport.close()  # as if the server had closed it while the client was not looking
        if self.server.mail_reply:
            return self.server.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, srv, session, envelope, address, rcpt_options):
        await self._saw(session, "RCPT")
        replies = self.server.rcpt_replies
        reply = replies.get(address) or replies.get(address.lower()) or replies.get("*")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, srv, session, envelope):
        await self._saw(session, "DATA")
        with self.server._lock:
            scripted = self.server.data_replies.pop(0) if self.server.data_replies else None
        if scripted:
            return scripted
        if self.server.data_reply:
            return self.server.data_reply
        with self.server._lock:
            self.server.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content or b""))
            )
            n = len(self.server.messages)
        return f"250 OK queued as {n}"


class SmtpServer:
    """An aiosmtpd server on loopback. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        host: str = LOOPBACK,
        tls: Optional[ssl.SSLContext] = None,  # offer STARTTLS with this context
        smtps: Optional[ssl.SSLContext] = None,  # implicit TLS with this context
        require_starttls: bool = False,
        auth: Optional[dict[str, str]] = None,  # user -> password
        rcpt_replies: Optional[dict[str, str]] = None,
        data_reply: Optional[str] = None,
        mail_reply: Optional[str] = None,  # answer to every MAIL FROM (e.g. "553 5.7.1 not yours")
        server_hostname: str = "smtp-test.localdomain",
        pipelining: bool = False,  # advertise PIPELINING in the EHLO reply
        idle_timeout: Optional[float] = None,  # close a connection idle this long (aiosmtpd: 300 s)
        messages_per_connection: Optional[int] = None,
        delays: Optional[dict[str, float]] = None,  # verb (or "*") -> seconds before the reply
    ):
        self.host = host
        self.port = 0
        self.messages: list[Received] = []
        self.commands: list[tuple[object, str]] = []
        self.pipelining = pipelining
        self.messages_per_connection = messages_per_connection
        self.delays = dict(delays or {})
        self.auth_attempts: list[tuple[str, bool]] = []
        self.rcpt_replies = dict(rcpt_replies or {})
        self.data_reply = data_reply
        # Answers for the next DATA commands, one each, before data_reply / 250 apply again
        # (e.g. ["451 4.3.0 try later"] * 2: accepted at the third attempt).
        self.data_replies: list[str] = []
        self.mail_reply = mail_reply
        self._lock = threading.Lock()
        self._auth = auth
        kwargs: dict = {"server_hostname": server_hostname}  # never getfqdn(): no DNS in tests
        if idle_timeout is not None:
            kwargs["timeout"] = idle_timeout
        if tls is not None:
            kwargs.update(tls_context=tls, require_starttls=require_starttls)
        if smtps is not None:
            kwargs["ssl_context"] = smtps
        if auth is not None:
            # auth_require_tls=False: the plaintext-AUTH path must be testable too
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        self._kwargs = kwargs
        self._controller: Optional[Controller] = None

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = False
        user = ""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            ok = self._auth.get(user) == auth_data.password.decode("utf-8", "replace")
        with self._lock:
            self.auth_attempts.append((user, ok))
        # handled=False: aiosmtpd then answers 235 / 535 itself
        return AuthResult(success=ok, handled=False)

    def sessions(self) -> int:
        """How many SMTP sessions (client connections that said EHLO/HELO) the server saw."""
        with self._lock:
            return len({peer for peer, _ in self.commands})

    def verbs(self) -> list[str]:
        with self._lock:
            return [verb for _, verb in self.commands]

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self, port: Optional[int] = None) -> "SmtpServer":
        """Listen on a free port, or on ``port`` (a relay coming back where it was)."""
        last: Optional[BaseException] = None
        for _ in range(1 if port else 5):  # free_port() can race with another test
            self.port = port or free_port(self.host)
            ctl = Controller(_Handler(self), hostname=self.host, port=self.port, **self._kwargs)
            try:
                ctl.start()
            except Exception as e:  # port taken meanwhile
                last = e
                continue
            self._controller = ctl
            return self
        raise RuntimeError(f"could not start aiosmtpd on {self.host}: {last}")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> "SmtpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def closed_port(host: str = LOOPBACK) -> Iterator[int]:
    """A loopback port where nothing listens: connect() is refused immediately.

    The socket stays bound (but not listening) for the duration, so no other test can
    start listening there by accident.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        yield s.getsockname()[1]
    finally:
        s.close()


class BlackHole:
    """A listening socket that never accepts or answers: TCP connects (the kernel completes
    the handshake into the backlog), but no SMTP greeting ever arrives."""

    def __init__(self, host: str = LOOPBACK):
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.bind((host, 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BlackHole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TestCA:
    """A throwaway certificate authority and a server certificate signed by it.

    ``ca_file`` is the PEM the client must trust (``tls_ca_file=``). The server certificate
    names ``localhost``, 127.0.0.1 and ::1 unless ``server_names`` says otherwise (use a
    foreign name to test host-name mismatch).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: str, server_names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "buildbot-mailext test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        os.makedirs(directory, exist_ok=True)
        self.ca_file = os.path.join(directory, "test-ca.pem")
        self.cert_file = os.path.join(directory, "server-cert.pem")
        self.key_file = os.path.join(directory, "server-key.pem")
        with open(self.ca_file, "wb") as f:
            f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key_file, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx
