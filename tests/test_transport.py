"""transport.py against real SMTP servers on loopback (aiosmtpd in a thread), a closed port
and a black-hole listener. Assertions are on what the server received and on the one log
line the operator reads."""

import os
import shutil
import socket
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from zope.interface import implementer
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext.relay import SmtpSettings
from buildbot_mailext.transport import _Session, Delivery, MailTransport, SendFailure, classify, describe, parse_queue_id
from smtp_servers import BlackHole, SmtpServer, TestCA, closed_port


def closed_port_number():
    with closed_port() as port:
        return port

MSG = (
    b"From: Buildbot <bb@example.org>\nTo: dev@example.org\nSubject: build #12 failed\n"
    b"Message-ID: <12@bb>\n\nline one\n.line starting with a dot\n"
)


class _RealServersTestCase(unittest.TestCase):
    def setUp(self):
        self.lines = []

        def observer(event):
            if event.get("isError"):
                self.lines.append("ERROR " + str(event.get("why") or event.get("failure")))
            text = log.textFromEventDict(event)
            if text and (text.startswith("mail ") or text.startswith("mailext:")):
                self.lines.append(text)

        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)
        self.servers = []
        self.transports = []

    def tearDown(self):
        d = defer.DeferredList([t.stop() for t in self.transports])

        def stop_servers(_):
            for s in self.servers:
                s.stop()
            # The transport reports outcomes; it logs nothing per message, and nothing
            # reaches Twisted's "Unhandled error" path.
            self.assertEqual(self.lines, [])

        return d.addCallback(stop_servers)

    def tempdir(self):
        # not self.mktemp(): under pytest it would create folders in the current directory
        path = tempfile.mkdtemp(prefix="mailext-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def server(self, **kw):
        s = SmtpServer(**kw).start()
        self.servers.append(s)
        return s

    def transport(self, port, host="127.0.0.1", **kw):
        kw.setdefault("timeout", 5)
        t = MailTransport(SmtpSettings(host=host, port=port, **kw), reactor=reactor)
        self.transports.append(t)
        return t

    def assertDescribed(self, delivery, *words):
        line = describe(delivery)
        self.assertNotIn("\n", line)
        for w in words:
            self.assertIn(w, line)
        return line


class TransportTestCase(_RealServersTestCase):
    # -- success paths
    @defer.inlineCallbacks
    def test_plain_delivery_bytes_and_outcome(self):
        srv = self.server()
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org", "qa@example.org"], MSG, "route 'dev' build 'runtests' #12 <12@bb>")
        self.assertIsInstance(d, Delivery)
        self.assertTrue(d.delivered)
        self.assertEqual(d.accepted, ["dev@example.org", "qa@example.org"])
        self.assertEqual((d.refused_permanently, d.refused_temporarily, d.failure), ({}, {}, None))
        self.assertEqual(d.reply, "250 OK queued as 1")
        self.assertEqual(d.queue_id, "1")
        self.assertEqual(d.endpoint, f"127.0.0.1:{srv.port} (plain SMTP)")
        self.assertIsNone(d.tls)
        (m,) = srv.messages
        self.assertEqual(m.mail_from, "bb@example.org")
        self.assertEqual(m.rcpt_tos, ["dev@example.org", "qa@example.org"])
        # CRLF on the wire, dot-stuffing undone by the server: the message arrives unchanged
        self.assertEqual(m.data, MSG.replace(b"\n", b"\r\n"))
        self.assertEqual(
            describe(d),
            f"mail route 'dev' build 'runtests' #12 <12@bb>: delivered via 127.0.0.1:{srv.port} (plain SMTP) "
            "to dev@example.org, qa@example.org; SMTP reply: 250 OK queued as 1",
        )

    @defer.inlineCallbacks
    def test_crlf_input_is_not_doubled(self):
        srv = self.server()
        t = self.transport(srv.port)
        yield t.send("bb@example.org", ["dev@example.org"], MSG.replace(b"\n", b"\r\n"), "crlf")
        self.assertEqual(srv.messages[0].data, MSG.replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_messages_due_together_share_one_session(self):
        srv = self.server()
        t = self.transport(srv.port)
        results = yield defer.gatherResults([
            t.send("bb@example.org", ["a@example.org"], MSG, "m1"),
            t.send("bb@example.org", ["b@example.org"], MSG, "m2"),
            t.send("bb@example.org", ["c@example.org"], MSG, "m3"),
        ])
        self.assertEqual([r.delivered for r in results], [True, True, True])
        self.assertEqual([r.label for r in results], ["m1", "m2", "m3"])
        self.assertEqual(srv.sessions(), 1)  # one SMTP session for three messages
        self.assertEqual([m.rcpt_tos for m in srv.messages], [["a@example.org"], ["b@example.org"], ["c@example.org"]])
        # and no RSET between messages: each transaction ended with the reply to its data
        self.assertEqual(srv.verbs(), ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3)

    @defer.inlineCallbacks
    def test_no_recipients_is_a_permanent_failure(self):
        t = self.transport(closed_port_number())
        d = yield t.send("bb@example.org", [], MSG, "nobody")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "permanent")
        self.assertDescribed(d, "nobody", "NOT delivered", "no recipients")

    @defer.inlineCallbacks
    def test_starttls_with_test_ca(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context(), require_starttls=True)
        t = self.transport(srv.port, tls="starttls", tls_ca_file=ca.ca_file)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "tls-ok")
        self.assertTrue(d.delivered)
        self.assertEqual(len(srv.messages), 1)
        self.assertDescribed(d, "tls-ok", "STARTTLS", "delivered")
        self.assertRegex(d.tls, r"^TLSv1\.[23] \(\S+\), certificate verified for 127\.0\.0\.1$")

    @defer.inlineCallbacks
    def test_starttls_without_ca_file_fails_verification(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "tls-bad")
        self.assertFalse(d.delivered)
        self.assertEqual(srv.messages, [])
        self.assertEqual(d.failure.kind, "tls")
        self.assertFalse(d.failure.transient)
        self.assertEqual(list(d.refused_permanently), ["dev@example.org"])  # the outbox's dead letter
        self.assertEqual(d.refused_temporarily, {})
        self.assertDescribed(d, "tls-bad", "tls:", "certificate verify failed", "tls_ca_file")

    @defer.inlineCallbacks
    def test_hostname_mismatch_fails(self):
        ca = TestCA(self.tempdir(), server_names=("mail.example.test",))
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls", tls_ca_file=ca.ca_file)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "mismatch")
        self.assertFalse(d.delivered)
        self.assertEqual(srv.messages, [])
        self.assertEqual(d.failure.kind, "tls")
        self.assertDescribed(d, "mismatch", "tls:")

    @defer.inlineCallbacks
    def test_smtps_with_test_ca(self):
        ca = TestCA(self.tempdir())
        srv = self.server(smtps=ca.server_context())
        t = self.transport(srv.port, tls="smtps", tls_ca_file=ca.ca_file)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "smtps")
        self.assertTrue(d.delivered)
        self.assertEqual(len(srv.messages), 1)
        self.assertIn("SMTPS", d.endpoint)
        self.assertRegex(d.tls, r"^TLSv1\.[23] \(\S+\), certificate verified for 127\.0\.0\.1$")

    @defer.inlineCallbacks
    def test_tls_verify_false_escape_hatch(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls", tls_verify=False)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "noverify")
        self.assertTrue(d.delivered)
        self.assertDescribed(d, "noverify", "UNVERIFIED")
        self.assertIn("certificate NOT verified (tls_verify=False)", d.tls)

    @defer.inlineCallbacks
    def test_starttls_not_offered(self):
        srv = self.server()
        t = self.transport(srv.port, tls="starttls")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "nostarttls")
        self.assertFalse(d.delivered)
        self.assertEqual(srv.messages, [])  # never in clear text
        self.assertEqual(d.failure.kind, "tls")
        self.assertEqual(list(d.refused_permanently), ["dev@example.org"])
        self.assertDescribed(d, "nostarttls", "STARTTLS not offered")

    @defer.inlineCallbacks
    def test_auth_right_and_wrong_password(self):
        srv = self.server(auth={"bb": "s3cret"})
        good = self.transport(srv.port, user="bb", password="s3cret", allow_plaintext_auth=True)
        d = yield good.send("bb@example.org", ["dev@example.org"], MSG, "auth-good")
        self.assertTrue(d.delivered)
        bad = self.transport(srv.port, user="bb", password="wrong", allow_plaintext_auth=True)
        d = yield bad.send("bb@example.org", ["dev@example.org"], MSG, "auth-bad")
        self.assertFalse(d.delivered)
        self.assertEqual(srv.auth_attempts, [("bb", True), ("bb", False)])
        self.assertEqual(len(srv.messages), 1)
        self.assertEqual(d.failure.kind, "auth")
        self.assertEqual(list(d.refused_permanently), ["dev@example.org"])
        line = self.assertDescribed(d, "auth-bad", "auth:", "AUTH rejected", "535")
        self.assertNotIn("wrong", line)  # the password never reaches the log
        self.assertNotIn("wrong", repr(d))

    # -- per-recipient and transient replies
    @defer.inlineCallbacks
    def test_550_for_one_recipient_delivers_to_the_others(self):
        srv = self.server(rcpt_replies={"gone@example.org": "550 5.1.1 <gone@example.org>: User unknown"})
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org", "gone@example.org"], MSG, "partial")
        self.assertTrue(d.delivered)
        self.assertIsNone(d.failure)
        self.assertEqual(d.accepted, ["dev@example.org"])
        self.assertEqual(d.refused_permanently, {"gone@example.org": "550 5.1.1 <gone@example.org>: User unknown"})
        self.assertEqual(srv.messages[0].rcpt_tos, ["dev@example.org"])
        self.assertDescribed(d, "partial", "delivered", "REJECTED permanently", "gone@example.org", "550 5.1.1")

    @defer.inlineCallbacks
    def test_451_for_one_recipient_550_for_another_250_for_the_third(self):
        srv = self.server(rcpt_replies={
            "later@example.org": "451 4.3.0 Try again later",
            "gone@example.org": "550 5.1.1 User unknown",
        })
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org", "later@example.org", "gone@example.org"], MSG, "mixed")
        self.assertTrue(d.delivered)
        self.assertEqual(d.accepted, ["dev@example.org"])
        self.assertEqual(d.refused_temporarily, {"later@example.org": "451 4.3.0 Try again later"})
        self.assertEqual(d.refused_permanently, {"gone@example.org": "550 5.1.1 User unknown"})
        self.assertDescribed(d, "temporarily refused: later@example.org (451 4.3.0")

    @defer.inlineCallbacks
    def test_550_for_every_recipient_is_permanent(self):
        srv = self.server(rcpt_replies={"*": "550 5.7.1 Relay access denied"})
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["x@example.com"], MSG, "allbad")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "permanent")
        self.assertEqual(d.refused_permanently, {"x@example.com": "550 5.7.1 Relay access denied"})
        self.assertDescribed(d, "allbad", "permanent", "x@example.com", "Relay access denied")

    @defer.inlineCallbacks
    def test_451_for_every_recipient_is_transient_and_not_retried_here(self):
        srv = self.server(rcpt_replies={"*": "451 4.3.0 Try again later"})
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "greylisted")
        self.assertFalse(d.delivered)
        self.assertTrue(d.failure.transient)
        self.assertEqual(d.refused_temporarily, {"dev@example.org": "451 4.3.0 Try again later"})
        self.assertDescribed(d, "greylisted", "transient", "451 4.3.0")
        srv.rcpt_replies.clear()  # the relay recovers: the transport keeps nothing to resend
        d2 = yield t.send("bb@example.org", ["dev@example.org"], MSG, "again")
        self.assertTrue(d2.delivered)
        self.assertEqual(len(srv.messages), 1)

    @defer.inlineCallbacks
    def test_reply_to_the_data_decides_transient_or_permanent(self):
        for reply, kind, refused in (
            ("451 4.3.0 Queue file write error", "transient", "refused_temporarily"),
            ("554 5.6.0 Message content rejected", "permanent", "refused_permanently"),
        ):
            srv = self.server(data_reply=reply)
            d = yield self.transport(srv.port).send("bb@example.org", ["dev@example.org"], MSG, f"data {kind}")
            self.assertFalse(d.delivered)
            self.assertEqual(d.failure.kind, kind)
            self.assertEqual(getattr(d, refused), {"dev@example.org": reply})
            self.assertDescribed(d, f"data {kind}", kind, reply)

    @defer.inlineCallbacks
    def test_sender_refused(self):
        srv = self.server(mail_reply="553 5.7.1 <bb@example.org>: Sender address rejected")
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "badsender")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "permanent")
        self.assertEqual(list(d.refused_permanently), ["dev@example.org"])
        self.assertDescribed(d, "sender refused", "553 5.7.1")

    # -- connection-level failures
    @defer.inlineCallbacks
    def test_refused_is_classified_and_every_recipient_temporarily_refused(self):
        with closed_port() as port:
            t = self.transport(port)
            d = yield t.send("bb@example.org", ["dev@example.org", "qa@example.org"], MSG, "route 'dev' #1")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "refused")
        self.assertEqual(sorted(d.refused_temporarily), ["dev@example.org", "qa@example.org"])
        self.assertEqual(d.refused_permanently, {})
        self.assertDescribed(d, "route 'dev' #1", f"127.0.0.1:{port}", "refused", "nothing is listening")

    @defer.inlineCallbacks
    def test_black_hole_times_out(self):
        with BlackHole() as bh:
            t = self.transport(bh.port, timeout=0.5)
            d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "hole")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "timeout")
        self.assertDescribed(d, "hole", "timeout", "no greeting", "0.5s")

    @defer.inlineCallbacks
    def test_dns_failure(self):
        # Tests use loopback only, so no query may reach the machine's real DNS server: a
        # resolver that knows no names stands in for it (Twisted's pluggable name resolver).
        previous = reactor.installNameResolver(_NoSuchHostResolver())
        self.addCleanup(reactor.installNameResolver, previous)
        t = self.transport(25, host="relay.does-not-exist.invalid", timeout=5)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "nodns")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "dns")
        self.assertEqual(list(d.refused_temporarily), ["dev@example.org"])
        self.assertDescribed(d, "nodns", "relay.does-not-exist.invalid:25", "dns:", "cannot resolve")

    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        try:
            srv = self.server(host="::1")
        except Exception as e:
            reason = f"no IPv6 loopback here ({type(e).__name__}: {e})"
            if os.environ.get("CI") == "true":
                self.fail(f"{reason}: under CI=true the IPv6 path must be tested; enable ::1 on the CI host")
            raise unittest.SkipTest(reason)
        t = self.transport(srv.port, host="::1")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "v6")
        self.assertTrue(d.delivered)
        self.assertDescribed(d, "v6", f"[::1]:{srv.port}")

