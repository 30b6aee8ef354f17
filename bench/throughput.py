"""Throughput of the send path: ours (MailExtNotifier) vs stock MailNotifier vs raw smtplib,
in one process, against one aiosmtpd sink on loopback (issue 8).

    .venv/bin/python bench/throughput.py            # N=500, 200 builds, 3 repeats: ~6 min
    .venv/bin/python bench/throughput.py --quick    # N=100, 40 builds, 1 repeat

Both notifiers run as in a master: on Buildbot's fake master with a real database, a SQLite
file in WAL mode as ``buildbot create-master`` makes, and the real reactor. Ours writes every
mail to its outbox in that database before the first attempt (issue 7); stock keeps nothing.

Phases (each repeated, medians printed; nothing is asserted, this prints):

1. N built messages through each notifier's ``sendMail``: one after another (each call
   awaited before the next) and all at once (N calls in one reactor turn). Stock's call fires
   when the server answered; ours fires once the mail is stored, so ours is timed until the
   server answered its last mail (its transport's ``Delivery``), not to the last call. A third
   row for ours awaits the server's answer to each mail before the next call (the latency of
   one mail: store + SMTP transaction). Raw ``smtplib`` over one blocking connection is the
   ceiling, twice: ``send_message()`` (it serializes each message, as a notifier must) and
   ``sendmail()`` with bytes made beforehand (the wire alone). Two rows for our transport
   without the outbox: on bytes made beforehand (the transport alone), and on each message
   serialized in the call (``message_bytes``, as ours does): the most any sender that
   serializes each mail as ours does can reach, stored or not.
2. The whole report path for failing builds (``_got_event`` -> generator -> formatter ->
   message -> transport): each event a failed build of its own (100-line log) right after a
   passing one, so each notifier reads what it reads on a real master.
3. A slow relay (every reply after EHLO delayed 200 ms): 50 mails at once; time until the
   last is accepted, and the reactor's latency meanwhile (a 10 ms ``LoopingCall`` probe).

Phases 1 and 2 also print the CPU each mail cost the whole process, split into the reactor
thread, Buildbot's DB thread and the rest (the sink's thread above all), read from
``/proc/self/task`` (Linux). A burst that keeps one core busy is bound by the GIL: no sender
in this process goes faster than about 1000 / (CPU ms per mail) msg/s.

Every phase waits with a bound and counts what reached the sink: mail that never arrives is
reported as lost (stock's sender has no timeout: its Deferred may never fire), duplicates as
duplicated. Log lines go to a file, as in a master (``twistd.log``). The sink runs in a
thread of the same process, so its work shares the GIL with the sender's: CPU-bound figures
(the bursts) are bounded by it for every sender alike.
"""

from __future__ import annotations

import argparse
import copy
import email
import os
import re
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import warnings
from email import policy

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

import run as bench_run  # noqa: E402  (bench/run.py: machine(), table(), build_rows())

from twisted.internet import defer, task  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from buildbot_mailext import message as mime  # noqa: E402
from smtp_servers import SmtpServer  # noqa: E402

FROM, TO, BUILDER = bench_run.FROM, bench_run.TO, bench_run.BUILDER
BOUND = 60.0  # seconds a phase may take before what is missing counts as lost
TEXT = "".join(f"cc -O2 -c src/module_{i}.c -o build/module_{i}.o\n" for i in range(60)) + "error: 'x' undeclared\n"
HTML = "<html><body><pre>" + TEXT.replace("<", "&lt;") + "</pre></body></html>"
BENCH_ID = re.compile(rb"X-Bench-Id: (\S+)")
BUILD_URL = re.compile(r"builds/(\d+)")


def built_messages(n: int, tag: str) -> list:
    """N finished failure mails (text + HTML, ~7 KB), each with its own X-Bench-Id."""
    return [
        mime.build_email(
            subject=f"[{BUILDER}] build #{i} failed", from_addr=FROM, to=[TO], text=TEXT, html=HTML,
            headers={"X-Bench-Id": f"{tag}-{i}"},
        )
        for i in range(n)
    ]


