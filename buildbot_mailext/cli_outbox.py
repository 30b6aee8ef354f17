"""``buildbot-mailext outbox``: look at and act on a master's mail outbox from the shell.

::

    buildbot-mailext outbox MASTER_DIR list            # what waits, what is dead, and why
    buildbot-mailext outbox MASTER_DIR show ID         # the raw message, as it will be sent
    buildbot-mailext outbox MASTER_DIR retry ID|--all  # due now; a dead letter goes back to pending
    buildbot-mailext outbox MASTER_DIR drop ID|--dead  # delete one mail, or every dead letter

It reads the database URL from MASTER_DIR's master.cfg (``c['db']['db_url']``, default
``sqlite:///state.sqlite``) and opens it with Buildbot's own engine settings. It is safe
while the master runs: each command is one short transaction on the outbox's own rows,
the same statements the master uses; a running master picks up a ``retry`` at its next
look at the outbox (within ``retry_initial`` seconds, at most ``outbox_lease`` / 3).

Exit status: 0 done, 1 no such mail, 2 usage errors (unreadable master.cfg, database
unreachable).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

from buildbot_mailext import outbox as ob

DEFAULT_DB_URL = "sqlite:///state.sqlite"
# Rows changed per transaction by retry --all / drop --dead: short transactions keep a
# running master's own writes flowing in between.
CHUNK = 500


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "outbox",
        help="list, show, retry or drop the mail a master keeps in its outbox",
        description="The outbox holds every mail the relay has not accepted yet (pending) and "
        "the ones a retry cannot fix (dead letters). Safe while the master runs.",
    )
    parser.add_argument("master_dir", metavar="MASTER_DIR", help="a Buildbot master directory")
    parser.add_argument("--config", default="master.cfg", help="config file name in MASTER_DIR (default master.cfg)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="id, state, attempts, next try, route, recipients, subject, last error")
    show = actions.add_parser("show", help="print the raw message")
    show.add_argument("id", type=int)
    retry = actions.add_parser("retry", help="make a mail due now (a dead letter goes back to pending)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?")
    which.add_argument("--all", action="store_true", help="every mail in the outbox, dead letters included")
    drop = actions.add_parser("drop", help="delete a mail from the outbox (it is never sent)")
    which = drop.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?")
    which.add_argument("--dead", action="store_true", help="every dead letter")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.action:
        print("outbox: give an action: list, show ID, retry ID|--all, drop ID|--dead", file=sys.stderr)
        return 2
    from buildbot_mailext.cli import load_master_config

    config_dict = load_master_config(args.master_dir, args.config, "outbox")
    if config_dict is None:
        return 2
    db_url = (config_dict.get("db") or {}).get("db_url") or config_dict.get("db_url") or DEFAULT_DB_URL
    try:
        engine = _engine(db_url, os.path.abspath(args.master_dir))
        with engine.connect() as conn:
            ob.thd_ensure_tables(conn)
            return ACTIONS[args.action](conn, args)
    except Exception as e:  # sqlalchemy errors, a missing driver: one line, not a traceback
        print(f"outbox: cannot use the database {_safe_url(db_url)}: {type(e).__name__}: {_first_line(e)}",
              file=sys.stderr)
        return 2


def _engine(db_url: str, basedir: str) -> Any:
    from buildbot.db.enginestrategy import create_engine

    return create_engine(db_url, basedir=basedir)


def _safe_url(db_url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(db_url).render_as_string(hide_password=True)
    except Exception:
        return "(db_url from master.cfg)"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _when(at: float, now: float) -> str:
    delta = at - now
    if delta <= 0:
        return "due now"
    if delta < 120:
        return f"in {delta:.0f}s"
    if delta < 7200:
        return f"in {delta / 60:.0f}min"
    return f"in {delta / 3600:.1f}h"


def _cut(text: Optional[str], width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _list(conn: Any, args: argparse.Namespace) -> int:
    entries = ob.thd_list(conn)
    if not entries:
        print("outbox is empty: every mail was accepted by the relay")
        return 0
    now = ob.wall_clock()
    rows = [("ID", "STATE", "ATTEMPTS", "NEXT TRY", "ROUTE", "RECIPIENTS", "SUBJECT", "LAST ERROR")]
    for e in entries:
        rows.append((
            str(e.id), e.state, str(e.attempts), _when(e.next_try_at, now) if e.state == ob.PENDING else "never",
            _cut(e.route, 30), _cut(", ".join(e.recipients), 40), _cut(e.subject, 50), _cut(e.last_error, 100),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    pending = sum(e.state == ob.PENDING for e in entries)
    print(f"{pending} pending, {len(entries) - pending} dead")
    return 0


def _show(conn: Any, args: argparse.Namespace) -> int:
    entry = ob.thd_get(conn, args.id)
    if entry is None:
        print(f"outbox: no mail #{args.id} (see 'buildbot-mailext outbox {args.master_dir} list')", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(entry.message)
    sys.stdout.flush()
    return 0


def _in_chunks(conn: Any, ids: Sequence[int], action: Callable[[Any, list], int], what: str) -> int:
    """Apply ``action`` to ``ids`` CHUNK at a time, with a progress bar on stderr when it
    takes more than one chunk."""
    from tqdm import tqdm

    done = 0
    with tqdm(total=len(ids), desc=what, unit="mail", file=sys.stderr, disable=len(ids) <= CHUNK) as bar:
        for start in range(0, len(ids), CHUNK):
            chunk = list(ids[start:start + CHUNK])
            done += action(conn, chunk)
            bar.update(len(chunk))
    return done


def _retry(conn: Any, args: argparse.Namespace) -> int:
    ids = [e.id for e in ob.thd_list(conn)] if args.all else [args.id]
    now = ob.wall_clock()
    done = _in_chunks(conn, ids, lambda c, chunk: ob.thd_retry_now(c, chunk, now), "retry")
    if not args.all and not done:
        print(f"outbox: no mail #{args.id} (see 'buildbot-mailext outbox {args.master_dir} list')", file=sys.stderr)
        return 1
    print(f"{done} mails due now: the master sends them at its next look at the outbox")
    return 0


def _drop(conn: Any, args: argparse.Namespace) -> int:
    ids = [e.id for e in ob.thd_list(conn, ob.DEAD)] if args.dead else [args.id]
    done = _in_chunks(conn, ids, ob.thd_drop, "drop")
    if not args.dead and not done:
        print(f"outbox: no mail #{args.id} (see 'buildbot-mailext outbox {args.master_dir} list')", file=sys.stderr)
        return 1
    print(f"{done} mails dropped from the outbox (never sent)")
    return 0


ACTIONS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "list": _list, "show": _show, "retry": _retry, "drop": _drop,
}
