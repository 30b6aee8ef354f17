"""The outbox's write journal (buildbot_mailext.journal): which writes share one commit.

The runner here records what each commit would carry and answers when the test says so;
the real runner (``outbox.thd_add`` on SQLite, one transaction) is exercised by
tests/test_outbox.py and the e2e tests. Time is a ``task.Clock``: the lingering of a
deletion is advanced, not waited for.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from buildbot_mailext.journal import DEFAULT_LINGER, WriteJournal


class Runner:
    """Records each commit as (mails, deletions); each answers when the test fires it."""

    def __init__(self):
        self.commits = []
        self.running = []
        self.fail_when = lambda mails, deletions: False

    def __call__(self, mails, deletions):
        self.commits.append((list(mails), list(deletions)))
        d = defer.Deferred()
        self.running.append((d, list(mails), list(deletions)))
        return d

    def finish(self):
        d, mails, deletions = self.running.pop(0)
        if self.fail_when(mails, deletions):
            d.errback(RuntimeError("database is locked"))
        else:
            d.callback([f"row {m}" for m in mails])


class WriteJournalTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.runner = Runner()
        self.journal = WriteJournal(self.runner, lambda: self.clock)

    def test_new_mails_made_while_a_commit_runs_share_the_next_one(self):
        results = [self.journal.add(n) for n in range(5)]
        self.assertEqual(self.runner.commits, [([0], [])])  # the first one does not wait for company
        self.runner.finish()
        self.assertEqual(self.runner.commits, [([0], []), ([1, 2, 3, 4], [])])
        self.runner.finish()
        self.assertEqual([self.successResultOf(r) for r in results], [f"row {n}" for n in range(5)])

    def test_a_deletion_alone_lingers_then_commits_by_itself(self):
        done = self.journal.delete("delivered 1")
        self.clock.advance(DEFAULT_LINGER * 0.9)
        self.assertEqual(self.runner.commits, [])
        self.assertNoResult(done)
        self.clock.advance(DEFAULT_LINGER * 0.1)
        self.assertEqual(self.runner.commits, [([], ["delivered 1"])])
        self.runner.finish()
        self.assertIsNone(self.successResultOf(done))

    def test_a_deletion_shares_the_commit_of_the_next_new_mail(self):
        # Mails sent one after another: mail 1 is delivered, mail 2 comes; ONE commit.
        deleted = self.journal.delete("delivered 1")
        self.clock.advance(DEFAULT_LINGER / 2)
        stored = self.journal.add("mail 2")
        self.assertEqual(self.runner.commits, [(["mail 2"], ["delivered 1"])])
        self.runner.finish()
        self.assertEqual(self.successResultOf(stored), "row mail 2")
        self.assertIsNone(self.successResultOf(deleted))
        self.clock.advance(DEFAULT_LINGER)  # the lingering timer was cancelled: no 2nd commit
        self.assertEqual(len(self.runner.commits), 1)

    def test_a_deletion_made_during_a_commit_waits_for_the_next_new_mail(self):
        self.journal.add("mail 1")
        deleted = self.journal.delete("delivered 0")
        self.runner.finish()  # mail 1 committed; the deletion lingers, it does not commit alone
        self.assertEqual(len(self.runner.commits), 1)
        self.journal.add("mail 2")
        self.assertEqual(self.runner.commits[1], (["mail 2"], ["delivered 0"]))
        self.runner.finish()
        self.assertIsNone(self.successResultOf(deleted))

    def test_a_failing_deletion_does_not_cost_a_new_mail(self):
        self.runner.fail_when = lambda mails, deletions: bool(deletions)
        deleted = self.journal.delete("delivered 1")
        stored = self.journal.add("mail 2")
        self.runner.finish()  # the shared commit fails: split in two
        self.assertEqual(self.runner.commits[1:], [(["mail 2"], []), ([], ["delivered 1"])])
        self.runner.finish()
        self.runner.finish()
        self.assertEqual(self.successResultOf(stored), "row mail 2")
        self.failureResultOf(deleted, RuntimeError)

    def test_a_failing_new_mail_alone_errbacks_its_caller(self):
        self.runner.fail_when = lambda mails, deletions: True
        stored = self.journal.add("mail 1")
        self.runner.finish()
        self.failureResultOf(stored, RuntimeError)
        self.assertTrue(self.journal.idle)

    def test_flush_commits_waiting_deletions_now_and_stops_lingering_until_restored(self):
        first = self.journal.delete("delivered 1")
        self.journal.flush()
        self.assertEqual(self.runner.commits, [([], ["delivered 1"])])
        self.runner.finish()
        self.assertIsNone(self.successResultOf(first))
        self.journal.delete("delivered 2")  # stopping: no lingering
        self.assertEqual(self.runner.commits[-1], ([], ["delivered 2"]))
        self.runner.finish()
        self.journal.flush(eager=False)  # started again
        self.journal.delete("delivered 3")
        self.assertEqual(len(self.runner.commits), 2)
        self.clock.advance(DEFAULT_LINGER)
        self.assertEqual(self.runner.commits[-1], ([], ["delivered 3"]))

    def test_every_new_mail_of_a_failed_commit_gets_its_failure_and_the_next_one_still_runs(self):
        first = self.journal.add("mail 0")
        waiting = [self.journal.add(f"mail {n}") for n in (1, 2)]
        self.runner.finish()  # mail 0 committed
        self.runner.fail_when = lambda mails, deletions: True
        self.runner.finish()  # mails 1 and 2 share a commit, which fails
        self.assertEqual(self.successResultOf(first), "row mail 0")
        for d in waiting:
            self.assertEqual(str(self.failureResultOf(d, RuntimeError).value), "database is locked")
        self.runner.fail_when = lambda mails, deletions: False
        later = self.journal.add("mail 3")
        self.runner.finish()
        self.assertEqual(self.successResultOf(later), "row mail 3")

    def test_with_linger_zero_a_deletion_commits_at_once(self):
        journal = WriteJournal(self.runner, lambda: self.clock, linger=0)
        journal.delete("delivered 1")
        self.assertEqual(self.runner.commits, [([], ["delivered 1"])])  # no reactor turn needed

    def test_an_idle_journal_holds_no_timer(self):
        # Nothing left waiting, nothing scheduled: a master that stops leaves no stray call.
        self.journal.add("mail 1")
        self.runner.finish()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.journal.delete("delivered 1")
        self.journal.delete("delivered 2")  # the lingering timer is not doubled
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(DEFAULT_LINGER)
        self.runner.finish()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.runner.commits[-1], ([], ["delivered 1", "delivered 2"]))
