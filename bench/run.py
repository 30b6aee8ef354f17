"""Benchmarks of buildbot-mailext, side by side with stock MailNotifier, measured in one run.

    .venv/bin/python bench/run.py [--quick]

Four measurements (no assertion on any figure; this prints, it does not judge):

1. time from a finished build dict to the bytes of one failure mail, going through each
   notifier's own code path (``_got_event`` -> generator -> formatter -> message ->
   ``sendMail``) with the network replaced by a recorder, for failing-step logs of 100,
   10,000 and 200,000 lines;
2. size of that mail, and whether it carries the end of the failing log;
3. tracemalloc peak of one mail for the 200,000-line log;
4. a refused relay on 127.0.0.1 with real sockets and the real reactor (run in a child
   process: the phases above run on Buildbot's fake reactor and in-memory database).

Phases 1-3 use Buildbot's test doubles (``fakemaster``, ``fakedb``: SQLite in memory,
synchronous), so database I/O is cheaper than on a real master: reading a whole log from a
real database typically costs more than it does here.
"""

from __future__ import annotations

import argparse
import copy
import email
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
import warnings
from email import policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Same import order as tests/conftest.py: these modules warn on import, and importing
# buildbot.test (below, in the in-process phase only) turns warnings into errors.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import buildbot.util.ssl  # noqa: F401
    import buildbot.reporters.mail  # noqa: F401

import buildbot  # noqa: E402
import twisted  # noqa: E402

FROM = "Buildbot <buildbot@example.org>"
TO = "dev@example.org"
BUILDER = "linux"
LOG_SIZES = (100, 10_000, 200_000)
BIG = LOG_SIZES[-1]

from buildbot_mailext.context import HEADER_SLACK_LINES as SLACK  # noqa: E402
from buildbot_mailext.context import MAX_TAIL_CHARS_PER_LOG as PER_LOG  # noqa: E402
from buildbot_mailext.context import MAX_TAIL_CHARS_PER_MAIL as PER_MAIL  # noqa: E402
from buildbot_mailext.routes import DEFAULT_LOG_TAIL_LINES as TAIL  # noqa: E402
from buildbot_mailext.excerpts import ERROR_SCAN_LINES as SCAN  # noqa: E402
from buildbot_mailext.excerpts import SCAN_CHUNK_LINES as SCAN_CHUNK  # noqa: E402


def last_line_marker(n: int) -> str:
    return f"BENCH-END-OF-LOG-{n}"


def log_lines(n: int) -> list[str]:
    """A failing compile step's stdio: header, n-3 compile lines, the error, the end."""
    lines = ["hmake -j8 all", " in dir /build/linux (timeout 1200 secs)"]
    lines = ["h" + lines[0], "h" + lines[1]]
    body = n - len(lines) - 3
    lines += [
        f"ogcc -O2 -Wall -c src/module_{i % 97}/file_{i}.c -o build/obj/file_{i}.o  # unit {i}"
        for i in range(body)
    ]
    lines += [
        "esrc/module_3/file_3.c:42:7: error: 'frobnicate' undeclared (first use in this function)",
        f"emake: *** [Makefile:12: all] Error 1  {last_line_marker(n)}",
        "hprogram finished with exit code 2",
    ]
    return lines


