"""Keeping the master's SQLite write-ahead log open while the outbox runs.

This module owns :class:`WalKeeper`, one idle connection to the master's SQLite file.

Why: Buildbot opens a new SQLite connection for every database call (SQLAlchemy's
``NullPool``, one DB thread) and closes it afterwards. When the *last* connection to a WAL
database closes, SQLite checkpoints the whole log into the database file, fsyncs it and
deletes the log; the next call creates it again. So on a master with an SQLite database,
every call that wrote something pays a checkpoint: measured here ~12 ms per
insert-and-commit through ``NullPool``, against ~1 ms while one other connection to the file
stays open (``bench/throughput.py`` shows what it does to a mail). The outbox commits every
mail before ``sendMail`` returns (issue 7), so that checkpoint was most of a mail's cost
(issue 8).

While the keeper's connection is open, closing Buildbot's connection no longer closes the
last one: the log stays, and SQLite checkpoints it in the background as designed (every
1000 pages, ``wal_autocheckpoint``). The keeper reads the schema once (that maps the log's
index) and then holds no transaction and no lock a writer could wait for; it never writes.
Buildbot's own calls on the same master get the same speed-up. What an administrator sees:
``state.sqlite-wal`` and ``state.sqlite-shm`` stay next to ``state.sqlite`` while the master
runs (copy the database with ``sqlite3 state.sqlite ".backup copy.sqlite"``, not ``cp``).

Nothing to keep for PostgreSQL or MySQL (their pools keep connections) or for an in-memory
SQLite database. Opening and closing run in Buildbot's DB thread, never in the reactor.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Optional

from twisted.internet import defer
from twisted.python import log


def sqlite_file(engine: Any) -> Optional[str]:
    """The path of ``engine``'s SQLite database file, or None (another database, or in memory)."""
    url = getattr(engine, "url", None)
    if url is None or not url.drivername.startswith("sqlite"):
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return database if os.path.isfile(database) else None


class WalKeeper:
    """One idle connection to the master's SQLite file, from :meth:`open` to :meth:`close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._connection: Optional[sqlite3.Connection] = None

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    def open(self, pool: Any) -> defer.Deferred:
        """Open the connection in ``pool`` (Buildbot's ``master.db.pool``); a no-op for other
        databases. Never fails: without the keeper, mail is only slower."""
        if self._connection is not None:
            return defer.succeed(None)
        d = pool.do_with_engine(self._thd_open)
        d.addErrback(self._not_opened)
        return d

    def close(self, pool: Any) -> defer.Deferred:
        """Close the connection (SQLite then checkpoints and removes the log, as at every
        last close). Never fails: at shutdown the DB thread may already be gone."""
        connection, self._connection = self._connection, None
        if connection is None:
            return defer.succeed(None)
        d = pool.do_with_engine(lambda engine: connection.close())
        # The pool was stopped first (master shutdown): the connection closes with the
        # process; SQLite replays or checkpoints the log at the next open either way.
        d.addErrback(lambda f: None)
        return d

    def _thd_open(self, engine: Any) -> None:
        path = sqlite_file(engine)
        if path is None:
            return
        # check_same_thread=False: Buildbot's DB pool may close it from another of its threads.
        connection = sqlite3.connect(path, check_same_thread=False)
        try:
            # Reading the schema opens the file and maps the log's index: from now on this
            # connection counts as open for SQLite's "last connection closes" rule.
            connection.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except Exception:
            connection.close()
            raise
        self._connection = connection

    def _not_opened(self, failure: Any) -> None:
        log.msg(
            f"{self.name}: outbox: could not keep the SQLite database's log open ({failure.getErrorMessage()}); "
            "mail is still stored and sent, each commit is only slower"
        )
