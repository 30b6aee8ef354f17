"""The outbox: every finished mail is kept in the master's database until a server took it.

This module owns the durable side of sending:

* three tables (``mailext_outbox``: one row per message not yet accepted, or dead;
  ``mailext_leases``: one row per master and notifier, its heartbeat;
  ``mailext_claims``: which build event a notifier has already mailed, across masters);
* the retry schedule (:class:`RetryPolicy`: first retry after ``retry_initial`` seconds,
  doubling, capped at ``retry_max_delay``, dead letter after ``give_up_after``);
* what happens after each attempt (delivered -> row deleted; 4xx/refused/timeout -> retry;
  5xx/AUTH -> dead letter; a mix -> split), with one log line per transition;
* leases: a row carries the master that owns it; that master's lease (renewed at every
  pass, ended at a clean stop) says until when; another master takes a pending row over
  once the lease has expired (its owner stopped or was killed);
* writes in groups (``journal.py``): what is queued, or delivered, while a transaction runs
  shares the next one (one commit for a burst, not one per mail), and a delivered row's
  deletion waits briefly to share the next new mail's commit.
* the bound (``outbox_max_messages`` / ``outbox_max_bytes``): past it, new mails of a route
  are folded into one digest row for that route instead of being dropped.

It stores finished messages (envelope + bytes) and never renders: the digest's text is
built by a callable the notifier hands in. The transport (``transport.py``) makes one
attempt per call and reports a ``Delivery``; the decision what to do next is made here.

Why tables of our own, not rows in Buildbot's ``object_state``
---------------------------------------------------------------
``object_state`` holds one JSON value per (object, name) and offers no delete, no
compare-and-set and no query by value: a queue needs all three (take the rows that are due,
take over a row whose lease expired without racing another master, delete a row after the
250). Our tables are created by us (``CREATE TABLE`` only if missing, at notifier start and
by the CLI) in a ``MetaData`` of our own, named ``mailext_*`` so they can never clash with
Buildbot's. Buildbot's schema handling only ever touches its own tables: ``upgrade-master``
runs Alembic migrations for Buildbot's models (ours are not in them, so they are neither
altered nor dropped) and the start-up check compares the ``alembic_version`` row only, so
extra tables do not trip it. Claims use a primary key on a hash of (notifier, route, build,
event): an ``INSERT`` either wins or raises ``IntegrityError``, atomically on SQLite,
PostgreSQL and MySQL.

Every database call runs in Buildbot's DB thread pool, so the reactor never waits on the
database; on SQLite it runs on one connection kept open while the outbox runs
(``sqlite_wal.py``), elsewhere on a connection of Buildbot's pool (``master.db.pool.do``).
The ``thd_*`` functions take a SQLAlchemy connection and are shared with the
``buildbot-mailext outbox`` command, which opens the same database.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from twisted.internet import defer
from twisted.python import log

from buildbot_mailext.journal import WriteJournal
from buildbot_mailext.sqlite_wal import KeptConnection
from buildbot_mailext.transport import Delivery, describe

PENDING = "pending"
DEAD = "dead"

DEFAULT_RETRY_INITIAL = 30.0
DEFAULT_RETRY_MAX_DELAY = 1800.0
DEFAULT_GIVE_UP_AFTER = 3 * 24 * 3600.0
DEFAULT_MAX_MESSAGES = 10_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_LEASE = 120.0

# Rows taken per pass: a long outage's backlog leaves in batches rather than in one huge
# query; the next pass starts at once while more are due.
BATCH = 200
# Claims only need to outlive the time every master takes to see one build event.
CLAIM_RETENTION = 2 * 24 * 3600.0
PRUNE_EVERY = 3600.0

metadata = sa.MetaData()

outbox_table = sa.Table(
    "mailext_outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("notifier", sa.String(191), nullable=False),
    sa.Column("route", sa.String(255), nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("envelope_from", sa.Text, nullable=False),
    sa.Column("recipients", sa.Text, nullable=False),  # JSON list
    sa.Column("message", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql"), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Column("next_try_at", sa.Float(precision=53), nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("owner", sa.Integer, nullable=True),  # the owning master's masterid
    sa.Column("digest_count", sa.Integer, nullable=False, default=0),  # 0: a plain mail
    sa.Column("digest_items", sa.Text, nullable=True),  # JSON list of {"subject", "label"}
    sa.Index("mailext_outbox_due", "notifier", "state", "next_try_at"),
)

# One row per (notifier, master): the master's lease on every pending row it owns, renewed
# by one small UPDATE per pass (a heartbeat), so renewing never touches the mail rows
# themselves (a bulk UPDATE of those would deadlock against another master's deletes).
leases_table = sa.Table(
    "mailext_leases",
    metadata,
    sa.Column("notifier", sa.String(191), primary_key=True),
    sa.Column("owner", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("lease_until", sa.Float(precision=53), nullable=False),
)

claims_table = sa.Table(
    "mailext_claims",
    metadata,
    sa.Column("claim", sa.String(40), primary_key=True),  # sha1 of the claim's parts
    sa.Column("notifier", sa.String(191), nullable=False),
    sa.Column("owner", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Index("mailext_claims_created", "created_at"),
)


# Statements of the per-mail path, built once: building one per call (every value coerced
# into a bind parameter) cost more CPU than SQLite's own work for a mail (issue 8).
_TOTALS = sa.select(
    sa.func.count(outbox_table.c.id), sa.func.coalesce(sa.func.sum(outbox_table.c.size), 0)
).where(outbox_table.c.notifier == sa.bindparam("notifier"))
_INSERT = outbox_table.insert()
_DELETE_DELIVERED = outbox_table.delete().where(
    outbox_table.c.id.in_(sa.bindparam("ids", expanding=True)), outbox_table.c.digest_count == 0
)


# ------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again: ``initial`` seconds after the first failure, doubling, never more
    than ``max_delay`` apart; a mail still not accepted ``give_up_after`` seconds after it
    was queued becomes a dead letter."""

    initial: float = DEFAULT_RETRY_INITIAL
    max_delay: float = DEFAULT_RETRY_MAX_DELAY
    give_up_after: float = DEFAULT_GIVE_UP_AFTER

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failed attempt (1, 2, ...)."""
        exponent = min(max(failed_attempts, 1) - 1, 64)  # 2**64 s is already past any cap
        return min(self.initial * (2 ** exponent), self.max_delay)


@dataclass(frozen=True)
class OutboxLimits:
    """The bound on one notifier's outbox (pending and dead rows together)."""

    max_messages: int = DEFAULT_MAX_MESSAGES
    max_bytes: int = DEFAULT_MAX_BYTES