def tally(ids: list[str], expected: set[str]) -> tuple[int, int]:
    """(lost, duplicated) among the expected ids."""
    seen: dict[str, int] = {}
    for i in ids:
        if i in expected:
            seen[i] = seen.get(i, 0) + 1
    return len(expected) - len(seen), sum(c - 1 for c in seen.values())


def bench_ids(sink: SmtpServer, start: int) -> list[str]:
    out = []
    for m in sink.messages[start:]:
        found = BENCH_ID.search(m.data)
        if found:
            out.append(found.group(1).decode())
    return out


def build_numbers(sink: SmtpServer, start: int) -> list[str]:
    out = []
    for m in sink.messages[start:]:
        msg = email.message_from_bytes(m.data, policy=policy.default)
        text = str(msg.get("X-Buildbot-URL", ""))
        if not BUILD_URL.search(text):
            for part in msg.walk():
                if not part.is_multipart():
                    text += (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
        found = BUILD_URL.search(text)
        out.append(found.group(1) if found else "?")
    return out


async def wait_for(condition, bound: float) -> bool:
    from twisted.internet import reactor

    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.05, lambda: None)
    return True


async def timed(calls, together: bool, bound: float, answered=None) -> tuple[float, int, int]:
    """Run the calls (each returns a Deferred or coroutine); (seconds, errbacks, unfired).

    ``seconds`` runs until the last Deferred that fired: a sender whose Deferreds never fire
    is not billed for the bound, it is reported as unfired (and its mail as lost). With
    ``answered`` (a coroutine function), the clock stops only once it has returned too:
    ours, whose calls fire when a mail is stored, is timed to the server's answer."""
    from twisted.internet import reactor

    errors = 0
    t0 = time.perf_counter()
    if not together:
        deadline = t0 + bound
        for index, call in enumerate(calls):
            d = defer.ensureDeferred(call())
            d.addTimeout(max(0.001, deadline - time.perf_counter()), reactor)
            try:
                await d
            except defer.TimeoutError:
                return time.perf_counter() - t0, errors, len(calls) - index
            except Exception:  # stock's sendMail errbacks; ours never does
                errors += 1
        if answered is not None:
            await answered()
        return time.perf_counter() - t0, errors, 0
    ds = [defer.ensureDeferred(call()) for call in calls]
    fired = [False] * len(ds)
    done = defer.Deferred()
    remaining = [len(ds)]
    end = [0.0]

    def one(result, index):
        fired[index] = True
        remaining[0] -= 1
        end[0] = time.perf_counter()  # the last one that fired, even if others never do
        if remaining[0] == 0 and not done.called:
            done.callback(None)
        return None  # consumed: an errback here is counted, not logged as unhandled

    def bad(f, index):
        nonlocal errors
        errors += 1
        return one(None, index)

    for index, d in enumerate(ds):
        d.addCallbacks(one, bad, callbackArgs=(index,), errbackArgs=(index,))
    timer = reactor.callLater(bound, lambda: done.called or done.callback(None))
    await done
    if timer.active():
        timer.cancel()
    if answered is not None and not fired.count(False):
        await answered()
        end[0] = time.perf_counter()
    elapsed = (end[0] or time.perf_counter()) - t0
    return elapsed, errors, fired.count(False)


# ------------------------------------------------------------------------ notifiers


async def stock_notifier(port: int, master=None, **kw):
    from buildbot.reporters.mail import MailNotifier

    return await _notifier(MailNotifier, master, fromaddr=FROM, relayhost="127.0.0.1", smtpPort=port, **kw)


async def our_notifier(port: int, master, **kw):
    """Ours needs a master: every mail is written to the outbox in the master's database
    (here a SQLite file, as ``buildbot create-master`` makes) before its first attempt."""
    from buildbot_mailext import MailExtNotifier

    return await _notifier(MailExtNotifier, master, fromaddr=FROM, relayhost="127.0.0.1", smtpPort=port,
                           preflight="off", **kw)


async def _notifier(cls, master, **args):
    if "routes" not in args:
        args.setdefault("generators", [])  # sendMail only: no reports
    n = cls(**args)
    if master is None:  # stock's sendMail needs no master
        await n.reconfigService(**args)
    else:
        await n.setServiceParent(master)
        await n.startService()
    return n


