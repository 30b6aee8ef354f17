"""Hostile build values through the notifier's real path (issue 6).

Every test here runs ``MailExtNotifier._got_event`` on Buildbot's fake master and fake
database (as ``bench/run.py`` does): the route or stock generators, our formatter and
context, ``message.build_email`` and ``message_bytes``, up to the transport, which a
recorder replaces (a fake reactor cannot open sockets; what a real SMTP server receives is
proven in the end-to-end tests, tests/e2e/test_hostile_master.py).

The property test draws hostile values for every field a build carries: branch, builder
name and tag, revision, repository, project, worker, reason, step name and state string,
build state string, property names and values, change author, comments and file, log
lines, owner, ``lookup`` answers and patches; made of encoded words, CR/LF in every form,
NUL and other C0 controls, lone surrogates (where a database can hold them), RTL override,
zero-width characters, emoji, markup, and megabyte repetitions.

Profiles: ``ci`` (default; fixed seed, CI_EXAMPLES examples) and ``long``
(``HYPOTHESIS_PROFILE=long`` or ``make fuzz``: random seed, 1000 examples).
"""

from __future__ import annotations

import base64
import email
import os
import re
import time
import warnings
from email import policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildbot.process.properties import Interpolate
from buildbot.process.results import FAILURE
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.message import MessageFormatter
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin
from buildbot import interfaces
from twisted.internet import defer
from twisted.python import failure as tw_failure
from twisted.python import log as twlog
from twisted.trial import unittest
from zope.interface import implementer

from buildbot_mailext import MailExtNotifier, MailRoute
from buildbot_mailext import message as mime
from buildbot_mailext.addresses import bare_address, is_valid_address
from buildbot_mailext.transport import Delivery

# buildbot.test made warnings errors; these two are known and harmless (see pytest.ini).
warnings.filterwarnings("ignore", message="No path_separator found", category=DeprecationWarning)
warnings.filterwarnings(
    "ignore", message="twisted.internet.ssl.ProtocolNegotiationSupport", category=DeprecationWarning
)

