"""master.cfg.example as a university build server runs it: through a real local Postfix.

    master (master.cfg.example, unchanged) --SMTP--> Postfix 127.0.0.1:<listen>
        --relayhost = [127.0.0.1]:<sink>--> aiosmtpd sink ("the institution's relay")

Postfix is Debian's package, started without systemd by ``tools/postfix-relay.sh``
(loopback only, no DNS). The master gets only environment variables: the relayhost of the
example's comments, ``MAILEXT_PREFLIGHT=fail`` (so a master that cannot reach Postfix does
not even start), and free ports.

Needs root and apt-get. Elsewhere the module is skipped with the reason; under CI
(``CI=true``, where ``.ci/run`` installs Postfix first) a missing Postfix is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from harness import LOOPBACK, Master, SmtpSink, Worker, example_cfg_text, free_port, repo_root

SCRIPT = repo_root() / "tools" / "postfix-relay.sh"
MTA_HOSTNAME = "buildserver.localdomain"


def _script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, MTA_HOSTNAME=MTA_HOSTNAME, RETRY_S="2")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not SCRIPT.exists():
        _unavailable(f"{SCRIPT} is missing")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _unavailable("a real Postfix needs root and apt-get (Debian/Ubuntu)")
    out = _script("install", timeout=600)
    if out.returncode != 0:
        _unavailable(f"tools/postfix-relay.sh install failed: {out.stderr.strip()[-400:]}")

    tmp = tmp_path_factory.mktemp("postfix-site")
    sink = SmtpSink().start()
    listen = free_port()
    out = _script("start", str(sink.port), str(listen))
    if out.returncode != 0:
        sink.stop()
        _unavailable(f"Postfix did not start: {out.stderr.strip()[-400:]}")
    master = Master(tmp / "master", example_cfg_text(), env={
        "MAILEXT_RELAYHOST": f"[{LOOPBACK}]:{listen}",
        "MAILEXT_PREFLIGHT": "fail",
    })
    worker = Worker(tmp / "worker", master.pb_port, "example-worker", "example-pass")
    try:
        master.create()
        master.start()
        worker.create()
        worker.start()
        master.wait_worker("example-worker")
        yield sink, master
    finally:
        worker.stop()
        master.stop()
        _script("purge")
        _script("stop")
        sink.stop()


def test_example_mail_travels_through_postfix_relayhost(site):
    sink, master = site
    build = master.force_and_wait("force", "runtests", timeout=90)
    assert build["results"] == 2, build
    mails = sink.wait_for(1, timeout=30)
    assert len(mails) == 1, f"no mail at the relay behind Postfix\n{master.log_tail(40)}"
    time.sleep(1.0)
    assert len(sink.snapshot()) == 1, "one route matches runtests: one mail"
    mail = sink.snapshot()[0]
    msg = mail.message()
    assert mail.rcpt_tos == ["dev-list@example.org"]
    assert mail.mail_from == "buildbot@example.org"
    # Postfix handled it: its Received: line names the build server's hostname
    received = [str(v) for v in msg.get_all("Received") or []]
    assert any(MTA_HOSTNAME in r for r in received), received
    assert str(msg["X-Buildbot-Builder"]).strip() == "runtests"
    assert "test_send ... FAILED" in (mail.part("text/plain") or "")
    assert mail.part("text/html") is not None


def test_example_passing_docs_build_sends_nothing(site):
    sink, master = site
    before = len(sink.snapshot())
    build = master.force_and_wait("force", "docs", timeout=90)
    assert build["results"] == 0, build
    # sentinel: a failing build afterwards; its mail arrives after any docs mail would have
    master.force_and_wait("force", "runtests", timeout=90)
    sink.wait_for(before + 1, timeout=30)
    time.sleep(1.0)
    new = sink.snapshot()[before:]
    assert [m.rcpt_tos for m in new] == [["dev-list@example.org"]], [m.rcpt_tos for m in new]
