"""End to end (issue 9): culprits, error excerpts, test results, threads, buildset mails,
flood control and hostile change fields, on a real master + worker + aiosmtpd sink.

Changes enter through Buildbot's own ``base`` change hook (``POST /change_hook/base``), as
a post-receive hook would send them; a ``SingleBranchScheduler`` builds each one. The step
passes when the revision starts with ``pass`` and fails otherwise, so the sequence of
changes decides the sequence of results.

Everything asserted is what the SMTP sink received.
"""

from __future__ import annotations

import email.header
import re
import time
import urllib.parse
import urllib.request

import pytest

from harness import CFG_PREAMBLE, Master, SmtpSink, running_site  # noqa: F401 (Master, SmtpSink: types)

pytest.importorskip("aiosmtpd")

WORKER = ("culprit-worker", "culprit-pass")
LIST = "dev-list@example.org"
FIRST_ERROR = "src/parser.c:212:9: error: E2E-FIRST-ERROR undeclared"

CFG = (CFG_PREAMBLE + r'''
from twisted.internet import defer
from buildbot.process.results import FAILURE

def sh(name, script):
    f = util.BuildFactory()
    f.addStep(steps.ShellCommand(name=name, command=["sh", "-c", script]))
    return f

# pass when the revision starts with "pass", fail otherwise
by_revision = util.BuildFactory()
by_revision.addStep(steps.ShellCommand(name="unit tests", command=["sh", "-c", util.Interpolate(
    "case '%%(prop:revision)s' in pass*) echo all good; exit 0;; "
    "*) echo 'error: broken'; exit 1;; esac")]))

by_outcome = util.BuildFactory()
by_outcome.addStep(steps.ShellCommand(name="flaky", command=["sh", "-c", util.Interpolate(
    "echo outcome %%(prop:outcome)s; test '%%(prop:outcome)s' = pass")]))

# the first error 5,000 lines before the end of an 8,001-line log
bigerr = sh("compile",
    "i=1; while [ $i -le 3000 ]; do echo \"noise line $i\"; i=$((i+1)); done; "
    "echo '%(first_error)s'; "
    "i=1; while [ $i -le 5000 ]; do echo \"teardown line $i\"; i=$((i+1)); done; exit 1")
noerr = sh("compile", "i=1; while [ $i -le 3000 ]; do echo \"noise line $i\"; i=$((i+1)); done; exit 1")


class RecordTests(steps.BuildStep):
    """Records test results in Buildbot's data API, as a JUnit-reading step would."""
    name = "pytest"

    @defer.inlineCallbacks
    def run(self):
        setid = yield self.addTestResultSet("pytest", "pass_fail", "boolean")
        self.addTestResult(setid, "1", test_name="tests/test_ok.py::test_fine")
        self.addTestResult(setid, "0", test_name="tests/test_parser.py::test_rejects_crlf")
        self.addTestResult(setid, "0", test_name="tests/test_parser.py::test_<b>html</b>")
        return FAILURE

pytest_factory = util.BuildFactory()
pytest_factory.addStep(RecordTests())

c['builders'] = [
    util.BuilderConfig(name="culprit", workernames=["%(worker)s"], factory=by_revision),
    util.BuilderConfig(name="hostile", workernames=["%(worker)s"], factory=by_revision),
    util.BuilderConfig(name="flood", workernames=["%(worker)s"], factory=by_outcome),
    util.BuilderConfig(name="bigerr", workernames=["%(worker)s"], factory=bigerr),
    util.BuilderConfig(name="noerr", workernames=["%(worker)s"], factory=noerr),
    util.BuilderConfig(name="pytest", workernames=["%(worker)s"], factory=pytest_factory),
    util.BuilderConfig(name="bs-pass", workernames=["%(worker)s"], factory=sh("ok", "exit 0")),
    util.BuilderConfig(name="bs-fail1", workernames=["%(worker)s"], factory=sh("one", "echo 'error: one'; exit 1")),
    util.BuilderConfig(name="bs-fail2", workernames=["%(worker)s"], factory=sh("two", "echo 'error: two'; exit 1")),
]
c['schedulers'] = [
    schedulers.SingleBranchScheduler(
        name="main", change_filter=util.ChangeFilter(branch="main"), treeStableTimer=2,
        builderNames=["culprit"]),
    schedulers.SingleBranchScheduler(
        name="hostile", change_filter=util.ChangeFilter(branch="hostile"), treeStableTimer=None,
        builderNames=["hostile"]),
    schedulers.ForceScheduler(name="force", builderNames=["flood", "bigerr", "noerr", "pytest"],
        properties=[util.StringParameter(name="outcome", default="fail")]),
    schedulers.ForceScheduler(name="bs", builderNames=["bs-pass", "bs-fail1", "bs-fail2"]),
]
c['collapseRequests'] = False

c['services'] = [
    reporters.MailExtNotifier(
        fromaddr="Buildbot <buildbot@ci.example.org>",
        relayhost=env("MAILEXT_RELAYHOST"),
        smtp_timeout=10,
        exclude_recipients=[],  # the route's own patterns are what is tested here
        routes=[
            MailRoute(name="culprits", to=["%(list)s"], builders=["culprit", "hostile"],
                      mode=("failing", "fixed"), notify_culprits=True,
                      exclude_recipients=["*noreply*", "dependabot*"],
                      list_id="Build results <builds.example.org>",
                      reply_to="Developers <dev@example.org>"),
            MailRoute(name="flood", to=["flood@example.org"], builders=["flood"],
                      mode=("failing", "fixed"), max_mails=(2, 60)),
            MailRoute(name="excerpts", to=["excerpts@example.org"],
                      builders=["bigerr", "noerr", "pytest"]),
            MailRoute(name="buildset", to=["bs@example.org"],
                      builders=["bs-pass", "bs-fail1", "bs-fail2"], group_by="buildset"),
        ],
    ),
]
c['title'] = "mailext e2e"
c['buildbotURL'] = "http://127.0.0.1:%%s/" %% env("MAILEXT_WWW_PORT")
c['www'] = {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_WWW_PORT"), 'plugins': {},
            'change_hook_dialects': {'base': True}}
c['db'] = {'db_url': "sqlite:///state.sqlite"}
c['buildbotNetUsageData'] = None
''') % {"worker": WORKER[0], "password": WORKER[1], "list": LIST, "first_error": FIRST_ERROR}


