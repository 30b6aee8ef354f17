"""A real Postfix (Debian's package) on loopback, started without systemd by our own
tools/postfix-relay.sh, with relayhost = [127.0.0.1]:<aiosmtpd sink port>.

- the transport sends to Postfix and the mail arrives at the sink;
- the preflight against that Postfix reports its relayhost, and reports the
  site-guide trap (no relayhost, recipient outside mydestination) when relayhost is empty;
- one hop further: with Postfix's relayhost refused, unresolvable or a black hole, the
  preflight (probe, CLI, ``buildbot checkconfig``) names the second-hop fault;
- the queue tracker: a mail stuck behind a refused relayhost gets one "stuck in Postfix"
  line, and one "left Postfix" line once the relay is back and ``postqueue -f`` ran.

Postfix is installed by the session fixture (apt-get, ~15 s the first time). Off CI the
tests are skipped when it cannot be installed or started, and the skip reason says why;
under ``CI=true`` (where .ci/run installs Postfix first) that is a failure with the reason.
"""

import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from twisted.internet import defer, reactor, task
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext import postfix as postfix_mod
from buildbot_mailext.postfix_queue import PostfixQueueTracker
from buildbot_mailext.preflight import probe
from buildbot_mailext.relay import SmtpSettings
from buildbot_mailext.transport import MailTransport, describe
from smtp_servers import BlackHole, SmtpServer, free_port

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "postfix-relay.sh")
MTA_HOSTNAME = "buildserver.localdomain"
VENV_BIN = os.path.dirname(sys.executable)
FROM = "buildbot@buildserver.example.edu"
TO = "dev-list@lists.example.edu"


def _script(*args, timeout=300):
    env = dict(os.environ, MTA_HOSTNAME=MTA_HOSTNAME, RETRY_S="2")
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


class PostfixRig:
    def __init__(self, sink, listen):
        self.sink = sink
        self.listen = listen

    def start(self, relay="sink"):
        """relay: "sink", "none" (empty relayhost), a port number ([127.0.0.1]:PORT) or a
        relayhost value taken verbatim."""
        arg = {"sink": str(self.sink.port), "none": "none"}.get(relay, str(relay))
        out = _script("start", arg, str(self.listen))
        if out.returncode != 0:
            raise RuntimeError(f"postfix-relay.sh start failed: {out.stderr.strip()}")
        return out.stdout


@pytest.fixture(scope="session")
def postfix():
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("Postfix tests need root and apt-get (Debian/Ubuntu) to install Postfix")
    t0 = time.monotonic()
    out = _script("install", timeout=600)
    if out.returncode != 0:
        _unavailable(f"Postfix could not be installed (tools/postfix-relay.sh install): {out.stderr.strip()[-400:]}")
    print(f"\npostfix install: {time.monotonic() - t0:.1f}s")
    sink = SmtpServer(server_hostname="smtp-sink.localdomain").start()
    rig = PostfixRig(sink, free_port())
    try:
        t0 = time.monotonic()
        print(rig.start(), f"start: {time.monotonic() - t0:.2f}s")
    except RuntimeError as e:
        sink.stop()
        _unavailable(f"Postfix is installed but could not be started: {e}")
    yield rig
    _script("purge")
    _script("stop")
    sink.stop()


