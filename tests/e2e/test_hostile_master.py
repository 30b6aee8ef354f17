"""End to end, issue 6: hostile values from a real build reach a real SMTP sink harmlessly.

A real master, a real worker and the aiosmtpd sink on loopback (tests/e2e/harness.py):

- a build forced through the web API with the branch ``=?utf-8?q?a=0D=0ABcc:_x@evil.example?=``
  (an RFC 2047 encoded word that decodes to CR LF + "Bcc: ..."): its mail reaches the sink
  with exactly the headers the notifier builds, and the branch shown literally;
- a build started by a change whose author is ``üser@example.org`` (a non-ASCII local
  part: it would need SMTPUTF8): the route's list still gets the mail, the author is left
  out with one log line naming the address and the build.
"""

from __future__ import annotations

import re
import urllib.parse
import urllib.request

import pytest

from harness import CFG_PREAMBLE, SmtpSink, running_site

pytest.importorskip("aiosmtpd")

WORKER = ("hostile-worker", "hostile-pass")
LIST = "dev-list@example.org"
ENCODED_WORD_BRANCH = "=?utf-8?q?a=0D=0ABcc:_x@evil.example?="
NON_ASCII_AUTHOR = "üser@example.org"
BUILT_HEADERS = [
    "Date", "From", "To", "Subject", "Message-ID", "Auto-Submitted", "X-Auto-Response-Suppress",
    "X-Buildbot-Builder", "X-Buildbot-Result", "X-Buildbot-URL", "In-Reply-To", "References",
    "MIME-Version", "Content-Type",
]

CFG = (CFG_PREAMBLE + r'''
f = util.BuildFactory()
f.addStep(steps.ShellCommand(name="fail", command=["sh", "-c", "echo failing; exit 1"]))
c['builders'] = [util.BuilderConfig(name="hostile", workernames=["%(worker)s"], factory=f)]
c['schedulers'] = [
    schedulers.ForceScheduler(name="force", builderNames=["hostile"]),
    schedulers.AnyBranchScheduler(name="changes", builderNames=["hostile"], treeStableTimer=None),
]
c['collapseRequests'] = False
c['services'] = [
    reporters.MailExtNotifier(
        fromaddr="buildbot@example.org",
        relayhost=env("MAILEXT_RELAYHOST"),
        preflight="off",
        smtp_timeout=10,
        routes=[MailRoute(name="hostile-list", to=["%(list)s"], builders=["hostile"],
                          send_to_interested_users=True,
                          subject="{{ buildername }} on {{ branch }}: {{ result }}")],
    ),
]
c['title'] = "mailext hostile e2e"
c['buildbotURL'] = "http://127.0.0.1:%%s/" %% env("MAILEXT_WWW_PORT")
c['www'] = {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_WWW_PORT"), 'plugins': {},
            'change_hook_dialects': {'base': True}}
c['db'] = {'db_url': "sqlite:///state.sqlite"}
c['buildbotNetUsageData'] = None
''') % {"worker": WORKER[0], "password": WORKER[1], "list": LIST}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_site(tmp_path_factory.mktemp("hostile"), CFG, WORKER) as (sink, master, _):
        yield sink, master


def header_block(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii")


def header_names(raw: bytes) -> list[str]:
    return [line.split(":", 1)[0] for line in header_block(raw).split("\r\n") if line[:1] not in (" ", "\t")]


def mails_of_build(sink: SmtpSink, number: int, timeout: float = 30):
    def match(mail) -> bool:
        return re.search(rf"/builds/{number}/?$", str(mail.message().get("X-Buildbot-URL", ""))) is not None

    return sink.wait_for(1, timeout=timeout, predicate=match)


def test_encoded_word_branch_reaches_the_sink_without_an_extra_header(env):
    sink, master = env
    build = master.force_and_wait("force", "hostile", timeout=90, branch=ENCODED_WORD_BRANCH)
    assert master.build_properties(build["buildid"]).get("branch") == ENCODED_WORD_BRANCH
    (mail,) = mails_of_build(sink, build["number"])
    print("\n--- headers of the encoded-word branch mail, as received ---\n"
          + header_block(mail.data) + "\n---")
    assert mail.rcpt_tos == [LIST]
    assert header_names(mail.data) == BUILT_HEADERS
    assert not re.search(r"(?im)^(bcc|reply-to)\s*:", header_block(mail.data))
    msg = mail.message()
    assert str(msg["Subject"]) == f"hostile on {ENCODED_WORD_BRANCH}: failure"  # literally
    assert ENCODED_WORD_BRANCH in mail.part("text/plain")


def test_non_ascii_author_is_left_out_and_the_list_still_gets_the_mail(env):
    sink, master = env
    form = urllib.parse.urlencode({
        "author": NON_ASCII_AUTHOR, "comments": "a change by a non-ASCII address",
        "branch": "main", "repository": "https://git.example.org/r.git", "project": "proj",
        "revision": "c0ffee", "files": '["src/a.c"]',
    }).encode()
    url = f"http://127.0.0.1:{master.www_port}/change_hook/base"
    with urllib.request.urlopen(urllib.request.Request(url, data=form), timeout=30) as resp:
        assert resp.status == 200
    mails = sink.wait_for(1, timeout=90, predicate=lambda m: "c0ffee" in (m.part("text/plain") or ""))
    assert len(mails) == 1, [m.rcpt_tos for m in sink.snapshot()]
    (mail,) = mails
    assert mail.rcpt_tos == [LIST]
    assert NON_ASCII_AUTHOR in mail.part("text/plain")  # still named as the change's author
    assert str(mail.message()["To"]) == LIST
    log = master.log_path.read_text(errors="replace")
    left_out = [line for line in log.splitlines() if "left out" in line and "üser@example.org" in line]
    assert len(left_out) == 1, master.log_tail(40)
    assert "SMTPUTF8" in left_out[0] and "build 'hostile' #" in left_out[0]