async def stop_notifier(notifier) -> None:
    if notifier.parent is not None:
        await notifier.disownServiceParent()  # ours: stops the outbox, then the transport


class Deliveries:
    """The outcome of every attempt of our notifier, as its transport reports it.

    Stock's ``sendMail`` fires when the server answered the message; ours fires earlier,
    once the mail is stored in the outbox (then it is safe). So that both are timed to the
    same point, our phases stop the clock at the last attempt's ``Delivery`` (the reply
    to the message), seen here."""

    def __init__(self, transport):
        self.waiters: list = []
        send = transport.send

        def watched(*args, **kwargs):
            d = send(*args, **kwargs)
            waiter: defer.Deferred = defer.Deferred()
            d.addBoth(lambda result: (waiter.callback(None), result)[1])
            self.waiters.append(waiter)
            return d

        transport.send = watched

    async def all_answered(self) -> None:
        await defer.DeferredList(list(self.waiters))

    async def last_answered(self) -> None:
        await self.waiters[-1]


async def settled(notifier) -> None:
    """Until our outbox has recorded every outcome (not timed: the rows' deletion)."""
    from twisted.internet import reactor

    notifier.outbox._journal.flush()
    while notifier.outbox._in_flight or not notifier.outbox._journal.idle:
        await task.deferLater(reactor, 0.01, lambda: None)
    notifier.outbox._journal.flush(eager=False)


def raw_smtplib(port: int, messages: list, serialized: bool) -> float:
    """The ceiling: one blocking connection; ``send_message()`` serializes each message
    (as a notifier must), ``sendmail()`` gets the bytes made beforehand (wire only)."""
    payloads = [mime.message_bytes(m) for m in messages] if serialized else messages
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("bench")
        for item in payloads:
            if serialized:
                s.sendmail("buildbot@example.org", [TO], item)
            else:
                s.send_message(item, "buildbot@example.org", [TO])
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- phases


async def sendmail_phase(sink: SmtpServer, master, n: int, reps: int, log) -> dict:
    """N built messages through sendMail, one after another and all at once."""
    rows: dict[str, list] = {}

    def record(key, seconds, cpu_before, lost, dup, errors=0, unfired=0):
        cpu = cpu_ms_per_mail(cpu_before, n)  # once the sink has every mail: its parsing counts too
        rows.setdefault(key, []).append({"rate": (n - lost) / seconds, "lost": lost, "dup": dup,
                                         "errors": errors, "unfired": unfired,
                                         **{f"cpu_{part}": ms for part, ms in cpu.items()}})
        log(f"  {key}: {(n - lost) / seconds:8.1f} msg/s  lost {lost} dup {dup} errbacks {errors} unfired {unfired}")

    async def run(key, tag, calls, together, answered=None):
        start, cpu_before = len(sink.messages), cpu_by_thread()
        seconds, errors, unfired = await timed(calls, together, BOUND, answered)
        expected = {f"{tag}-{i}" for i in range(n)}
        await wait_for(lambda: tally(bench_ids(sink, start), expected)[0] == 0, 5)
        record(key, seconds, cpu_before, *tally(bench_ids(sink, start), expected), errors, unfired)

    for rep in range(reps):
        for serialized, key in ((False, "raw send_message"), (True, "raw bytes")):
            tag = f"raw{rep}{key[4:8]}"
            msgs = built_messages(n, tag)
            start, cpu_before = len(sink.messages), cpu_by_thread()
            seconds = raw_smtplib(sink.port, msgs, serialized)
            await wait_for(lambda: len(sink.messages) >= start + n, 10)
            record(key, seconds, cpu_before, *tally(bench_ids(sink, start), {f"{tag}-{i}" for i in range(n)}))

        stock = await stock_notifier(sink.port)
        for together in (False, True):
            tag = f"stock{rep}{'b' if together else 's'}"
            calls = [lambda m=m: stock.sendMail(m, [TO]) for m in built_messages(n, tag)]
            await run(f"stock {'all at once' if together else 'one-by-one'}", tag, calls, together)

        ours = await our_notifier(sink.port, master)
        deliveries = Deliveries(ours.transport)
        for together in (False, True):
            tag = f"ours{rep}{'b' if together else 's'}"
            calls = [lambda m=m: ours.sendMail(m, [TO]) for m in built_messages(n, tag)]
            await run(f"ours {'all at once' if together else 'one-by-one'}", tag, calls, together,
                      deliveries.all_answered)
            await settled(ours)

        async def answered_before_the_next(m):
            await ours.sendMail(m, [TO])
            await deliveries.last_answered()

        tag = f"ours{rep}a"
        calls = [lambda m=m: answered_before_the_next(m) for m in built_messages(n, tag)]
        await run("ours each answered", tag, calls, False)
        await settled(ours)

        # The transport alone, on bytes made beforehand: what is left once the message is
        # serialized and stored (compare with raw sendmail(bytes)).
        t = ours.transport
        for together in (False, True):
            tag = f"transport{rep}{'b' if together else 's'}"
            payloads = [mime.message_bytes(m) for m in built_messages(n, tag)]
            calls = [lambda b=b: t.send("buildbot@example.org", [TO], b, "bench") for b in payloads]
            await run(f"transport {'all at once' if together else 'one-by-one'}", tag, calls, together)
        # Serialization (message_bytes, as ours does) and the transport, nothing stored: the
        # most any sender that serializes each mail as ours does can reach (issue 8's burst target).
        for together in (False, True):
            tag = f"serialized{rep}{'b' if together else 's'}"
            calls = [lambda m=m: t.send("buildbot@example.org", [TO], mime.message_bytes(m), "bench")
                     for m in built_messages(n, tag)]
            await run(f"serialize+transport {'all at once' if together else 'one-by-one'}", tag, calls, together)
        await stop_notifier(ours)
    return rows