CI_EXAMPLES = 60
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci", max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
    suppress_health_check=_HEALTH, print_blob=True,
)
settings.register_profile(
    "long", max_examples=1000, deadline=None, suppress_health_check=_HEALTH, print_blob=True
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

FROM = "Buildbot <buildbot@example.org>"
LIST = "dev-list@example.org"
ENCODED_WORD_BRANCH = "=?utf-8?q?a=0D=0ABcc:_x@evil.example?="
PROBE_TAG = "xss-probe"
ENVELOPE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@([A-Za-z0-9.-]+|\[[0-9.]+\])")

# --------------------------------------------------------------------------- harness


class _Harness(TestReactorMixin, unittest.TestCase):
    def runTest(self):  # pragma: no cover - never run, only used for its fixtures
        pass


def _sync(d):
    """The fake reactor and in-memory DB make everything synchronous; check it."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    results = []
    d.addBoth(results.append)
    assert results, "a Deferred did not fire synchronously"
    if isinstance(results[0], tw_failure.Failure):
        results[0].raiseException()
    return results[0]


class Recorder:
    """Takes the place of MailTransport: keeps what the notifier hands over."""

    def __init__(self):
        self.sent = []
        self.settings = None

    def send(self, envelope_from, recipients, message, label):
        self.sent.append({"from": envelope_from, "to": list(recipients), "raw": message, "label": label})
        return defer.succeed(Delivery(label, "recorder", accepted=list(recipients), reply="250 recorded"))

    def stop(self):
        return defer.succeed(None)


@implementer(interfaces.IEmailLookup)
class HostileLookup:
    """A lookup that answers ``answer`` for every user (or raises it, if an exception)."""

    def __init__(self, answer):
        self.answer = answer

    def getAddress(self, name):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


DEFAULTS = dict(
    builder="linux", tag="nightly", worker="wrk", branch="main", revision="d34db33f",
    repository="https://git.example.org/r.git", project="proj", reason="because",
    build_state="failed compile", step_name="compile", step_state="compile failed",
    log_name="stdio", log_text="gcc: error: frobnicate undeclared", prop_name="flavour",
    prop_value="debug", author="Dev <dev@example.org>", comments="fix it", file="src/a.c",
    owner="owner@example.org", patch=None, lookup=None, use_routes=True, subject=None,
    generators=None,
)


class Run:
    """One failing build with ``values`` sent through one notifier; what came out."""

    def __init__(self, **values):
        v = dict(DEFAULTS, **values)
        self.values = v
        self.lines: list[str] = []
        self.errors: list[str] = []
        observer = self._observe
        twlog.addObserver(observer)
        h = _Harness()
        h.setup_test_reactor()
        try:
            master = _sync(fakemaster.make_master(h, wantData=True, wantDb=True, wantMq=True))
            _sync(master.db.insert_test_data(self._rows(v)))
            build = _sync(master.data.get(("builds", 20)))
            kwargs = dict(
                fromaddr=FROM, preflight="off",
                extraHeaders={"X-Project": Interpolate("%(prop:hostile)s")},
            )
            if v["lookup"] is not None:
                kwargs["lookup"] = HostileLookup(v["lookup"])
            if v["use_routes"]:
                kwargs["routes"] = [MailRoute(
                    LIST, name="hostile", mode="all", send_to_interested_users=True,
                    subject=v["subject"],
                )]
            else:
                kwargs["extraRecipients"] = [LIST]
                if v["generators"] is not None:
                    kwargs["generators"] = v["generators"]
            notifier = MailExtNotifier(**kwargs)
            _sync(notifier.setServiceParent(master))
            _sync(notifier.startService())
            _sync(notifier.transport.stop())
            notifier.transport = notifier.outbox.transport = self.recorder = Recorder()
            started = time.perf_counter()
            _sync(notifier._got_event(("builds", 20, "finished"), build))
            self.event_seconds = time.perf_counter() - started  # reported, never asserted
            _sync(notifier.stopService())
        finally:
            twlog.removeObserver(observer)
            h.doCleanups()
        self.sent = self.recorder.sent

    def _observe(self, event):
        text = twlog.textFromEventDict(event) or ""
        self.lines.append(text)
        if event.get("isError"):
            self.errors.append(text)

    @staticmethod
    def _rows(v):
        lines = v["log_text"].split("\n")
        patch_id = None
        rows = [
            fakedb.Master(id=92),
            fakedb.Worker(id=13, name=v["worker"]),
            fakedb.Builder(id=79, name=v["builder"]),
            fakedb.Tag(id=1, name=v["tag"]),
            fakedb.BuildersTags(builderid=79, tagid=1),
        ]
        if v["patch"] is not None:
            patch_id = 5
            rows.append(fakedb.Patch(
                id=5, patchlevel=1, patch_base64=base64.b64encode(v["patch"]).decode(),
                patch_author="him@example.org", patch_comment="a try patch", subdir=".",
            ))
        rows += [
            fakedb.SourceStamp(id=234, branch=v["branch"], revision=v["revision"], patchid=patch_id,
                               project=v["project"], repository=v["repository"]),
            fakedb.Buildset(id=98, results=FAILURE, reason=v["reason"]),
            fakedb.BuildsetSourceStamp(buildsetid=98, sourcestampid=234),
            fakedb.Change(changeid=13, author=v["author"], comments=v["comments"], branch=v["branch"],
                          revision=v["revision"], sourcestampid=234, project=v["project"],
                          repository=v["repository"]),
            fakedb.ChangeFile(changeid=13, filename=v["file"]),
            fakedb.BuildRequest(id=11, buildsetid=98, builderid=79),
            fakedb.Build(id=20, number=7, builderid=79, buildrequestid=11, workerid=13, masterid=92,
                         results=FAILURE, state_string=v["build_state"],
                         started_at=10000001, complete_at=10000125),
            fakedb.BuildProperty(buildid=20, name="branch", value=v["branch"], source="Force"),
            fakedb.BuildProperty(buildid=20, name="owner", value=v["owner"], source="Force"),
            fakedb.BuildProperty(buildid=20, name="workername", value=v["worker"], source="Worker"),
            fakedb.BuildProperty(buildid=20, name="hostile", value=v["prop_value"], source="Force"),
            fakedb.BuildProperty(buildid=20, name=v["prop_name"], value=v["prop_value"], source="Force"),
            fakedb.Step(id=50, buildid=20, number=0, name=v["step_name"], results=FAILURE,
                        state_string=v["step_state"]),
            fakedb.Log(id=60, stepid=50, name=v["log_name"], slug="stdio", type="s",
                       num_lines=len(lines)),
            fakedb.LogChunk(logid=60, first_line=0, last_line=len(lines) - 1,
                            content="\n".join("o" + line for line in lines) + "\n"),
        ]
        return rows

    # ------------------------------------------------------------------ what came out

    def only_mail(self):
        assert not self.errors, self.errors
        assert len(self.sent) == 1, (self.sent, self.lines[-20:])
        return self.sent[0]

    def candidates(self):
        """Every address the build offered as interested (after lookup)."""
        v = self.values
        if v["lookup"] is not None:
            offered = [] if isinstance(v["lookup"], Exception) else [v["lookup"]]
        else:
            owners = v["owner"] if isinstance(v["owner"], list) else [v["owner"]]
            offered = [v["author"], *owners]
        out = []
        for value in offered:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str) and value.count("@") > 1:
                value = value[: value.rindex("@")]
            out.append(value)
        return out


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=policy.default)


def header_names(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0].lower() for line in head.split("\r\n") if line and line[0] not in " \t"]


def assert_wire_valid(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    for line in raw[:-2].split(b"\r\n"):
        assert len(line) <= mime.MAX_LINE_BYTES, len(line)
        bad = re.search(rb"[^\t\x20-\x7e]", line)
        assert bad is None, (bad, line[:200])


def built_header_names(run: Run, msg) -> list[str]:
    """The header set the notifier builds for this run, in order."""
    names = ["date", "from", "to"]
    if msg.get("Cc") is not None:  # stock's rule: the extras are copied when users are mailed
        names.append("cc")
    names += ["subject", "message-id", "auto-submitted", "x-auto-response-suppress",
              "in-reply-to", "references", "x-buildbot-builder",
              "x-buildbot-result", "x-buildbot-url", "x-project", "content-type", "mime-version"]
    if msg.get_content_type() == "text/plain":
        names.append("content-transfer-encoding")
    return names


def check_mail(run: Run) -> dict:
    """Every property the issue demands of one mail; returns the sent record."""
    sent = run.only_mail()
    raw = sent["raw"]
    assert len(raw) <= mime.MAX_MAIL_BYTES, len(raw)
    assert_wire_valid(raw)
    msg = parsed(raw)
    # The header set parsed back is exactly the one built: nothing injected, nothing lost.
    assert sorted(header_names(raw)) == sorted(built_header_names(run, msg)), header_names(raw)
    for name, value in msg.items():
        assert not re.search(r"[\x00-\x1f\x7f]", str(value)), (name, value)
    subject = str(msg["Subject"])
    assert "\n" not in subject and "\r" not in subject
    # The envelope: the list, and only addresses that were valid and intended.
    intended = {LIST} | {bare_address(a) for a in run.candidates() if is_valid_address(a)}
    assert LIST in sent["to"]
    assert set(sent["to"]) <= intended, (sent["to"], intended)
    assert all(is_valid_address(a) and bare_address(a) == a for a in sent["to"])
    # An oracle independent of the gate: plain ASCII addr-specs, each written as such in
    # what the build offered (never a repaired or partial address).
    for a in sent["to"]:
        assert ENVELOPE_ADDRESS.fullmatch(a), a
        assert a == LIST or any(
            isinstance(c, str) and re.search(rf"(^|<){re.escape(a)}(>|$)", c.strip())
            for c in run.candidates()
        ), (a, run.candidates())
    assert sent["from"] == "buildbot@example.org"
    # No markup from the data in the HTML part.
    html = msg.get_body(("html",))
    if html is not None:
        assert f"<{PROBE_TAG}" not in html.get_content().lower()
    # Every candidate left out is named in one log line.
    for value in run.candidates():
        if isinstance(value, str) and not is_valid_address(value) and value.strip():
            assert any("left out" in line and mime.one_line(repr(value), 300)[:40] in line
                       for line in run.lines), (value, run.lines[-10:])
    return sent


# --------------------------------------------------------------------------- property test

ATOMS = [
    ENCODED_WORD_BRANCH,
    "=?utf-8?b?YQ0KQmNjOiB4QGV2aWwuZXhhbXBsZQ==?=",  # base64 of "a\r\nBcc: x@evil.example"
    "=?iso-8859-1?q?=0D=0AReply-To:_evil@evil.example?=",
    "\r\nBcc: injected@evil.example\r\n", "\r\n\r\n<b>body</b>", "\n", "\r", "\r\n", "\n\n",
    "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\t",
    "\x00", "\x07", "\x1b[31m", "\x7f", "\x01", "\x1f",
    f"<{PROBE_TAG} onmouseover=alert(1)>", f"</td></tr></table><{PROBE_TAG}>", "&amp;", '"', "'",
    "\u202e", "\u200b", "\ufeff", "\u200d", "💥", "👩‍💻", "中文", "é", "\ufffd",
    "=?", "?=", ":", ";", ",", "<", ">", "@", "\\", " ", "main", "x@example.org",
]
# Only where a database can hold them (property values are JSON, lookup answers are not
# stored): lone surrogates, what undecodable bytes become with surrogateescape.
NON_DB_ATOMS = ["\udcff", "\ud800", "caf\udce9"]


def hostile_text(atoms=ATOMS, big=True):
    small = st.lists(st.sampled_from(atoms) | st.text(max_size=12), max_size=6).map("".join)
    if not big:
        return small
    return st.tuples(small, st.sampled_from([1, 1, 1, 1, 1, 1, 1, 300, 100_000])).map(
        lambda pair: (pair[0] or "x") * pair[1] if pair[1] > 1 else pair[0]
    )


def non_empty(strategy):
    return strategy.map(lambda s: s if s.strip() else s + "x")


ADDRESS_ATOMS = [
    "üser@example.org", "\x07@example.org", 'a"@evil.example', "dev@example.org, qa@example.org",
    "a@x.org;b@x.org", "a@x.org>", "x@evil.example\r\nBcc: y@evil.example",
    "=?utf-8?q?a=0D=0A?= <a@example.org>", "Name <ok@example.org>", "ok2@example.org",
    "root@[127.0.0.1]", "'User' <user@foo.com>@foo.com", "<>", "@", "a@b@c", "Jörg <j@example.org>",
    f"<{PROBE_TAG}> <p@example.org>", "buildbot@localhost", "\u202eevil@example.org",
]


def address(atoms=()):
    return st.one_of(
        st.sampled_from(ADDRESS_ATOMS),
        hostile_text(ATOMS + list(atoms), big=False),
        st.builds(lambda name, local: f"{name} <{local}@example.org>",
                  hostile_text(ATOMS + list(atoms), big=False),
                  st.text(alphabet="abc.-+_", min_size=1, max_size=8)),
    )


field = hostile_text()
build_values = st.fixed_dictionaries({
    "builder": non_empty(field), "tag": non_empty(hostile_text(big=False)),
    "worker": non_empty(hostile_text(big=False)), "branch": field, "revision": field,
    "repository": field, "project": field, "reason": field, "build_state": field,
    "step_name": non_empty(field), "step_state": field, "log_name": non_empty(hostile_text(big=False)),
    "log_text": field, "prop_name": non_empty(hostile_text(big=False)),
    "prop_value": hostile_text(ATOMS + NON_DB_ATOMS), "author": address(), "comments": field,
    "file": field, "owner": address(NON_DB_ATOMS),
    "lookup": st.none() | address(NON_DB_ATOMS) | st.just(ValueError("lookup is down")),
    "patch": st.none() | st.sampled_from([b"--- a\n+++ b\n", b"\x00\xff" * 10, b"x" * 4_000_000]),
    "use_routes": st.booleans(),
    "subject": st.none() | st.just("{{ buildername }} on {{ branch }}: {{ result }} {{ state_string }}"),
})

STATS = {"examples": 0, "largest": 0}


@settings(settings.get_profile(PROFILE))
@given(values=build_values)
def test_hostile_build_values_never_break_a_mail(values):
    if values["prop_name"] in ("branch", "owner", "workername", "hostile"):
        values["prop_name"] += "-x"
    run = Run(**values)
    sent = check_mail(run)
    STATS["examples"] += 1
    STATS["largest"] = max(STATS["largest"], len(sent["raw"]))


@pytest.fixture(scope="module", autouse=True)
def report_property_test_figures(request):
    """For the closing note of issue 6: how many hostile builds were mailed, the largest
    mail. Written through pytest's terminal reporter, with output capture paused."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not STATS["examples"] or reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(
            f"test_hostile: {STATS['examples']} hostile builds mailed (profile {PROFILE!r}), "
            f"largest mail {STATS['largest']:,} bytes (limit {mime.MAX_MAIL_BYTES:,})"
        )