class Env:
    def __init__(self, sink: SmtpSink, master: Master) -> None:
        self.sink, self.master = sink, master

    def change(self, **fields) -> None:
        """One change through Buildbot's base change hook."""
        data = urllib.parse.urlencode(fields).encode()
        url = f"http://127.0.0.1:{self.master.www_port}/change_hook/base"
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            assert r.status == 200, r.read()

    def wait_builds(self, builder: str, count: int, timeout: float = 120) -> list[dict]:
        builderid = self.master.builder_ids()[builder]
        deadline = time.monotonic() + timeout
        while True:
            builds = self.master.get(f"builders/{builderid}/builds")["builds"]
            done = [b for b in builds if b.get("complete")]
            if len(done) >= count:
                return sorted(done, key=lambda b: b["number"])
            assert time.monotonic() < deadline, (
                f"{builder}: {len(done)} of {count} builds after {timeout}s\n"
                f"{self.master.log_tail(40)}")
            time.sleep(0.25)

    def mails_to(self, address: str) -> list:
        return [m for m in self.sink.snapshot() if address in m.rcpt_tos]

    def wait_mails_to(self, address: str, count: int, timeout: float = 60) -> list:
        return self.sink.wait_for(count, timeout, predicate=lambda m: address in m.rcpt_tos)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("culprits")
    with running_site(tmp, CFG, WORKER) as (sink, master, _):
        yield Env(sink, master)


def part(mail, content_type: str) -> str:
    """A decoded body part with "\n" line ends (the wire has CRLF)."""
    return (mail.part(content_type) or "").replace("\r\n", "\n")


def header(msg, name: str) -> str:
    value = msg.get(name)
    return "" if value is None else str(value)


def test_flood_two_mails_then_one_digest_fixed_at_once(e2e):
    """max_mails=(2, 60): fail, fail, fail, pass (fixed), fail, fail -> two failure mails,
    the fixed mail at once, and one digest listing the three held builds."""
    outcomes = ["fail", "fail", "fail", "pass", "fail", "fail"]
    for n, outcome in enumerate(outcomes, 1):
        e2e.master.force_and_wait("force", "flood", timeout=90, outcome=outcome)
    mails = e2e.wait_mails_to("flood@example.org", 3, timeout=30)
    subjects = [m.message()["Subject"] for m in mails]
    assert len(mails) == 3, subjects
    assert "flood #1 " in subjects[0]
    assert "still failing: flood #2" in subjects[1]
    assert "fixed: flood #4" in subjects[2] and "closes this thread" in subjects[2], subjects
    # The period started with the first mail; the digest follows its end (60 s).
    mails = e2e.sink.wait_for(4, timeout=90, predicate=lambda m: "flood@example.org" in m.rcpt_tos)
    assert len(mails) == 4, [m.message()["Subject"] for m in mails]
    digest = mails[3].message()
    assert "digest: 3 builds" in digest["Subject"]
    text = part(mails[3], "text/plain")
    for number, transition in ((3, "still failing"), (5, "new failure"), (6, "still failing")):
        assert f"flood #{number}: FAILURE ({transition})" in text, text
    assert "flood #4" not in text and "flood #1:" not in text
    print("\n--- digest mail (text part) ---\n" + text)
    # nothing more: normal mail resumes, nothing else was held
    time.sleep(2)
    assert len(e2e.mails_to("flood@example.org")) == 4


