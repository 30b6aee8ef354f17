"""The preflight as an operator meets it: `buildbot checkconfig` and `buildbot start` of a
real master (master.cfg.example, unchanged) whose relay refuses connections.

preflight="fail": both commands fail and print the cause and the fix.
preflight="warn": the master starts, and the same explanation is a banner in twistd.log.
"""

from __future__ import annotations

import re
import time

import pytest
from harness import HarnessError, LOOPBACK, Master, Worker, example_cfg_text, free_port

REFUSED_TEXT = "connection refused"
FIX_TEXT = "install and start an MTA such as Postfix"


def make_master(tmp_path, mode: str) -> tuple[Master, str]:
    """A master whose relay is a port that was free a moment ago: nothing listens there,
    so connecting is refused. Returns the master and the "host:port" messages name."""
    port = free_port()
    master = Master(
        tmp_path / f"master-{mode}",
        example_cfg_text(),
        env={"MAILEXT_RELAYHOST": f"[{LOOPBACK}]:{port}", "MAILEXT_PREFLIGHT": mode},
    )
    master.create()
    return master, f"{LOOPBACK}:{port}"


def test_checkconfig_fails_with_cause_and_fix(tmp_path):
    master, endpoint = make_master(tmp_path, "fail")
    started = time.monotonic()
    proc = master.checkconfig()
    elapsed = time.monotonic() - started
    print(f"checkconfig verdict in {elapsed:.2f}s:\n{proc.stdout}")
    assert proc.returncode == 1, proc.stdout
    assert "Configuration Errors:" in proc.stdout
    assert REFUSED_TEXT in proc.stdout and FIX_TEXT in proc.stdout
    assert endpoint in proc.stdout
    assert "Traceback" not in proc.stdout


def test_start_halts_with_the_message(tmp_path):
    master, endpoint = make_master(tmp_path, "fail")
    try:
        with pytest.raises(HarnessError) as caught:
            master.start(timeout=120)
    finally:
        master.stop()
    log = master.log_path.read_text()
    assert "Halting master." in log
    assert REFUSED_TEXT in log and FIX_TEXT in log and endpoint in log
    assert "Unhandled error in Deferred" not in log
    # What `buildbot start` itself printed to the operator's terminal:
    assert REFUSED_TEXT in str(caught.value)


def test_warn_starts_logs_a_banner_and_keeps_the_failure_mail(tmp_path):
    """The site guide's log, as it reads now: the master runs, and a failing build's mail
    is one classified line and kept for a retry -- no retry storm, no traceback."""
    master, endpoint = make_master(tmp_path, "warn")
    worker = Worker(tmp_path / "worker", master.pb_port, "example-worker", "example-pass")
    try:
        master.start(timeout=120)
        worker.create()
        worker.start()
        master.wait_worker("example-worker")
        build = master.force_and_wait("force", "runtests")
        deadline = time.monotonic() + 30
        while "NOT delivered" not in master.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        worker.stop()
        master.stop()
    log = master.log_path.read_text()
    assert "MAIL PREFLIGHT WARNING" in log
    assert REFUSED_TEXT in log and FIX_TEXT in log and endpoint in log
    assert "BuildMaster is running" in log

    (line,) = [l for l in log.splitlines() if "NOT delivered" in l]
    print(line)
    assert f"build 'runtests' #{build['number']}" in line
    assert "route 'runtests-to-dev'" in line
    assert endpoint in line and "refused" in line
    # The outbox keeps it and says when it tries again.
    assert re.search(r"attempt \d+ in \d+s \(outbox #\d+, kept in the database\)", line)
    assert "Unhandled error" not in log and "Traceback" not in log
    assert "SMTP Client retrying" not in log