class SessionTestCase(_RealServersTestCase):
    """Connection handling (issue 8): TCP_NODELAY, the connection cache, bounded
    parallelism, no avoidable round trips, and a bound on every wait."""

    @defer.inlineCallbacks
    def poll(self, condition, what, bound=10.0):
        """Wait until ``condition()`` holds, at most ``bound`` seconds (a slow machine gets
        the whole bound; a fast one does not wait for it)."""
        deadline = time.monotonic() + bound
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"not within {bound:g}s: {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    def cached_sockets(self, t):
        socks = []
        for session in t._idle:
            tr = session.transport
            while not hasattr(tr, "getHandle") or not isinstance(tr.getHandle(), socket.socket):
                tr = tr.transport
            socks.append(tr.getHandle())
        return socks

    @defer.inlineCallbacks
    def test_tcp_nodelay_on_plain_and_smtps_connections(self):
        ca = TestCA(self.tempdir())
        for kw, tkw in (({}, {}), ({"smtps": ca.server_context()}, {"tls": "smtps", "tls_ca_file": ca.ca_file})):
            srv = self.server(**kw)
            t = self.transport(srv.port, **tkw)
            d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "nodelay")
            self.assertTrue(d.delivered, describe(d))
            yield self.poll(lambda: t._idle, "the session waits in the cache")
            (sock,) = self.cached_sockets(t)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1, tkw)

    @defer.inlineCallbacks
    def test_cache_reuses_the_session_then_quits_after_the_idle_time(self):
        srv = self.server()
        t = self.transport(srv.port, cache_time=0.3)
        for n in range(3):  # one after another, as failing builds come
            d = yield t.send("bb@example.org", ["dev@example.org"], MSG, f"one-by-one {n}")
            self.assertTrue(d.delivered)
        self.assertEqual(srv.sessions(), 1)
        self.assertEqual(srv.verbs(), ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3)  # no RSET, no QUIT yet
        yield self.poll(lambda: "QUIT" in srv.verbs(), "QUIT after the cache time")
        yield self.poll(lambda: not t._sessions, "the connection closed")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "later")
        self.assertTrue(d.delivered)
        self.assertEqual(srv.sessions(), 2)  # the cache had let it go

    @defer.inlineCallbacks
    def test_cache_time_zero_quits_at_once(self):
        srv = self.server()
        t = self.transport(srv.port, cache_time=0)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "no-cache")
        self.assertTrue(d.delivered)
        yield self.poll(lambda: srv.verbs()[-1:] == ["QUIT"], "QUIT right after the message")

    @defer.inlineCallbacks
    def test_cached_connection_closed_by_the_server_is_not_a_failure(self):
        srv = self.server(idle_timeout=0.2)  # the server hangs up long before our cache time
        t = self.transport(srv.port, cache_time=30)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "first")
        self.assertTrue(d.delivered)
        yield self.poll(lambda: not t._sessions, "the server closed the cached connection")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "second")
        self.assertTrue(d.delivered, describe(d))
        self.assertEqual(len(srv.messages), 2)
        self.assertEqual(srv.sessions(), 2)

    @defer.inlineCallbacks
    def test_connection_dropped_under_the_next_mail_goes_on_a_new_session(self):
        # The race the cache must survive: the server has closed the connection, the client
        # has not noticed yet and sends MAIL into it. Provoked for real: the server drops
        # the connection, unanswered, at the second MAIL of a session.
        srv = self.server(messages_per_connection=1)
        t = self.transport(srv.port)
        results = yield defer.gatherResults(
            [t.send("bb@example.org", [f"u{n}@example.org"], MSG, f"m{n}") for n in range(3)]
        )
        self.assertEqual([r.delivered for r in results], [True, True, True], [describe(r) for r in results])
        self.assertEqual(sorted(m.rcpt_tos[0] for m in srv.messages), ["u0@example.org", "u1@example.org", "u2@example.org"])
        self.assertEqual(srv.sessions(), 3)

    @defer.inlineCallbacks
    def test_burst_is_split_between_at_most_max_sessions(self):
        srv = self.server()
        t = self.transport(srv.port, max_sessions=3)
        n = 60
        results = yield defer.gatherResults(
            [t.send("bb@example.org", [f"u{i}@example.org"], MSG, f"burst {i}") for i in range(n)]
        )
        self.assertTrue(all(r.delivered for r in results))
        got = sorted(m.rcpt_tos[0] for m in srv.messages)
        self.assertEqual(got, sorted(f"u{i}@example.org" for i in range(n)))  # none lost, none twice
        self.assertEqual(srv.sessions(), 3)  # split, never one connection per mail
        per_session = {}
        for peer, verb in srv.commands:
            if verb == "DATA":
                per_session[peer] = per_session.get(peer, 0) + 1
        self.assertTrue(all(count >= 5 for count in per_session.values()), per_session)

    @defer.inlineCallbacks
    def test_pipelining_when_offered(self):
        srv = self.server(pipelining=True, rcpt_replies={"gone@example.org": "550 5.1.1 User unknown"})
        t = self.transport(srv.port)
        results = yield defer.gatherResults([
            t.send("bb@example.org", ["a@example.org", "gone@example.org"], MSG, "p1"),
            t.send("bb@example.org", ["gone@example.org"], MSG, "p2"),
            t.send("bb@example.org", ["c@example.org"], MSG, "p3"),
        ])
        self.assertEqual([r.delivered for r in results], [True, False, True])
        self.assertEqual(results[0].refused_permanently, {"gone@example.org": "550 5.1.1 User unknown"})
        self.assertEqual(results[1].failure.kind, "permanent")
        self.assertEqual([m.rcpt_tos for m in srv.messages], [["a@example.org"], ["c@example.org"]])
        self.assertEqual(srv.messages[1].data, MSG.replace(b"\n", b"\r\n"))
        # p2's transaction stayed open after DATA was refused: reset before p3
        self.assertEqual(
            srv.verbs(),
            ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"],
        )

    @defer.inlineCallbacks
    def test_sender_refused_with_pipelining_is_not_blamed_on_recipients(self):
        srv = self.server(pipelining=True, mail_reply="553 5.7.1 Sender address rejected")
        t = self.transport(srv.port)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "p-sender")
        self.assertEqual(d.failure.kind, "permanent")
        self.assertIn("sender refused", str(d.failure))
        self.assertEqual(d.refused_permanently, {"dev@example.org": "permanent: sender refused (553 5.7.1 Sender address rejected)"})

    @defer.inlineCallbacks
    def test_a_late_reply_to_the_data_is_bounded_by_smtp_timeout(self):
        srv = self.server(delays={"DATA": 3.0})
        t = self.transport(srv.port, timeout=0.5)
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "slow-data")
        self.assertFalse(d.delivered)
        self.assertEqual(d.failure.kind, "timeout")
        self.assertDescribed(d, "slow-data", "server gave no answer to end of DATA within 0.5s")
        self.assertEqual(list(d.refused_temporarily), ["dev@example.org"])

    @defer.inlineCallbacks
    def test_megabyte_message_with_dots_arrives_unchanged(self):
        # Past 64 KiB the body is written as the socket drains; the bytes must not change.
        srv = self.server()
        t = self.transport(srv.port)
        body = b"".join(b".line %d starting with a dot\n" % i if i % 7 == 0 else b"line %d\n" % i for i in range(80000))
        msg = b".first line is a dot too\nSubject: big\n\n" + body
        d = yield t.send("bb@example.org", ["dev@example.org"], msg, "big")
        self.assertTrue(d.delivered, describe(d))
        self.assertGreater(len(msg), 1_000_000)
        self.assertEqual(srv.messages[0].data, msg.replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_reconfig_quits_the_cached_connection_and_uses_the_new_relay(self):
        old, new = self.server(), self.server()
        t = self.transport(old.port, cache_time=30)
        yield t.send("bb@example.org", ["dev@example.org"], MSG, "to-old")
        t.settings = SmtpSettings(host="127.0.0.1", port=new.port, timeout=5)
        yield self.poll(lambda: "QUIT" in old.verbs(), "QUIT to the old relay at reconfig")
        d = yield t.send("bb@example.org", ["dev@example.org"], MSG, "to-new")
        self.assertTrue(d.delivered)
        self.assertEqual((len(old.messages), len(new.messages)), (1, 1))

    @defer.inlineCallbacks
    def test_stop_quits_cached_connections(self):
        srv = self.server()
        t = self.transport(srv.port, cache_time=30)
        yield t.send("bb@example.org", ["dev@example.org"], MSG, "before-stop")
        yield t.stop()
        self.assertEqual(t._sessions, set())
        yield self.poll(lambda: "QUIT" in srv.verbs(), "QUIT at stop")


class _Writes(StringTransport):
    """StringTransport that keeps each write() apart: one write is one send() on a socket."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def clear(self):
        super().clear()
        self.writes = []


class PipeliningWritesTestCase(unittest.TestCase):
    """What leaves in one write cannot be seen through a real socket (the kernel may merge
    or split segments), so these tests drive one session over Twisted's StringTransport."""

    def session_with_one_job(self, ehlo_reply):
        t = MailTransport(SmtpSettings(host="127.0.0.1", port=25, cache_time=0), reactor=reactor)
        outcomes = []
        d = t.send("bb@example.org", ["a@example.org", "b@example.org"], b"Subject: x\n\nbody\n", "pipe")
        d.addCallback(outcomes.append)
        t._pump_call.cancel()  # the session below takes the job instead of a real connection
        t._pump_call = None
        session = _Session(t, t.settings, t._generation, None)
        wire = _Writes()
        session.makeConnection(wire)
        self.addCleanup(session.setTimeout, None)
        session.dataReceived(b"220 relay ESMTP\r\n")
        self.assertEqual(wire.value(), b"EHLO " + smtp.DNSNAME + b"\r\n")
        wire.clear()
        session.dataReceived(ehlo_reply)
        return session, wire, outcomes

    def test_mail_rcpt_and_data_leave_together_when_offered(self):
        session, wire, outcomes = self.session_with_one_job(b"250-relay\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        self.assertEqual(
            wire.writes, [b"MAIL FROM:<bb@example.org>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"]
        )
        wire.clear()
        session.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n")
        self.assertEqual(wire.writes, [b"Subject: x\r\n\r\nbody\r\n.\r\n"])  # body and dot: one write
        wire.clear()
        session.dataReceived(b"250 2.0.0 Ok: queued as E63B916209A\r\n")
        (d,) = outcomes
        self.assertEqual((d.accepted, d.queue_id), (["a@example.org", "b@example.org"], "E63B916209A"))
        self.assertEqual(wire.value(), b"QUIT\r\n")  # cache_time=0; and no RSET before it

    def test_one_command_at_a_time_without_pipelining(self):
        session, wire, outcomes = self.session_with_one_job(b"250-relay\r\n250 8BITMIME\r\n")
        self.assertEqual(wire.value(), b"MAIL FROM:<bb@example.org>\r\n")
        for reply, expected in ((b"250 ok", b"RCPT TO:<a@example.org>"), (b"250 ok", b"RCPT TO:<b@example.org>"),
                                (b"550 no", b"DATA")):
            wire.clear()
            session.dataReceived(reply + b"\r\n")
            self.assertEqual(wire.value(), expected + b"\r\n")
        wire.clear()
        session.dataReceived(b"354 go\r\n")
        session.dataReceived(b"250 queued\r\n")
        (d,) = outcomes
        self.assertEqual((d.accepted, d.refused_permanently), (["a@example.org"], {"b@example.org": "550 no"}))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class _NoSuchHostResolver:
    """Answers every lookup with "no addresses", like NXDOMAIN."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


class ClassifyTestCase(unittest.TestCase):
    def test_kinds(self):
        from twisted.internet import error
        from twisted.mail import smtp

        s = SmtpSettings(host="relay", port=25, timeout=7)
        self.assertEqual(classify(error.ConnectionRefusedError(), s).kind, "refused")
        self.assertEqual(classify(error.DNSLookupError("x"), s).kind, "dns")
        self.assertEqual(classify(error.TimeoutError(), s).kind, "timeout")
        self.assertEqual(classify(smtp.SMTPConnectError(421, b"busy"), s).kind, "transient")
        self.assertEqual(classify(smtp.SMTPConnectError(554, b"go away"), s).kind, "permanent")
        self.assertEqual(classify(smtp.AUTHDeclinedError(535, b"no"), s).kind, "auth")
        self.assertEqual(classify(smtp.AUTHDeclinedError(454, b"later"), s).kind, "transient")
        self.assertEqual(classify(smtp.TLSRequiredError(502, b"x"), s).kind, "tls")
        timeout = classify(smtp.SMTPTimeoutError(-1, b"t", b">>> EHLO x\n>>> AUTH LOGIN\n>>> c2VjcmV0\n"), s)
        self.assertEqual(timeout.kind, "timeout")
        self.assertNotIn("c2VjcmV0", str(timeout))  # base64 credentials never reach the log
        self.assertIn("AUTH exchange", str(timeout))
        f = SendFailure("permanent", "cause", "550 no", ["a@x"])
        self.assertEqual(str(f), "cause")
        self.assertFalse(f.transient)

    def test_tls_network_error_is_transient(self):
        from OpenSSL import SSL

        s = SmtpSettings(host="relay", port=465, tls="smtps")
        cut = classify(SSL.Error([("SSL routines", "", "unexpected eof while reading")]), s)
        self.assertEqual(cut.kind, "tls")
        self.assertTrue(cut.transient)
        bad_cert = classify(SSL.Error([("SSL routines", "", "certificate verify failed")]), s)
        self.assertFalse(bad_cert.transient)


class QueueIdTestCase(unittest.TestCase):
    def test_common_mta_replies(self):
        self.assertEqual(parse_queue_id("250 2.0.0 Ok: queued as E63B916209A"), "E63B916209A")
        self.assertEqual(parse_queue_id("250 OK id=1rX2Yz-0004Ab-Cd"), "1rX2Yz-0004Ab-Cd")
        self.assertEqual(parse_queue_id("250 2.0.0 4AQ1x2Yz012345 Message accepted for delivery"), "4AQ1x2Yz012345")
        self.assertEqual(parse_queue_id("250 ok 1700000000 qp 1234"), "1234")
        self.assertIsNone(parse_queue_id("250 OK"))
        self.assertIsNone(parse_queue_id(None))
