"""The outbox (buildbot_mailext.outbox) on Buildbot's fake master with a real SQLite file.

The database is real (a file under the test's temp dir, Buildbot's own schema upgraded by
the fake master, our tables created by the outbox); the reactor is Buildbot's test reactor
so retry delays are advanced, not waited for. The transport is scripted: each attempt
returns the (real) Delivery the test chose. That is the one thing mocked here, because a fake
reactor cannot open sockets; the same transitions against a real SMTP server are in
tests/e2e/test_outbox_master.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import sqlalchemy as sa
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin
from twisted.internet import defer
from twisted.python import log
from twisted.trial import unittest

from buildbot_mailext import journal
from buildbot_mailext import outbox as ob
from buildbot_mailext.transport import Delivery, SendFailure


RELAY = "[127.0.0.1]:2525 (plain SMTP)"


def accepted(*rcpts, reply="250 2.0.0 Ok: queued as X"):
    return lambda label, recipients: Delivery(label, RELAY, accepted=list(rcpts or recipients), reply=reply)


def refused(reply="connection refused", kind="refused"):
    return lambda label, recipients: Delivery.failed(label, RELAY, recipients, SendFailure(kind, reply))


def rejected(reply="550 5.1.1 unknown user"):
    return lambda label, recipients: Delivery.failed(
        label, RELAY, recipients, SendFailure("permanent", "every recipient rejected", reply)
    )


class ScriptedTransport:
    """Answers each attempt with the next scripted outcome (the last one repeats). With
    ``hold=True`` attempts never answer (a master killed mid-session)."""

    def __init__(self, outbox_rows, *script, hold=False):
        self.script = list(script)
        self.attempts = []  # (label, recipients, rows in the outbox at that moment)
        self.hold = hold
        self._rows = outbox_rows

    def send(self, envelope_from, recipients, message, label):
        self.attempts.append((label, list(recipients), self._rows()))
        if self.hold:
            return defer.Deferred()
        outcome = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return defer.succeed(outcome(label, list(recipients)))


def digest(route, items, recipients):
    return ("DIGEST %s %d\n" % (route, len(items)) + "\n".join(i["subject"] for i in items)).encode()


class OutboxTestCase(TestReactorMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.setup_test_reactor()
        tmp = tempfile.mkdtemp(prefix="mailext-outbox-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.db_path = os.path.join(tmp, "state.sqlite")
        self.master = yield fakemaster.make_master(
            self, wantDb=True, db_url=f"sqlite:///{self.db_path}", sqlite_memory=False
        )
        self.master.masterid = 1
        self.logged = []
        log.addObserver(self._observe)
        self.addCleanup(log.removeObserver, self._observe)

    def _observe(self, event):
        if event.get("message"):
            self.logged.append(" ".join(str(m) for m in event["message"]))

    def rows(self):
        """The outbox as another process sees it: read straight from the SQLite file."""
        engine = sa.create_engine(f"sqlite:///{self.db_path}")
        try:
            with engine.connect() as conn:
                return ob.thd_list(conn)
        finally:
            engine.dispose()

    def rows_once_deletions_committed(self):
        """The rows after the deletions of delivered mails have committed: they wait up to
        journal.DEFAULT_LINGER to share a commit with the next new mail (issue 8)."""
        self.reactor.advance(journal.DEFAULT_LINGER)
        return self.rows()

    def make_outbox(self, *script, master=None, hold=False, **kwargs):
        transport = ScriptedTransport(self.rows, *script, hold=hold)
        box = ob.Outbox(master or self.master, "MailExtNotifier_test", transport, digest, **kwargs)
        return box, transport

    @staticmethod
    def mail(n=1, to=("dev@example.org",), route="route dev"):
        return ob.NewMail(route, f"build #{n}", f"FAILURE: build #{n}", "bb@example.org", list(to),
                          b"Subject: x\r\n\r\nbody %d\r\n" % n)

    def lines(self, needle):
        return [line for line in self.logged if needle in line]

    # ------------------------------------------------------------------ the happy path

    @defer.inlineCallbacks
    def test_mail_is_written_before_the_first_attempt_and_deleted_after_250(self):
        box, transport = self.make_outbox(accepted())
        yield box.start()
        row_id = yield box.queue(self.mail())
        self.assertEqual(len(transport.attempts), 1)
        label, recipients, rows_during_attempt = transport.attempts[0]
        self.assertEqual([r.id for r in rows_during_attempt], [row_id])
        self.assertEqual(rows_during_attempt[0].state, ob.PENDING)
        self.assertEqual(self.rows_once_deletions_committed(), [])
        self.assertEqual(len(self.lines(f"outbox #{row_id} done")), 1)

    @defer.inlineCallbacks
    def test_a_delivered_rows_deletion_shares_the_commit_of_the_next_new_mail(self):
        # Mails one after another: one commit each, not two (issue 8). The scripted
        # transport answers at once, so each mail is delivered before queue() returns.
        box, transport = self.make_outbox(accepted())
        yield box.start()
        first = yield box.queue(self.mail(1))
        self.assertEqual([r.id for r in self.rows()], [first])  # delivered; the deletion waits
        second = yield box.queue(self.mail(2))
        self.assertEqual([r.id for r in self.rows()], [second])  # gone in mail 2's commit
        self.assertEqual(self.rows_once_deletions_committed(), [])
        self.assertEqual(len(self.lines("done")), 2)

    # ------------------------------------------------------------------ retries

    @defer.inlineCallbacks
    def test_451_twice_then_250_is_delivered_at_the_third_attempt_after_30_then_60_s(self):
        temp = refused("451 4.3.0 try later", kind="transient")
        box, transport = self.make_outbox(temp, temp, accepted(), policy=ob.RetryPolicy(30, 1800, 86400))
        yield box.start()
        row_id = yield box.queue(self.mail())
        self.assertEqual(len(transport.attempts), 1)
        [row] = self.rows()
        self.assertEqual((row.state, row.attempts), (ob.PENDING, 1))
        self.assertIn("451 4.3.0", row.last_error)
        self.reactor.advance(29)
        self.assertEqual(len(transport.attempts), 1)
        self.reactor.advance(1)
        self.assertEqual(len(transport.attempts), 2)
        self.reactor.advance(59)
        self.assertEqual(len(transport.attempts), 2)
        self.reactor.advance(1)
        self.assertEqual(len(transport.attempts), 3)
        self.assertEqual(self.rows_once_deletions_committed(), [])
        self.assertEqual(len(self.lines("attempt 2 in 30s")), 1)
        self.assertEqual(len(self.lines("attempt 3 in 60s")), 1)
        self.assertEqual(len(self.lines(f"outbox #{row_id} done")), 1)

    def test_retry_delays_double_up_to_the_cap(self):
        policy = ob.RetryPolicy(30, 1800, 3 * 86400)
        self.assertEqual([policy.delay(n) for n in range(1, 9)], [30, 60, 120, 240, 480, 960, 1800, 1800])
        self.assertEqual(policy.delay(10_000), 1800)

    @defer.inlineCallbacks
    def test_a_mail_not_accepted_within_give_up_after_becomes_a_dead_letter(self):
        box, transport = self.make_outbox(refused(), policy=ob.RetryPolicy(10, 40, 100))
        yield box.start()
        row_id = yield box.queue(self.mail())
        for _ in range(20):
            self.reactor.advance(40)
        [row] = self.rows()
        self.assertEqual((row.id, row.state), (row_id, ob.DEAD))
        attempts = len(transport.attempts)
        self.assertEqual(row.attempts, attempts)
        self.reactor.advance(10_000)
        self.assertEqual(len(transport.attempts), attempts)  # a dead letter is not retried
        self.assertEqual(len(self.lines(f"gave up after {attempts} attempts")), 1)

    # ------------------------------------------------------------------ dead letters

    @defer.inlineCallbacks
    def test_550_is_a_dead_letter_at_once_and_never_retried(self):
        box, transport = self.make_outbox(rejected())
        yield box.start()
        row_id = yield box.queue(self.mail())
        self.reactor.advance(3 * 86400)
        self.assertEqual(len(transport.attempts), 1)
        [row] = self.rows()
        self.assertEqual((row.id, row.state, row.recipients), (row_id, ob.DEAD, ["dev@example.org"]))
        self.assertEqual(len(self.lines(f"SMTP reply: 550 5.1.1 unknown user; dead letter #{row_id} for dev@example.org (a retry")), 1)

    @defer.inlineCallbacks
    def test_one_recipient_550_and_one_250_delivers_one_and_dead_letters_the_other(self):
        def split(label, recipients):
            return Delivery(label, RELAY, accepted=["ok@example.org"], reply="250 ok",
                            refused_permanently={"bad@example.org": "550 5.1.1 unknown"})

        box, transport = self.make_outbox(split)
        yield box.start()
        yield box.queue(self.mail(to=("ok@example.org", "bad@example.org")))
        [row] = self.rows()
        self.assertEqual((row.state, row.recipients), (ob.DEAD, ["bad@example.org"]))
        self.reactor.advance(86400)
        self.assertEqual(len(transport.attempts), 1)

    @defer.inlineCallbacks
    def test_one_recipient_451_one_550_one_250_keeps_retrying_only_the_451(self):
        def mixed(label, recipients):
            return Delivery(label, RELAY, accepted=["ok@example.org"], reply="250 ok",
                            refused_permanently={"bad@example.org": "550 unknown"},
                            refused_temporarily={"later@example.org": "451 greylisted"})

        box, transport = self.make_outbox(mixed, accepted())
        yield box.start()
        yield box.queue(self.mail(to=("ok@example.org", "bad@example.org", "later@example.org")))
        rows = {r.state: r for r in self.rows()}
        self.assertEqual(rows[ob.DEAD].recipients, ["bad@example.org"])
        self.assertEqual(rows[ob.PENDING].recipients, ["later@example.org"])
        self.reactor.advance(30)
        self.assertEqual(transport.attempts[1][1], ["later@example.org"])
        self.assertEqual([r.state for r in self.rows_once_deletions_committed()], [ob.DEAD])

    @defer.inlineCallbacks
    def test_retry_now_puts_a_dead_letter_back_and_it_is_delivered(self):
        box, transport = self.make_outbox(rejected(), accepted())
        yield box.start()
        row_id = yield box.queue(self.mail())
        self.assertEqual(self.rows()[0].state, ob.DEAD)
        yield self.master.db.pool.do(ob.thd_retry_now, [row_id], self.reactor.seconds())
        self.reactor.advance(box.poll_interval)
        self.assertEqual(len(transport.attempts), 2)
        self.assertEqual(self.rows_once_deletions_committed(), [])

    # ------------------------------------------------------------------ restarts and masters

    @defer.inlineCallbacks
    def test_pending_mail_resumes_at_once_when_the_master_starts_again(self):
        box, transport = self.make_outbox(refused())
        yield box.start()
        for n in range(3):
            yield box.queue(self.mail(n))
        yield box.stop()
        self.assertEqual(len(self.rows()), 3)
        self.assertEqual(len(self.lines("3 mails still pending, kept in the database")), 1)

        again, transport2 = self.make_outbox(accepted())
        yield again.start()
        self.reactor.advance(0)
        self.assertEqual(len(transport2.attempts), 3)  # at once, not after the retry delay
        self.assertEqual(self.rows_once_deletions_committed(), [])
        yield again.stop()

    @defer.inlineCallbacks
    def test_a_killed_masters_mail_is_taken_over_by_another_master_after_the_lease(self):
        dying, held = self.make_outbox(hold=True, lease=60)  # its attempt never reports back
        yield dying.start()
        row_id = yield dying.queue(self.mail())
        dying._running = False  # killed: no stop(), no release, no more passes
        dying._cancel_timer()

        other_master = yield fakemaster.make_master(
            self, wantDb=True, db_url=f"sqlite:///{self.db_path}", sqlite_memory=False, auto_upgrade=False,
            auto_clean=False,
        )
        other_master.masterid = 2
        survivor, transport = self.make_outbox(accepted(), master=other_master, lease=60)
        yield survivor.start()
        self.reactor.advance(30)
        self.assertEqual(transport.attempts, [])  # the lease still holds
        for _ in range(10):
            self.reactor.advance(survivor.poll_interval)
        self.assertEqual(len(transport.attempts), 1)
        self.assertEqual(self.rows_once_deletions_committed(), [])
        self.assertEqual(len(self.lines(f"outbox #{row_id} done")), 1)
        yield survivor.stop()

    @defer.inlineCallbacks
    def test_a_claim_is_won_by_exactly_one_master(self):
        box, _ = self.make_outbox(accepted())
        other = yield fakemaster.make_master(
            self, wantDb=True, db_url=f"sqlite:///{self.db_path}", sqlite_memory=False, auto_upgrade=False,
            auto_clean=False,
        )
        other.masterid = 2
        box2, _ = self.make_outbox(accepted(), master=other)
        first = yield box.claim("route dev", [[20, True]])
        second = yield box2.claim("route dev", [[20, True]])
        third = yield box2.claim("route dev", [[20, False]])  # another event of that build
        self.assertEqual((first, second, third), (True, False, True))

    # ------------------------------------------------------------------ the bound

    @defer.inlineCallbacks
    def test_past_outbox_max_messages_a_routes_mails_fold_into_one_digest(self):
        box, transport = self.make_outbox(refused(), limits=ob.OutboxLimits(max_messages=2, max_bytes=10**6))
        yield box.start()
        for n in range(5):
            yield box.queue(self.mail(n))
        rows = self.rows()
        self.assertEqual([r.digest_count for r in rows], [0, 0, 3])
        digest_row = yield self.master.db.pool.do(ob.thd_get, rows[2].id)
        self.assertEqual(digest_row.message.splitlines()[0], b"DIGEST route dev 3")
        self.assertIn("3 mails held back", digest_row.subject)
        self.assertEqual(len(self.lines("outbox full (")), 3)
        self.assertEqual(len(self.lines("folded into the digest for route dev")), 3)

        box.transport.script = [accepted()]
        self.reactor.advance(30)
        self.assertEqual(self.rows_once_deletions_committed(), [])

    @defer.inlineCallbacks
    def test_a_batch_is_one_insert_with_ids_in_order_and_folds_what_is_past_the_bound(self):
        yield self.master.db.pool.do(ob.thd_ensure_tables)
        mails = [self.mail(n) for n in range(4)]
        added = yield self.master.db.pool.do(
            ob.thd_add, "MailExtNotifier_test", mails, 1, 0.0, 60, ob.OutboxLimits(max_messages=2), digest
        )
        rows = {r.id: r for r in self.rows()}
        self.assertEqual([rows[a.id].label for a in added[:2]], ["build #0", "build #1"])
        self.assertEqual([a.digest_count for a in added], [0, 0, 1, 2])
        self.assertEqual(added[2].id, added[3].id)
        self.assertEqual(len(rows), 3)

    # ------------------------------------------------------------------ schema

    @defer.inlineCallbacks
    def test_tables_survive_buildbot_upgrade_and_leave_its_schema_check_content(self):
        box, _ = self.make_outbox(refused())
        yield box.start()
        yield box.queue(self.mail())
        yield self.master.db.model.upgrade()
        current = yield self.master.db.model.is_current()
        self.assertTrue(current)
        self.assertEqual(len(self.rows()), 1)


class OptionsTestCase(unittest.TestCase):
    def test_defaults_pass(self):
        self.assertEqual(ob.check_outbox_options(30, 1800, 3 * 86400, 10000, 10**8, 120, 30), [])

    def test_each_bad_value_names_the_setting(self):
        errors = ob.check_outbox_options(0, "x", -1, 1.5, True, 120, 30)
        for name in ("retry_initial=0", "retry_max_delay='x'", "give_up_after=-1", "outbox_max_messages=1.5",
                     "outbox_max_bytes=True"):
            self.assertTrue(any(name in e for e in errors), (name, errors))

    def test_inconsistent_values_say_what_to_change(self):
        errors = ob.check_outbox_options(60, 30, 10, 10, 10**6, 20, 30)
        self.assertEqual(len(errors), 3, errors)
        self.assertIn("retry_max_delay=30 is shorter than retry_initial=60", errors[0])
        self.assertIn("outbox_lease=20 must be at least twice smtp_timeout=30", errors[2])