def send_into_postfix(port, subject="build #7 failed"):
    """One mail into Postfix with smtplib; returns Postfix's queue id from its 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail(FROM)
        smtp.rcpt(TO)
        code, reply = smtp.data(f"From: {FROM}\r\nTo: {TO}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250, reply
    return re.search(rb"queued as ([0-9A-Za-z]+)", reply).group(1).decode()


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
        self.assertIn(f"Postfix's relayhost [127.0.0.1]:{self.rig.sink.port} answers from this machine", result.render())
        self.assertNotIn("postfix-relay", result.render())

    def test_preflight_sends_nothing_through_postfix(self):
        before = len(self.rig.sink.messages)
        result = probe(self.settings(), "bb@example.org", ["dev-list@lists.example.org"])
        self.assertTrue(result.ok, result.render())
        # Anything the probe had sent would sit in Postfix's queue or reach the sink: a
        # flush pushes whatever is queued on, then neither may hold a message.
        self.assertEqual(_script("flush", "10").returncode, 0)
        self.assertEqual(postfix_mod.read_queue(), [])
        self.assertEqual(len(self.rig.sink.messages), before)

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


class SecondHopTestCase(unittest.TestCase):
    """The preflight one hop further: Postfix's relayhost probed from this machine."""

    @pytest.fixture(autouse=True)
    def _rig(self, postfix):
        self.rig = postfix
        self.addCleanup(self.rig.start)  # back to the healthy relay for the next test
        self.addCleanup(_script, "purge")

    def check(self, kind, timeout=10):
        result = probe(SmtpSettings(host="127.0.0.1", port=self.rig.listen, timeout=timeout), FROM, [TO])
        print("\n" + result.render())
        self.assertFalse(result.ok)
        self.assertEqual([p.kind for p in result.problems], [kind], result.render())
        return result.problems[0]

    def test_refused_relayhost(self):
        port = free_port()  # nothing listens there
        self.rig.start(relay=port)
        p = self.check("postfix-relay-refused")
        self.assertIn(f"127.0.0.1:{self.rig.listen} is the local Postfix", p.what_happened)
        self.assertIn(f"relayhost = [127.0.0.1]:{port}", p.what_happened)
        self.assertIn("connection refused", p.what_happened)
        self.assertIn("keep it deferred in its queue", p.what_happened)
        self.assertIn("postconf -e 'relayhost = [relay.example.org]:587' && postfix reload", p.fix)
        self.assertIn("notifier's own relayhost=", p.fix)

        # Mail sent now is accepted and stuck: the preflight counts it, with Postfix's reason.
        queue_id = send_into_postfix(self.rig.listen)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
            postfix_mod.delay_reasons(e) for e in postfix_mod.read_queue() if e["queue_id"] == queue_id
        ):
            time.sleep(0.2)
        result = probe(SmtpSettings(host="127.0.0.1", port=self.rig.listen, timeout=10), FROM, [TO])
        print("\n" + result.render())
        kinds = [p.kind for p in result.problems]
        self.assertEqual(kinds, ["postfix-relay-refused", "postfix-deferred"])
        stuck = result.problems[1]
        self.assertIn(f"1 mail(s) from {FROM} wait in its deferred queue (queue id {queue_id})", stuck.what_happened)
        self.assertIn(f"1 x connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused", stuck.what_happened)
        self.assertIn("postqueue -f", stuck.fix)

    def test_refused_relayhost_cli_and_checkconfig_fail(self):
        port = free_port()
        self.rig.start(relay=port)
        cli = subprocess.run(
            [os.path.join(VENV_BIN, "buildbot-mailext"), "preflight", "--relayhost", f"127.0.0.1:{self.rig.listen}",
             "--from", FROM, "--to", TO], capture_output=True, text=True, timeout=120)
        print(cli.stdout, cli.stderr)
        self.assertEqual(cli.returncode, 1)
        self.assertIn("PROBLEM [postfix-relay-refused]", cli.stdout)
        self.assertIn(f"relayhost = [127.0.0.1]:{port}", cli.stdout)
        basedir = tempfile.mkdtemp(prefix="mailext-test-")  # not self.mktemp(): it writes to cwd
        self.addCleanup(shutil.rmtree, basedir, True)
        with open(os.path.join(basedir, "master.cfg"), "w") as f:
            f.write(textwrap.dedent(f"""
                from buildbot.plugins import reporters
                c = BuildmasterConfig = {{}}
                c['services'] = [reporters.MailExtNotifier(fromaddr={FROM!r}, relayhost="127.0.0.1:{self.rig.listen}",
                                                           extraRecipients=[{TO!r}], preflight="fail")]
            """))
        check = subprocess.run([os.path.join(VENV_BIN, "buildbot"), "checkconfig", basedir],
                               capture_output=True, text=True, timeout=120)
        print(check.stdout, check.stderr)
        self.assertEqual(check.returncode, 1)
        self.assertIn("PROBLEM [postfix-relay-refused]", check.stderr)
        self.assertIn(f"relayhost = [127.0.0.1]:{port}", check.stderr)
        self.assertIn("postconf -e 'relayhost = [relay.example.org]:587'", check.stderr)

    def test_relayhost_that_does_not_resolve(self):
        self.rig.start(relay="internalmailrelay.invalid")
        p = self.check("postfix-relay-dns")
        self.assertIn("relayhost = internalmailrelay.invalid", p.what_happened)
        self.assertIn("does not resolve", p.what_happened)
        self.assertIn("getent hosts internalmailrelay.invalid", p.fix)

    def test_relayhost_black_hole_times_out(self):
        with BlackHole() as hole:
            self.rig.start(relay=f"[127.0.0.1]:{hole.port}")
            p = self.check("postfix-relay-timeout", timeout=2)
        self.assertIn(f"relayhost = [127.0.0.1]:{hole.port}", p.what_happened)
        self.assertIn("no SMTP greeting came within 2s", p.what_happened)
        self.assertIn("submission port", p.fix)


