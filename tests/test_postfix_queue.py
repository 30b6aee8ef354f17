"""PostfixQueueTracker's timing rules, with the queue reader scripted.

A real Postfix (tests/test_postfix.py, tests/e2e/test_postfix_tracking.py) cannot be made to
show, on demand, the moment where a mail sits in its *active* queue with no ``delay_reason``
yet (its first delivery attempt is running): that moment is a race. Here ``read_queue``, the
tracker's own seam, plays the ``postqueue -j`` entries of that race; everything else is real
(reactor, thread pool, log lines).
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor, task
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext.postfix_queue import PostfixQueueTracker

REFUSED = {"queue_id": "AB12", "queue_name": "deferred", "recipients": [
    {"address": "dev@example.org", "delay_reason": "connect to 127.0.0.1[127.0.0.1]:2525: Connection refused"}]}
TRYING = {"queue_id": "AB12", "queue_name": "active", "recipients": [{"address": "dev@example.org"}]}


class StuckLineWaitsForTheReasonTests(unittest.TestCase):
    def setUp(self):
        self.lines: list[str] = []
        observer = lambda e: self.lines.append(log.textFromEventDict(e) or "")  # noqa: E731
        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)

    def stuck(self):
        return [line for line in self.lines if "stuck in Postfix" in line]

    @defer.inlineCallbacks
    def run_until(self, predicate, seconds=10):
        deadline = time.monotonic() + seconds
        while not predicate() and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(predicate(), "\n".join(self.lines))

    def tracker(self, queue):
        reads = []

        def read_queue():
            reads.append(1)
            return [queue[min(len(reads), len(queue)) - 1]]

        tracker = PostfixQueueTracker("mail", stuck_after=0.2, poll_interval=0.1, read_queue=read_queue)
        self.addCleanup(tracker.stop)
        tracker.track("AB12", "route 'dev' build 'runtests' #1")
        return tracker, reads

    @defer.inlineCallbacks
    def test_a_mail_in_its_first_delivery_attempt_is_reported_with_the_reason_that_follows(self):
        # Past stuck_after the first polls see the attempt running; then Postfix records why.
        tracker, reads = self.tracker([TRYING] * 3 + [REFUSED])
        yield self.run_until(self.stuck)
        (line,) = self.stuck()
        self.assertIn("queue id AB12, deferred: connect to 127.0.0.1[127.0.0.1]:2525: Connection refused", line)
        self.assertIn("start the relay's MTA", line)
        self.assertGreaterEqual(len(reads), 4)

    @defer.inlineCallbacks
    def test_a_mail_that_never_gets_a_reason_is_still_reported(self):
        # Bounded: after stuck_after more, the line goes out without a reason rather than never.
        tracker, reads = self.tracker([TRYING])
        yield self.run_until(self.stuck)
        (line,) = self.stuck()
        self.assertIn("queue id AB12, active: no delay_reason yet (in its active queue)", line)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(self.stuck()), 1)  # one line, however long it stays