def check_outbox_options(
    retry_initial: Any,
    retry_max_delay: Any,
    give_up_after: Any,
    outbox_max_messages: Any,
    outbox_max_bytes: Any,
    outbox_lease: Any,
    smtp_timeout: Any,
) -> list[str]:
    """Config errors for the outbox options, each naming the setting and the fix."""
    errors: list[str] = []

    def number(name: str, value: Any, integer: bool = False) -> bool:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            what = "a whole number" if integer else "a number of seconds"
            errors.append(f"MailExtNotifier: {name}={value!r} must be {what} greater than 0")
            return False
        return True

    ok = all(
        [
            number("retry_initial", retry_initial),
            number("retry_max_delay", retry_max_delay),
            number("give_up_after", give_up_after),
            number("outbox_max_messages", outbox_max_messages, integer=True),
            number("outbox_max_bytes", outbox_max_bytes, integer=True),
            number("outbox_lease", outbox_lease),
        ]
    )
    if not ok:
        return errors
    if retry_max_delay < retry_initial:
        errors.append(
            f"MailExtNotifier: retry_max_delay={retry_max_delay!r} is shorter than "
            f"retry_initial={retry_initial!r}; make it at least as long"
        )
    if give_up_after < retry_initial:
        errors.append(
            f"MailExtNotifier: give_up_after={give_up_after!r} is shorter than the first retry "
            f"(retry_initial={retry_initial!r}): no mail would ever be retried; raise it"
        )
    if isinstance(smtp_timeout, (int, float)) and outbox_lease < 2 * smtp_timeout:
        errors.append(
            f"MailExtNotifier: outbox_lease={outbox_lease!r} must be at least twice "
            f"smtp_timeout={smtp_timeout!r}, or another master could take over a mail that "
            "is still being sent (and send it twice)"
        )
    return errors


# ------------------------------------------------------------------------------- rows


@dataclass
class NewMail:
    """A finished message on its way into the outbox."""

    route: str
    label: str
    subject: str
    envelope_from: str
    recipients: list[str]
    message: bytes


@dataclass
class OutboxEntry:
    """One row of ``mailext_outbox`` (``message`` is None when it was not read)."""

    id: int
    notifier: str
    route: str
    label: str
    subject: str
    envelope_from: str
    recipients: list[str]
    size: int
    state: str
    attempts: int
    created_at: float
    next_try_at: float
    last_error: Optional[str]
    owner: Optional[int]
    digest_count: int
    digest_items: list[dict] = field(default_factory=list)
    message: Optional[bytes] = None


_SUMMARY_COLUMNS = [c for c in outbox_table.c if c.name != "message"]


def _entry(row: Any, with_message: bool) -> OutboxEntry:
    m = row._mapping
    plain = {f.name: m[f.name] for f in fields(OutboxEntry) if f.name not in ("recipients", "digest_items", "message")}
    return OutboxEntry(
        **plain,
        recipients=json.loads(m["recipients"]),
        digest_items=json.loads(m["digest_items"] or "[]"),
        message=bytes(m["message"]) if with_message else None,
    )


