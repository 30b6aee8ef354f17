"""End to end: a real Buildbot master + a real worker + an aiosmtpd sink, all on loopback.

One master for the whole module (start-up costs ~3 s, each build ~1 s).  Assertions are
on the bytes the SMTP sink received, parsed with :mod:`email`.

Routes in the test master (see CFG below):

=================  ===========================  =====================  ===============
route              to                           builders               mode
=================  ===========================  =====================  ===============
runtests-dev       dev-list@example.org         runtests               failing
failures-qa        qa-list@example.org          runtests, hostile      failing
docs-list          docs-list@example.org        docs                   failing
hostile-sec        sec-list@example.org         hostile                failing, subject
                                                                       with the branch
=================  ===========================  =====================  ===============

So a failing ``runtests`` build sends two mails, a passing ``docs`` build none, and a
failing ``hostile`` build (HTML and CR/LF in its output, CR/LF in its branch) two.

CR/LF in the branch: Buildbot 4.3's ForceScheduler accepts a branch with CR/LF (checked
here: the build's ``branch`` property keeps the ``\\r\\n``), so the test forces it through
the REST API exactly as a user could.  Stock MailNotifier raises ``AssertionError: Subject
cannot contain newlines`` for such a build and sends nothing.
"""

from __future__ import annotations

import re
import time

import pytest

from harness import CFG_PREAMBLE, Master, SmtpSink, Worker, example_cfg_text, running_site

pytest.importorskip("aiosmtpd")

WORKER = ("example-worker", "e2e-pass")
DEV, QA, DOCS, SEC = (
    "dev-list@example.org",
    "qa-list@example.org",
    "docs-list@example.org",
    "sec-list@example.org",
)
TAIL_MARKER = "E2E-LAST-LINE-7f3a"
EARLY_MARKER = "E2E-EARLY-LINE-0001"  # line 1 of 120: beyond a 40-line tail
SCRIPT = "<script>alert(1)</script>"
# In the worker's environment: Buildbot writes the step environment into the log's header
# stream; a mail must not carry it to a mailing list.
WORKER_SECRET = "e2e-worker-env-secret-5d1c"
EVIL_BRANCH = "evil\r\nX-Injected: yes\r\nBcc: victim@example.org\r\n\r\n<b>body</b>"

CFG = (CFG_PREAMBLE + r'''

def sh(name, script):
    f = util.BuildFactory()
    f.addStep(steps.ShellCommand(name=name, command=["sh", "-c", script]))
    return f

runtests = sh("unit tests",
    "echo '%(early)s'; i=2; while [ $i -le 119 ]; do echo \"filler line $i\"; i=$((i+1)); done; "
    "echo 'AssertionError: expected 250' >&2; echo '%(tail)s'; exit 1")
docs = sh("build docs", "echo 'docs ok'; exit 0")
hostile = sh("hostile output",
    "echo '%(script)s'; printf 'a\\r\\nX-Injected-Step: yes\\r\\n\\r\\nafter-blank\\n'; "
    "printf '<img src=x onerror=alert(2)> & \"quotes\"\\n'; exit 1")

c['builders'] = [
    util.BuilderConfig(name=n, workernames=["%(worker)s"], factory=f)
    for n, f in (("runtests", runtests), ("docs", docs), ("hostile", hostile))
]
c['schedulers'] = [schedulers.ForceScheduler(name="force", builderNames=["runtests", "docs", "hostile"])]
c['collapseRequests'] = False

c['services'] = [
    reporters.MailExtNotifier(
        fromaddr="buildbot@example.org",
        relayhost=env("MAILEXT_RELAYHOST"),
        preflight=env("MAILEXT_PREFLIGHT", "fail"),
        smtp_timeout=10,
        routes=[
            MailRoute(name="runtests-dev", to=["%(dev)s"], builders=["runtests"]),
            MailRoute(name="failures-qa", to=["%(qa)s"], builders=["runtests", "hostile"]),
            MailRoute(name="docs-list", to=["%(docs)s"], builders=["docs"], mode=("failing",)),
            MailRoute(name="hostile-sec", to=["%(sec)s"], builders=["hostile"],
                      subject="{{ buildername }} on {{ branch }}: {{ result }}"),
        ],
    ),
]
c['title'] = "mailext e2e"
c['buildbotURL'] = "http://127.0.0.1:%%s/" %% env("MAILEXT_WWW_PORT")
c['www'] = {'port': "tcp:%%s:interface=127.0.0.1" %% env("MAILEXT_WWW_PORT"), 'plugins': {}}
c['db'] = {'db_url': "sqlite:///state.sqlite"}
c['buildbotNetUsageData'] = None
''') % {
    "worker": WORKER[0],
    "password": WORKER[1],
    "early": EARLY_MARKER,
    "tail": TAIL_MARKER,
    "script": SCRIPT,
    "dev": DEV,
    "qa": QA,
    "docs": DOCS,
    "sec": SEC,
}

