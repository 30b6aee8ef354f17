"""The outbox with real faults: a real master, a real worker, aiosmtpd on loopback.

One master for the module (SQLite, the default). Its notifier retries fast
(``retry_initial=1``, ``retry_max_delay=2``) so an outage of seconds shows what an
outage of hours would. The relay is "down" by having nothing listen on its port
(connection refused, as when the MTA is stopped) and comes back on the same port.

Figures (queued, delivered, duplicates, seconds from relay-up to the last delivery)
are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import CFG_PREAMBLE, HarnessError, Master, SmtpSink, Worker, free_port, pid_alive, venv_bin

from buildbot_mailext import outbox as ob

pytest.importorskip("aiosmtpd")

WORKER = ("outbox-worker", "outbox-pass")
OPS = "ops@example.org"
FAIL_BUILDERS = ("fail0", "fail1", "fail2", "fail3")
BUILDS = 20  # per outage scenario, spread over the four builders

CFG = (CFG_PREAMBLE + r'''

def failing(name):
    f = util.BuildFactory()
    f.addStep(steps.ShellCommand(name=name, command=["sh", "-c", "echo 'boom' >&2; exit 1"]))
    return f

names = %(fail)r + ("greylist", "rejected", "split")
c['builders'] = [util.BuilderConfig(name=n, workernames=["%(worker)s"], factory=failing(n)) for n in names]
c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=list(names))]
c['collapseRequests'] = False

# The relay is read from a file so a test can change it and run `buildbot reconfig`.
with open(os.path.join(basedir, "relayhost.txt")) as f:
    relayhost = f.read().strip()

c['services'] = [
    reporters.MailExtNotifier(
        fromaddr="buildbot@example.org",
        relayhost=relayhost,
        preflight="off",
        smtp_timeout=3,
        retry_initial=1,
        retry_max_delay=2,
        outbox_lease=8,
        routes=[
            MailRoute(name="ops", to=["%(ops)s"], builders=list(%(fail)r)),
            MailRoute(name="greylist", to=["grey@example.org"], builders=["greylist"]),
            MailRoute(name="rejected", to=["nobody@example.org"], builders=["rejected"]),
            MailRoute(name="split", to=["ok@example.org", "bad@example.org"], builders=["split"]),
        ],
    ),
]
c['title'] = "mailext outbox e2e"
c['buildbotURL'] = "http://127.0.0.1:%%s/" %% env("MAILEXT_WWW_PORT")
c['www'] = {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_WWW_PORT"), 'plugins': {}}
c['db'] = {'db_url': "sqlite:///state.sqlite"}
c['buildbotNetUsageData'] = None
''') % {"worker": WORKER[0], "password": WORKER[1], "ops": OPS, "fail": FAIL_BUILDERS}

REJECTS = {"nobody@example.org": "550 5.1.1 <nobody@example.org>: user unknown",
           "bad@example.org": "550 5.1.1 <bad@example.org>: user unknown"}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.relay_port = free_port()  # nothing listens here until a test starts a sink on it
        self.master = Master(tmp / "master", CFG)
        self.worker: Worker | None = None

    @property
    def relayhost(self) -> str:
        return f"[127.0.0.1]:{self.relay_port}"

    def sink(self, port: int | None = None) -> SmtpSink:
        """The relay, up (on its usual port unless told otherwise)."""
        sink = SmtpSink()
        sink._server.rcpt_replies.update(REJECTS)
        return sink.start(port or self.relay_port)

    def rows(self) -> list[ob.OutboxEntry]:
        engine = sa.create_engine(f"sqlite:///{self.master.basedir / 'state.sqlite'}")
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("mailext_outbox"):
                    return []
                return ob.thd_list(conn)
        finally:
            engine.dispose()

    def wait_rows(self, predicate, timeout: float = 60) -> list[ob.OutboxEntry]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv_bin("buildbot-mailext"), "outbox", str(self.master.basedir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, env=self.master.env,
        )

    def fail_builds(self, count: int = BUILDS) -> list[dict]:
        requests = [self.master.force("force", FAIL_BUILDERS[i % len(FAIL_BUILDERS)])[1] for i in range(count)]
        return [self.master.wait_build(r, timeout=300) for r in requests]

    def wait_log(self, *needles: str, timeout: float = 10) -> list[str]:
        """Log lines containing every needle, once there is one (a line follows the 250)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [x for x in self.log_lines(needles[0]) if all(n in x for n in needles)]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.master.log_path.read_text(errors="replace").splitlines() if needle in line]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("outbox"))
    e.master.create()
    (e.master.basedir / "relayhost.txt").write_text(e.relayhost)
    e.master.start()
    e.worker = Worker(e.tmp / "worker", e.master.pb_port, *WORKER)
    e.worker.create()
    e.worker.start()
    try:
        e.master.wait_worker(WORKER[0])
        yield e
    finally:
        e.worker.stop()
        e.master.stop()


