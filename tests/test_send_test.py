"""``buildbot-mailext send-test MASTER_DIR --to ADDR``, run as an operator runs it, against real
aiosmtpd relays on loopback (plain, STARTTLS with a test CA, AUTH with a Buildbot secret).

A master directory here is a folder with a master.cfg: send-test needs neither a running master
nor its database. The assertions are on what the relay received and on the printed summary.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import textwrap
from email import policy

import pytest

from smtp_servers import SmtpServer, TestCA, closed_port

pytest.importorskip("aiosmtpd")

TO = "ops@example.org"


def master_dir(tmp_path, notifiers: str, preamble: str = "") -> str:
    """A master directory whose master.cfg configures ``notifiers`` (Python source)."""
    path = tmp_path / "master"
    path.mkdir()
    (path / "master.cfg").write_text(
        textwrap.dedent(
            """\
            from buildbot.plugins import reporters, schedulers, steps, util, worker
            c = BuildmasterConfig = {}
            c['workers'] = [worker.Worker("w", "pass")]
            c['builders'] = [util.BuilderConfig(name="b", workernames=["w"],
                                                factory=util.BuildFactory([steps.ShellCommand(command="true")]))]
            c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=["b"])]
            c['protocols'] = {'pb': {'port': "tcp:0:interface=127.0.0.1"}}  # never started here
            c['buildbotNetUsageData'] = None
            c['title'] = "send-test master"
            """
        )
        + textwrap.dedent(preamble)
        + "c['services'] = [\n"
        + textwrap.indent(textwrap.dedent(notifiers), "    ")
        + "]\n"
    )
    return str(path)


def send_test(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "buildbot_mailext.cli", "send-test", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plain_relay_gets_one_mail(tmp_path):
    with SmtpServer() as srv:
        cfg = master_dir(
            tmp_path,
            f"""reporters.MailExtNotifier(fromaddr="Buildbot <buildbot@example.org>",
                relayhost="[127.0.0.1]:{srv.port}", preflight="off"),
            """,
        )
        done = send_test(cfg, "--to", TO)
        assert done.returncode == 0, done.stdout + done.stderr
        (received,) = srv.messages
    assert received.mail_from == "buildbot@example.org"
    assert received.rcpt_tos == [TO]
    msg = email.message_from_bytes(received.data, policy=policy.default)
    assert msg["Subject"].startswith("buildbot-mailext test mail from send-test master")
    assert msg["To"] == TO
    assert f"127.0.0.1:{srv.port} (plain SMTP)" in done.stdout
    assert "TLS:" in done.stdout and "none (plain SMTP" in done.stdout
    rows = dict(line.strip().split(": ", 1) for line in done.stdout.splitlines()[1:-1])
    assert rows["accepted"].strip() == TO
    assert rows["reply"].strip() == "250 OK queued as 1"  # the relay's 250 reply ...
    assert rows["queue id"].strip() == "1"  # ... and the queue id it names
    assert done.stdout.rstrip().endswith("send-test: the relay accepted the mail")


def test_starttls_reports_version_and_verified_name(tmp_path):
    ca = TestCA(str(tmp_path))
    with SmtpServer(tls=ca.server_context(), require_starttls=True) as srv:
        cfg = master_dir(
            tmp_path,
            f"""reporters.MailExtNotifier(fromaddr="buildbot@example.org", preflight="off",
                relayhost="[127.0.0.1]:{srv.port}", useTls=True, tls_ca_file={ca.ca_file!r}),
            """,
        )
        done = send_test(cfg, "--to", TO)
        assert done.returncode == 0, done.stdout + done.stderr
        assert [m.rcpt_tos for m in srv.messages] == [[TO]]
    tls_line = next(line for line in done.stdout.splitlines() if line.strip().startswith("TLS:"))
    assert "TLSv1." in tls_line
    assert "certificate verified for 127.0.0.1" in tls_line
    assert ca.ca_file in tls_line


def test_auth_password_from_a_secret(tmp_path):
    # The password is a Buildbot secret: send-test renders it as the master does.
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "smtp_password").write_text("s3cret\n")
    os.chmod(secrets / "smtp_password", 0o600)
    ca = TestCA(str(tmp_path))
    with SmtpServer(tls=ca.server_context(), auth={"buildbot": "s3cret"}) as srv:
        cfg = master_dir(
            tmp_path,
            f"""reporters.MailExtNotifier(fromaddr="buildbot@example.org", preflight="off",
                relayhost="[127.0.0.1]:{srv.port}", useTls=True, tls_ca_file={ca.ca_file!r},
                smtpUser="buildbot", smtpPassword=util.Secret("smtp_password")),
            """,
            preamble="from buildbot.plugins import secrets\n"
            f"c['secretsProviders'] = [secrets.SecretInAFile({str(secrets)!r}, strip=True)]\n",
        )
        done = send_test(cfg, "--to", TO)
        assert done.returncode == 0, done.stdout + done.stderr
        assert srv.auth_attempts == [("buildbot", True)]
        assert len(srv.messages) == 1
    assert "s3cret" not in done.stdout + done.stderr
    assert "as buildbot" in done.stdout


def test_missing_secret_is_one_line(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    cfg = master_dir(
        tmp_path,
        """reporters.MailExtNotifier(name="mail", fromaddr="buildbot@example.org", preflight="off",
            relayhost="[127.0.0.1]:2525", useTls=True,
            smtpUser="buildbot", smtpPassword=util.Secret("smtp_password")),
        """,
        preamble="from buildbot.plugins import secrets\n"
        f"c['secretsProviders'] = [secrets.SecretInAFile({str(secrets)!r})]\n",
    )
    done = send_test(cfg, "--to", TO)
    assert done.returncode == 2
    assert done.stderr == (
        "send-test: notifier 'mail': secret key smtp_password is not found in any provider: "
        "check c['secretsProviders'] and that this user can read the secrets\n"
    )


def test_refused_relay_exits_1_with_the_cause(tmp_path):
    with closed_port() as port:
        cfg = master_dir(
            tmp_path,
            f"""reporters.MailExtNotifier(fromaddr="buildbot@example.org", preflight="off",
                relayhost="[127.0.0.1]:{port}"),
            """,
        )
        done = send_test(cfg, "--to", TO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused" in done.stdout
    assert "NOT delivered" in done.stdout
    assert "Traceback" not in done.stderr


def test_several_notifiers_need_a_name(tmp_path):
    with SmtpServer() as srv:
        cfg = master_dir(
            tmp_path,
            f"""reporters.MailExtNotifier(name="team", fromaddr="team@example.org", preflight="off",
                relayhost="[127.0.0.1]:{srv.port}"),
            reporters.MailExtNotifier(name="ops", fromaddr="ops@example.org", preflight="off",
                relayhost="[127.0.0.1]:{srv.port}"),
            """,
        )
        done = send_test(cfg, "--to", TO)
        assert done.returncode == 2
        assert "2 mail notifiers ('team', 'ops'): choose one with --notifier NAME" in done.stderr
        done = send_test(cfg, "--to", TO, "--notifier", "nope")
        assert done.returncode == 2
        assert "no mail notifier named 'nope'; the notifiers are: 'team', 'ops'" in done.stderr
        done = send_test(cfg, "--to", TO, "--notifier", "ops")
        assert done.returncode == 0, done.stdout + done.stderr
        assert [m.mail_from for m in srv.messages] == ["ops@example.org"]


def test_bad_address_and_missing_master_cfg(tmp_path):
    done = send_test(str(tmp_path), "--to", "not an address")
    assert done.returncode == 2
    assert "send-test: 'not an address' in '--to' is not a valid email address" in done.stderr
    done = send_test(str(tmp_path / "nowhere"), "--to", TO)
    assert done.returncode == 2
    assert "master.cfg does not exist" in done.stderr
    assert "Traceback" not in done.stderr
