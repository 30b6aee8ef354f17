"""A real Postfix (Debian's package) on loopback, started without systemd by our own
tools/postfix-relay.sh, with relayhost = [127.0.0.1]:<aiosmtpd sink port>.

- the transport sends to Postfix and the mail arrives at the sink;
- the preflight against that Postfix reports its relayhost, and reports the
  site-guide trap (no relayhost, recipient outside mydestination) when relayhost is empty.

Postfix is installed by the session fixture (apt-get, ~15 s the first time). The tests are
skipped only when it cannot be installed or started, and the skip reason says why.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest
from twisted.internet import defer, reactor, task
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext.preflight import probe
from buildbot_mailext.relay import SmtpSettings
from buildbot_mailext.transport import MailTransport, describe
from smtp_servers import SmtpServer, free_port

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "postfix-relay.sh")
MTA_HOSTNAME = "buildserver.localdomain"


def _script(*args, timeout=300):
    env = dict(os.environ, MTA_HOSTNAME=MTA_HOSTNAME, RETRY_S="2")
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _port_in_use(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PostfixRig:
    def __init__(self, sink, listen):
        self.sink = sink
        self.listen = listen

    def start(self, relay="sink"):
        out = _script("start", str(self.sink.port) if relay == "sink" else "none", str(self.listen))
        if out.returncode != 0:
            raise RuntimeError(f"postfix-relay.sh start failed: {out.stderr.strip()}")
        return out.stdout


@pytest.fixture(scope="session")
def postfix():
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Postfix tests need root and apt-get (Debian/Ubuntu) to install Postfix")
    t0 = time.monotonic()
    out = _script("install", timeout=600)
    if out.returncode != 0:
        pytest.skip(f"Postfix could not be installed (tools/postfix-relay.sh install): {out.stderr.strip()[-400:]}")
    print(f"\npostfix install: {time.monotonic() - t0:.1f}s")
    sink = SmtpServer(server_hostname="smtp-sink.localdomain").start()
    listen = 25 if not _port_in_use(25) else free_port()
    rig = PostfixRig(sink, listen)
    try:
        t0 = time.monotonic()
        print(rig.start(), f"start: {time.monotonic() - t0:.2f}s")
    except RuntimeError as e:
        sink.stop()
        pytest.skip(f"Postfix is installed but could not be started: {e}")
    yield rig
    _script("purge")
    _script("stop")
    sink.stop()


class PostfixTestCase(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _rig(self, postfix):
        self.rig = postfix

    def settings(self, **kw):
        return SmtpSettings(host="127.0.0.1", port=self.rig.listen, timeout=10, **kw)

    @defer.inlineCallbacks
    def wait_for_sink(self, count, seconds=20):
        deadline = time.monotonic() + seconds
        while len(self.rig.sink.messages) < count and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_transport_through_postfix_reaches_the_sink(self):
        lines = []
        observer = lambda e: lines.append(log.textFromEventDict(e) or "")  # noqa: E731
        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)
        before = len(self.rig.sink.messages)
        t = MailTransport(self.settings(), reactor=reactor)
        self.addCleanup(t.stop)
        body = b"From: bb@example.org\nTo: dev-list@lists.example.org\nSubject: build #7 failed\n\nvia postfix\n"
        t0 = time.monotonic()
        ok = yield t.send("bb@example.org", ["dev-list@lists.example.org"], body, "route 'dev' build #7")
        self.assertTrue(ok.delivered, describe(ok))
        yield self.wait_for_sink(before + 1)
        print(f"\nsend -> sink: {time.monotonic() - t0:.3f}s")
        got = self.rig.sink.messages[before]
        self.assertEqual(got.mail_from, "bb@example.org")
        self.assertEqual(got.rcpt_tos, ["dev-list@lists.example.org"])
        self.assertIn(b"Subject: build #7 failed", got.data)
        self.assertIn(b"via postfix", got.data)
        self.assertIn(b"Received: from", got.data)  # it really went through Postfix
        self.assertIn("route 'dev' build #7: delivered", describe(ok))

    def test_preflight_reports_postfix_relayhost(self):
        result = probe(self.settings(), "bb@example.org", ["dev-list@lists.example.org"])
        print("\n" + result.render())
        self.assertTrue(result.ok, result.render())
        self.assertIn(f"relays all outside mail via relayhost = [127.0.0.1]:{self.rig.sink.port}", result.render())
        self.assertEqual(self.rig.sink.messages[-1:] and [], [])  # probe sends nothing

    @defer.inlineCallbacks
    def test_preflight_reports_the_mydestination_trap(self):
        self.rig.start(relay="none")
        try:
            t0 = time.monotonic()
            result = probe(self.settings(), "bb@example.org", ["dev-list@lists.example.org", f"root@{MTA_HOSTNAME}"])
            print(f"\n--- verdict in {time.monotonic() - t0:.3f}s\n" + result.render())
            self.assertFalse(result.ok)
            (p,) = result.problems
            self.assertEqual(p.kind, "postfix-no-relayhost")
            self.assertIn(f"127.0.0.1:{self.rig.listen}", p.what_happened)
            self.assertIn("dev-list@lists.example.org", p.what_happened)
            self.assertNotIn(f"root@{MTA_HOSTNAME}", p.what_happened)  # local: inside mydestination
            self.assertIn("postconf -e 'relayhost = [relay.example.org]'", p.fix)
            self.assertIn("main.cf", p.fix)
            self.assertIn("notifier's relayhost=", p.fix)
            local_only = probe(self.settings(), "bb@example.org", [f"root@{MTA_HOSTNAME}"])
            self.assertTrue(local_only.ok, local_only.render())

            # The trap itself: Postfix says 250, the mail never reaches anyone.
            before = len(self.rig.sink.messages)
            t = MailTransport(self.settings(), reactor=reactor)
            ok = yield t.send("bb@example.org", ["dev-list@lists.example.org"], b"Subject: lost\n\nx\n", "trap")
            yield t.stop()
            self.assertTrue(ok.delivered, describe(ok))
            yield task.deferLater(reactor, 1.0, lambda: None)
            self.assertEqual(len(self.rig.sink.messages), before)
            self.assertIn("dev-list@lists.example.org", _script("queue").stdout)
        finally:
            _script("purge")
            self.rig.start(relay="sink")