class QueueTrackerTestCase(unittest.TestCase):
    """postfix_queue.PostfixQueueTracker against the real Postfix queue."""

    @pytest.fixture(autouse=True)
    def _rig(self, postfix):
        self.rig = postfix
        self.addCleanup(self.rig.start)
        self.addCleanup(_script, "purge")
        self.lines = []
        observer = lambda e: self.lines.append(log.textFromEventDict(e) or "")  # noqa: E731
        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)

    @defer.inlineCallbacks
    def wait_for(self, predicate, seconds=30):
        deadline = time.monotonic() + seconds
        while not predicate() and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(predicate(), "\n".join(self.lines))

    def matching(self, text):
        return [line for line in self.lines if text in line]

    @defer.inlineCallbacks
    def test_stuck_then_left(self):
        port = free_port()
        self.rig.start(relay=port)
        queue_id = send_into_postfix(self.rig.listen)
        tracker = PostfixQueueTracker("mail", stuck_after=1, poll_interval=0.3)
        self.addCleanup(tracker.stop)
        tracker.track(queue_id, "route 'dev' build 'runtests' #12 <id@example.org>")
        yield self.wait_for(lambda: self.matching("stuck in Postfix"))
        yield task.deferLater(reactor, 1.0, lambda: None)  # several more polls: still one line
        (stuck,) = self.matching("stuck in Postfix")
        print("\n" + stuck)
        self.assertIn("mail route 'dev' build 'runtests' #12 <id@example.org>: stuck in Postfix for", stuck)
        self.assertIn(f"queue id {queue_id}, deferred: connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused", stuck)
        self.assertIn("postqueue -f", stuck)
        self.assertEqual(self.matching("left Postfix"), [])

        sink = SmtpServer(server_hostname="smtp-sink.localdomain").start(port)
        self.addCleanup(sink.stop)
        self.assertEqual(_script("flush").returncode, 0)
        yield self.wait_for(lambda: self.matching("left Postfix"))
        (left,) = self.matching("left Postfix")
        print(left)
        self.assertIn(f"mail route 'dev' build 'runtests' #12 <id@example.org>: left Postfix: queue id {queue_id}", left)
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(tracker.outstanding(), [])
        self.assertIsNone(tracker._loop)  # nothing outstanding: no more polling

    @defer.inlineCallbacks
    def test_healthy_hand_off_is_quiet(self):
        before = len(self.rig.sink.messages)
        queue_id = send_into_postfix(self.rig.listen)
        tracker = PostfixQueueTracker("mail", stuck_after=30, poll_interval=0.3)
        self.addCleanup(tracker.stop)
        tracker.track(queue_id, "route 'dev' build 'runtests' #13")
        yield self.wait_for(lambda: not tracker.outstanding())
        self.assertEqual(len(self.rig.sink.messages), before + 1)
        self.assertEqual([line for line in self.lines if "mail" in line and "Postfix" in line], [])
        self.assertIsNone(tracker._loop)

    @defer.inlineCallbacks
    def test_unreadable_queue_is_said_once_and_when_it_is_readable_again(self):
        postqueue = ["/nonexistent/postqueue"]  # then the real one: Postfix "comes back"
        tracker = PostfixQueueTracker(
            "mail", stuck_after=30, poll_interval=0.1, read_queue=lambda: postfix_mod.read_queue(postqueue[0])
        )
        self.addCleanup(tracker.stop)
        tracker.track("ABC123", "route 'dev' build 'x' #1")
        yield self.wait_for(lambda: self.matching("cannot follow mail handed to the local Postfix"))
        tracker.track("DEF456", "route 'dev' build 'x' #2")
        yield task.deferLater(reactor, 0.5, lambda: None)  # several failed polls: one line
        (line,) = self.matching("cannot follow")
        print("\n" + line)
        self.assertIn("/nonexistent/postqueue -j could not run", line)
        self.assertIn("track_local_mta=False", line)
        self.assertEqual(len(tracker.outstanding()), 2)
        postqueue[0] = None
        yield self.wait_for(lambda: self.matching("queue is readable again"))
        yield self.wait_for(lambda: not tracker.outstanding())  # neither id is in the real queue
        self.assertEqual(len(self.matching("cannot follow")), 1)

    @defer.inlineCallbacks
    def test_relay_that_is_not_postfix_is_not_followed(self):
        with SmtpServer() as other:  # an MTA on this machine, but not Postfix
            quiet = PostfixQueueTracker("mail", poll_interval=0.1, relay_port=other.port, explicit=False)
            asked = PostfixQueueTracker("asked", poll_interval=0.1, relay_port=other.port, explicit=True)
            for tracker in (quiet, asked):
                self.addCleanup(tracker.stop)
                tracker.track("1", "route 'dev' build 'x' #1")
            yield self.wait_for(lambda: quiet.not_postfix and asked.not_postfix)
        self.assertEqual(self.matching("mail: "), [])
        (line,) = self.matching("asked: track_local_mta=True, but")
        self.assertIn(f"port {other.port} on this machine is not a listener of the local Postfix", line)
        self.assertEqual(quiet.outstanding() + asked.outstanding(), [])
        self.assertIsNone(quiet._loop)