# --------------------------------------------------------------------------- the six cases


def test_regression_1_encoded_word_branch_adds_no_header():
    run = Run(
        branch=ENCODED_WORD_BRANCH, builder=f"linux {ENCODED_WORD_BRANCH}",
        prop_value=ENCODED_WORD_BRANCH,
        subject="{{ buildername }} on {{ branch }}: {{ result }}",
    )
    sent = check_mail(run)
    raw = sent["raw"]
    assert not re.search(rb"(?im)^(bcc|reply-to)\s*:", raw.split(b"\r\n\r\n", 1)[0])
    msg = parsed(raw)
    # A reader decodes our encoded words once: to the literal text of the branch.
    assert str(msg["Subject"]) == f"linux {ENCODED_WORD_BRANCH} on {ENCODED_WORD_BRANCH}: failure"
    assert str(msg["X-Buildbot-Builder"]) == f"linux {ENCODED_WORD_BRANCH}"
    assert str(msg["X-Project"]) == ENCODED_WORD_BRANCH


def test_regression_2_one_hostile_interested_address_does_not_lose_the_mail():
    for author, owner in (
        ("\x07@example.org", "=?utf-8?q?a=0D=0A?= <owner@example.org>"),
        ("Dev <dev@example.org>", "x@evil.example\r\nBcc: y@evil.example"),
    ):
        run = Run(author=author, owner=owner)
        sent = check_mail(run)
        assert sent["to"][0] == LIST and len(sent["to"]) == 2, sent["to"]
        left_out = [line for line in run.lines if "left out" in line]
        assert len(left_out) == 1, run.lines
        assert "build 'linux' #7" in left_out[0]
    msg = parsed(Run(owner="=?utf-8?q?a=0D=0A?= <owner@example.org>").only_mail()["raw"])
    assert "=?utf-8?q?a=0D=0A?= <owner@example.org>" in str(msg["To"])


