"""Exactly one mail per build across two masters, on the real distributed setup.

A throwaway PostgreSQL cluster (Debian's ``postgresql``: ``initdb``/``pg_ctl`` as the
``postgres`` user when the test runs as root, on a free loopback port), a crossbar router
as Buildbot's ``wamp`` message queue (crossbar lives in a venv of its own: its pins fight
Buildbot's; ``.ci/run`` installs it into /opt/mailext-crossbar, or set
``MAILEXT_CROSSBAR=/path/to/crossbar``), two masters on that database and queue, one
worker. Every build event reaches both masters; the outbox's claim lets one mail out.

Then the master that holds a queued mail stops (cleanly, then with SIGKILL) while the relay
is down, and the other master delivers it once the relay is back (after a kill: once the
killed master's lease has expired).

Under ``CI=true`` a missing piece (PostgreSQL, crossbar, psycopg2) fails the test with its
reason; elsewhere the module is skipped with the reason. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from harness import CFG_PREAMBLE, HarnessError, Master, SmtpSink, Worker, free_port, pid_alive, venv_bin

from buildbot_mailext import outbox as ob

CROSSBAR_CANDIDATES = ("/opt/mailext-crossbar/bin/crossbar",)
WORKER = ("mm-worker", "mm-pass")
OPS = "ops@example.org"
BUILDS = 6


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the multi-master test cannot run: {reason}")
    pytest.skip(reason)


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        unavailable("PostgreSQL is not installed (apt-get install postgresql): no /usr/lib/postgresql/*/bin/initdb")
    return Path(found[-1]).parent


def crossbar_exe() -> str:
    for candidate in (os.environ.get("MAILEXT_CROSSBAR"), *CROSSBAR_CANDIDATES, shutil.which("crossbar")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    unavailable("crossbar is not installed: python3 -m venv /opt/mailext-crossbar && "
                "/opt/mailext-crossbar/bin/pip install crossbar (or set MAILEXT_CROSSBAR)")
    return ""


def wait_port(port: int, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise HarnessError(f"{what} not listening on 127.0.0.1:{port} after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


class Postgres:
    """A PostgreSQL cluster of its own in a world-traversable temp dir (as root, the server
    runs as ``postgres``: PostgreSQL refuses root)."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="mailext-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://buildbot@127.0.0.1:{self.port}/buildbot"

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self.as_user, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
        if proc.returncode:
            raise HarnessError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}")

    def start(self) -> "Postgres":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "buildbot", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -c unix_socket_directories={self.dir}"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "buildbot", "buildbot")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Crossbar:
    """A crossbar router with one realm ``buildbot`` open to anonymous clients."""

    def __init__(self, root: Path) -> None:
        self.exe = crossbar_exe()
        self.dir = root / ".crossbar"
        self.port = free_port()
        self.log = root / "crossbar.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> "Crossbar":
        self.dir.mkdir(parents=True)
        everything = {"call": True, "register": True, "publish": True, "subscribe": True}
        config = {
            "version": 2,
            "workers": [{
                "type": "router",
                "realms": [{"name": "buildbot", "roles": [{"name": "anonymous", "permissions": [
                    {"uri": "", "match": "prefix", "allow": everything,
                     "disclose": {"caller": False, "publisher": False}, "cache": True}]}]}],
                "transports": [{"type": "web", "endpoint": {"type": "tcp", "port": self.port,
                                                              "interface": "127.0.0.1"},
                                "paths": {"ws": {"type": "websocket"}}}],
            }],
        }
        (self.dir / "config.json").write_text(json.dumps(config))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([self.exe, "start", "--cbdir", str(self.dir)], stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_port(self.port, 90, "crossbar", self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


CFG = (CFG_PREAMBLE + r'''
f = util.BuildFactory()
f.addStep(steps.ShellCommand(name="tests", command=["sh", "-c", "echo boom >&2; exit 1"]))
c['builders'] = [util.BuilderConfig(name="runtests", workernames=["%(worker)s"], factory=f)]
c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=["runtests"])]
c['collapseRequests'] = False
c['services'] = [
    reporters.MailExtNotifier(
        fromaddr="buildbot@example.org",
        relayhost=env("MAILEXT_RELAYHOST"),
        preflight="off", smtp_timeout=3, retry_initial=1, retry_max_delay=2, outbox_lease=8,
        routes=[MailRoute(name="ops", to=["%(ops)s"], builders=["runtests"]),
                MailRoute(name="leads", to=["leads@example.org"], builders=["runtests"])],
    ),
]
c['multiMaster'] = True
c['mq'] = {'type': 'wamp', 'router_url': env("MAILEXT_ROUTER_URL"), 'realm': 'buildbot'}
c['db'] = {'db_url': env("MAILEXT_DB_URL")}
c['title'] = "mailext multi-master"
c['buildbotURL'] = "http://127.0.0.1:%%s/" %% env("MAILEXT_WWW_PORT")
c['www'] = {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_WWW_PORT"), 'plugins': {}}
c['buildbotNetUsageData'] = None
''') % {"worker": WORKER[0], "password": WORKER[1], "ops": OPS}


class Cluster:
    def __init__(self, tmp: Path, pg: Postgres, router: Crossbar) -> None:
        self.pg, self.router = pg, router
        self.relay_port = free_port()
        env = {"MAILEXT_DB_URL": pg.url, "MAILEXT_ROUTER_URL": router.url,
               "MAILEXT_RELAYHOST": f"[127.0.0.1]:{self.relay_port}"}
        self.masters = [Master(tmp / f"master{i}", CFG, env=env) for i in (1, 2)]
        self.worker = Worker(tmp / "worker", self.masters[0].pb_port, *WORKER)
        self.engine = sa.create_engine(pg.url.replace("postgresql+psycopg2", "postgresql+psycopg2"))

    def start(self) -> None:
        for i, master in enumerate(self.masters):
            master.create()
            if i == 0:  # one schema for both
                proc = master._run([venv_bin("buildbot"), "upgrade-master", str(master.basedir)], 180)
                if proc.returncode:
                    raise HarnessError(f"upgrade-master on PostgreSQL failed:\n{proc.stdout}")
            master.start()
        self.worker.create()
        self.worker.start()
        self.masters[0].wait_worker(WORKER[0])
        deadline = time.monotonic() + 60
        while len([m for m in self.masters[0].get("masters")["masters"] if m["active"]]) < 2:
            if time.monotonic() > deadline:
                raise HarnessError(f"both masters never showed as active: {self.masters[0].get('masters')}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.worker.stop()
        for master in self.masters:
            master.stop()
        self.engine.dispose()

    def rows(self) -> list[ob.OutboxEntry]:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("mailext_outbox"):
                return []
            return ob.thd_list(conn)

    def sink(self) -> SmtpSink:
        return SmtpSink().start(self.relay_port)

    def masterids(self) -> dict[int, Master]:
        by_dir = {str(m.basedir.resolve()): m for m in self.masters}
        return {m["masterid"]: by_dir[m["name"].split(":", 1)[1]] for m in self.masters[0].get("masters")["masters"]
                if m["name"].split(":", 1)[1] in by_dir}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("aiosmtpd")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (pip install psycopg2-binary, in the [test] extra)")
    tmp = tmp_path_factory.mktemp("multimaster")
    pg = Postgres()
    router = Crossbar(tmp)
    try:
        pg.start()
        router.start()
        c = Cluster(tmp, pg, router)
        try:
            c.start()
            yield c
        finally:
            c.stop()
    finally:
        router.stop()
        pg.stop()


def test_two_masters_send_each_failing_build_once_per_route(cluster):
    sink = cluster.sink()
    try:
        master = cluster.masters[0]
        requests = [master.force("force", "runtests")[1] for _ in range(BUILDS)]
        builds = [master.wait_build(r, timeout=120) for r in requests]
        expected = {(rcpt, str(b["number"])) for b in builds for rcpt in (OPS, "leads@example.org")}
        sink.wait_for(len(expected), timeout=60)
        mails = sink.wait_for(len(expected) + 1, timeout=5)  # anything more is a duplicate
    finally:
        sink.stop()
    got = [(m.rcpt_tos[0], m.message()["X-Buildbot-URL"].rsplit("/", 1)[1]) for m in mails]
    duplicates = len(got) - len(set(got))
    print(f"\n[multi-master] {BUILDS} failing builds x 2 routes on 2 masters: expected {len(expected)}, "
          f"delivered {len(set(got))}, duplicates {duplicates}")
    assert set(got) == expected and duplicates == 0
    lost = [line for m in cluster.masters for line in m.log_path.read_text().splitlines()
            if "is mailed by another master" in line]
    assert len(lost) == len(expected), lost  # every event was claimed by the other master too


def queued_mail_outlives_its_master(cluster: Cluster, lose, how: str) -> Master:
    """A failing build while the relay is down; ``lose(holder)`` takes away the master that
    queued its two mails; the relay comes back; the other master delivers both, once.
    Returns the lost master."""
    master = cluster.masters[0]
    master.wait_worker(WORKER[0], timeout=120)  # it may have been restarted by a test before
    build = master.force_and_wait("force", "runtests")
    deadline = time.monotonic() + 30
    while len(rows := cluster.rows()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    owners = {r.owner for r in rows}
    assert len(rows) == 2 and len(owners) == 1, rows
    holder = cluster.masterids()[owners.pop()]
    other = [m for m in cluster.masters if m is not holder][0]
    lose(holder)
    relay_up = time.monotonic()
    sink = cluster.sink()
    try:
        mails = sink.wait_for(2, timeout=60)
        took = max((m.received_at for m in mails), default=relay_up) - relay_up
        mails = sink.wait_for(3, timeout=3)
    finally:
        sink.stop()
    numbers = sorted((m.rcpt_tos[0], m.message()["X-Buildbot-URL"].rsplit("/", 1)[1]) for m in mails)
    print(f"\n[multi-master {how}] queued 2 on {holder.basedir.name}; delivered {len(mails)} by "
          f"{other.basedir.name}, duplicates {len(numbers) - len(set(numbers))}, relay-up to last delivery {took:.2f}s")
    assert numbers == sorted([("leads@example.org", str(build["number"])), (OPS, str(build["number"]))])
    delivered_by = [line for line in other.log_path.read_text().splitlines() if ": delivered via" in line
                    and f"build 'runtests' #{build['number']} <" in line]
    assert len(delivered_by) == 2, delivered_by
    assert cluster.rows() == []
    return holder


def test_a_stopped_masters_queued_mail_is_delivered_by_the_other_master(cluster):
    holder = queued_mail_outlives_its_master(cluster, lambda m: m.stop(), "clean stop")  # its lease ends at once
    holder.start()  # leave the cluster whole for the next test


def test_a_killed_masters_queued_mail_is_delivered_by_the_other_master_after_the_lease(cluster):
    def kill(master: Master) -> None:  # no clean stop: its lease must run out (outbox_lease=8)
        pid = master.pid
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
        master.pid = None

    queued_mail_outlives_its_master(cluster, kill, "SIGKILL")