BUILDBOT_HEADERS = ("X-Buildbot-Builder", "X-Buildbot-Result", "X-Buildbot-URL")


class Env:
    def __init__(self, sink: SmtpSink, master: Master, worker: Worker) -> None:
        self.sink, self.master, self.worker = sink, master, worker

    def mails_for(self, builder: str, number: int | None = None):
        """Mails whose X-Buildbot-Builder is ``builder`` (and URL ends in /builds/N)."""

        def match(mail) -> bool:
            msg = mail.message()
            if str(msg.get("X-Buildbot-Builder", "")).strip() != builder:
                return False
            if number is not None:
                url = str(msg.get("X-Buildbot-URL", ""))
                return re.search(rf"/builds/{number}/?$", url.strip()) is not None
            return True

        return match

    def build_and_mails(self, builder: str, expected: int, settle: float = 2.0, **params):
        """Force ``builder``, wait for the build, then for ``expected`` mails of that build.

        After the expected mails arrived, wait ``settle`` seconds more so an unexpected
        extra mail is seen too.
        """
        build = self.master.force_and_wait("force", builder, timeout=90, **params)
        match = self.mails_for(builder, build["number"])
        mails = self.sink.wait_for(max(expected, 1), timeout=30 if expected else settle, predicate=match)
        if expected:
            time.sleep(settle)
        mails = [m for m in self.sink.snapshot() if match(m)]
        return build, mails

    def describe(self) -> str:
        out = []
        for m in self.sink.snapshot():
            msg = m.message()
            out.append(f"  rcpt={m.rcpt_tos} builder={msg.get('X-Buildbot-Builder')!r} "
                       f"subject={msg.get('Subject')!r} url={msg.get('X-Buildbot-URL')!r}")
        return "mails in the sink:\n" + ("\n".join(out) or "  (none)") + \
            "\n--- twistd.log ---\n" + self.master.log_tail(40)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    with running_site(
        tmp_path_factory.mktemp("e2e"), CFG, WORKER,
        master_env={"MAILEXT_PREFLIGHT": "fail"},
        worker_env={"MAILEXT_E2E_WORKER_SECRET": WORKER_SECRET},
    ) as site:
        yield Env(*site)


def header_block(raw: bytes) -> str:
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    return head.decode("ascii", errors="replace")


def assert_single_line_headers(mail) -> None:
    msg = mail.message()
    for name in BUILDBOT_HEADERS + ("Subject", "To", "From", "Message-ID"):
        values = msg.get_all(name) or []
        assert len(values) == 1, f"{name}: expected exactly one header, got {values!r}"
        value = str(values[0])
        assert "\r" not in value and "\n" not in value, f"{name} is multi-line: {value!r}"


# --------------------------------------------------------------------------- tests


