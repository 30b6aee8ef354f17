"""The preflight as an operator meets it: `buildbot checkconfig` and `buildbot start` of a
real master (master.cfg.example, unchanged) whose relay refuses connections.

preflight="fail": both commands fail and print the cause and the fix.
preflight="warn": the master starts, and the same explanation is a banner in twistd.log.
"""

from __future__ import annotations

import time

import pytest
from harness import HarnessError, LOOPBACK, Master, example_cfg_text, free_port

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


def test_warn_starts_and_logs_a_banner(tmp_path):
    master, endpoint = make_master(tmp_path, "warn")
    try:
        master.start(timeout=120)
        log = master.log_path.read_text()
    finally:
        master.stop()
    assert "MAIL PREFLIGHT WARNING" in log
    assert REFUSED_TEXT in log and FIX_TEXT in log and endpoint in log
    assert "BuildMaster is running" in log