def test_culprits_threads_and_notify(e2e):
    """pass (A), fail (B), fail (C, together with a bot's change N), pass (D)."""
    e2e.change(revision="pass-A", branch="main", author="Alice <alice@example.org>",
               comments="A: initial", files='["a.c"]')
    e2e.wait_builds("culprit", 1)
    e2e.change(revision="fail-B", branch="main", author="Bob Builder <bob@example.org>",
               comments="B: break the parser\n\nlonger text", files='["parser.c", "parser.h"]',
               revlink="https://git.example.org/commit/fail-B")
    e2e.wait_builds("culprit", 2)
    # N and C within the tree-stable timer: one build, two changes
    e2e.change(revision="fail-N", branch="main",
               author="dependabot[bot] <noreply@github.com>", comments="N: bump lib")
    e2e.change(revision="fail-C", branch="main", author="carol@example.org",
               comments="C: also break the lexer", files='["lexer.c"]')
    builds = e2e.wait_builds("culprit", 3)
    assert [b["results"] for b in builds] == [0, 2, 2]
    mails = e2e.wait_mails_to(LIST, 2)
    assert len(mails) == 2, [m.message()["Subject"] for m in mails]
    first, second = mails
    text = part(second, "text/plain").replace("\r\n", "\n")
    print("\n--- second-failure mail (text part) ---\n" + text)
    msg = second.message()
    assert "still failing: culprit #3" in msg["Subject"]
    # culprits: C and N new in this build, B already failing since #2, A not a culprit
    culprits = text.split("Culprits\n========\n", 1)[1].split("\nFailed steps", 1)[0]
    new, old = culprits.split("Already failing before this build:")
    assert "New in this build (#3):" in new
    assert "fail-C by carol@example.org" in new and "fail-N by dependabot[bot]" in new
    assert "fail-B by Bob Builder <bob@example.org> (2 files), first in build #2" in old
    assert "B: break the parser" in old and "longer text" not in old
    assert "https://git.example.org/commit/fail-B" in old
    assert "pass-A" not in culprits
    assert "since the last passing build #1" in culprits
    # newest first
    assert new.index("fail-C") < new.index("fail-N")
    # recipients: the list, B's and C's authors; not the bot, not A
    assert sorted(second.rcpt_tos) == sorted([LIST, "bob@example.org", "carol@example.org"])
    assert sorted(first.rcpt_tos) == sorted([LIST, "bob@example.org"])
    assert "noreply" not in header(msg, "To")
    # list headers
    assert header(msg, "List-Id") == "Build results <builds.example.org>"
    assert header(msg, "Reply-To") == "Developers <dev@example.org>"
    assert header(msg, "X-Auto-Response-Suppress") == "All"
    assert header(msg, "Auto-Submitted") == "auto-generated"
    root = header(msg, "In-Reply-To")
    assert re.fullmatch(r"<buildbot\.thread\.[0-9a-f]{24}@ci\.example\.org>", root), root
    assert header(first.message(), "In-Reply-To") == root
    assert root in header(msg, "References")

    # D passes: a fixed mail in the same thread
    e2e.change(revision="pass-D", branch="main", author="Dora <dora@example.org>",
               comments="D: fix both")
    e2e.wait_builds("culprit", 4)
    mails = e2e.wait_mails_to(LIST, 3)
    assert len(mails) == 3
    fixed = mails[2].message()
    assert "fixed: culprit #4" in fixed["Subject"] and "closes this thread" in fixed["Subject"]
    assert header(fixed, "In-Reply-To") == root
    assert root in header(fixed, "References")
    assert header(fixed, "Message-ID") != root


