"""``buildbot-mailext outbox`` (cli_outbox.py), run as a user runs it, on a master directory
whose master.cfg names a SQLite file. The rows are written with the outbox's own functions;
a running master is in tests/e2e/test_outbox_master.py."""

from __future__ import annotations

import subprocess
import sys
import time

import sqlalchemy as sa

from buildbot_mailext import outbox as ob

CFG = """
c = BuildmasterConfig = {}
c['db'] = {'db_url': "sqlite:///mail-state.sqlite"}
"""


def run_cli(*args, text=True):
    return subprocess.run([sys.executable, "-m", "buildbot_mailext.cli", "outbox", *args],
                          capture_output=True, text=text, timeout=120)


def master_dir(tmp_path, pending=1, dead=1):
    (tmp_path / "master.cfg").write_text(CFG)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'mail-state.sqlite'}")
    with engine.connect() as conn:
        ob.thd_ensure_tables(conn)
        mails = [ob.NewMail("route dev", f"build #{n}", f"FAILURE build #{n}", "bb@example.org",
                            ["dev@example.org"], b"Subject: FAILURE\r\n\r\nbody %d\r\n" % n)
                 for n in range(pending + dead)]
        added = ob.thd_add(conn, "n", mails, 1, time.time(), 60, ob.OutboxLimits(), lambda *a: b"")
        entries = [ob.thd_get(conn, a.id) for a in added[pending:]]
        for entry in entries:
            ob.thd_dead_letter(conn, entry, entry.recipients, "permanent: 550 5.1.1 unknown", 1, False)
    engine.dispose()
    return tmp_path


def test_list_shows_pending_and_dead_with_the_last_error(tmp_path):
    done = run_cli(str(master_dir(tmp_path)), "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "ATTEMPTS", "NEXT"]
    assert lines[1].split()[:2] == ["1", "pending"] and "dev@example.org" in lines[1]
    assert lines[2].split()[:2] == ["2", "dead"] and "550 5.1.1 unknown" in lines[2]
    assert lines[-1] == "1 pending, 1 dead"


def test_show_prints_the_raw_message_and_a_missing_id_exits_1(tmp_path):
    d = str(master_dir(tmp_path))
    assert run_cli(d, "show", "2", text=False).stdout == b"Subject: FAILURE\r\n\r\nbody 1\r\n"  # bytes as stored
    missing = run_cli(d, "show", "9")
    assert missing.returncode == 1 and missing.stderr.startswith("outbox: no mail #9")


def test_retry_puts_a_dead_letter_back_to_pending(tmp_path):
    d = str(master_dir(tmp_path))
    assert run_cli(d, "retry", "2").returncode == 0
    assert "2 pending, 0 dead" in run_cli(d, "list").stdout


def test_drop_dead_of_many_shows_progress_on_stderr(tmp_path):
    d = str(master_dir(tmp_path, pending=0, dead=1200))
    done = run_cli(d, "drop", "--dead")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1200 mails dropped from the outbox (never sent)"
    assert "1200/1200" in done.stderr  # tqdm's bar
    assert run_cli(d, "list").stdout.startswith("outbox is empty")


def test_a_master_dir_without_master_cfg_is_one_line_and_exit_2(tmp_path):
    done = run_cli(str(tmp_path), "list")
    assert done.returncode == 2
    assert done.stderr.strip() == f"outbox: {tmp_path / 'master.cfg'} does not exist"


def test_an_unreachable_database_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "master.cfg").write_text(
        "c = BuildmasterConfig = {'db': {'db_url': 'sqlite:////nonexistent/dir/state.sqlite'}}\n")
    done = run_cli(str(tmp_path), "list")
    assert done.returncode == 2
    assert done.stderr.startswith("outbox: cannot use the database sqlite:////nonexistent/dir/state.sqlite:")
    assert len(done.stderr.strip().splitlines()) == 1