def claim_key(notifier: str, *parts: Any) -> str:
    """The claim's primary key: a hash of the notifier name and what identifies the event."""
    text = json.dumps([notifier, *parts], sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8", "replace")).hexdigest()


# ------------------------------------------------------------------------------- DB side
def _commit(conn: Any) -> None:
    """Commit what this thread did. SQLAlchemy 2 ("future") connections need it; the 1.4
    connections of Buildbot 4.0/4.1 autocommit each statement and have no commit()."""
    commit = getattr(conn, "commit", None)
    if commit is not None:
        commit()


def _rollback(conn: Any) -> None:
    """Roll back after a failed statement. SQLAlchemy 1.4's connections (Buildbot 4.0/4.1)
    have no rollback(): each statement runs in a transaction of its own, which SQLAlchemy
    itself rolls back when the statement fails."""
    rollback = getattr(conn, "rollback", None)
    if rollback is not None:
        rollback()


# Each thd_* function runs in a DB thread (master.db.pool.do) or in the CLI, and commits
# its own work: a crash between two of them leaves the database consistent.


def thd_ensure_tables(conn: Any) -> None:
    """Create the outbox tables if missing. Two masters starting together may race: the
    loser's CREATE fails, and the tables exist, which is all we wanted."""
    try:
        metadata.create_all(conn, checkfirst=True)
        _commit(conn)
    except sa.exc.SQLAlchemyError:
        _rollback(conn)
        inspector = sa.inspect(conn)
        if not all(inspector.has_table(t.name) for t in metadata.sorted_tables):
            raise


def thd_claim(conn: Any, key: str, notifier: str, owner: Optional[int], now: float) -> bool:
    """Insert the claim; True when this call won it, False when it was already there."""
    try:
        conn.execute(claims_table.insert().values(claim=key, notifier=notifier, owner=owner, created_at=now))
        _commit(conn)
        return True
    except sa.exc.IntegrityError:
        _rollback(conn)
        return False


def thd_totals(conn: Any, notifier: str) -> tuple[int, int]:
    """(rows, bytes) held by this notifier, pending and dead."""
    row = conn.execute(_TOTALS, {"notifier": notifier}).one()
    return int(row[0]), int(row[1])


DigestBuilder = Callable[[str, list, list], bytes]


def digest_summary(count: int) -> str:
    """What a digest row is about (``outbox list``'s subject column, the digest's subject)."""
    return f"{count} mails held back: the mail outbox is full"


@dataclass
class Added:
    """What :func:`thd_add` did: queued ``id`` as a mail of its own, or folded it into the
    digest row ``id`` that now holds ``digest_count`` mails."""

    id: int
    digest_count: int = 0
    held: tuple[int, int] = (0, 0)  # (rows, bytes) when the bound was reached


def thd_add(
    conn: Any,
    notifier: str,
    mails: Sequence[NewMail],
    owner: Optional[int],
    now: float,
    lease: float,
    limits: OutboxLimits,
    build_digest: DigestBuilder,
    delivered: Sequence[OutboxEntry] = (),
) -> list[Added]:
    """Write ``mails`` in one transaction (one commit: one fsync on SQLite, however many
    mails a build made), each leased to ``owner`` for its first attempt, which the caller
    makes right away; past the bound, a mail is folded into its route's digest instead.

    The rows of ``delivered`` mails are deleted in the same transaction, first, so the new
    mails can use the room they leave under the bound (the write journal, ``journal.py``,
    lets those deletions wait for the next new mail)."""
    t = outbox_table
    if delivered:
        thd_delivered(conn, delivered, build_digest, commit=False)
    rows, total = thd_totals(conn, notifier)  # one count per batch, kept current below
    fits = []
    for mail in mails:
        if rows + len(fits) >= limits.max_messages or total + len(mail.message) > limits.max_bytes:
            break
        fits.append(mail)
        total += len(mail.message)
    values = [dict(
        notifier=notifier, route=m.route, label=m.label, subject=m.subject,
        envelope_from=m.envelope_from, recipients=json.dumps(m.recipients), message=m.message,
        size=len(m.message), state=PENDING, attempts=0, created_at=now, next_try_at=now + lease,
        last_error=None, owner=owner, digest_count=0, digest_items=None,
    ) for m in fits]
    if len(values) > 1 and getattr(conn.dialect, "insert_executemany_returning_sort_by_parameter_order", False):
        # SQLite and PostgreSQL: one multi-row INSERT ... RETURNING, ids in the order given
        ids = list(conn.execute(t.insert().returning(t.c.id, sort_by_parameter_order=True), values).scalars())
    else:  # one row, or MySQL (no RETURNING)
        ids = [conn.execute(_INSERT, v).inserted_primary_key[0] for v in values]
    added = [Added(i) for i in ids]
    held = [rows + len(fits), total]
    added += [_add_one(conn, notifier, mail, owner, now, lease, limits, build_digest, held)
              for mail in mails[len(fits):]]
    _commit(conn)
    return added


def _add_one(
    conn: Any,
    notifier: str,
    mail: NewMail,
    owner: Optional[int],
    now: float,
    lease: float,
    limits: OutboxLimits,
    build_digest: DigestBuilder,
    held: list,
) -> Added:
    t = outbox_table
    size = len(mail.message)
    rows, total = held
    if rows < limits.max_messages and total + size <= limits.max_bytes:
        held[0], held[1] = rows + 1, total + size
        result = conn.execute(
            t.insert().values(
                notifier=notifier, route=mail.route, label=mail.label, subject=mail.subject,
                envelope_from=mail.envelope_from, recipients=json.dumps(mail.recipients),
                message=mail.message, size=size, state=PENDING, attempts=0, created_at=now,
                next_try_at=now + lease, last_error=None, owner=owner,
                digest_count=0, digest_items=None,
            )
        )
        return Added(result.inserted_primary_key[0])

    item = {"subject": mail.subject, "label": mail.label}
    digest = conn.execute(
        sa.select(*outbox_table.c).where(
            t.c.notifier == notifier, t.c.route == mail.route, t.c.state == PENDING, t.c.digest_count > 0
        ).order_by(t.c.id).limit(1)
    ).first()
    if digest is None:
        items, recipients = [item], list(mail.recipients)
    else:
        old = _entry(digest, with_message=False)
        items = old.digest_items + [item]
        recipients = old.recipients + [r for r in mail.recipients if r not in old.recipients]
    message = build_digest(mail.route, items, recipients)
    values = dict(
        subject=digest_summary(len(items)), recipients=json.dumps(recipients),
        message=message, size=len(message), digest_count=len(items), digest_items=json.dumps(items),
    )
    if digest is None:
        result = conn.execute(
            t.insert().values(
                notifier=notifier, route=mail.route, label=f"digest for {mail.route}",
                envelope_from=mail.envelope_from, state=PENDING, attempts=0, created_at=now,
                next_try_at=now, last_error=None, owner=owner, **values,
            )
        )
        digest_id = result.inserted_primary_key[0]
    else:
        conn.execute(t.update().where(t.c.id == digest.id).values(**values))
        digest_id = digest.id
    held[:] = thd_totals(conn, notifier)
    return Added(digest_id, len(items), (rows, total))


def _takeable(owner: Optional[int], now: float) -> Any:
    t, lt = outbox_table, leases_table
    # Ours, nobody's, or held by a master whose lease ran out (stopped or killed).
    alive = sa.exists().where(lt.c.notifier == t.c.notifier, lt.c.owner == t.c.owner, lt.c.lease_until >= now)
    return sa.or_(t.c.owner == owner, t.c.owner.is_(None), ~alive)


def thd_take_due(conn: Any, notifier: str, owner: Optional[int], now: float, lease: float, limit: int) -> list[OutboxEntry]:
    """Lease up to ``limit`` due pending rows to ``owner`` and return them with their bytes.

    Each row is taken by a conditional UPDATE (compare-and-set): of two masters racing for
    a row, exactly one sees rowcount 1. ``next_try_at`` moves to the lease's end, so a row
    whose attempt never reports back (a kill) is due again when its lease expires."""
    t = outbox_table
    ids = [
        r.id
        for r in conn.execute(
            sa.select(t.c.id)
            .where(t.c.notifier == notifier, t.c.state == PENDING, t.c.next_try_at <= now, _takeable(owner, now))
            .order_by(t.c.next_try_at, t.c.id)
            .limit(limit)
        )
    ]
    taken = []
    for row_id in sorted(ids):  # one lock order for every transaction: no deadlock
        result = conn.execute(
            t.update()
            .where(t.c.id == row_id, t.c.state == PENDING, t.c.next_try_at <= now, _takeable(owner, now))
            .values(owner=owner, next_try_at=now + lease)
        )
        if result.rowcount == 1:
            taken.append(row_id)
    _commit(conn)
    if not taken:
        return []
    rows = conn.execute(sa.select(*t.c).where(t.c.id.in_(taken)).order_by(t.c.id))
    return [_entry(r, with_message=True) for r in rows]


def thd_next_due(conn: Any, notifier: str, owner: Optional[int], now: float) -> Optional[float]:
    """When the next pending row this master may take is due (None: nothing pending)."""
    t = outbox_table
    mine = sa.or_(t.c.owner == owner, t.c.owner.is_(None))
    value = conn.execute(
        sa.select(sa.func.min(t.c.next_try_at)).where(t.c.notifier == notifier, t.c.state == PENDING, mine)
    ).scalar()
    return None if value is None else float(value)


def thd_delivered(
    conn: Any, entries: Sequence[OutboxEntry], build_digest: DigestBuilder, commit: bool = True
) -> None:
    """The server accepted these mails: delete their rows, in one transaction. A digest
    that took more mails while it was on the wire (compare-and-set on ``digest_count``)
    keeps only those, rebuilt. ``commit=False``: part of :func:`thd_add`'s transaction."""
    t = outbox_table
    plain = sorted(e.id for e in entries if not e.digest_count)
    if plain:  # one statement; ids in order, the lock order of thd_take_due
        conn.execute(_DELETE_DELIVERED, {"ids": plain})
    for entry in sorted((e for e in entries if e.digest_count), key=lambda e: e.id):
        deleted = conn.execute(t.delete().where(t.c.id == entry.id, t.c.digest_count == entry.digest_count))
        if deleted.rowcount:
            continue
        row = conn.execute(sa.select(*t.c).where(t.c.id == entry.id)).first()
        if row is None:
            continue
        current = _entry(row, with_message=False)
        items = current.digest_items[entry.digest_count:]
        message = build_digest(current.route, items, current.recipients)
        conn.execute(
            t.update().where(t.c.id == entry.id).values(
                digest_items=json.dumps(items), digest_count=len(items), message=message, size=len(message),
                subject=digest_summary(len(items)), next_try_at=0.0,
            )
        )
    if commit:
        _commit(conn)


def thd_reschedule(
    conn: Any, entry_id: int, recipients: Sequence[str], next_try_at: float, last_error: str, attempts: int,
) -> None:
    t = outbox_table
    conn.execute(
        t.update().where(t.c.id == entry_id).values(
            recipients=json.dumps(list(recipients)), next_try_at=next_try_at, last_error=last_error,
            attempts=attempts,
        )
    )
    _commit(conn)


def thd_dead_letter(
    conn: Any, entry: OutboxEntry, recipients: Sequence[str], last_error: str, attempts: int, split: bool
) -> int:
    """Mark the row dead for ``recipients``; with ``split`` the row itself stays pending
    (its other recipients will be retried) and the dead letter is a copy. Returns the dead
    row's id."""
    t = outbox_table
    values = dict(recipients=json.dumps(list(recipients)), state=DEAD, last_error=last_error, attempts=attempts)
    if not split:
        conn.execute(t.update().where(t.c.id == entry.id).values(**values))
        _commit(conn)
        return entry.id
    result = conn.execute(
        t.insert().values(
            notifier=entry.notifier, route=entry.route, label=entry.label, subject=entry.subject,
            envelope_from=entry.envelope_from, message=entry.message, size=entry.size,
            created_at=entry.created_at, next_try_at=entry.next_try_at, owner=entry.owner,
            digest_count=0, digest_items=None, **values,
        )
    )
    _commit(conn)
    return result.inserted_primary_key[0]


def thd_renew_lease(conn: Any, notifier: str, owner: Optional[int], now: float, lease: float) -> None:
    """Heartbeat: this master is alive and still owns its pending rows until now + lease."""
    lt = leases_table
    updated = conn.execute(
        lt.update().where(lt.c.notifier == notifier, lt.c.owner == owner).values(lease_until=now + lease)
    )
    if updated.rowcount == 0:  # only this master writes its own row: no race
        conn.execute(lt.insert().values(notifier=notifier, owner=owner, lease_until=now + lease))
    _commit(conn)


def thd_release_lease(conn: Any, notifier: str, owner: Optional[int], now: float) -> int:
    """Clean stop: end this master's lease now, so another master may take over at once.
    Returns how many pending rows this master leaves behind."""
    lt, t = leases_table, outbox_table
    conn.execute(lt.update().where(lt.c.notifier == notifier, lt.c.owner == owner).values(lease_until=now - 1))
    _commit(conn)
    left = conn.execute(
        sa.select(sa.func.count(t.c.id)).where(t.c.notifier == notifier, t.c.state == PENDING, t.c.owner == owner)
    ).scalar()
    return int(left or 0)


def thd_resume(conn: Any, notifier: str, owner: Optional[int], now: float) -> int:
    """Master start: this master's pending rows (and orphaned ones) are due at once."""
    t = outbox_table
    result = conn.execute(
        t.update()
        .where(t.c.notifier == notifier, t.c.state == PENDING, _takeable(owner, now))
        .values(next_try_at=now, owner=owner)
    )
    _commit(conn)
    return result.rowcount


def thd_prune_claims(conn: Any, before: float) -> int:
    result = conn.execute(claims_table.delete().where(claims_table.c.created_at < before))
    _commit(conn)
    return result.rowcount


# -- used by the CLI (and tests)


def thd_list(conn: Any, state: Optional[str] = None) -> list[OutboxEntry]:
    t = outbox_table
    query = sa.select(*_SUMMARY_COLUMNS).order_by(t.c.id)
    if state is not None:
        query = query.where(t.c.state == state)
    return [_entry(r, with_message=False) for r in conn.execute(query)]


def thd_get(conn: Any, entry_id: int) -> Optional[OutboxEntry]:
    row = conn.execute(sa.select(*outbox_table.c).where(outbox_table.c.id == entry_id)).first()
    return None if row is None else _entry(row, with_message=True)


def thd_retry_now(conn: Any, entry_ids: Sequence[int], now: float) -> int:
    """Make rows due now; a dead letter goes back to pending (its attempts start again,
    and ``give_up_after`` counts from now)."""
    t = outbox_table
    result = conn.execute(
        t.update().where(t.c.id.in_(list(entry_ids))).values(
            state=PENDING, next_try_at=now, created_at=sa.case(
                (t.c.state == DEAD, now), else_=t.c.created_at
            ), attempts=sa.case((t.c.state == DEAD, 0), else_=t.c.attempts),
        )
    )
    _commit(conn)
    return result.rowcount


def thd_drop(conn: Any, entry_ids: Sequence[int]) -> int:
    t = outbox_table
    result = conn.execute(t.delete().where(t.c.id.in_(list(entry_ids))))
    _commit(conn)
    return result.rowcount


# ------------------------------------------------------------------------------- reactor side


def _recipient_text(replies: dict) -> str:
    return "; ".join(f"{rcpt} ({reply})" for rcpt, reply in replies.items())


class Outbox:
    """One notifier's outbox on one master: queue, claim, and the retry scheduler.

    ``transport`` is a :class:`~buildbot_mailext.transport.MailTransport` (or anything with
    its ``send(envelope_from, recipients, message, label) -> Deferred[Delivery]``: one
    attempt, never errbacks).
    """

    def __init__(
        self,
        master: Any,
        notifier: str,
        transport: Any,
        build_digest: DigestBuilder,
        policy: RetryPolicy = RetryPolicy(),
        limits: OutboxLimits = OutboxLimits(),
        lease: float = DEFAULT_LEASE,
        on_delivery: Optional[Callable[[Delivery], Any]] = None,
    ) -> None:
        self.master = master
        # Told of every attempt's Delivery (the notifier hands Postfix's queue ids to its
        # queue tracker); it must not raise, and cannot change what the outbox decides.
        self.on_delivery = on_delivery
        self.notifier = notifier
        self.transport = transport
        self.build_digest = build_digest
        self.policy = policy
        self.limits = limits
        self.lease = lease
        self._timer: Any = None
        self._timer_at: Optional[float] = None
        self._pass_running = False
        self._pass_again = False
        self._in_flight: dict[int, defer.Deferred] = {}
        self._running = False
        self._holds_lease = False  # True between a successful start() and stop()
        self._last_prune = 0.0
        self._tables_ready = False
        # New rows and deletions of delivered ones share commits (one fsync each on SQLite).
        self._journal = WriteJournal(self._write_batch, lambda: self.reactor)
        # On SQLite, one connection kept open spares every commit a checkpoint (sqlite_wal.py).
        self._kept = KeptConnection(notifier)

    # -- plumbing
    @property
    def reactor(self) -> Any:
        return self.master.reactor

    @property
    def owner(self) -> Optional[int]:
        return getattr(self.master, "masterid", None)

    def _now(self) -> float:
        return float(self.reactor.seconds())

    def _db(self, fn: Callable, *args: Any) -> defer.Deferred:
        return self._kept.do(self.master.db.pool, fn, *args)

    @property
    def poll_interval(self) -> float:
        """How often a master looks for due rows it did not schedule itself (rows another
        master left behind, `outbox retry` from the CLI) and renews its leases."""
        return max(0.5, min(self.policy.initial, self.lease / 3.0))

    def _write_batch(self, mails: list, delivered: list) -> defer.Deferred:
        return self._db(
            thd_add, self.notifier, mails, self.owner, self._now(), self.lease, self.limits, self.build_digest,
            delivered,
        )

    @defer.inlineCallbacks
    def ensure_tables(self) -> Any:
        if not self._tables_ready:
            yield self._db(thd_ensure_tables)
            self._tables_ready = True

    # -- lifecycle
    @defer.inlineCallbacks
    def start(self) -> Any:
        """Create the tables if needed and resume pending mail at once."""
        yield self.ensure_tables()
        yield self._kept.open(self.master.db.pool)
        yield self._db(thd_renew_lease, self.notifier, self.owner, self._now(), self.lease)
        self._holds_lease = True
        self._running = True
        self._journal.flush(eager=False)  # deletions may linger again (a restart after stop)
        try:
            resumed = yield self._db(thd_resume, self.notifier, self.owner, self._now())
        except Exception as e:  # e.g. a deadlock with another master taking rows: they are
            resumed = 0  # due anyway and the next pass takes them
            log.msg(f"{self.notifier}: outbox: could not mark waiting mail due at start ({e}); sent at the next pass")
        if resumed:
            log.msg(f"{self.notifier}: outbox: {resumed} mails waiting from before: sending them now")
        self._wake(0)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop scheduling, let attempts on the wire report back, release this master's
        leases. Nothing is lost: what is still pending stays in the database."""
        self._running = False
        self._cancel_timer()
        self._journal.flush()  # delivered rows are deleted now, not after lingering
        if self._in_flight:
            yield defer.DeferredList(list(self._in_flight.values()), consumeErrors=True)
        try:
            yield self._release_leases()
        finally:
            yield self._kept.close(self.master.db.pool)

    @defer.inlineCallbacks
    def _release_leases(self) -> Any:
        if not self._holds_lease:
            # never started (e.g. `buildbot-mailext preview`, which reads the database
            # only): there is no lease to release, and nothing may be written
            return
        self._holds_lease = False
        try:
            left = yield self._db(thd_release_lease, self.notifier, self.owner, self._now())
        except Exception as e:  # the DB may already be gone at shutdown
            log.msg(f"{self.notifier}: outbox: could not release leases at stop ({e}); they expire by themselves")
            return
        if left:
            log.msg(
                f"{self.notifier}: outbox: {left} mails still pending, kept in the database: "
                "they are sent when this notifier runs again, on this master or another one on the same "
                "database (if its routes, fromaddr or templates_dir change, keep its name with "
                f"name={self.notifier!r})"
            )

    # -- queueing
    @defer.inlineCallbacks
    def claim(self, *parts: Any) -> Any:
        """True when this master won the right to mail this event (first to insert)."""
        yield self.ensure_tables()
        won = yield self._db(thd_claim, claim_key(self.notifier, *parts), self.notifier, self.owner, self._now())
        return won

    @defer.inlineCallbacks
    def queue(self, mail: NewMail) -> Any:
        """Write ``mail`` to the outbox, then make its first attempt. Fires with the row id
        once the mail is safely stored (not when it is delivered)."""
        yield self.ensure_tables()
        added: Added = yield self._journal.add(mail)
        if added.digest_count:
            rows, total = added.held
            log.msg(
                f"{self.notifier}: mail {mail.label}: outbox full ({rows} mails, {total} bytes; "
                f"outbox_max_messages={self.limits.max_messages}, outbox_max_bytes={self.limits.max_bytes}): "
                f"folded into the digest for {mail.route} (#{added.id}, now {added.digest_count} mails); "
                "deliver or drop dead letters (buildbot-mailext outbox) to make room"
            )
            self._wake(0)
            return added.id
        log.msg(
            f"{self.notifier}: mail {mail.label}: queued as outbox #{added.id} ({len(mail.message)} bytes) "
            f"to {', '.join(mail.recipients)}"
        )
        entry = OutboxEntry(
            id=added.id, notifier=self.notifier, route=mail.route, label=mail.label, subject=mail.subject,
            envelope_from=mail.envelope_from, recipients=list(mail.recipients), size=len(mail.message),
            state=PENDING, attempts=0, created_at=self._now(), next_try_at=0.0, last_error=None,
            owner=self.owner, digest_count=0, message=mail.message,
        )
        if self._running:
            self._attempt(entry)
        return added.id

    # -- the scheduler
    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _wake(self, delay: float) -> None:
        """Run a pass in ``delay`` seconds, unless one is already planned sooner."""
        if not self._running:
            return
        at = self._now() + max(0.0, delay)
        if self._timer is not None and self._timer.active() and self._timer_at is not None and self._timer_at <= at:
            return
        self._cancel_timer()
        self._timer_at = at
        self._timer = self.reactor.callLater(max(0.0, delay), self._pass)

    def wake_now(self) -> None:
        """Look for due mail now (reconfig: a changed relay gets the pending mail)."""
        self._wake(0)

    def _pass(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._pass_running:
            self._pass_again = True
            return
        self._pass_running = True
        d = self._run_pass()
        d.addErrback(self._pass_failed)
        d.addBoth(self._pass_done)

    @defer.inlineCallbacks
    def _run_pass(self) -> Any:
        now = self._now()
        yield self._db(thd_renew_lease, self.notifier, self.owner, now, self.lease)
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            yield self._db(thd_prune_claims, now - CLAIM_RETENTION)
        entries = yield self._db(thd_take_due, self.notifier, self.owner, now, self.lease, BATCH)
        for entry in entries:
            if entry.id not in self._in_flight and self._running:
                # All in the same reactor turn: the transport lets them share sessions.
                self._attempt(entry)
        if len(entries) >= BATCH:
            return 0.0
        next_due = yield self._db(thd_next_due, self.notifier, self.owner, self._now())
        wait = self.poll_interval
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - self._now()))
        return wait

    def _pass_failed(self, f: Any) -> float:
        log.msg(
            f"{self.notifier}: outbox: cannot read the outbox from the database ({f.getErrorMessage()}); "
            f"trying again in {self.poll_interval:g}s (mail stays queued)"
        )
        return self.poll_interval

    def _pass_done(self, wait: Any) -> None:
        self._pass_running = False
        if self._pass_again:
            self._pass_again = False
            wait = 0.0
        self._wake(wait if isinstance(wait, (int, float)) else self.poll_interval)

    # -- one attempt and its outcome
    def _attempt(self, entry: OutboxEntry) -> None:
        entry.attempts += 1
        d = self.transport.send(entry.envelope_from, list(entry.recipients), entry.message, entry.label)
        d.addCallback(self._record, entry)
        d.addErrback(self._record_failed, entry)
        self._in_flight[entry.id] = d
        d.addBoth(self._forget, entry.id)

    def _forget(self, result: Any, entry_id: int) -> Any:
        self._in_flight.pop(entry_id, None)
        return None

    def _record_failed(self, f: Any, entry: OutboxEntry) -> None:
        log.msg(
            f"{self.notifier}: mail {entry.label}: outbox #{entry.id}: could not record the outcome "
            f"in the database ({f.getErrorMessage()}); the mail stays queued (if it was delivered, "
            "it may be sent once more)"
        )

    @defer.inlineCallbacks
    def _record(self, delivery: Delivery, entry: OutboxEntry) -> Any:
        """Decide and store what happens after one attempt; log exactly one line."""
        now = self._now()
        head = describe(delivery)
        if self.on_delivery is not None:
            try:
                self.on_delivery(delivery)
            except Exception as e:
                log.msg(f"{self.notifier}: mail {entry.label}: could not hand the delivery on ({e})")
        accepted = list(delivery.accepted) if delivery.delivered else []
        temporary = {r: v for r, v in delivery.refused_temporarily.items() if r not in accepted}
        permanent = {r: v for r, v in delivery.refused_permanently.items() if r not in accepted}
        unreported = [r for r in entry.recipients if r not in accepted and r not in temporary and r not in permanent]
        if unreported and not accepted:  # defensive: an attempt that said nothing is transient
            cause = delivery.failure.kind if delivery.failure is not None else "no outcome"
            temporary.update({r: cause for r in unreported})
        error = self._error_text(delivery, {**temporary, **permanent})

        if not temporary and not permanent:
            yield self._journal.delete(entry)
            log.msg(f"{head}; outbox #{entry.id} done")
            return

        notes = []
        dead_id = None
        give_up = now - entry.created_at >= self.policy.give_up_after
        if permanent:
            dead_id = yield self._db(
                thd_dead_letter, entry, list(permanent), error, entry.attempts, bool(temporary) and not give_up
            )
            notes.append(
                f"dead letter #{dead_id} for {', '.join(permanent)} (a retry cannot fix this; "
                "see buildbot-mailext outbox MASTER_DIR list)"
            )
        if temporary and give_up:
            dead_id = yield self._db(thd_dead_letter, entry, list(temporary), error, entry.attempts, False)
            notes.append(
                f"gave up after {entry.attempts} attempts over {self._age(now - entry.created_at)} "
                f"(give_up_after={self.policy.give_up_after:g}s): dead letter #{dead_id}"
            )
        elif temporary:
            delay = self.policy.delay(entry.attempts)
            yield self._db(
                thd_reschedule, entry.id, list(temporary), now + delay, error, entry.attempts
            )
            self._wake(delay)
            notes.append(f"attempt {entry.attempts + 1} in {delay:g}s (outbox #{entry.id}, kept in the database)")
        log.msg(f"{head}; {'; '.join(notes)}")

    @staticmethod
    def _error_text(delivery: Delivery, refused: dict) -> str:
        """The row's ``last_error`` (``outbox list``): the failure, or each refusal."""
        f = delivery.failure
        if f is not None:
            return f"{f.kind}: {f}" + (f"; SMTP reply: {f.reply}" if f.reply else "")
        return _recipient_text(refused) or "no outcome reported"

    @staticmethod
    def _age(seconds: float) -> str:
        if seconds >= 86400:
            return f"{seconds / 86400:.1f}d"
        if seconds >= 3600:
            return f"{seconds / 3600:.1f}h"
        return f"{seconds:.0f}s"


def wall_clock() -> float:
    """Seconds since the epoch, as the outbox stores them (the CLI's 'now')."""
    return time.time()