def build_key(mail) -> tuple[str, str]:
    """(builder, build number) of a build mail, from its X-Buildbot-* headers."""
    msg = mail.message()
    number = re.search(r"/builds/(\d+)", msg["X-Buildbot-URL"]).group(1)
    return msg["X-Buildbot-Builder"], number


def deliver_after_outage(env: Env, builds: list[dict], scenario: str) -> None:
    """Relay up; every queued build mail arrives exactly once within a minute."""
    expected = {(b["builderid"], str(b["number"])) for b in builds}
    assert len(expected) == len(builds)
    rows = env.wait_rows(lambda r: len([x for x in r if x.route == "route ops"]) >= len(builds), timeout=30)
    queued = len([r for r in rows if r.route == "route ops"])
    assert queued == len(builds), [r.label for r in rows]
    relay_up = time.monotonic()
    sink = env.sink()
    try:
        mails = sink.wait_for(len(builds), timeout=60, predicate=lambda m: OPS in m.rcpt_tos)
        last = max((m.received_at for m in mails), default=relay_up) - relay_up
        extra = sink.wait_for(len(builds) + 1, timeout=3, predicate=lambda m: OPS in m.rcpt_tos)
    finally:
        sink.stop()
    keys = [build_key(m) for m in extra]
    ids = env.master.builder_ids()
    delivered = {(ids[name], number) for name, number in keys}
    duplicates = len(keys) - len(set(keys))
    print(f"\n[{scenario}] queued {queued}, delivered {len(set(keys))}, duplicates {duplicates}, "
          f"relay-up to last delivery {last:.2f}s")
    assert delivered == expected
    assert duplicates == 0
    assert [r for r in env.rows() if r.route == "route ops"] == []


def test_relay_down_while_20_builds_fail_then_up_delivers_each_once(env):
    builds = env.fail_builds()
    assert env.log_lines("NOT delivered via"), "the outage left no log line"
    deliver_after_outage(env, builds, "outage")


def test_master_stopped_and_started_during_the_outage_loses_nothing(env):
    builds = env.fail_builds()
    env.wait_rows(lambda r: len([x for x in r if x.route == "route ops"]) >= BUILDS, timeout=30)
    # SQLite: the outbox keeps a connection open while it runs, so the write-ahead log stays
    # (no checkpoint at every query); at the stop it closes it and the log is folded in.
    # (Buildbot 4.0/4.1 fail to switch SQLite to WAL: there, only the open file shows.)
    db = env.master.basedir / "state.sqlite"
    wal = env.master.basedir / "state.sqlite-wal"
    check = sqlite3.connect(str(db))
    try:
        in_wal_mode = check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        check.close()
    samples = []
    for _ in range(20):  # without it, both vanish whenever no query is running
        held = any(os.path.realpath(f"/proc/{env.master.pid}/fd/{fd}") == str(db)
                   for fd in os.listdir(f"/proc/{env.master.pid}/fd"))
        samples.append((held, wal.exists() or not in_wal_mode))
        time.sleep(0.1)
    assert all(held and log_kept for held, log_kept in samples), samples
    env.master.stop()
    assert env.log_lines(f"mails still pending, kept in the database")
    assert not env.log_lines("could not keep a connection to the SQLite database open")
    assert not wal.exists()
    env.master.start()
    env.master.wait_worker(WORKER[0])
    deliver_after_outage(env, builds, "restart")


def test_master_killed_after_builds_fail_loses_nothing(env):
    builds = env.fail_builds()
    env.wait_rows(lambda r: len([x for x in r if x.route == "route ops"]) >= BUILDS, timeout=30)
    pid = env.master.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    env.master.pid = None
    env.master.start()
    env.master.wait_worker(WORKER[0])
    assert env.log_lines("mails waiting from before: sending them now")
    deliver_after_outage(env, builds, "SIGKILL")