def test_failing_build_one_mail_per_matching_route(e2e):
    build, mails = e2e.build_and_mails("runtests", expected=2)
    assert build["results"] == 2, build  # FAILURE
    # the secret really is in the step log (header stream), so its absence below means something
    assert WORKER_SECRET in e2e.master.step_log(build["buildid"], 1)
    assert len(mails) == 2, f"expected 2 mails (runtests-dev + failures-qa)\n{e2e.describe()}"
    assert sorted(tuple(m.rcpt_tos) for m in mails) == [(DEV,), (QA,)], [m.rcpt_tos for m in mails]

    ids = set()
    for mail in mails:
        msg = mail.message()
        assert mail.mail_from == "buildbot@example.org"
        assert str(msg["To"]).strip() in mail.rcpt_tos
        assert str(msg["X-Buildbot-Builder"]).strip() == "runtests"
        assert "fail" in str(msg["X-Buildbot-Result"]).lower()
        assert str(msg["X-Buildbot-URL"]).startswith(f"http://127.0.0.1:{e2e.master.www_port}/")
        assert str(msg["Auto-Submitted"]).strip().lower().startswith("auto-generated")
        ids.add(str(msg["Message-ID"]))
        assert_single_line_headers(mail)

        assert msg.get_content_type() == "multipart/alternative"
        text = mail.part("text/plain")
        html = mail.part("text/html")
        assert text is not None and html is not None, "both text/plain and text/html parts"
        # the log tail: last line present, the first of 120 lines is outside a 40-line tail
        assert TAIL_MARKER in text, text
        tail_lines = [l for l in text.splitlines() if l.lstrip().startswith("| ")]
        assert not any(EARLY_MARKER in l for l in tail_lines), "log tail is not a tail"
        # the command that failed is shown above the tail (it echoes the early marker)
        (command,) = [l for l in text.splitlines() if l.lstrip().startswith("Command: sh -c ")]
        assert EARLY_MARKER in command
        assert "AssertionError: expected 250" in text
        # stream prefixes stripped (Buildbot #4850)
        assert f"o{TAIL_MARKER}" not in text and f"o{TAIL_MARKER}" not in html
        assert TAIL_MARKER in html
        assert WORKER_SECRET not in text + html, "the worker environment (log header) was mailed"
    assert len(ids) == 2, f"Message-IDs must differ: {ids}"


def test_passing_build_sends_nothing_in_mode_failing(e2e):
    build = e2e.master.force_and_wait("force", "docs", timeout=90)
    assert build["results"] == 0, build
    # Sentinel: a failing build forced afterwards; its mails arrive after any docs mail.
    sentinel, sent = e2e.build_and_mails("runtests", expected=2, settle=1.0)
    assert len(sent) == 2, e2e.describe()
    docs_mails = [m for m in e2e.sink.snapshot() if e2e.mails_for("docs")(m) or DOCS in m.rcpt_tos]
    assert docs_mails == [], e2e.describe()


def test_hostile_output_and_branch_do_not_inject_headers_or_html(e2e):
    build, mails = e2e.build_and_mails("hostile", expected=2, branch=EVIL_BRANCH)
    assert build["results"] == 2, build
    # Buildbot kept the CR/LF: this really is hostile input for the notifier.
    assert e2e.master.build_properties(build["buildid"]).get("branch") == EVIL_BRANCH
    assert len(mails) == 2, f"expected failures-qa + hostile-sec\n{e2e.describe()}"
    assert sorted(tuple(m.rcpt_tos) for m in mails) == [(QA,), (SEC,)]

    for mail in mails:
        assert "victim@example.org" not in mail.rcpt_tos
        msg = mail.message()
        names = {k.lower() for k in msg.keys()}
        assert not names & {"x-injected", "x-injected-step", "bcc"}, sorted(names)
        head = header_block(mail.data)
        assert not re.search(r"(?im)^(x-injected|x-injected-step|bcc)\s*:", head), head
        assert_single_line_headers(mail)
        assert str(msg["X-Buildbot-Builder"]).strip() == "hostile"

        html = mail.part("text/html")
        text = mail.part("text/plain")
        assert html is not None and text is not None
        assert SCRIPT not in html, "raw <script> in the HTML part"
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html
        assert "<b>body</b>" not in html, "branch HTML not escaped"
        assert SCRIPT in text, "the text part shows the output as is"
        assert "after-blank" in text

    sec = next(m for m in mails if m.rcpt_tos == [SEC])
    subject = str(sec.message()["Subject"]).strip()  # may be folded right after "Subject:"
    assert subject.startswith("hostile on evil"), subject


def test_master_cfg_example_loads(tmp_path):
    """The shipped example passes `buildbot checkconfig` with the plugin installed."""
    basedir = tmp_path / "example"
    master = Master(basedir, example_cfg_text(), env={"MAILEXT_PREFLIGHT": "off"})
    master.create()
    proc = master.checkconfig()
    assert proc.returncode == 0, proc.stdout
    assert "Config file is good" in proc.stdout, proc.stdout