def build_rows(n: int) -> list:
    from buildbot.test import fakedb

    from buildbot.process.results import FAILURE, SUCCESS

    lines = log_lines(n)
    rows = [
        fakedb.Master(id=92),
        fakedb.Worker(id=13, name="wrk"),
        fakedb.Builder(id=79, name=BUILDER),
        fakedb.Buildset(id=98, results=FAILURE, reason="because"),
        fakedb.SourceStamp(id=234, branch="main", revision="d34db33f", project="proj",
                           repository="https://git.example.org/r.git"),
        fakedb.BuildsetSourceStamp(buildsetid=98, sourcestampid=234),
        fakedb.Change(changeid=13, author="Dev <dev@example.org>", comments="fix the frobnicator",
                      branch="main", revision="d34db33f", sourcestampid=234),
        fakedb.BuildRequest(id=11, buildsetid=98, builderid=79),
        fakedb.Build(id=20, number=7, builderid=79, buildrequestid=11, workerid=13, masterid=92,
                     results=FAILURE, state_string="failed compile",
                     started_at=10000001, complete_at=10000125),
        fakedb.BuildProperty(buildid=20, name="branch", value="main", source="Build"),
        fakedb.BuildProperty(buildid=20, name="workername", value="wrk", source="Worker"),
        fakedb.Step(id=50, buildid=20, number=0, name="checkout", results=SUCCESS,
                    state_string="checkout done"),
        fakedb.Step(id=51, buildid=20, number=1, name="compile", results=FAILURE,
                    state_string="compile failed"),
        fakedb.Log(id=60, stepid=51, name="stdio", slug="stdio", type="s", num_lines=len(lines)),
    ]
    # Chunked as Buildbot's appendLog stores logs: at most 1000 lines per chunk.
    for first in range(0, len(lines), 1000):
        chunk = lines[first:first + 1000]
        rows.append(fakedb.LogChunk(logid=60, first_line=first, last_line=first + len(chunk) - 1,
                                    content="\n".join(chunk) + "\n"))
    return rows


# --------------------------------------------------------------------------------- helpers


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join("  " + x for x in out)


def carries_tail(raw: bytes, n: int) -> bool:
    """Does any decoded part of the mail contain the last output line of the log?"""
    marker = last_line_marker(n).encode()
    msg = email.message_from_bytes(raw, policy=policy.default)
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        if marker in payload:
            return True
    return False


# ------------------------------------------------------------- phases 1-3: fake master