def test_regression_3_non_ascii_address_is_dropped_alone():
    run = Run(author="üser@example.org")
    sent = check_mail(run)
    assert sent["to"] == [LIST, "owner@example.org"]
    (line,) = [line for line in run.lines if "left out" in line]
    assert "'üser@example.org'" in line and "SMTPUTF8" in line and "build 'linux' #7" in line


def test_regression_4_no_mangled_recipient():
    run = Run(author='a"@evil.example', owner="a@x.org>")
    sent = check_mail(run)
    assert sent["to"] == [LIST]
    assert len([line for line in run.lines if "left out" in line]) == 2


def test_regression_5_no_nul_or_c0_on_the_wire():
    values = dict(build_state="failed\x00compile\x07", step_state="failed\x00compile",
                  prop_name="na\x00me", tag="t\x00ag", prop_value="v\x00\x1b[1m")
    check_mail(Run(**values))
    # A stock formatter puts the build's state string into the body as it is: the NUL is
    # shown as a visible symbol, not sent.
    stock = MessageFormatter(template="state: {{ build['state_string'] }}", template_type="plain")
    sent = check_mail(Run(use_routes=False, generators=[
        BuildStatusGenerator(mode=("failing",), message_formatter=stock)], **values))
    body = parsed(sent["raw"]).get_content()
    assert "state: failed\u2400compile\u2407" in body