async def bench_master(basedir: str):
    """Buildbot's fake master on the real reactor, with a real database: a SQLite file, as
    ``buildbot create-master`` makes (WAL; every commit an fsync), and its DB services."""
    from twisted.trial import unittest

    from buildbot.test.fake import fakemaster

    warnings.filterwarnings("ignore", category=DeprecationWarning)

    class Harness(unittest.TestCase):
        def runTest(self):
            pass

    master = await fakemaster.make_master(
        Harness(), wantData=True, wantDb=True, wantMq=True, wantRealReactor=True,
        db_url=f"sqlite:///{os.path.join(basedir, 'state.sqlite')}", sqlite_memory=False,
    )
    # fakemaster does not start the DB services; the log reader needs its thread pool.
    await master.db.logs.startService()
    return master


def cpu_by_thread() -> dict[str, float]:
    """CPU seconds used so far by the reactor thread, the DB threads and the rest of the
    process (the SMTP sink's thread above all), from /proc (Linux; the process only, elsewhere)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    main = threading.main_thread().native_id
    out = {"process": time.process_time(), "reactor": 0.0, "db": 0.0}
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        if int(tid) == main:
            out["reactor"] += seconds
        elif "DBThreadPool" in names.get(int(tid), ""):
            out["db"] += seconds
    return out


def cpu_ms_per_mail(before: dict[str, float], mails: int) -> dict[str, float]:
    """CPU milliseconds per mail since ``before`` (a ``cpu_by_thread()``), by part."""
    after = cpu_by_thread()
    return {part: (after[part] - before[part]) * 1000 / mails for part in before}


class DbCalls:
    """Counts the calls into a master's DB thread pool (``pool.do`` and
    ``pool.do_with_engine``: Buildbot's reads, our reads and the outbox's writes alike)."""

    def __init__(self, master):
        self.count = 0
        pool = master.db.pool
        for name in ("do", "do_with_engine"):
            real = getattr(pool, name)

            def counting(*args, _real=real, **kwargs):
                self.count += 1
                return _real(*args, **kwargs)

            setattr(pool, name, counting)


async def report_path_phase(sink: SmtpServer, master, stock_master, builds: int, reps: int, log) -> dict:
    """Failing builds through each notifier's whole report path, on the real reactor.

    Each notifier runs on a master of its own (its own SQLite file), as a site would run
    one or the other: ours keeps the SQLite log open while it runs (sqlite_wal.py), which
    makes every DB call of its master cheaper; stock's master must not get that for free."""
    from buildbot.reporters.generators.build import BuildStatusGenerator
    from buildbot.reporters.message import MessageFormatter
    from buildbot.process.results import FAILURE, SUCCESS
    from buildbot.test import fakedb

    from buildbot_mailext import MailRoute

    for m in (master, stock_master):
        await m.db.insert_test_data(bench_run.build_rows(100))
    # Every event is a build of its own, on a build request of its own (Buildbot's reporters
    # handle the events of one build request in turn: with one request for all, "all at
    # once" would be "one after another"), in the buildset of one commit, as when a bad
    # commit breaks many builders at once (claims are per build: one mail per build event),
    # failed in its compile step with the same 100-line log as build 20, right after a
    # passing build of the same builder and branch: a bad commit breaking builders that
    # passed before (each notifier looks the previous build up: ours for the context and
    # the culprits since it, stock for its "change" modes).
    first_number = 100000
    event_numbers = [first_number + 2 * j for j in range(reps * 4 * builds)]
    log_chunks = [r for r in bench_run.build_rows(100) if type(r).__name__ == "LogChunk"]
    rows = []
    for number in event_numbers:
        for n, results in ((number - 1, SUCCESS), (number, FAILURE)):
            rows += [
                fakedb.BuildRequest(id=n, buildsetid=98, builderid=79),
                fakedb.Build(id=n, number=n, builderid=79, buildrequestid=n, workerid=13, masterid=92,
                             results=results, state_string="failed compile" if results else "build successful",
                             started_at=10000001 + n, complete_at=10000100 + n),
                fakedb.BuildProperty(buildid=n, name="branch", value="main", source="Build"),
            ]
        rows += [
            fakedb.Step(id=number, buildid=number, number=1, name="compile", results=FAILURE,
                        state_string="compile failed"),
            fakedb.Log(id=number, stepid=number, name="stdio", slug="stdio", type="s", num_lines=100),
        ]
        rows += [fakedb.LogChunk(logid=number, first_line=c.first_line, last_line=c.last_line,
                                 content=c.content) for c in log_chunks]
    for m in (master, stock_master):
        await m.db.insert_test_data(rows)
    events = {number: await master.data.get(("builds", number)) for number in event_numbers}

    ours = await our_notifier(sink.port, master, routes=[MailRoute(TO, builders=[BUILDER])])
    stock = await stock_notifier(
        sink.port, stock_master, sendToInterestedUsers=False, extraRecipients=[TO],
        generators=[BuildStatusGenerator(mode=("failing",), message_formatter=MessageFormatter(template_type="html"))],
    )

    deliveries = Deliveries(ours.transport)
    db_calls = {ours: DbCalls(master), stock: DbCalls(stock_master)}
    rows: dict[str, list] = {}
    batches = iter(event_numbers[k:k + builds] for k in range(0, len(event_numbers), builds))
    for rep in range(reps):
        for who, notifier in (("stock", stock), ("ours", ours)):
            for together in (False, True):
                numbers = next(batches)

                def event(i):
                    return notifier._got_event(("builds", i, "finished"), copy.deepcopy(events[i]))

                start = len(sink.messages)
                calls_before = db_calls[notifier].count
                answered = deliveries.all_answered if notifier is ours else None
                cpu_before = cpu_by_thread()
                seconds, errors, unfired = await timed([lambda i=i: event(i) for i in numbers], together, BOUND,
                                                       answered)
                cpu = cpu_ms_per_mail(cpu_before, builds)
                if notifier is ours:
                    await settled(ours)
                expected = {str(i) for i in numbers}
                arrived = lambda: len(sink.messages) - start >= builds  # noqa: E731
                await wait_for(arrived, 5)
                lost, dup = tally(build_numbers(sink, start), expected)
                key = f"{who} {'all at once' if together else 'one-by-one'}"
                rows.setdefault(key, []).append({"rate": (builds - lost) / seconds, "lost": lost, "dup": dup,
                                                 "errors": errors, "unfired": unfired,
                                                 "db_calls": (db_calls[notifier].count - calls_before) / builds,
                                                 **{f"cpu_{part}": ms for part, ms in cpu.items()}})
                log(f"  report path {key}: {(builds - lost) / seconds:8.1f} msg/s  lost {lost} dup {dup}  "
                    f"CPU {cpu['process']:.1f} ms/mail (reactor {cpu['reactor']:.1f}, DB {cpu['db']:.1f})")
    await stop_notifier(ours)
    await stop_notifier(stock)
    return rows