class Recorder:
    """Takes the place of the network: keeps the bytes each notifier would send."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.settings = None

    # MailTransport's interface (our notifier)
    def send(self, envelope_from, recipients, message, label):
        from twisted.internet import defer

        from buildbot_mailext.transport import Delivery

        self.sent.append(message)
        return defer.succeed(Delivery(label, "recorder", accepted=list(recipients), reply="250 recorded"))

    def stop(self):
        from twisted.internet import defer

        return defer.succeed(None)


def in_process_phase(quick: bool) -> dict:
    from twisted.internet import defer
    from twisted.python import log as twlog
    from twisted.trial import unittest

    from buildbot.reporters.generators.build import BuildStatusGenerator
    from buildbot.reporters.mail import MailNotifier
    from buildbot.reporters.message import MessageFormatter
    from buildbot.util import unicode2bytes
    from buildbot.test.fake import fakemaster
    from buildbot.test.reactor import TestReactorMixin

    # buildbot.test made warnings errors; these two are known and harmless (see pytest.ini).
    warnings.filterwarnings("ignore", message="No path_separator found", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="twisted.internet.ssl.ProtocolNegotiationSupport",
                            category=DeprecationWarning)

    from buildbot_mailext import MailExtNotifier, MailRoute

    errors: list[str] = []

    def observer(event):
        if event.get("isError"):
            errors.append(twlog.textFromEventDict(event) or repr(event))

    twlog.addObserver(observer)

    class Harness(TestReactorMixin, unittest.TestCase):
        def runTest(self):
            pass

    def sync(d):
        """The fake reactor and NonThreadPool make everything synchronous; check it."""
        d = defer.ensureDeferred(d) if not isinstance(d, defer.Deferred) else d
        results = []
        d.addBoth(results.append)
        if not results:
            raise RuntimeError("bench: a Deferred did not fire synchronously")
        if isinstance(results[0], twisted.python.failure.Failure):
            results[0].raiseException()
        return results[0]

    reps = 7 if quick else 30
    budget = 1.0 if quick else 4.0  # seconds per cell at most (min 3 repetitions)
    out = {"reps": reps, "cases": {}}

    for n in LOG_SIZES:
        h = Harness()
        h.setup_test_reactor()
        master = sync(fakemaster.make_master(h, wantData=True, wantDb=True, wantMq=True))
        sync(master.db.insert_test_data(build_rows(n)))
        base_build = sync(master.data.get(("builds", 20)))

        notifiers = {}
        ours = MailExtNotifier(fromaddr=FROM, routes=[MailRoute(TO, builders=[BUILDER])],
                               preflight="off")
        sync(ours.setServiceParent(master))
        sync(ours.startService())
        sync(ours.transport.stop())
        ours.transport = ours.outbox.transport = Recorder()  # the outbox makes the attempts
        notifiers["ours"] = (ours, ours.transport)

        for key, with_logs in (("stock", False), ("stock+logs", True)):
            stock = MailNotifier(
                fromaddr=FROM,
                sendToInterestedUsers=False,
                extraRecipients=[TO],
                generators=[BuildStatusGenerator(
                    mode=("failing",),
                    message_formatter=MessageFormatter(template_type="html",
                                                       want_logs_content=with_logs),
                )],
                name=f"bench-{key}",
            )
            sync(stock.setServiceParent(master))
            sync(stock.startService())
            rec = Recorder()

            def send_mail(m, recipients, rec=rec):
                # stock sendMail up to the socket: m.as_string(), then bytes
                rec.sent.append(unicode2bytes(m.as_string()))
                return defer.succeed(None)

            stock.sendMail = send_mail
            notifiers[key] = (stock, rec)

        key_event = ("builds", 20, "finished")

        def forget_claims():
            # Every repetition mails the same build event; ours claims each event once (one
            # mail per build across masters), so the claim is forgotten between repetitions,
            # outside the timing: each timed mail still pays its claim and outbox writes.
            from buildbot_mailext import outbox as ob

            sync(master.db.pool.do(lambda conn: (conn.execute(ob.claims_table.delete()), ob._commit(conn))))

        def one_mail(notifier, rec):
            build = copy.deepcopy(base_build)
            forget_claims()
            before = len(rec.sent)
            t0 = time.perf_counter()
            sync(notifier._got_event(key_event, build))
            elapsed = time.perf_counter() - t0
            if len(rec.sent) != before + 1:
                raise RuntimeError(f"bench: expected one mail, got {len(rec.sent) - before}: {errors}")
            return elapsed

        case = {}
        for key, (notifier, rec) in notifiers.items():
            one_mail(notifier, rec)  # warm-up (template compilation, caches)
            gc.collect()  # do not bill one cell for the garbage of the previous one
            times = []
            started = time.perf_counter()
            while len(times) < reps and (len(times) < 3 or time.perf_counter() - started < budget):
                times.append(one_mail(notifier, rec))
            raw = rec.sent[-1]
            rec.sent[:] = [raw]
            case[key] = {
                "median": statistics.median(times),
                "p95": pct(times, 95),
                "n": len(times),
                "bytes": len(raw),
                "tail": carries_tail(raw, n),
            }
            if n == BIG:
                # Peak memory of one mail, traced on its own (tracemalloc slows everything,
                # so it is never on while timing).
                build = copy.deepcopy(base_build)
                rec.sent.clear()
                tracemalloc.start()
                tracemalloc.reset_peak()
                sync(notifier._got_event(key_event, build))
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                case[key]["peak"] = peak
                rec.sent.clear()
        out["cases"][n] = case
        for notifier, _ in notifiers.values():
            sync(notifier.stopService())
        h.doCleanups()
    if errors:
        out["errors"] = errors
    twlog.removeObserver(observer)
    return out


# --------------------------------------------------------- phase 4: refused relay (child)


def closed_port() -> int:
    """A loopback port that was just listening and is now closed: connecting is refused."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    s.close()
    return port


