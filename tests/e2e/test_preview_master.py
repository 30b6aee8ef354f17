"""``buildbot-mailext preview MASTER_DIR`` against a real running master (master.cfg.example,
a real worker, an aiosmtpd sink on loopback).

The master mails a failing ``runtests`` build through its route; preview, run afterwards from
the shell while the master keeps running, must write the very same mail (same headers, same
text and HTML parts; only Date and Message-ID are new) without touching the database.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import textwrap
from email import policy

import pytest

from harness import Master, example_cfg_text, running_site

pytest.importorskip("aiosmtpd")

ROUTE = "runtests-to-dev"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preview")
    with running_site(tmp, example_cfg_text(), ("example-worker", "example-pass"),
                      master_env={"MAILEXT_PREFLIGHT": "warn"}) as (sink, master, _):
        master.force_and_wait("force", "runtests", timeout=90)
        master.force_and_wait("force", "docs", timeout=90)
        (mail,) = sink.wait_for(1, timeout=30)
        yield master, mail, tmp


def preview(master: Master, *args: str) -> subprocess.CompletedProcess:
    # master.env: master.cfg reads its ports and relay from the environment, as in the master
    return subprocess.run(
        [sys.executable, "-m", "buildbot_mailext.cli", "preview", str(master.basedir), *args],
        capture_output=True, text=True, timeout=180, env=master.env,
    )


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


def test_preview_writes_the_mail_the_master_sent(site, tmp_path):
    master, sent, _ = site
    done = preview(master, "--builder", "runtests", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    base = tmp_path / f"runtests-1-{ROUTE}"
    previewed = parse((base.with_suffix(".eml")).read_bytes())
    received = parse(sent.data)
    for header in ("From", "To", "Subject", "Auto-Submitted",
                   "X-Buildbot-Builder", "X-Buildbot-Result", "X-Buildbot-URL"):
        assert previewed[header] == received[header], header
    assert previewed.get_body(("plain",)).get_content() == received.get_body(("plain",)).get_content()
    assert previewed.get_body(("html",)).get_content() == received.get_body(("html",)).get_content()
    # the failing step's log tail made it in, as in the sent mail
    assert "AssertionError: expected 250, got 554" in (base.with_suffix(".txt")).read_text()
    assert (base.with_suffix(".html")).read_text().lstrip().startswith("<!DOCTYPE html>")
    # printed: the paths and the headers
    assert f"wrote {base}.eml" in done.stdout
    assert f"Subject: {received['Subject']}" in done.stdout
    assert f"route {ROUTE!r}: mail to dev-list@example.org" in done.stdout


def test_every_builder_with_progress_and_reasons(site, tmp_path):
    master, _, _ = site
    done = preview(master, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "build 'docs' #1: success" in done.stdout
    assert "route 'docs-to-docs-list': no mail: its mode (failing) does not select this success build" in done.stdout
    assert f"route {ROUTE!r}: no mail: its builders/tags/branches/schedulers filters leave this build out" in done.stdout
    assert re.search(r"preview: 100%.*2/2", done.stderr), done.stderr  # tqdm, on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"runtests-1-{ROUTE}.eml", f"runtests-1-{ROUTE}.html", f"runtests-1-{ROUTE}.txt"]


def test_usage_errors_are_one_line(site, tmp_path):
    master, _, _ = site
    cases = [
        (("--route", "nope"), f"no route named 'nope'; the routes are: {ROUTE!r}, 'docs-to-docs-list'"),
        (("--builder", "nope"), "no builder named 'nope' in the database; the builders are: 'docs', 'runtests'"),
        (("--builder", "runtests", "--build", "99"), "builder 'runtests' has no build #99"),
        (("--build", "1"), "--build NUMBER needs --builder NAME"),
    ]
    for args, message in cases:
        done = preview(master, "--out", str(tmp_path), *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.strip() == f"preview: {message}", args
    assert not any(tmp_path.iterdir())


def test_template_error_at_render_time_names_file_and_line(site, tmp_path):
    # Fine against the sample build (it has got_revision), broken for a forced build without
    # a checkout: exactly what a sample cannot show and preview MASTER_DIR can.
    master, _, _ = site
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "build_failure.txt.j2").write_text("Revision {{ build.properties.got_revision[0] }}\n")
    cfg = example_cfg_text().replace("# templates_dir=\"templates\",", f"templates_dir={str(templates)!r},")
    assert str(templates) in cfg
    (master.basedir / "preview-broken.cfg").write_text(cfg)
    done = preview(master, "--config", "preview-broken.cfg", "--builder", "runtests", "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"preview: route {ROUTE!r}: template error: {templates}/build_failure.txt.j2:1: UndefinedError" in done.stderr
    # what the notifier would really send: the packaged template, saying why
    text = (tmp_path / "out" / f"runtests-1-{ROUTE}.txt").read_text()
    assert "build_failure.txt.j2:1" in text


def test_sample_renders_every_route(site, tmp_path):
    master, _, _ = site
    done = preview(master, "--sample", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    for route in (ROUTE, "docs-to-docs-list"):
        msg = parse((tmp_path / f"sample-{route}.eml").read_bytes())
        assert msg["X-Buildbot-Builder"] == "linux-x86_64"
    assert "sample build 'linux-x86_64' #1234" in done.stdout


def test_database_is_opened_read_only(site):
    # The same MasterDir preview uses, on the live master's database: a write must fail.
    master, _, _ = site
    script = textwrap.dedent(
        """
        import sys
        from buildbot_mailext.master_dir import MasterDir, run_command

        async def main():
            md = MasterDir(sys.argv[1])
            master = await md.open()
            try:
                def write(conn):
                    conn.exec_driver_sql("UPDATE builders SET description = 'changed by preview'")
                    conn.commit()
                await master.db.pool.do(write)
            except Exception as e:
                print("write refused:", type(e).__name__, e)
                return 0
            finally:
                await md.close()
            print("write went through")
            return 1

        sys.exit(run_command(main))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(master.basedir)], capture_output=True,
                          text=True, timeout=120, env=master.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "readonly database" in done.stdout
    assert all(b.get("description") != "changed by preview" for b in master.get("builders")["builders"])


def test_no_database_yet(tmp_path):
    (tmp_path / "master.cfg").write_text(example_cfg_text())
    done = subprocess.run([sys.executable, "-m", "buildbot_mailext.cli", "preview", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MAILEXT_PREFLIGHT": "off"})
    assert done.returncode == 2
    assert f"preview: no database at {tmp_path}/state.sqlite" in done.stderr
    assert "use --sample" in done.stderr
    assert not (tmp_path / "state.sqlite").exists()  # never a new empty database
