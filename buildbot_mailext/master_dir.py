"""A Buildbot master directory opened from the ``buildbot-mailext`` command line.

This module owns what the operator commands (``preview MASTER_DIR``, ``send-test``) need of a
real master: its ``master.cfg`` loaded in-process exactly as Buildbot loads it (without the
config-load preflight: the commands probe or send by themselves), its mail notifiers configured
the way the master configures them (secrets rendered), and its database opened **read-only**,
so that a command is safe while the master runs:

- SQLite: ``PRAGMA query_only`` on every connection (and a missing database file is an error,
  never a new empty database);
- PostgreSQL: ``SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY`` on every connection;
- MySQL: ``SET SESSION TRANSACTION READ ONLY``.

Problems become :class:`MasterDirError` with a one-line message (cause and fix) and the exit
status the command should return.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from buildbot_mailext import preflight

__all__ = [
    "MasterDir", "MasterDirError", "TEMPLATE_ERROR_EXIT", "USAGE_EXIT", "add_master_dir_arguments", "run_command",
]

USAGE_EXIT = 2  # unreadable master.cfg, no database, bad options
TEMPLATE_ERROR_EXIT = 1  # a template that does not render (the thing an operator came to check)


def add_master_dir_arguments(parser: Any, optional: bool = False) -> None:
    """``MASTER_DIR`` and ``--config FILE``, worded alike in every command that reads a master."""
    parser.add_argument(
        "master_dir", nargs="?" if optional else None, metavar="MASTER_DIR", help="a Buildbot master directory"
    )
    parser.add_argument("--config", default="master.cfg", help="config file name in MASTER_DIR (default master.cfg)")


class MasterDirError(Exception):
    """One line for the operator; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT):
        super().__init__(message)
        self.exit_code = exit_code


def _read_only_statement(dbapi_connection: Any) -> Optional[str]:
    module = type(dbapi_connection).__module__
    if "sqlite" in module:
        return "PRAGMA query_only = ON"
    if "psycopg" in module or "pg8000" in module or "asyncpg" in module:
        return "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
    if "mysql" in module.lower() or "pymysql" in module.lower():
        return "SET SESSION TRANSACTION READ ONLY"
    return None


def _make_read_only(dbapi_connection: Any, _record: Any) -> None:
    statement = _read_only_statement(dbapi_connection)
    if statement is None:
        raise MasterDirError(
            f"cannot open the database read-only: unknown driver {type(dbapi_connection).__module__}"
        )
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()
    # PostgreSQL's SET is transactional: commit it, or the pool's first rollback undoes it.
    dbapi_connection.commit()