def relay_phase(reps: int) -> None:
    """Runs in a child process on the real reactor; prints one JSON line."""
    from email.message import EmailMessage

    from twisted.internet import defer, task
    from twisted.python import log as twlog

    from buildbot.reporters.mail import MailNotifier

    from buildbot_mailext import message as mime
    from buildbot_mailext.relay import SmtpSettings
    from buildbot_mailext.transport import MailTransport, describe

    lines: list[str] = []

    def observer(event):
        text = twlog.textFromEventDict(event)
        if text:
            lines.append(text)

    twlog.addObserver(observer)

    def a_message():
        m = EmailMessage()
        m["From"] = FROM
        m["To"] = TO
        m["Subject"] = "[linux] build #7 failed"
        m.set_content("compile failed\n" * 50)
        return m

    async def stock_once(reactor, port):
        notifier = MailNotifier(fromaddr=FROM, relayhost="127.0.0.1", smtpPort=port, generators=[])
        await notifier.reconfigService(fromaddr=FROM, relayhost="127.0.0.1", smtpPort=port,
                                       generators=[])
        del lines[:]
        t0 = time.perf_counter()
        error = None
        try:
            await notifier.sendMail(a_message(), [TO])
        except Exception as e:  # what the caller of stock sendMail receives
            error = f"{type(e).__name__}: {e}"
        elapsed = time.perf_counter() - t0
        retries = sum("SMTP Client retrying" in x for x in lines)
        return {"time": elapsed, "attempts": 1 + retries, "outcome": error or "delivered?!",
                "logged": [x for x in lines if "retrying" in x][:1]}

    async def ours_once(reactor, port):
        transport = MailTransport(SmtpSettings(host="127.0.0.1", port=port, timeout=30.0))
        attempts = []
        endpoint = transport._endpoint

        def counting_endpoint():
            attempts.append(1)
            return endpoint()

        transport._endpoint = counting_endpoint
        msg = mime.build_email(subject="[linux] build #7 failed", from_addr=FROM, to=[TO],
                               text="compile failed\n" * 50, html=None)
        label = f"route 'linux->{TO}' build 'linux' #7 {msg['Message-ID']}"
        del lines[:]
        t0 = time.perf_counter()
        delivery = await transport.send("buildbot@example.org", [TO], mime.message_bytes(msg), label)
        elapsed = time.perf_counter() - t0
        await transport.stop()
        outcome = (f"Delivery fired: {delivery.failure.kind}, transient={delivery.failure.transient} "
                   "(the caller decides the retry)")
        return {"time": elapsed, "attempts": len(attempts), "outcome": outcome, "logged": [describe(delivery)]}

    async def main(reactor):
        results = {"stock": [], "ours": []}
        for _ in range(reps):
            results["stock"].append(await stock_once(reactor, closed_port()))
            results["ours"].append(await ours_once(reactor, closed_port()))
        twlog.removeObserver(observer)
        print("BENCH-JSON " + json.dumps(results))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def run_relay_child(quick: bool) -> dict:
    reps = 3 if quick else 7
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--relay-phase", str(reps)],
        capture_output=True, text=True, timeout=120,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):])
    raise RuntimeError(f"relay phase failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


# -------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"machine : {platform.system()} {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({cpu or 'unknown model'})\n"
        f"python  : {platform.python_implementation()} {platform.python_version()}\n"
        f"buildbot: {buildbot.version}   twisted: {twisted.__version__}"
    )


