"""transport.py against real SMTP servers on loopback (aiosmtpd in a thread), a closed port
and a black-hole listener. Assertions are on what the server received and on the one log
line the operator reads."""

import shutil
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from zope.interface import implementer
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext.relay import SmtpSettings
from buildbot_mailext.transport import MailTransport, SendFailure, classify
from smtp_servers import BlackHole, SmtpServer, TestCA, closed_port

MSG = (
    b"From: Buildbot <bb@example.org>\nTo: dev@example.org\nSubject: build #12 failed\n"
    b"Message-ID: <12@bb>\n\nline one\n.line starting with a dot\n"
)


class TransportTestCase(unittest.TestCase):
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

    def transport(self, port, host="127.0.0.1", retry_delays=(30, 120), **kw):
        kw.setdefault("timeout", 5)
        t = MailTransport(SmtpSettings(host=host, port=port, **kw), reactor=reactor, retry_delays=retry_delays)
        self.transports.append(t)
        return t

    def assertOneLine(self, label, *words):
        mine = [line for line in self.lines if label in line]
        self.assertEqual(len(mine), 1, mine)
        for w in words:
            self.assertIn(w, mine[0])
        self.assertFalse([line for line in self.lines if line.startswith("ERROR")])
        return mine[0]

    # -- success paths
    @defer.inlineCallbacks
    def test_plain_delivery_bytes_and_log_line(self):
        srv = self.server()
        t = self.transport(srv.port)
        ok = yield t.send("bb@example.org", ["dev@example.org", "qa@example.org"], MSG, "route 'dev' build 'runtests' #12 <12@bb>")
        self.assertIs(ok, True)
        (m,) = srv.messages
        self.assertEqual(m.mail_from, "bb@example.org")
        self.assertEqual(m.rcpt_tos, ["dev@example.org", "qa@example.org"])
        # CRLF on the wire, dot-stuffing undone by the server: the message arrives unchanged
        self.assertEqual(m.data, MSG.replace(b"\n", b"\r\n"))
        self.assertOneLine("route 'dev'", "delivered", f"127.0.0.1:{srv.port}", "dev@example.org, qa@example.org", "250")

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
        connects = []
        orig = t._start_session
        t._start_session = lambda jobs: (connects.append(len(jobs)), orig(jobs))[1]
        results = yield defer.gatherResults([
            t.send("bb@example.org", ["a@example.org"], MSG, "m1"),
            t.send("bb@example.org", ["b@example.org"], MSG, "m2"),
            t.send("bb@example.org", ["c@example.org"], MSG, "m3"),
        ])
        self.assertEqual(results, [True, True, True])
        self.assertEqual(connects, [3])  # one SMTP session for three messages
        self.assertEqual([m.rcpt_tos for m in srv.messages], [["a@example.org"], ["b@example.org"], ["c@example.org"]])

    @defer.inlineCallbacks
    def test_starttls_with_test_ca(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context(), require_starttls=True)
        t = self.transport(srv.port, tls="starttls", tls_ca_file=ca.ca_file)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "tls-ok")
        self.assertIs(ok, True)
        self.assertEqual(len(srv.messages), 1)
        self.assertOneLine("tls-ok", "STARTTLS", "delivered")

    @defer.inlineCallbacks
    def test_starttls_without_ca_file_fails_verification(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls")
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "tls-bad")
        self.assertIs(ok, False)
        self.assertEqual(srv.messages, [])
        self.assertOneLine("tls-bad", "tls:", "certificate verify failed", "tls_ca_file", "not retried")
        self.assertEqual(t.pending(), 0)

    @defer.inlineCallbacks
    def test_hostname_mismatch_fails(self):
        ca = TestCA(self.tempdir(), server_names=("mail.example.test",))
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls", tls_ca_file=ca.ca_file)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "mismatch")
        self.assertIs(ok, False)
        self.assertEqual(srv.messages, [])
        self.assertOneLine("mismatch", "tls:")

    @defer.inlineCallbacks
    def test_smtps_with_test_ca(self):
        ca = TestCA(self.tempdir())
        srv = self.server(smtps=ca.server_context())
        t = self.transport(srv.port, tls="smtps", tls_ca_file=ca.ca_file)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "smtps")
        self.assertIs(ok, True)
        self.assertEqual(len(srv.messages), 1)

    @defer.inlineCallbacks
    def test_tls_verify_false_escape_hatch(self):
        ca = TestCA(self.tempdir())
        srv = self.server(tls=ca.server_context())
        t = self.transport(srv.port, tls="starttls", tls_verify=False)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "noverify")
        self.assertIs(ok, True)
        self.assertOneLine("noverify", "UNVERIFIED")

    @defer.inlineCallbacks
    def test_starttls_not_offered(self):
        srv = self.server()
        t = self.transport(srv.port, tls="starttls")
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "nostarttls")
        self.assertIs(ok, False)
        self.assertEqual(srv.messages, [])  # never in clear text
        self.assertOneLine("nostarttls", "STARTTLS not offered", "not retried")

    @defer.inlineCallbacks
    def test_auth_right_and_wrong_password(self):
        srv = self.server(auth={"bb": "s3cret"})
        good = self.transport(srv.port, user="bb", password="s3cret", allow_plaintext_auth=True)
        ok = yield good.send("bb@example.org", ["dev@example.org"], MSG, "auth-good")
        self.assertIs(ok, True)
        bad = self.transport(srv.port, user="bb", password="wrong", allow_plaintext_auth=True)
        ok = yield bad.send("bb@example.org", ["dev@example.org"], MSG, "auth-bad")
        self.assertIs(ok, False)
        self.assertEqual(srv.auth_attempts, [("bb", True), ("bb", False)])
        self.assertEqual(len(srv.messages), 1)
        line = self.assertOneLine("auth-bad", "auth:", "AUTH rejected", "535")
        self.assertNotIn("wrong", line)  # the password never reaches the log

    # -- per-recipient and transient replies
    @defer.inlineCallbacks
    def test_550_for_one_recipient_delivers_to_the_others(self):
        srv = self.server(rcpt_replies={"gone@example.org": "550 5.1.1 <gone@example.org>: User unknown"})
        t = self.transport(srv.port)
        ok = yield t.send("bb@example.org", ["dev@example.org", "gone@example.org"], MSG, "partial")
        self.assertIs(ok, True)
        self.assertEqual(srv.messages[0].rcpt_tos, ["dev@example.org"])
        self.assertOneLine("partial", "delivered", "REJECTED permanently", "gone@example.org", "550 5.1.1")
        self.assertEqual(t.pending(), 0)

    @defer.inlineCallbacks
    def test_550_for_every_recipient_is_permanent(self):
        srv = self.server(rcpt_replies={"*": "550 5.7.1 Relay access denied"})
        t = self.transport(srv.port)
        ok = yield t.send("bb@example.org", ["x@example.com"], MSG, "allbad")
        self.assertIs(ok, False)
        self.assertOneLine("allbad", "permanent", "x@example.com", "Relay access denied", "not retried")
        self.assertEqual(t.pending(), 0)

    @defer.inlineCallbacks
    def test_451_is_retried_with_backoff_then_delivered(self):
        srv = self.server(rcpt_replies={"*": "451 4.3.0 Try again later"})
        t = self.transport(srv.port, retry_delays=(0.3, 5))
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "greylisted")
        self.assertIs(ok, False)
        self.assertEqual(t.pending(), 1)
        self.assertOneLine("greylisted", "transient", "451 4.3.0", "retry 1/2 in 0.3s", "kept in memory only")
        srv.rcpt_replies.clear()  # the relay recovers
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(t.pending(), 0)
        self.assertEqual(len(srv.messages), 1)
        self.assertIn("delivered", [line for line in self.lines if "greylisted" in line][-1])

    @defer.inlineCallbacks
    def test_refused_then_relay_comes_back_mail_is_delivered(self):
        # The site guide's scenario: no MTA listening when the build fails. The mail is
        # kept and goes out once something listens there again.
        srv = self.server()
        port = srv.port
        srv.stop()
        t = self.transport(port, retry_delays=(0.5, 5))
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "down-then-up")
        self.assertIs(ok, False)
        self.assertEqual(t.pending(), 1)
        self.assertOneLine("down-then-up", "refused", "retry 1/2 in 0.5s")
        srv.start(port=port)
        for _ in range(50):  # the retry fires after 0.5 s; allow a slow machine 5 s
            if srv.messages:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(srv.messages), 1)
        self.assertIn(b"Subject: build #12 failed", srv.messages[0].data)
        self.assertEqual(t.pending(), 0)
        self.assertIn("delivered", [line for line in self.lines if "down-then-up" in line][-1])

    @defer.inlineCallbacks
    def test_451_after_data(self):
        srv = self.server(data_reply="451 4.3.0 Queue file write error")
        t = self.transport(srv.port)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "datafail")
        self.assertIs(ok, False)
        self.assertOneLine("datafail", "transient", "451 4.3.0 Queue file write error", "retry 1/2")

    # -- connection-level failures
    @defer.inlineCallbacks
    def test_refused_is_one_line_and_quick(self):
        with closed_port() as port:
            t = self.transport(port)
            t0 = time.monotonic()
            ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "route 'dev' #1")
            print(f"\nrefused verdict after {time.monotonic() - t0:.3f}s")
        self.assertIs(ok, False)
        self.assertOneLine("route 'dev' #1", f"127.0.0.1:{port}", "refused", "nothing is listening", "retry 1/2 in 30s")
        self.assertEqual(t.pending(), 1)
        self.assertFalse([line for line in self.lines if "retrying server" in line])

    @defer.inlineCallbacks
    def test_black_hole_times_out(self):
        with BlackHole() as bh:
            t = self.transport(bh.port, timeout=0.5)
            ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "hole")
        self.assertIs(ok, False)
        self.assertOneLine("hole", "timeout", "no greeting", "0.5s")

    @defer.inlineCallbacks
    def test_dns_failure(self):
        # Tests use loopback only, so no query may reach the machine's real DNS server: a
        # resolver that knows no names stands in for it (Twisted's pluggable name resolver).
        previous = reactor.installNameResolver(_NoSuchHostResolver())
        self.addCleanup(reactor.installNameResolver, previous)
        t = self.transport(25, host="relay.does-not-exist.invalid", timeout=5)
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "nodns")
        self.assertIs(ok, False)
        self.assertOneLine("nodns", "relay.does-not-exist.invalid:25", "dns:", "cannot resolve", "retry 1/2")

    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        try:
            srv = self.server(host="::1")
        except Exception as e:  # pragma: no cover - host without IPv6
            raise unittest.SkipTest(f"no IPv6 loopback here: {e}")
        t = self.transport(srv.port, host="::1")
        ok = yield t.send("bb@example.org", ["dev@example.org"], MSG, "v6")
        self.assertIs(ok, True)
        self.assertOneLine("v6", f"[::1]:{srv.port}")

    @defer.inlineCallbacks
    def test_gives_up_after_last_retry(self):
        with closed_port() as port:
            t = self.transport(port, retry_delays=(0.1,))
            yield t.send("bb@example.org", ["dev@example.org"], MSG, "doomed")
            yield task.deferLater(reactor, 0.5, lambda: None)
        lines = [line for line in self.lines if "doomed" in line]
        self.assertEqual(len(lines), 2)
        self.assertIn("giving up after 2 attempts", lines[1])
        self.assertEqual(t.pending(), 0)

    @defer.inlineCallbacks
    def test_stop_reports_unsent_mail(self):
        with closed_port() as port:
            t = self.transport(port)
            yield t.send("bb@example.org", ["dev@example.org"], MSG, "m-a")
            yield t.send("bb@example.org", ["qa@example.org"], MSG, "m-b")
            self.assertEqual(t.pending(), 2)
            yield t.stop()
        self.assertEqual(t.pending(), 0)
        summary = [line for line in self.lines if "still unsent" in line]
        self.assertEqual(len(summary), 1)
        self.assertIn("2 mails still unsent, kept in memory only: lost at shutdown", summary[0])
        self.assertEqual(len([line for line in self.lines if line.startswith("mailext: unsent at shutdown")]), 2)


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