class MasterDir:
    """``MASTER_DIR`` with its configuration loaded (``config``) and, after :meth:`open`, a
    not-running ``BuildMaster`` (``master``) whose ``db`` and ``data`` read the real database.
    """

    def __init__(self, basedir: str, config_file: str = "master.cfg"):
        self.basedir = os.path.abspath(basedir)
        self.config_file = config_file
        self.config: Any = None
        self.master: Any = None
        self._listening = False
        self._started: list[Any] = []  # database components to stop again
        self._configured: list[Any] = []  # notifiers to stop again (transport, trackers)

    # -- configuration ------------------------------------------------------------------------

    def load_config(self) -> Any:
        """Load ``master.cfg`` like ``buildbot checkconfig`` (same objects, same checks)."""
        from buildbot.config.errors import ConfigErrors
        from buildbot.config.master import FileLoader

        path = os.path.join(self.basedir, self.config_file)
        if not os.path.isfile(path):
            raise MasterDirError(f"{path} does not exist: give a Buildbot master directory")
        cwd = os.getcwd()
        try:
            # A master runs from its directory: relative paths in master.cfg mean that one.
            os.chdir(self.basedir)
            with preflight.suppressed():
                self.config = FileLoader(self.basedir, self.config_file).loadConfig()
        except ConfigErrors as e:
            errors = list(e.errors)
            # A broken template is what these commands are for: exit 1, as at render time.
            code = TEMPLATE_ERROR_EXIT if any("template" in err for err in errors) else USAGE_EXIT
            raise MasterDirError(
                f"{self.config_file} has configuration errors:\n" + "\n".join("  " + err for err in errors),
                code,
            ) from None
        finally:
            os.chdir(cwd)
        return self.config

    def mail_notifiers(self) -> list[Any]:
        """Every ``MailNotifier`` (ours or stock) among the configured services, in order."""
        from buildbot.reporters.mail import MailNotifier

        services = getattr(self.config, "services", {}) or {}
        return [s for s in services.values() if isinstance(s, MailNotifier)]

    def notifier(self, name: Optional[str]) -> Any:
        """The notifier called ``name``, or the only one when ``name`` is None."""
        notifiers = self.mail_notifiers()
        names = ", ".join(repr(n.name) for n in notifiers) or "(none)"
        if not notifiers:
            raise MasterDirError(f"no MailNotifier in {os.path.join(self.basedir, self.config_file)}")
        if name is None:
            if len(notifiers) > 1:
                raise MasterDirError(f"{len(notifiers)} mail notifiers ({names}): choose one with --notifier NAME")
            return notifiers[0]
        for n in notifiers:
            if n.name == name:
                return n
        raise MasterDirError(f"no mail notifier named {name!r}; the notifiers are: {names}")

    # -- the master ---------------------------------------------------------------------------

    def database_url(self) -> str:
        db = getattr(self.config, "db", None)
        url = db.get("db_url") if isinstance(db, dict) else getattr(db, "db_url", None)
        if not isinstance(url, str):
            raise MasterDirError("c['db']['db_url'] is not a plain string: cannot open the database from the command line")
        return url

    def _check_sqlite_file(self, url: str) -> None:
        from sqlalchemy.engine.url import make_url

        u = make_url(url)
        if not u.drivername.startswith("sqlite"):
            return
        if not u.database:
            raise MasterDirError(f"db_url {url!r} is an in-memory database: nothing to read from another process")
        path = u.database % {"basedir": self.basedir}
        if not os.path.isabs(path):
            path = os.path.join(self.basedir, path)
        if not os.path.isfile(path):
            raise MasterDirError(
                f"no database at {path}: has this master ever started (buildbot upgrade-master "
                f"{self.basedir})? Without builds, use --sample"
            )

    @defer.inlineCallbacks
    def open(self, database: bool = True) -> Any:
        """Build a ``BuildMaster`` that is never started: its ``config`` is ours, its services
        are configured like the master's (secrets rendered), its database read-only."""
        from buildbot.master import BuildMaster

        if self.config is None:
            self.load_config()
        master = BuildMaster(self.basedir)
        services_ready = getattr(master, "_services_d", None)  # Buildbot >= 4.2 builds them async
        if services_ready is not None:
            yield services_ready
        self.master = master
        # Reporters subscribe to the MQ when configured. This master must never receive the
        # real master's events (a wamp MQ would deliver them): an in-process MQ of its own.
        master.config = copy.copy(self.config)
        master.config.mq = {"type": "simple"}
        yield master.mq.setup()
        master.config = self.config
        # The secret providers, configured as the master's secrets manager configures them
        # (its own reconfig would also claim them in the database).
        manager = master.secrets_manager
        for provider in manager.get_service_config(self.config).values():
            yield provider.setServiceParent(manager)
            yield provider.configureService()
        if database:
            yield self._open_database()
        return master

    @defer.inlineCallbacks
    def _open_database(self) -> Any:
        import sqlalchemy as sa
        from buildbot import util, version
        from buildbot.db import exceptions

        url = self.database_url()
        self._check_sqlite_file(url)
        shown = util.stripUrlPassword(url) if "@" in url else url
        sa.event.listen(sa.pool.Pool, "connect", _make_read_only)
        self._listening = True
        try:
            yield self.master.db.setup(check_version=True, verbose=False)
        except exceptions.DatabaseNotReadyError:
            raise MasterDirError(
                f"the database {shown} is not at the schema of this Buildbot "
                f"(Buildbot {version}): run the command with the Buildbot the "
                f"master runs, or `buildbot upgrade-master {self.basedir}`"
            ) from None
        except MasterDirError:
            raise
        except Exception as e:
            raise MasterDirError(
                f"cannot open the database {shown}: {type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}"
            ) from None
        # The components start their own helpers (Buildbot >= 4.2 reads logs through a thread
        # pool started here). Not the periodic cleanup: it deletes old changes.
        cleanup = getattr(self.master.db, "cleanup_timer", None)
        for component in list(self.master.db):
            if component is not cleanup and not component.running:
                yield component.startService()
                self._started.append(component)

    @defer.inlineCallbacks
    def configure_notifier(self, notifier: Any) -> Any:
        """Configure ``notifier`` as the master does at start (secrets rendered,
        ``reconfigService`` run), attached to our never-started master."""
        yield notifier.setServiceParent(self.master)
        self._configured.append(notifier)
        try:
            yield notifier.configureService()
        except KeyError as e:  # how Buildbot's secrets manager says a secret is missing
            raise MasterDirError(
                f"notifier {notifier.name!r}: {e.args[0] if e.args else e}: check c['secretsProviders'] "
                "and that this user can read the secrets"
            ) from None
        return notifier

    @defer.inlineCallbacks
    def close(self) -> Any:
        """Stop the database pool and drop the read-only hook."""
        master, self.master = self.master, None
        try:
            # The notifiers' own stopService: QUIT on cached connections, trackers stopped.
            configured, self._configured = self._configured, []
            for notifier in configured:
                yield notifier.stopService()
            started, self._started = self._started, []
            for component in reversed(started):
                yield component.stopService()
            pool = getattr(getattr(master, "db", None), "pool", None)
            if pool is not None:
                # stop() from Buildbot 4.1 on, shutdown() in 4.0
                yield (pool.stop() if hasattr(pool, "stop") else pool.shutdown())
        finally:
            if self._listening:
                import sqlalchemy as sa

                sa.event.remove(sa.pool.Pool, "connect", _make_read_only)
                self._listening = False


def run_command(command: Callable[[], Awaitable[int]]) -> int:
    """Run ``command`` (an async function returning an exit status) on the Twisted reactor and
    return its status; an unexpected exception is one line on stderr and status 2."""
    from twisted.internet import reactor

    outcome: list[int] = []

    def finish(result: Any) -> None:
        if isinstance(result, Failure):
            print(f"buildbot-mailext: unexpected error: {result.type.__name__}: {result.getErrorMessage()}", file=sys.stderr)
            outcome.append(USAGE_EXIT)
        else:
            outcome.append(int(result))
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(command()).addBoth(finish))
    reactor.run()
    return outcome[0] if outcome else USAGE_EXIT
