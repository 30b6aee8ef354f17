"""Group commit for the outbox's own writes: new rows and the deletion of delivered ones.

This module owns *when* the outbox commits, not *what* it writes (that is
``outbox.thd_add``). A commit is a round trip through Buildbot's DB thread and, on SQLite,
a write to the WAL and an fsync: with one transaction per new mail and another per
delivered mail, the database, not the network, would set the pace of mails sent one after
another. So:

* a **new mail** is urgent (its caller waits to know it is stored before the first attempt):
  it starts a transaction at once, or, while one runs, joins the next one;
* the **deletion of a delivered row** is lazy: it waits up to ``linger`` seconds for the next
  new mail and shares its commit. Mails sent one after another then cost one commit each,
  not two. Until the deletion commits, the row stays leased to this master (nobody else sends
  it); a master killed in that window sends that mail once more after its restart, the same
  trade-off as a kill between the ``250`` and any commit, over a window of ``linger``
  instead of one fsync. ``flush()`` (at stop) ends the lingering.
* a transaction that carried both kinds and failed is split and retried as two, so a new
  mail is never lost to a failing deletion.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer

# run(mails, delivered_entries) -> Deferred firing with one result per mail (one commit)
Runner = Callable[[list, list], defer.Deferred]

DEFAULT_LINGER = 0.1  # seconds a deletion waits for a new mail to share its commit


class WriteJournal:
    """Batches :meth:`add` (urgent) and :meth:`delete` (lazy) into as few commits as it can."""

    def __init__(self, run: Runner, reactor: Callable[[], Any], linger: float = DEFAULT_LINGER) -> None:
        self._run = run
        self._reactor = reactor  # a callable: the master's reactor is known only once attached
        self.linger = linger
        self._adds: list[tuple[Any, defer.Deferred]] = []
        self._deletes: list[tuple[Any, defer.Deferred]] = []
        self._busy = False
        self._eager = False  # set by flush(): deletions no longer wait
        self._timer: Any = None

    def add(self, mail: Any) -> defer.Deferred:
        """Store ``mail``; fires with its result once committed."""
        d: defer.Deferred = defer.Deferred()
        self._adds.append((mail, d))
        self._kick()
        return d

    def delete(self, entry: Any) -> defer.Deferred:
        """Delete a delivered row; fires (with None) once committed, at most ``linger`` later
        than it would alone (sooner when a new mail comes)."""
        d: defer.Deferred = defer.Deferred()
        self._deletes.append((entry, d))
        self._kick()
        return d

    def flush(self, eager: bool = True) -> None:
        """Commit the waiting deletions now; with ``eager``, later ones do not linger either
        (the outbox is stopping). ``flush(eager=False)`` restores lingering (restart)."""
        self._eager = eager
        if eager:
            self._kick()

    @property
    def idle(self) -> bool:
        return not (self._busy or self._adds or self._deletes)

    def _kick(self) -> None:
        if self._busy:
            return  # the running commit's end looks again
        if self._adds or (self._deletes and (self._eager or self.linger <= 0)):
            self._next()
        elif self._deletes and self._timer is None:
            self._timer = self._reactor().callLater(self.linger, self._linger_over)

    def _linger_over(self) -> None:
        self._timer = None
        if not self._busy:
            self._next()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _next(self) -> None:
        self._cancel_timer()
        adds, self._adds = self._adds, []
        deletes, self._deletes = self._deletes, []
        if not adds and not deletes:
            return
        self._busy = True
        d = self._commit(adds, deletes)
        d.addBoth(self._done)

    def _commit(self, adds: list, deletes: list) -> defer.Deferred:
        d = defer.maybeDeferred(self._run, [m for m, _ in adds], [e for e, _ in deletes])

        def done(results: Any) -> None:
            for (_, waiter), result in zip(adds, results):
                waiter.callback(result)
            for _, waiter in deletes:
                waiter.callback(None)

        def failed(f: Any) -> Optional[defer.Deferred]:
            if adds and deletes:  # split: a failing deletion must not cost a new mail
                return defer.DeferredList([self._commit(adds, []), self._commit([], deletes)])
            for _, waiter in adds + deletes:
                waiter.errback(f)
            return None

        d.addCallbacks(done, failed)
        return d

    def _done(self, _: Any) -> None:
        self._busy = False
        self._kick()
