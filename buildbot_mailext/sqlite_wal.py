"""One connection to the master's SQLite file, kept open while the outbox runs.

This module owns :class:`KeptConnection`.

Why: Buildbot opens a new SQLite connection for every database call (SQLAlchemy's
``NullPool``, one DB thread) and closes it afterwards. When the *last* connection to a WAL
database closes, SQLite checkpoints the whole log into the database file, fsyncs it and
deletes the log; the next call creates it again. So on a master with an SQLite database,
every call that wrote something paid a checkpoint: a mail's outbox write and delete took
4.1 ms through Buildbot's pool, 0.9 ms on a connection kept open (``bench/outbox.py``).
The outbox commits every mail before ``sendMail`` returns (issue 7), so that checkpoint
was most of a mail's cost (issue 8).

While the kept connection is open, closing Buildbot's connection no longer closes the last
one: the log stays, and SQLite checkpoints it in the background as designed (every 1000
pages, ``wal_autocheckpoint``). Buildbot's own calls on the same master get the same
speed-up. The outbox's own statements run on the kept connection too, which spares each of
them a connect and a close, but always in Buildbot's DB thread (``do_with_engine``): on
SQLite that pool has exactly one thread, so the outbox's writes and Buildbot's never run at
the same time and never wait for each other's lock. Between two calls the connection holds
no transaction (whatever a call leaves open is rolled back), hence no lock and no old
snapshot. What an administrator sees: ``state.sqlite-wal`` and ``state.sqlite-shm`` stay
next to ``state.sqlite`` while the master runs (copy the database with
``sqlite3 state.sqlite ".backup copy.sqlite"``, not ``cp``).

Nothing is kept for PostgreSQL or MySQL (their pools keep connections already) or for an
in-memory SQLite database: calls then go through ``pool.do`` as any Buildbot query.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import sqlalchemy as sa
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


class KeptConnection:
    """A SQLAlchemy connection to the master's SQLite file, from :meth:`open` to :meth:`close`,
    used only in Buildbot's DB thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._engine: Any = None
        self._connection: Any = None  # set and cleared in the DB thread only
        self._asked = False  # open() was called and close() not yet (reactor thread)

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    def open(self, pool: Any) -> defer.Deferred:
        """Open the connection in ``pool`` (Buildbot's ``master.db.pool``); a no-op for other
        databases. Never fails: without it, mail is only slower."""
        self._asked = True
        d = pool.do_with_engine(self._thd_open)
        d.addErrback(self._not_opened)
        return d

    def do(self, pool: Any, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``pool.do(fn, *args)``, on the kept connection while it is open."""
        return pool.do_with_engine(self._thd_run, fn, *args)

    def close(self, pool: Any) -> defer.Deferred:
        """Close the connection after the calls queued before (SQLite then checkpoints and
        removes the log, as at every last close). Never fails: at shutdown the DB thread may
        already be gone, and the connection closes with the process. A no-op when it was
        never opened (an outbox that was not started, e.g. in ``buildbot-mailext preview``)."""
        if not self._asked:
            return defer.succeed(None)
        self._asked = False
        d = pool.do_with_engine(self._thd_close)
        d.addErrback(lambda f: None)
        return d

    # -- in Buildbot's DB thread
    def _thd_open(self, engine: Any) -> None:
        path = sqlite_file(engine)
        if path is None or self._connection is not None:
            return
        options: dict = {"poolclass": sa.pool.StaticPool, "connect_args": {"check_same_thread": False}}
        if sa.__version__.startswith("1."):
            options["future"] = True  # commit() as on SQLAlchemy 2, whatever Buildbot's engine does
        kept_engine = sa.create_engine(engine.url, **options)
        connection = kept_engine.connect()
        try:
            # Reading the schema opens the file and maps the log's index: from now on this
            # connection counts as open for SQLite's "last connection closes" rule.
            connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").fetchall()
            connection.rollback()
        except Exception:
            connection.close()
            kept_engine.dispose()
            raise
        self._engine, self._connection = kept_engine, connection

    def _thd_run(self, engine: Any, fn: Callable[..., Any], *args: Any) -> Any:
        connection = self._connection
        if connection is None:  # not SQLite, or closed: what pool.do would do
            with engine.connect() as fresh:
                return fn(fresh, *args)
        try:
            return fn(connection, *args)
        finally:
            if connection.in_transaction():  # a read, or a failed write: hold nothing
                connection.rollback()

    def _thd_close(self, engine: Any) -> None:
        connection, kept_engine = self._connection, self._engine
        self._connection = self._engine = None
        if connection is not None:
            connection.close()
            kept_engine.dispose()

    def _not_opened(self, failure: Any) -> None:
        log.msg(
            f"{self.name}: outbox: could not keep a connection to the SQLite database open "
            f"({failure.getErrorMessage()}); mail is still stored and sent, each commit is only slower"
        )
