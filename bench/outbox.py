"""What the durable outbox costs and how fast a backlog drains, SQLite and PostgreSQL.

Run from the repository root::

    .venv/bin/python bench/outbox.py            # N=1000, SQLite and (if installed) PostgreSQL
    .venv/bin/python bench/outbox.py --n 200 --no-postgres

Everything is real: Buildbot's own DB thread pool (``DBThreadPool``) on a SQLite file or
on a throwaway PostgreSQL cluster (started like the multi-master test does), our
``MailTransport`` and ``Outbox`` on the real reactor, one aiosmtpd sink on 127.0.0.1.
Rows printed:

1. **write cost per mail**: one ``Outbox.queue`` write (the row before the first attempt)
   plus the delete after the 250, through the DB pool, one mail after another.
2. **send rate, all at once**: N built mails handed over in one reactor turn, until the
   sink holds all N: straight to ``MailTransport.send`` (no outbox; after one warm-up run)
   vs through ``Outbox.queue`` (write, attempt, delete); median of 3 runs each.
3. **relay-up to last delivery**: N mails queued while nothing listens on the relay's port
   (each attempt refused, each row rescheduled); the relay comes up on that port and the
   next retry pass fires; time until the sink holds the last of the N.

Figures are for the machine and run that printed them; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def message(n: int) -> bytes:
    body = "".join(f"log line {i} of the failing step: AssertionError: expected 250\r\n" for i in range(120))
    return (f"From: buildbot@example.org\r\nTo: dev@example.org\r\nSubject: FAILURE build #{n}\r\n"
            f"Message-ID: <bench-{n}@example.org>\r\n\r\n{body}").encode()


async def wait_for(reactor, predicate, timeout: float) -> bool:
    from twisted.internet import task

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.01, lambda: None)
    return True


async def backend_rows(reactor, label: str, db_url: str, basedir: str, n: int, sink, smtp_servers) -> list[tuple]:
    from buildbot.db.enginestrategy import create_engine
    from buildbot.db.pool import DBThreadPool
    from twisted.internet import defer

    from buildbot_mailext import outbox as ob
    from buildbot_mailext.relay import SmtpSettings
    from buildbot_mailext.sqlite_wal import KeptConnection
    from buildbot_mailext.transport import MailTransport

    engine = create_engine(db_url, basedir=basedir)
    pool = DBThreadPool(engine, reactor)
    pool.start()
    master = SimpleNamespace(reactor=reactor, masterid=1, db=SimpleNamespace(pool=pool))
    rows = []
    try:
        await pool.do(ob.thd_ensure_tables)
        await pool.do(lambda conn: (conn.execute(ob.outbox_table.delete()), conn.commit()))

        def digest(route, items, recipients):
            return b""

        # 1. write cost per mail (no network): through a connection of Buildbot's pool per
        # call, then as the outbox makes it (on SQLite: its kept connection, sqlite_wal.py)
        mails = [ob.NewMail("route dev", f"build #{i}", f"FAILURE #{i}", "buildbot@example.org",
                            ["dev@example.org"], message(i)) for i in range(n)]
        kept = KeptConnection("bench")

        async def write_and_delete(how: str, do) -> None:
            start = time.perf_counter()
            for mail in mails:
                [added] = await do(ob.thd_add, "bench", [mail], 1, time.time(), 120.0, ob.OutboxLimits(), digest)
                entry = ob.OutboxEntry(added.id, "bench", "", "", "", "", [], 0, ob.PENDING, 0, 0.0, 0.0, None, 1,
                                       None, 0)
                await do(ob.thd_delivered, [entry], digest)
            per_mail = (time.perf_counter() - start) / n
            rows.append((f"{label}: write + delete per mail, {how}", f"{per_mail * 1000:.2f} ms",
                         f"{1 / per_mail:,.0f} mails/s"))

        await write_and_delete("a connection of Buildbot's pool each", pool.do)
        await kept.open(pool)  # what a started outbox does (nothing but on SQLite)
        await write_and_delete("as the outbox makes them", lambda *a: kept.do(pool, *a))
        await kept.close(pool)

        # 2. send rate through the outbox, all at once (median of REPEATS)
        settings = SmtpSettings.from_notifier_args(relayhost=sink.relayhost, smtp_timeout=30)
        rates, all_ok, left = [], True, (0, 0)
        for _ in range(REPEATS):
            transport = MailTransport(settings, reactor=reactor)
            box = ob.Outbox(master, "bench", transport, digest, ob.RetryPolicy(1, 1, 3600))
            await box.start()
            before = len(sink.snapshot())
            start = time.perf_counter()
            await defer.gatherResults([box.queue(m) for m in mails])
            ok = await wait_for(reactor, lambda: len(sink.snapshot()) - before >= n and not box._in_flight, 120)
            rates.append(n / (time.perf_counter() - start))
            all_ok = all_ok and ok
            left = await pool.do(ob.thd_totals, "bench")
            await box.stop()
            await transport.stop()
        rows.append((f"{label}: send rate through the outbox", f"{statistics.median(rates):,.0f} mails/s",
                     f"median of {REPEATS}; {'all' if all_ok else 'NOT all'} delivered, {left[0]} rows left"))

        # 3. relay down, N queued; relay up -> last delivery
        with smtp_servers.closed_port() as down_port:
            pass
        settings = SmtpSettings.from_notifier_args(relayhost=f"[127.0.0.1]:{down_port}", smtp_timeout=30)
        transport = MailTransport(settings, reactor=reactor)
        box = ob.Outbox(master, "bench", transport, digest, ob.RetryPolicy(1, 1, 3600))
        await box.start()
        await defer.gatherResults([box.queue(m) for m in mails])
        await wait_for(reactor, lambda: not box._in_flight, 60)
        queued = (await pool.do(ob.thd_totals, "bench"))[0]
        relay = smtp_servers.SmtpServer().start(down_port)
        try:
            start = time.perf_counter()
            box.wake_now()  # the retry timer's next pass, without waiting up to retry_initial for it
            ok = await wait_for(reactor, lambda: len(relay.messages) >= n, 180)
            took = time.perf_counter() - start
            await wait_for(reactor, lambda: not box._in_flight, 30)
            left = (await pool.do(ob.thd_totals, "bench"))[0]
        finally:
            relay.stop()
        rows.append((f"{label}: relay-up to last of {queued} queued delivered", f"{took:.2f} s",
                     f"{len(relay.messages)} received, {left} rows left{'' if ok else ', TIMED OUT'}"))
        await box.stop()
        await transport.stop()
    finally:
        await pool.stop()
    return rows


async def main(reactor, args) -> None:
    from twisted.internet import defer

    from buildbot_mailext.relay import SmtpSettings
    from buildbot_mailext.transport import MailTransport

    smtp_servers = _load("smtp_servers", ROOT / "tests" / "smtp_servers.py")
    harness = _load("harness", ROOT / "tests" / "e2e" / "harness.py")
    import buildbot
    import twisted

    print("buildbot-mailext outbox benchmark")
    print(f"machine : {platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"python  : {platform.python_implementation()} {platform.python_version()}")
    print(f"buildbot: {buildbot.version}   twisted: {twisted.__version__}   N = {args.n}\n")
    sink = harness.SmtpSink().start()
    rows = []
    try:
        # Without the outbox: the transport alone, all at once (a warm-up, then median of REPEATS).
        rates = []
        for repeat in range(REPEATS + 1):
            transport = MailTransport(SmtpSettings.from_notifier_args(relayhost=sink.relayhost), reactor=reactor)
            start = time.perf_counter()
            await defer.gatherResults([transport.send("buildbot@example.org", ["dev@example.org"], message(i),
                                                      f"#{i}") for i in range(args.n)])
            if repeat:
                rates.append(args.n / (time.perf_counter() - start))
            await transport.stop()
        rows.append(("no outbox: MailTransport.send, all at once", f"{statistics.median(rates):,.0f} mails/s",
                     f"median of {REPEATS}"))

        with tempfile.TemporaryDirectory() as tmp:
            rows += await backend_rows(reactor, "SQLite", "sqlite:///outbox-bench.sqlite", tmp, args.n, sink,
                                       smtp_servers)
        if args.postgres:
            mm = _load("test_multimaster", ROOT / "tests" / "e2e" / "test_multimaster.py")
            try:
                pg = mm.Postgres().start()
            except BaseException as e:  # pytest's skip/fail are BaseExceptions
                rows.append(("PostgreSQL", "not measured", str(e).splitlines()[0]))
            else:
                try:
                    rows += await backend_rows(reactor, "PostgreSQL", pg.url, str(pg.dir), args.n, sink,
                                               smtp_servers)
                finally:
                    pg.stop()
    finally:
        sink.stop()
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name.ljust(width)}  {value:>14}  {note}".rstrip())


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="mails per measurement (default 1000)")
    parser.add_argument("--no-postgres", dest="postgres", action="store_false", help="SQLite only")
    args = parser.parse_args()
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    run()