def test_hostile_change_fields_are_escaped_or_dropped(e2e):
    e2e.change(revision="fail-H", branch="hostile",
               author="Eve\r\nBcc: victim@example.org\r\n <eve@example.org>",
               comments="<script>alert(1)</script> & <b>bold</b>\r\nX-Injected: yes",
               revlink="javascript:alert(document.cookie)")
    e2e.wait_builds("hostile", 1)
    mails = e2e.sink.wait_for(1, 60, predicate=lambda m: b"hostile #1" in m.data)
    assert len(mails) == 1
    mail = mails[0]
    msg = mail.message()
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    assert b"victim" not in head and b"X-Injected" not in head
    assert "victim@example.org" not in mail.rcpt_tos
    # an author with CR/LF is not mailed (no address can be trusted from it)
    assert sorted(mail.rcpt_tos) == [LIST]
    html = part(mail, "text/html")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold" in html
    assert "javascript:" not in html
    text = part(mail, "text/plain").replace("\r\n", "\n")
    assert "javascript:" not in text
    # the author stays on one line, as data
    assert re.search(r"fail-H by Eve Bcc: victim@example\.org +<eve@example\.org>", text), text
    assert "\nBcc:" not in text


def test_first_error_5000_lines_before_the_end(e2e):
    build = e2e.master.force_and_wait("force", "bigerr", timeout=120)
    assert build["results"] == 2
    mails = e2e.sink.wait_for(1, 60, predicate=lambda m: b"bigerr #" in m.data)
    assert len(mails) == 1
    text = part(mails[0], "text/plain")
    # line numbers count the log's header lines (command, environment) too
    match = re.search(r'First error, line (\d+) of log "stdio":', text)
    assert match and 3001 <= int(match.group(1)) < 3001 + 200, text[:3000]
    excerpt = text[match.end():]
    print("\n--- first-error excerpt (text part) ---\n"
          + text[text.index("Failed steps"):text.index("\nSteps\n")])
    assert f"> | {FIRST_ERROR}" in excerpt, excerpt[:600]
    assert "noise line 2998" in excerpt  # context before
    assert "teardown line 1" in excerpt  # context after
    assert re.search(r"\[\.\.\. 49\d\d lines \.\.\.\]", excerpt), excerpt[:800]
    assert "teardown line 5000" in excerpt  # the tail
    assert "teardown line 2500" not in text  # bounded: the middle is not in the mail
    assert len(mails[0].data) < 64 * 1024
    html = part(mails[0], "text/html")
    assert "E2E-FIRST-ERROR" in html


def test_log_without_error_shows_the_tail_only(e2e):
    e2e.master.force_and_wait("force", "noerr", timeout=120)
    mails = e2e.sink.wait_for(1, 60, predicate=lambda m: b"noerr #" in m.data)
    assert len(mails) == 1
    text = part(mails[0], "text/plain")
    assert "First error" not in text
    assert "noise line 3000" in text and "noise line 2900" not in text


def test_failed_tests_in_both_parts(e2e):
    e2e.master.force_and_wait("force", "pytest", timeout=120)
    mails = e2e.sink.wait_for(1, 60, predicate=lambda m: b"pytest #" in m.data)
    assert len(mails) == 1
    text, html = part(mails[0], "text/plain"), part(mails[0], "text/html")
    assert "Failed tests\n============" in text
    assert "pytest: 2 failed, 1 passed" in text
    assert "* tests/test_parser.py::test_rejects_crlf" in text
    assert "tests/test_ok.py::test_fine" not in text
    assert "tests/test_parser.py::test_rejects_crlf" in html
    assert "test_&lt;b&gt;html&lt;/b&gt;" in html and "<b>html</b>" not in html


def test_group_by_buildset_one_mail_naming_both_failures(e2e):
    answer = e2e.master.post_json(
        "forceschedulers/bs", {"jsonrpc": "2.0", "method": "force", "id": 1, "params": {}})
    assert not answer.get("error"), answer
    for builder in ("bs-pass", "bs-fail1", "bs-fail2"):
        e2e.wait_builds(builder, 1)
    mails = e2e.wait_mails_to("bs@example.org", 1)
    time.sleep(3)  # a second mail would arrive by now
    mails = e2e.mails_to("bs@example.org")
    assert len(mails) == 1, [m.message()["Subject"] for m in mails]
    text = part(mails[0], "text/plain")
    assert "Builds in this buildset" in text
    assert "bs-fail1 #1: FAILURE" in text and "bs-fail2 #1: FAILURE" in text
    assert "error: one" in text and "error: two" in text
    assert "bs-pass" not in text