def test_regression_6_megabyte_values_and_patches_are_bounded():
    megabyte = "x" * 1_000_000
    run = Run(use_routes=False, build_state=megabyte, step_state=megabyte, prop_value=megabyte,
              tag="t" * 100_000, builder="b" * 100_000, branch=megabyte, log_text=megabyte,
              comments=megabyte, patch=b"+" * 4_000_000)
    sent = check_mail(run)
    msg = parsed(sent["raw"])
    (attachment,) = list(msg.iter_attachments())
    note = attachment.get_content()
    assert "patch of 4,000,000 bytes not attached" in note, note
    assert len(sent["raw"]) < 200_000, len(sent["raw"])  # bounded values, not just a cut mail


def test_worker_missing_mail_goes_to_the_valid_notify_addresses_only():
    lines: list[str] = []
    observer = lambda event: lines.append(twlog.textFromEventDict(event) or "")  # noqa: E731
    twlog.addObserver(observer)
    h = _Harness()
    h.setup_test_reactor()
    try:
        master = _sync(fakemaster.make_master(h, wantData=True, wantDb=True, wantMq=True))
        notifier = MailExtNotifier(fromaddr=FROM, preflight="off")  # stock defaults
        _sync(notifier.setServiceParent(master))
        _sync(notifier.startService())
        _sync(notifier.transport.stop())
        notifier.transport = notifier.outbox.transport = recorder = Recorder()
        worker = {
            "name": f"wrk {ENCODED_WORD_BRANCH}", "workerid": 13, "last_connection": "yesterday",
            "workerinfo": {"admin": f"<{PROBE_TAG}> \x00 {ENCODED_WORD_BRANCH}", "host": "h\r\nBcc: x"},
            "notify": ["ops@example.org", "üser@example.org", "a@x.org>", "Admin <admin@example.org>"],
        }
        _sync(notifier._got_event(("workers", 13, "missing"), worker))
        _sync(notifier.stopService())
    finally:
        twlog.removeObserver(observer)
        h.doCleanups()
    (sent,) = recorder.sent
    assert sent["to"] == ["ops@example.org", "admin@example.org"]
    raw = sent["raw"]
    assert_wire_valid(raw)
    msg = parsed(raw)
    assert not re.search(rb"(?im)^bcc\s*:", raw.split(b"\r\n\r\n", 1)[0])
    assert f"<{PROBE_TAG}" not in msg.get_body(("html",)).get_content()
    assert ENCODED_WORD_BRANCH in str(msg["Subject"])
    left_out = [line for line in lines if "left out" in line]
    assert len(left_out) == 2 and "'üser@example.org'" in left_out[0] and "'a@x.org>'" in left_out[1]