async def slow_relay_phase(master, n: int, reps: int, log, pipelining: bool) -> dict:
    """A relay that answers every command 200 ms late: 50 mails at once."""
    from twisted.internet import reactor

    sink = SmtpServer(pipelining=pipelining, delays={"*": 0.2}).start()
    rows: dict[str, list] = {}
    try:
        for rep in range(reps):
            for who, make, kw in (
                ("stock", stock_notifier, {}),
                ("ours (smtp_max_sessions=4)", our_notifier, {}),
                ("ours (smtp_max_sessions=16)", our_notifier, {"smtp_max_sessions": 16}),
            ):
                notifier = await (make(sink.port, **kw) if make is stock_notifier else make(sink.port, master, **kw))
                deliveries = None if make is stock_notifier else Deliveries(notifier.transport)
                tag = f"slow{rep}-" + re.sub(r"\W", "", who)  # X-Bench-Id: no spaces
                msgs = built_messages(n, tag)
                lateness: list[float] = []
                expected_at = [time.perf_counter() + 0.01]

                def probe():
                    now = time.perf_counter()
                    lateness.append(max(0.0, now - expected_at[0]))
                    expected_at[0] = now + 0.01

                probe_loop = task.LoopingCall(probe)
                probe_loop.clock = reactor
                probe_loop.start(0.01, now=False)
                start = len(sink.messages)
                seconds, errors, unfired = await timed([lambda m=m: notifier.sendMail(m, [TO]) for m in msgs], True, BOUND,
                                                       deliveries and deliveries.all_answered)
                probe_loop.stop()
                expected = {f"{tag}-{i}" for i in range(n)}
                await wait_for(lambda: tally(bench_ids(sink, start), expected)[0] == 0, 5)
                lost, dup = tally(bench_ids(sink, start), expected)
                lateness.sort()
                rows.setdefault(who, []).append({
                    "seconds": seconds, "lost": lost, "dup": dup,
                    "p99": lateness[int(len(lateness) * 0.99) - 1] if lateness else 0.0,
                    "max": lateness[-1] if lateness else 0.0, "probes": len(lateness),
                })
                log(f"  slow relay {who}: last accepted after {seconds:.2f}s, reactor max late "
                    f"{rows[who][-1]['max'] * 1000:.1f} ms, lost {lost}")
                if deliveries is not None:
                    await settled(notifier)
                await stop_notifier(notifier)
    finally:
        sink.stop()
    return rows


