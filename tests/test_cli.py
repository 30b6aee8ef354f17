"""The buildbot-mailext command (cli.py, cli_preview.py), run as a user runs it."""

import email
import subprocess
import sys
from email import policy

from buildbot_mailext import __version__


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "buildbot_mailext.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_version():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"buildbot-mailext {__version__}"


def test_no_command_prints_help_and_fails():
    done = run_cli()
    assert done.returncode == 2
    assert "preflight" in done.stdout and "preview" in done.stdout


def test_preview_writes_a_parsable_mail(tmp_path):
    done = run_cli("preview", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "X-Buildbot-Builder:" in done.stdout
    raw = (tmp_path / "build_failure.eml").read_bytes()
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg.get_content_type() == "multipart/alternative"
    assert (tmp_path / "build_failure.html").read_text().lstrip().startswith("<")


def test_preview_without_out_prints_headers_and_text_and_writes_nothing(tmp_path):
    done = run_cli("preview", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Subject: " in done.stdout and "Failed steps" in done.stdout  # the text part
    assert "<html" not in done.stdout  # the HTML part is only written with --out
    assert list(tmp_path.iterdir()) == []


def test_preview_worker_template():
    done = run_cli("preview", "--template", "worker_missing")
    assert done.returncode == 0, done.stderr
    assert "X-Buildbot-Builder" not in done.stdout


def test_preview_reports_a_broken_template(tmp_path):
    (tmp_path / "build_failure.txt.j2").write_text("{{ no_such_variable }}\n")
    done = run_cli("preview", "--templates-dir", str(tmp_path))
    assert done.returncode == 1
    assert "no_such_variable" in done.stderr
    assert "build_failure.txt.j2" in done.stderr
