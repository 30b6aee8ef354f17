"""A throwaway PostgreSQL cluster for the unit tests that need a real server.

SQLite cannot show two things the outbox relies on: DDL inside a transaction (PostgreSQL
drops a CREATE TABLE that is never committed) and the ids of a multi-row
``INSERT ... RETURNING``. So the outbox row tests also run on a cluster of their own:
``initdb`` (Debian's ``postgresql`` package, ``/usr/lib/postgresql/*/bin``) in a temp dir,
``pg_ctl start`` on a free 127.0.0.1 port (``fsync=off``, trust auth), as the ``postgres``
user when the tests run as root (PostgreSQL refuses root). One cluster per process (about
2 s), started by the first test that asks and stopped at exit by that same process, so the
forked children of ``mutmut run`` reuse the one their parent started.

:func:`url` raises :class:`Unavailable` (PostgreSQL or psycopg2 missing: the fixture in
conftest.py skips, or fails under ``CI=true``) or :class:`StartFailed` (installed but it
did not start: always an error, with initdb's or the server's output).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional


class Unavailable(Exception):
    """PostgreSQL (or its Python driver) is not installed here."""


class StartFailed(Exception):
    """PostgreSQL is installed but the throwaway cluster did not start."""


_url: Optional[str] = None
_error: Optional[Exception] = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise Unavailable("PostgreSQL is not installed (apt-get install postgresql): no /usr/lib/postgresql/*/bin/initdb")
    return Path(found[-1]).parent


def _start() -> str:
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"psycopg2 is not installed (pip install psycopg2-binary): {exc}") from None
    bindir = _bin_dir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise Unavailable("running as root without runuser: PostgreSQL refuses to run as root")
        as_user = ["runuser", "-u", "postgres", "--"]
    tmp = Path(tempfile.mkdtemp(prefix="mailext-pg-unit-", dir="/tmp"))
    os.chmod(tmp, 0o755)  # the postgres user must reach it
    if as_user:
        try:
            shutil.chown(tmp, "postgres")
        except (LookupError, PermissionError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise Unavailable(f"no postgres user to run the server as: {exc}") from None
    data, log = tmp / "data", tmp / "postgres.log"

    def run(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
        if proc.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise StartFailed(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{tail}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "mailext", "--auth=trust", "-E", "UTF8", "--no-sync")
        for attempt in range(3):  # the free port may be taken between the check and the start
            port = _free_port()
            options = (f"-p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
                       f"-c synchronous_commit=off -c unix_socket_directories={tmp}")
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start")
                break
            except StartFailed:
                if attempt == 2:
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    owner = os.getpid()

    def stop() -> None:
        if os.getpid() != owner:  # a forked child (mutmut) leaves its parent's cluster alone
            return
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql+psycopg2://mailext@127.0.0.1:{port}/postgres"


def url() -> str:
    """The SQLAlchemy URL of this process's cluster, started on first use."""
    global _url, _error
    if _error is not None:
        raise _error
    if _url is None:
        try:
            _url = _start()
        except (Unavailable, StartFailed) as exc:
            _error = exc
            raise
    return _url