# ----------------------------------------------------------------------------- report


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def cpu_split(rows: list[dict], digits: int) -> str:
    """"process = reactor + DB + rest", medians of the rows' CPU ms per mail."""
    p, r, d = (median(rows, f"cpu_{part}") for part in ("process", "reactor", "db"))
    return f"{p:5.{digits}f} = {r:4.{digits}f} + {d:4.{digits}f} + {p - r - d:4.{digits}f}"


def render(args, send: dict, path: dict, slow: dict, total: float, load: tuple) -> str:
    out = ["", "buildbot-mailext throughput: ours (MailExtNotifier) vs stock MailNotifier vs raw smtplib",
           bench_run.machine(),
           f"load    : 1-min load average {load[0]:.1f} at start, {load[1]:.1f} at the end (other processes "
           "share the CPUs: CPU-bound figures shrink with it, stock's 40 ms waits do not)",
           f"sink    : aiosmtpd on 127.0.0.1 in a thread of the same process, "
           f"{'NOT offering' if args.no_pipelining else 'offering'} PIPELINING; "
           f"medians of {args.reps} repeat(s)", ""]

    def lost_dup(rows):
        return f"{sum(r['lost'] for r in rows)}/{sum(r['dup'] for r in rows)}"

    raw = median(send["raw send_message"], "rate")
    raw_bytes = median(send["raw bytes"], "rate")
    stock_s, stock_b = median(send["stock one-by-one"], "rate"), median(send["stock all at once"], "rate")
    ours_s, ours_b = median(send["ours one-by-one"], "rate"), median(send["ours all at once"], "rate")
    out.append(f"1. {args.n} built messages through sendMail (msg/s; lost/dup summed over the repeats)")
    rows = [
        ["raw smtplib send_message, 1 conn", f"{raw:.0f}", "-", lost_dup(send["raw send_message"]), "-"],
        ["raw smtplib sendmail(bytes made before)", f"{raw_bytes:.0f}", "-", lost_dup(send["raw bytes"]), "-"],
        ["stock MailNotifier", f"{stock_s:.1f}", f"{stock_b:.1f}", lost_dup(send["stock one-by-one"]),
         lost_dup(send["stock all at once"])],
        ["MailExtNotifier", f"{ours_s:.1f}", f"{ours_b:.1f}", lost_dup(send["ours one-by-one"]),
         lost_dup(send["ours all at once"])],
        ["  each answered by the server before the next", f"{median(send['ours each answered'], 'rate'):.1f}", "-",
         lost_dup(send["ours each answered"]), "-"],
        ["  its MailTransport.send(bytes made before)", f"{median(send['transport one-by-one'], 'rate'):.1f}",
         f"{median(send['transport all at once'], 'rate'):.1f}", lost_dup(send["transport one-by-one"]),
         lost_dup(send["transport all at once"])],
        ["  its MailTransport.send(message_bytes(m)), nothing stored",
         f"{median(send['serialize+transport one-by-one'], 'rate'):.1f}",
         f"{median(send['serialize+transport all at once'], 'rate'):.1f}",
         lost_dup(send["serialize+transport one-by-one"]), lost_dup(send["serialize+transport all at once"])],
    ]
    out.append(bench_run.table(["sender", "one after another", "all at once", "lost/dup 1by1", "lost/dup burst"],
                               rows, right={1, 2, 3, 4}))
    out.append("   ratios                          one after another   all at once   target")
    out.append(f"   ours / stock                    {ours_s / stock_s:17.1f}x  {ours_b / stock_b:11.1f}x   "
               ">= 10x / >= 2x")
    out.append(f"   ours / raw send_message         {ours_s / raw:17.0%}  {ours_b / raw:12.0%}   >= 50% / >= 80%")
    out.append(f"   ours / raw sendmail(bytes)      {ours_s / raw_bytes:17.0%}  {ours_b / raw_bytes:12.0%}")
    ts, tb = median(send["transport one-by-one"], "rate"), median(send["transport all at once"], "rate")
    out.append(f"   transport / raw sendmail(bytes) {ts / raw_bytes:17.0%}  {tb / raw_bytes:12.0%}")
    ss, sb = (median(send[f"serialize+transport {mode}"], "rate") for mode in ("one-by-one", "all at once"))
    out.append(f"   serialize + transport / stock   {ss / stock_s:17.1f}x  {sb / stock_b:11.1f}x   "
               "(nothing stored: the most a sender that serializes each mail can reach)")
    out.append("   CPU per mail, ms: whole process = reactor thread + DB thread + the rest (the SMTP sink "
               "above all), until the sink has the last mail:")
    for key in ("raw send_message", "stock all at once", "ours all at once", "ours one-by-one",
                "serialize+transport all at once", "transport all at once"):
        out.append(f"   {key:31} {cpu_split(send[key], 2)}")
    stock_unfired = sum(r["unfired"] for r in send["stock all at once"])
    stock_err = sum(r["errors"] for r in send["stock all at once"] + send["stock one-by-one"])
    out.append(f"   stock: {stock_err} sendMail Deferreds errbacked, {stock_unfired} never fired within {BOUND:g}s")
    out.append("")

    ps, pb = median(path["stock one-by-one"], "rate"), median(path["stock all at once"], "rate")
    os_, ob = median(path["ours one-by-one"], "rate"), median(path["ours all at once"], "rate")
    out.append(f"2. {args.builds} failing builds through the whole report path (msg/s)")
    rows = [
        ["stock MailNotifier", f"{ps:.1f}", f"{pb:.1f}", lost_dup(path["stock one-by-one"]),
         lost_dup(path["stock all at once"])],
        ["MailExtNotifier", f"{os_:.1f}", f"{ob:.1f}", lost_dup(path["ours one-by-one"]),
         lost_dup(path["ours all at once"])],
        ["ours / stock (target >= 2x)", f"{os_ / ps:.1f}x", f"{ob / pb:.1f}x", "", ""],
    ]
    out.append(bench_run.table(["notifier", "one after another", "all at once", "lost/dup 1by1", "lost/dup burst"],
                               rows, right={1, 2, 3, 4}))
    calls = {key: median(rs, "db_calls") for key, rs in path.items()}
    out.append("   calls into each master's DB thread per mail (reads and writes, counted at pool.do and "
               "do_with_engine; one after another / all at once):")
    out.append(f"   stock {calls['stock one-by-one']:.1f} / {calls['stock all at once']:.1f}, "
               f"ours {calls['ours one-by-one']:.1f} / {calls['ours all at once']:.1f}")
    # Both notifiers run their Python under one GIL: a burst that keeps the process busy
    # cannot go faster than about 1000 / (CPU ms per mail) msg/s, whoever sends it.
    out.append("   CPU per mail, ms: whole process = reactor thread + DB thread + the rest (the SMTP sink "
               "above all); one after another | all at once:")
    for who in ("stock", "ours"):
        out.append(f"   {who:5}  {cpu_split(path[who + ' one-by-one'], 1)}   |   "
                   f"{cpu_split(path[who + ' all at once'], 1)}")
    out.append("")

    out.append(f"3. slow relay (every reply after the greeting 200 ms late): {args.slow} mails at once")
    rows = []
    for who, rs in slow.items():
        rows.append([who, f"{median(rs, 'seconds'):.2f}", f"{median(rs, 'p99') * 1000:.1f}",
                     f"{max(r['max'] for r in rs) * 1000:.1f}", lost_dup(rs)])
    out.append(bench_run.table(["sender", "last accepted (s)", "reactor late p99 (ms)", "max (ms)", "lost/dup"],
                               rows, right={1, 2, 3, 4}))
    out.append("")
    out.append(f"total run time {total:.0f} s; figures are for this machine and this run only.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=100, 40 builds, 1 repeat")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--builds", type=int, default=200)
    parser.add_argument("--slow", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-pipelining", action="store_true", help="the sinks do not offer PIPELINING")
    args = parser.parse_args()
    if args.quick:
        args.n, args.builds, args.reps = 100, 40, 1

    log_file = tempfile.NamedTemporaryFile("w", prefix="bench-twistd-", suffix=".log", delete=False)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    async def run(reactor):
        try:
            await measure()
        except BaseException:
            import traceback

            traceback.print_exc()
            raise

    async def measure():
        t0 = time.perf_counter()
        load_start = os.getloadavg()[0]
        sink = SmtpServer(pipelining=not args.no_pipelining).start()
        basedir = tempfile.mkdtemp(prefix="bench-master-")
        master = await bench_master(basedir)
        stock_basedir = tempfile.mkdtemp(prefix="bench-stock-master-")
        stock_master = await bench_master(stock_basedir)
        try:
            progress("phase 1: sendMail")
            send = await sendmail_phase(sink, master, args.n, args.reps, progress)
            progress("phase 2: report path")
            path = await report_path_phase(sink, master, stock_master, args.builds, args.reps, progress)
        finally:
            sink.stop()
        progress("phase 3: slow relay")
        slow = await slow_relay_phase(master, args.slow, args.reps, progress, not args.no_pipelining)
        for m, d in ((master, basedir), (stock_master, stock_basedir)):
            await m.db.logs.stopService()
            shutil.rmtree(d, ignore_errors=True)
        load = (load_start, os.getloadavg()[0])
        print(render(args, send, path, slow, time.perf_counter() - t0, load))
        print(f"(log lines of the run: {log_file.name})")

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