def report(res: dict, relay: dict, quick: bool, total: float) -> str:
    out = []
    cases = res["cases"]
    labels = {
        "ours": "ours (MailRoute, tail)",
        "stock": "stock (no log)",
        "stock+logs": "stock want_logs_content=True",
    }

    out.append("")
    out.append("1+2. One failure mail: finished build dict -> message bytes (no network)")
    out.append("     each notifier's _got_event -> generator -> formatter -> message -> sendMail;")
    out.append(f"     sendMail/transport replaced by a recorder. Up to {res['reps']} repetitions per")
    out.append("     cell after one warm-up (fewer when a cell is slow; n shown).")
    rows = []
    for n, case in cases.items():
        for key in ("ours", "stock", "stock+logs"):
            c = case[key]
            rows.append([
                f"{n:,}" if key == "ours" else "",
                labels[key],
                ms(c["median"]), ms(c["p95"]), str(c["n"]),
                human_bytes(c["bytes"]),
                "yes" if c["tail"] else "no",
            ])
    out.append(table(["log lines", "notifier", "median ms", "p95 ms", "n", "mail size",
                      "has log end"], rows, right={2, 3, 4, 5}))
    o_small = cases[LOG_SIZES[0]]["ours"]["median"]
    o_big = cases[BIG]["ours"]["median"]
    out.append(f"     ours: {BIG:,}-line log / {LOG_SIZES[0]}-line log median = "
               f"{o_big / o_small:.2f}x")
    out.append(f"     (ours reads lines [total - {TAIL} - {SLACK}, total) for the tail, log_tail_lines="
               f"{TAIL} + {SLACK} slack, and scans at most the {SCAN:,} lines above it for the")
    out.append("     first error (this log has none there: the scan's worst case))")
    out.append("     Trade-off, honestly: stock's default formatter never reads the log, so its")
    out.append("     time is flat too, but its mail carries no line of the failing log; stock")
    out.append("     with want_logs_content=True reads and attaches the WHOLE log (base64), so")
    out.append("     its time and size grow with the log. Ours reads only the tail: more work")
    out.append("     than stock-without-logs, flat in the log size. (In-memory SQLite: reading")
    out.append("     a whole log from a real database typically costs more than here.)")

    out.append("")
    out.append(f"3. Peak memory of one mail, {BIG:,}-line log (tracemalloc peak, one run)")
    log_bytes = sum(len(x) + 1 for x in log_lines(BIG))
    rows = []
    for key in ("ours", "stock", "stock+logs"):
        c = cases[BIG][key]
        rows.append([labels[key], human_bytes(c["peak"]), human_bytes(c["bytes"])])
    out.append(table(["notifier", "peak traced", "mail size"], rows, right={1, 2}))
    out.append(f"     the log itself is {human_bytes(log_bytes)}. Ours is bounded by its tail budget")
    out.append(f"     ({TAIL} + {SLACK} lines read for the tail, {SCAN:,} scanned {SCAN_CHUNK:,} at a time "
               "for the first error,")
    out.append(f"     <= {human_bytes(PER_LOG)} shown per log, "
               f"{human_bytes(PER_MAIL)} per mail),")
    out.append("     whatever the log size; stock with want_logs_content=True holds the whole log,")
    out.append("     its base64 copy and the flattened message at once.")

    out.append("")
    out.append("4. Refused relay: 127.0.0.1, a port that was just closed (real reactor, real sockets)")
    rows = []
    for key, label in (("stock", "stock MailNotifier.sendMail"),
                       ("ours", "ours MailTransport.send")):
        rs = relay[key]
        times = [r["time"] for r in rs]
        attempts = sorted({r["attempts"] for r in rs})
        rows.append([label, ms(statistics.median(times)), ms(max(times)), str(len(rs)),
                     "/".join(map(str, attempts))])
    out.append(table(["sender", "median ms", "max ms", "n", "connect attempts"], rows,
                     right={1, 2, 3, 4}))
    s, o = relay["stock"][0], relay["ours"][0]
    out.append("     stock: time until the Deferred errbacks; attempts = 1 + 'SMTP Client retrying' lines")
    out.append(f"       Deferred fails with: {s['outcome']}")
    if s["logged"]:
        out.append(f"       e.g. log: {s['logged'][0]}")
    out.append("       (in a master, ReporterBase._got_event catches this and logs a traceback;")
    out.append("       the mail is not retried)")
    out.append("     ours: time until the classified Delivery fires (one outcome; the caller decides the retry)")
    out.append(f"       {o['outcome']}; its line (describe):")
    for line in o["logged"]:
        out.append(f"       {line}")
    if res.get("errors"):
        out.append("")
        out.append("errors logged during the run:")
        out += ["  " + e for e in res["errors"]]
    out.append("")
    out.append(f"total run time {total:.1f} s{' (--quick)' if quick else ''}; "
               "figures are for this machine and this run only.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~15 s)")
    parser.add_argument("--relay-phase", type=int, metavar="REPS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay_phase:
        relay_phase(args.relay_phase)
        return
    t0 = time.perf_counter()
    print("buildbot-mailext benchmarks: ours (MailExtNotifier) vs stock MailNotifier, same run")
    print(machine())
    sys.stdout.flush()
    relay = run_relay_child(args.quick)
    res = in_process_phase(args.quick)
    print(report(res, relay, args.quick, time.perf_counter() - t0))


if __name__ == "__main__":
    main()
