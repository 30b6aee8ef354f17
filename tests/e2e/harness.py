"""A real Buildbot master, a real worker and an SMTP sink, all on loopback.

Reusable by the end-to-end tests and by ``python -m buildbot_mailext.demo``::

    sink = SmtpSink().start()
    master = Master(tmp / "master", cfg_text, env={"MAILEXT_RELAYHOST": sink.relayhost, ...})
    master.create(); master.start()
    worker = Worker(tmp / "worker", master.pb_port, "example-worker", "pass")
    worker.create(); worker.start(); master.wait_worker("example-worker")
    build = master.force_and_wait("force", "runtests", timeout=60)
    mails = sink.wait_for(1, timeout=30)
    worker.stop(); master.stop(); sink.stop()

Only the standard library, aiosmtpd and ``tests/smtp_servers.py`` are used, so the harness
works from a checkout without installing anything else.  Every port is bound to
127.0.0.1.  Processes are stopped by the PIDs this harness started (twistd.pid), never
by name.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

LOOPBACK = "127.0.0.1"


# The first lines of every e2e master.cfg: imports, the worker and its loopback PB port.
# A test's config is CFG_PREAMBLE + its own lines, %-formatted with worker= and password=.
CFG_PREAMBLE = r'''
import os
from buildbot.plugins import reporters, schedulers, steps, util, worker
from buildbot_mailext import MailRoute

env = os.environ.get
c = BuildmasterConfig = {}
c['workers'] = [worker.Worker("%(worker)s", "%(password)s")]
c['protocols'] = {'pb': {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_PB_PORT")}}
'''


class HarnessError(RuntimeError):
    """Something in the set-up failed; the message says what and includes log tails."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """The console script ``name`` next to the running interpreter (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return name  # fall back to PATH


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    return True


def read_pid(basedir: Path) -> int | None:
    try:
        return int((Path(basedir) / "twistd.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_pid(pid: int | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL one PID (one we started)."""
    if not pid or not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


# --------------------------------------------------------------------------- SMTP sink


@dataclass
class ReceivedMail:
    """One message as the sink received it: the envelope and the exact DATA bytes."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float = field(default_factory=time.monotonic)

    def message(self) -> EmailMessage:
        """Parsed with the strict modern policy (headers decoded, defects recorded)."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    def part(self, content_type: str) -> str | None:
        """The decoded body of the first part with this content type, or None."""
        for part in self.message().walk():
            if part.get_content_type() == content_type and not part.is_multipart():
                return part.get_content()
        return None


def _smtp_servers():
    """tests/smtp_servers.py (the project's aiosmtpd fixtures), also outside pytest."""
    if "smtp_servers" in sys.modules:
        return sys.modules["smtp_servers"]
    path = Path(__file__).resolve().parents[1] / "smtp_servers.py"
    spec = importlib.util.spec_from_file_location("smtp_servers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["smtp_servers"] = module
    spec.loader.exec_module(module)
    return module


class SmtpSink:
    """An SMTP sink on 127.0.0.1 for a master running in another process.

    The server is ``tests/smtp_servers.py``'s ``SmtpServer`` (aiosmtpd in its own thread);
    this adds what a master-driven test needs: the Postfix-style ``relayhost`` string for
    master.cfg, waiting for N messages, and parsed messages (:class:`ReceivedMail`).
    """

    def __init__(self, hostname: str = LOOPBACK) -> None:
        self.hostname = hostname
        self._server = _smtp_servers().SmtpServer(host=hostname, server_hostname="sink.localdomain")
        self._seen: list[ReceivedMail] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def relayhost(self) -> str:
        """Postfix-style "[127.0.0.1]:PORT", as master.cfg.example expects it."""
        return f"[{self.hostname}]:{self.port}"

    def start(self, port: int | None = None) -> "SmtpSink":
        """Listen on a free port, or on ``port`` (a relay coming back where it was)."""
        self._server.start(port)
        return self

    def stop(self) -> None:
        self._server.stop()

    def snapshot(self) -> list[ReceivedMail]:
        """Every message received so far, in arrival order (``received_at`` is when this
        sink first saw it; polled every 50 ms by :meth:`wait_for`)."""
        with self._lock:
            with self._server._lock:
                raw = list(self._server.messages)
            for r in raw[len(self._seen):]:
                self._seen.append(ReceivedMail(r.mail_from, list(r.rcpt_tos), bytes(r.data)))
            return list(self._seen)

    def wait_for(self, count: int, timeout: float, predicate=None) -> list[ReceivedMail]:
        """Wait until ``count`` mails (matching ``predicate``) arrived; return them.

        Returns whatever matched at the deadline (possibly fewer): the caller asserts.
        """
        deadline = time.monotonic() + timeout
        while True:
            got = [m for m in self.snapshot() if predicate is None or predicate(m)]
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.05)

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- master


class Master:
    """A Buildbot master in ``basedir`` running ``cfg_text`` with extra ``env``."""

    def __init__(
        self,
        basedir: Path | str,
        cfg_text: str,
        env: dict[str, str] | None = None,
        www_port: int | None = None,
        pb_port: int | None = None,
    ) -> None:
        self.basedir = Path(basedir)
        self.cfg_text = cfg_text
        self.www_port = www_port or free_port()
        self.pb_port = pb_port or free_port()
        self.env = dict(os.environ)
        # Ports are always handed to master.cfg through these variables.
        self.env.update(
            {
                "MAILEXT_WWW_PORT": str(self.www_port),
                "MAILEXT_PB_PORT": str(self.pb_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        self.pid: int | None = None

    @property
    def api(self) -> str:
        return f"http://{LOOPBACK}:{self.www_port}/api/v2"

    @property
    def log_path(self) -> Path:
        return self.basedir / "twistd.log"

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )

    def create(self) -> None:
        """``buildbot create-master`` then write master.cfg."""
        self.basedir.parent.mkdir(parents=True, exist_ok=True)
        proc = self._run([venv_bin("buildbot"), "create-master", "-q", str(self.basedir)], 120)
        if proc.returncode != 0:
            raise HarnessError(f"buildbot create-master failed ({proc.returncode}):\n{proc.stdout}")
        (self.basedir / "master.cfg").write_text(self.cfg_text)

    def checkconfig(self) -> subprocess.CompletedProcess:
        return self._run([venv_bin("buildbot"), "checkconfig", str(self.basedir)], 120)

    def start(self, timeout: float = 90) -> None:
        """``buildbot start`` (returns once the master runs or failed), then wait for REST."""
        try:
            proc = self._run([venv_bin("buildbot"), "start", str(self.basedir)], timeout)
        except subprocess.TimeoutExpired as exc:
            self.pid = read_pid(self.basedir)
            raise HarnessError(
                f"buildbot start did not return in {timeout}s\n--- twistd.log ---\n"
                f"{self.log_tail()}"
            ) from exc
        self.pid = read_pid(self.basedir)
        if proc.returncode != 0:
            raise HarnessError(
                f"buildbot start failed (rc {proc.returncode}):\n{proc.stdout}\n"
                f"--- twistd.log ---\n{self.log_tail()}"
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("builders")
                return
            except (OSError, urllib.error.URLError) as exc:
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"REST API on port {self.www_port} not answering: {exc}\n"
                        f"--- twistd.log ---\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def stop(self, timeout: float = 30) -> None:
        """What ``buildbot stop`` does (SIGTERM: clean shutdown), polled every 0.1 s
        instead of every 1 s; SIGKILL the PID we started after ``timeout``."""
        _kill_pid(self.pid or read_pid(self.basedir), timeout=timeout)
        self.pid = None

    # ------------------------------------------------------------------ REST helpers

    def get(self, path: str, timeout: float = 10) -> dict:
        with urllib.request.urlopen(f"{self.api}/{path}", timeout=timeout) as resp:
            return json.load(resp)

    def post_json(self, path: str, body: dict, timeout: float = 30) -> dict:
        req = urllib.request.Request(
            f"{self.api}/{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise HarnessError(f"POST {path} -> HTTP {exc.code}: {detail}") from exc

    def builder_ids(self) -> dict[str, int]:
        return {b["name"]: b["builderid"] for b in self.get("builders")["builders"]}

    def force(self, scheduler: str, builder: str, **params) -> tuple[int, int]:
        """Force ``builder`` through ``scheduler``; returns (buildsetid, buildrequestid).

        Extra ``params`` are force-scheduler fields (e.g. ``branch="x"``, ``reason=...``).
        A JSON-RPC error (e.g. a field the scheduler rejects) raises HarnessError.
        """
        builderid = self.builder_ids()[builder]
        params = {"builderid": str(builderid), **params}
        answer = self.post_json(
            f"forceschedulers/{scheduler}",
            {"jsonrpc": "2.0", "method": "force", "id": 1, "params": params},
        )
        if "error" in answer and answer["error"]:
            raise HarnessError(f"force {builder} refused: {answer['error']}")
        bsid, brids = answer["result"]
        return int(bsid), int(brids[str(builderid)] if str(builderid) in brids else brids[builderid])

    def wait_build(self, buildrequestid: int, timeout: float = 90) -> dict:
        """Poll ``GET /api/v2/builds?buildrequestid=N`` until the build is complete."""
        deadline = time.monotonic() + timeout
        while True:
            builds = self.get(f"builds?buildrequestid={buildrequestid}")["builds"]
            done = [b for b in builds if b.get("complete")]
            if done:
                return done[-1]
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"build for request {buildrequestid} not complete after {timeout}s "
                    f"(builds: {builds})\n--- twistd.log ---\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def force_and_wait(self, scheduler: str, builder: str, timeout: float = 90, **params) -> dict:
        _, brid = self.force(scheduler, builder, **params)
        return self.wait_build(brid, timeout=timeout)

    def build_properties(self, buildid: int) -> dict:
        props = self.get(f"builds/{buildid}/properties")["properties"]
        return {k: v[0] for k, v in (props[0] if props else {}).items()}

    def step_log(self, buildid: int, step_number: int, log: str = "stdio") -> str:
        """Raw log content (each line keeps its ``o``/``e``/``h`` stream prefix)."""
        chunks = self.get(f"builds/{buildid}/steps/{step_number}/logs/{log}/contents")["logchunks"]
        return "".join(c["content"] for c in chunks)

    def wait_worker(self, name: str, timeout: float = 60) -> None:
        """Wait until worker ``name`` is connected to this master."""
        deadline = time.monotonic() + timeout
        while True:
            workers = self.get(f"workers?name={name}")["workers"]
            if workers and workers[0].get("connected_to"):
                return
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"worker {name} did not connect in {timeout}s\n--- twistd.log ---\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)


# --------------------------------------------------------------------------- worker


class Worker:
    """A buildbot-worker in ``basedir`` connecting to 127.0.0.1:``pb_port``."""

    def __init__(
        self, basedir: Path | str, pb_port: int, name: str, password: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.basedir = Path(basedir)
        self.env = {**os.environ, **(env or {})}  # the environment build steps inherit
        self.pb_port = pb_port
        self.name = name
        self.password = password
        self.pid: int | None = None

    @property
    def log_path(self) -> Path:
        return self.basedir / "twistd.log"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )

    def create(self) -> None:
        proc = self._run(
            [
                venv_bin("buildbot-worker"),
                "create-worker",
                "-q",
                str(self.basedir),
                f"{LOOPBACK}:{self.pb_port}",
                self.name,
                self.password,
            ],
            60,
        )
        if proc.returncode != 0:
            raise HarnessError(f"create-worker failed ({proc.returncode}):\n{proc.stdout}")

    def start(self, timeout: float = 60) -> None:
        proc = self._run([venv_bin("buildbot-worker"), "start", str(self.basedir)], timeout)
        self.pid = read_pid(self.basedir)
        if proc.returncode != 0:
            raise HarnessError(
                f"buildbot-worker start failed ({proc.returncode}):\n{proc.stdout}\n"
                f"--- worker twistd.log ---\n{tail(self.log_path)}"
            )

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (as ``buildbot-worker stop``), SIGKILL after ``timeout``."""
        _kill_pid(self.pid or read_pid(self.basedir), timeout=timeout)
        self.pid = None


# --------------------------------------------------------------------------- helpers


def repo_root() -> Path:
    """The checkout this file lives in (tests/e2e/harness.py -> ../..)."""
    return Path(__file__).resolve().parents[2]


def example_cfg_text() -> str:
    return (repo_root() / "master.cfg.example").read_text()


@contextlib.contextmanager
def running_site(
    tmp: Path,
    cfg_text: str,
    worker: tuple[str, str],
    master_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
):
    """A sink, a master running ``cfg_text`` (its ``MAILEXT_RELAYHOST`` is the sink) and a
    connected worker ``(name, password)``; yields ``(sink, master, worker)`` and stops all
    three afterwards, whatever happened."""
    sink = SmtpSink().start()
    master = Master(tmp / "master", cfg_text, env={"MAILEXT_RELAYHOST": sink.relayhost, **(master_env or {})})
    site_worker = Worker(tmp / "worker", master.pb_port, *worker, env=worker_env)
    try:
        master.create()
        master.start()
        site_worker.create()
        site_worker.start()
        master.wait_worker(worker[0])
        yield sink, master, site_worker
    finally:
        site_worker.stop()
        master.stop()
        sink.stop()
