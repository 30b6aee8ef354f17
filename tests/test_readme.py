"""README.rst is the user's manual (and the PyPI page): it must render without a warning,
and the two commands it promises must exist."""

import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_renders_cleanly():
    docutils_core = pytest.importorskip("docutils.core")
    errors = io.StringIO()
    docutils_core.publish_string(
        (ROOT / "README.rst").read_text(encoding="utf-8"),
        writer="html",
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": errors},
    )
    assert errors.getvalue() == ""


def test_readme_commands_exist_in_makefile():
    readme = (ROOT / "README.rst").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile


# --------------------------------------------------------------------------- quick start
# The README's quick start, run as written: a fresh venv, pip install from a copy of the
# checkout (dependencies from PyPI), a real aiosmtpd, master and worker, a forced build and
# its mail. Only SRC and the three loopback ports are replaced (free ports, since other
# tests run at the same time), and a bounded wait for the mail is put before `cat mail.log`.

QUICK_START_TITLE = "Quick start: a master, a worker and a failure mail\n"


def readme_block(after: str, directive: str) -> str:
    """The first literal block (``directive`` such as '.. code-block:: bash' or '::' at
    a line's end) after the heading ``after``, dedented."""
    section = (ROOT / "README.rst").read_text(encoding="utf-8").split(after, 1)[1]
    body = section.split(directive + "\n\n", 1)[1]
    lines = []
    for line in body.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip("\n") + "\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pid_in(pidfile: Path) -> None:
    """Stop what a failed run left behind, by the PID in its twistd.pid (never by name)."""
    import os
    import signal
    import time

    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def _normalized(line: str) -> str:
    """What of an output line must be the same in every run: ports, times, ids, temporary
    folder names, a derived notifier name and the text after 'Date:' / 'Message-ID:' / 'X-Peer:' / 'boundary='
    differ from run to run."""
    import re

    for head in ("Date:", "Message-ID:", "X-Peer:", "boundary="):
        if head in line:
            line = line.split(head)[0] + head
    line = re.sub(r"/\S*/demo-output/", "DIR/demo-output/", line)
    line = re.sub(r"mailext-demo-\w+", "mailext-demo-TMP", line)
    line = re.sub(r"notifier '[^']*'", "notifier 'NAME'", line)
    line = re.sub(r"\d+", "0", line)
    return re.sub(r"\s+", " ", line).strip()


def output_matches(shown: str, real: str) -> list[str]:
    """Lines of a README example output that no line of the real output matches (see
    _normalized); '...' lines stand for what the README leaves out."""
    real_lines = {_normalized(r) for r in real.splitlines()}
    return [
        line for line in shown.splitlines()
        if line.strip() not in ("", "...") and _normalized(line) not in real_lines
    ]


@pytest.mark.skipif(
    __import__("os").environ.get("MAILEXT_SKIP_INSTALL_TEST") == "1",
    reason="MAILEXT_SKIP_INSTALL_TEST=1 (the quick start installs from PyPI)",
)
def test_quick_start_runs_as_written(tmp_path):
    import re
    import shutil
    import subprocess
    import sys

    from test_install import IGNORE, _clean_env

    assert shutil.which("curl"), "the README's quick start uses curl: apt-get install curl"
    script = readme_block(QUICK_START_TITLE, ".. code-block:: bash")
    assert script.startswith("SRC=/path/to/buildbot-mailext\n")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    smtp, pb, www = _free_port(), _free_port(), _free_port()
    script = script.replace("SRC=/path/to/buildbot-mailext", f"SRC={src}")
    for default, port in (("8025", smtp), ("9989", pb), ("8010", www)):
        assert f":{default}" in script
        script = re.sub(rf"(?<=:){default}\b", str(port), script)
    wait = (
        "for i in $(seq 240); do grep -q '^X-Buildbot-Builder: runtests' mail.log && break;"
        " sleep 0.5; done\n"
    )
    assert "\ncat mail.log\n" in script
    script = script.replace("\ncat mail.log\n", "\n" + wait + "cat mail.log\n")
    workdir = tmp_path / "quickstart"
    workdir.mkdir()
    env = _clean_env()
    env.update({"MAILEXT_PB_PORT": str(pb), "MAILEXT_WWW_PORT": str(www)})
    base_python = Path(getattr(sys, "_base_executable", None) or sys.executable)
    env["PATH"] = f"{base_python.parent}:{env.get('PATH', '')}"  # the python3 of this run
    try:
        proc = subprocess.run(
            ["bash", "-e", "-c", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=1200,
        )
    finally:
        _stop_pid_in(workdir / "worker" / "twistd.pid")
        _stop_pid_in(workdir / "master" / "twistd.pid")
    output = proc.stdout
    print(output[-20000:])
    assert proc.returncode == 0, output[-6000:]
    mail = (workdir / "mail.log").read_text()
    assert "\nTo: dev-list@example.org\n" in mail
    assert "Subject: [mailext example] first build: runtests #1 - failed unit tests (failure)" in mail
    assert "AssertionError: expected 250, got 554" in mail
    assert "Config file is good!" in output
    twistd_log = (workdir / "master" / "twistd.log").read_text()
    assert f"delivered via 127.0.0.1:{smtp}" in twistd_log
    assert "The buildmaster appears to have (re)started correctly." in output
    # What the README shows after the block is what this run printed.
    shown = readme_block(QUICK_START_TITLE, "What it prints (real output, shortened)::")
    assert output_matches(shown, output) == []


def test_demo_prints_what_the_readme_shows(tmp_path):
    """``make demo``'s section shows a real run: run the demo (real master, worker, SMTP
    sink) and compare, line by line, what it printed with what the README shows."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "buildbot_mailext.demo"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    print(proc.stdout)
    assert proc.returncode == 0
    shown = readme_block("Try it: ``make demo``\n", ".. code-block:: text")
    assert "mail received" in shown
    assert output_matches(shown, proc.stdout) == []
    assert (tmp_path / "demo-output" / "runtests-1-1.html").is_file()