def test_451_twice_then_250_is_delivered_at_the_third_attempt(env):
    sink = env.sink()
    sink._server.data_replies = ["451 4.3.0 try again later"] * 2
    try:
        build = env.master.force_and_wait("force", "greylist")
        mails = sink.wait_for(1, timeout=30, predicate=lambda m: "grey@example.org" in m.rcpt_tos)
        assert [build_key(m)[1] for m in mails] == [str(build["number"])]
    finally:
        sink.stop()
    env.wait_log("build 'greylist' #%d " % build["number"], ": delivered via")
    lines = [line for line in env.log_lines("route 'greylist'") if "#%d " % build["number"] in line]
    assert len([x for x in lines if "451 4.3.0" in x and "attempt" in x]) == 2, lines
    assert len([x for x in lines if ": delivered via" in x]) == 1, lines


def test_550_is_a_dead_letter_listed_by_the_cli_and_retry_delivers_it_once_fixed(env):
    sink = env.sink()
    try:
        env.master.force_and_wait("force", "rejected")
        rows = env.wait_rows(lambda r: any(x.route == "route rejected" and x.state == ob.DEAD for x in r), 30)
        [dead] = [r for r in rows if r.route == "route rejected"]
        assert dead.state == ob.DEAD and dead.attempts == 1
        time.sleep(3)  # a dead letter is not retried
        assert env.rows()[-1].attempts == 1 and sink.snapshot() == []

        listed = env.cli("list")
        assert listed.returncode == 0, listed.stderr
        line = [x for x in listed.stdout.decode().splitlines() if x.startswith(f"{dead.id} ")]
        assert line and "dead" in line[0] and "nobody@example.org" in line[0] and "550 5.1.1" in line[0], listed.stdout
        shown = env.cli("show", str(dead.id))
        assert shown.returncode == 0 and b"\r\nX-Buildbot-Builder: rejected\r\n" in shown.stdout

        sink._server.rcpt_replies.pop("nobody@example.org")  # the relay is fixed
        retried = env.cli("retry", str(dead.id))
        assert retried.returncode == 0, retried.stderr
        mails = sink.wait_for(1, timeout=30, predicate=lambda m: "nobody@example.org" in m.rcpt_tos)
        assert len(mails) == 1
        assert env.wait_rows(lambda r: not any(x.id == dead.id for x in r), 10) == [
            r for r in env.rows() if r.id != dead.id
        ]
    finally:
        sink.stop()
    assert env.cli("show", str(dead.id)).returncode == 1


def test_one_recipient_550_and_one_250_delivers_one_and_dead_letters_the_other(env):
    sink = env.sink()
    try:
        env.master.force_and_wait("force", "split")
        mails = sink.wait_for(1, timeout=30, predicate=lambda m: "ok@example.org" in m.rcpt_tos)
        assert [m.rcpt_tos for m in mails] == [["ok@example.org"]]
        rows = env.wait_rows(lambda r: any(x.route == "route split" and x.state == ob.DEAD for x in r), 10)
        [dead] = [r for r in rows if r.route == "route split"]
        assert (dead.state, dead.recipients) == (ob.DEAD, ["bad@example.org"])
    finally:
        sink.stop()
    drop = env.cli("drop", "--dead")
    assert drop.returncode == 0 and b"mails dropped" in drop.stdout
    assert [r for r in env.rows() if r.state == ob.DEAD] == []


def test_relayhost_changed_by_reconfig_while_a_mail_waits_gets_it(env):
    """Issue 12: the queued mail is filed under a name that relay settings do not change."""
    build = env.fail_builds(1)[0]
    env.wait_rows(lambda r: any(x.route == "route ops" for x in r), 30)
    new_relay = env.sink(port=free_port())
    try:
        (env.master.basedir / "relayhost.txt").write_text(new_relay.relayhost)
        proc = subprocess.run([venv_bin("buildbot"), "reconfig", str(env.master.basedir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                              env=env.master.env)
        assert proc.returncode == 0, proc.stdout
        mails = new_relay.wait_for(1, timeout=30, predicate=lambda m: OPS in m.rcpt_tos)
        assert [build_key(m)[1] for m in mails] == [str(build["number"])]
    finally:
        new_relay.stop()
        (env.master.basedir / "relayhost.txt").write_text(env.relayhost)
    assert not env.log_lines("lost at shutdown")
