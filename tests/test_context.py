"""Tests of buildbot_mailext.context: transitions, same-branch previous build, log tails, context keys."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from buildbot.process.results import CANCELLED
from buildbot.process.results import EXCEPTION
from buildbot.process.results import FAILURE
from buildbot.process.results import RETRY
from buildbot.process.results import SUCCESS
from buildbot.process.results import WARNINGS
from buildbot.reporters import utils
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin

from fakedb_compat import patch_changes_for_build

from buildbot_mailext import context as ctxmod
from buildbot_mailext.context import HEADER_SLACK_LINES
from buildbot_mailext.context import build_context
from buildbot_mailext.context import previous_build_same_branch
from buildbot_mailext import excerpts
from buildbot_mailext.context import read_log_tail
from buildbot_mailext.samples import sample_context
from buildbot_mailext.context import transition_for
from buildbot_mailext.context import worker_context

BUILDER_ID = 79


def build_rows(number, branch, results, steps=(), changes=(), props=None, branch_prop=True):
    """fakedb rows of one build #number on BUILDER_ID; ids derive from the number.

    steps: (name, results, log_lines or None) -- log_lines is a list of raw stdio lines
    (with their 'o'/'e'/'h' prefix) stored as one chunk.
    """
    bid, brid, bsid, ssid = 100 + number, 200 + number, 300 + number, 400 + number
    rows = [
        fakedb.Buildset(id=bsid, results=results, reason="because"),
        fakedb.SourceStamp(id=ssid, branch=branch, revision=f"rev{number}", project="proj",
                           repository="https://git.example.org/r.git"),
        fakedb.BuildsetSourceStamp(buildsetid=bsid, sourcestampid=ssid),
        fakedb.BuildRequest(id=brid, buildsetid=bsid, builderid=BUILDER_ID),
        fakedb.Build(id=bid, number=number, builderid=BUILDER_ID, buildrequestid=brid, workerid=13,
                     masterid=92, results=results, state_string="finished",
                     started_at=1000000 + number * 1000, complete_at=1000000 + number * 1000 + 125),
        fakedb.BuildProperty(buildid=bid, name="workername", value="wrk", source="Worker"),
    ]
    if branch_prop:
        rows.append(fakedb.BuildProperty(buildid=bid, name="branch", value=branch, source="Build"))
    for k, v in (props or {}).items():
        rows.append(fakedb.BuildProperty(buildid=bid, name=k, value=v, source="test"))
    for i, (name, sresults, lines) in enumerate(steps):
        stepid = 1000 + number * 10 + i
        rows.append(fakedb.Step(id=stepid, buildid=bid, number=i, name=name, results=sresults,
                                state_string=f"{name} done"))
        if lines is not None:
            logid = 5000 + number * 10 + i
            rows.append(fakedb.Log(id=logid, stepid=stepid, name="stdio", slug="stdio", type="s",
                                   num_lines=len(lines)))
            if lines:
                rows.append(fakedb.LogChunk(logid=logid, first_line=0, last_line=len(lines) - 1,
                                            content="\n".join(lines)))
    for j, (author, comments) in enumerate(changes):
        changeid = 600 + number * 10 + j
        rows.append(fakedb.Change(changeid=changeid, author=author, comments=comments,
                                  branch=branch, revision=f"rev{number}", sourcestampid=ssid))
        rows += [fakedb.ChangeFile(changeid=changeid, filename=f) for f in ("a.c", "b.c")]
    return rows



def logged_lines(testcase) -> list:
    """The text of every log line from now until ``testcase`` ends."""
    from twisted.python import log

    lines: list = []

    def observer(event):
        lines.append(log.textFromEventDict(event) or "")

    log.addObserver(observer)
    testcase.addCleanup(log.removeObserver, observer)
    return lines

class FakeBuildMixin(TestReactorMixin):
    @defer.inlineCallbacks
    def setUp(self):
        self.setup_test_reactor()
        self.master = yield fakemaster.make_master(self, wantData=True, wantDb=True, wantMq=True)
        patch_changes_for_build(self, self.master)
        yield self.master.db.insert_test_data([
            fakedb.Master(id=92),
            fakedb.Worker(id=13, name="wrk"),
            fakedb.Builder(id=BUILDER_ID, name="linux"),
        ])

    @defer.inlineCallbacks
    def insert_build(self, *args, **kwargs):
        yield self.master.db.insert_test_data(build_rows(*args, **kwargs))

    def spy_log_reads(self, skip_first_line: bool = False) -> list:
        """Every (first, last) range read from a log (all reads go through
        excerpts.read_lines); ``skip_first_line`` leaves out (0, 0), the failed command line."""
        requested = []
        real = excerpts.read_lines

        def spy(master, logid, first_line, last_line):
            if not (skip_first_line and (first_line, last_line) == (0, 0)):
                requested.append((first_line, last_line))
            return real(master, logid, first_line, last_line)

        self.patch(excerpts, "read_lines", spy)
        return requested

    @defer.inlineCallbacks
    def get_build(self, number):
        build = yield self.master.data.get(("builders", BUILDER_ID, "builds", number))
        yield utils.getDetailsForBuild(self.master, build, want_properties=True, want_steps=True,
                                       want_previous_build=True, want_logs=True)
        return build


class TransitionForTests(unittest.TestCase):
    def test_table(self):
        cases = [
            (FAILURE, None, "first build"),
            (SUCCESS, None, "first build"),
            (FAILURE, SUCCESS, "new failure"),
            (FAILURE, WARNINGS, "new failure"),
            (EXCEPTION, SUCCESS, "new failure"),
            (FAILURE, FAILURE, "still failing"),
            (FAILURE, EXCEPTION, "still failing"),
            (SUCCESS, FAILURE, "fixed"),
            (WARNINGS, FAILURE, "fixed"),
            (SUCCESS, SUCCESS, "still passing"),
            (WARNINGS, WARNINGS, "still passing"),
            (WARNINGS, SUCCESS, "changed"),
            (CANCELLED, SUCCESS, "changed"),
            (CANCELLED, CANCELLED, "unchanged"),
        ]
        for results, prev, expected in cases:
            self.assertEqual(transition_for(results, prev), expected, (results, prev))


class PreviousBuildSameBranchTests(FakeBuildMixin, unittest.TestCase):
    """The builder alternates branches; n-1 would compare against the wrong branch."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "feature", FAILURE)
        yield self.insert_build(2, "main", FAILURE)     # new failure (n-1 says still failing)
        yield self.insert_build(3, "feature", SUCCESS)
        yield self.insert_build(4, "main", RETRY)       # skipped: says nothing about the code
        yield self.insert_build(5, "main", FAILURE)     # still failing (n-1 is a retry, n-2 passes)
        yield self.insert_build(6, "feature", FAILURE)
        yield self.insert_build(7, "main", SUCCESS)     # fixed (n-1 is a feature failure)
        yield self.insert_build(8, "other", SUCCESS)    # first build of its branch

    @defer.inlineCallbacks
    def check(self, number, prev_number, transition):
        build = yield self.get_build(number)
        prev = yield previous_build_same_branch(self.master, build)
        if prev_number is None:
            self.assertIsNone(prev)
        else:
            self.assertEqual(prev["number"], prev_number)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["transition"], transition)

    def test_new_failure_with_other_branch_in_between(self):
        # stock getPreviousBuild returns #1 (feature, failure) here
        return self.check(2, 0, "new failure")

    def test_still_failing_skips_retry_and_other_branch(self):
        return self.check(5, 2, "still failing")

    def test_fixed_with_other_branch_in_between(self):
        return self.check(7, 5, "fixed")

    def test_first_build_of_branch(self):
        return self.check(8, None, "first build")

    def test_feature_branch_compares_with_feature(self):
        return self.check(6, 3, "new failure")


class SourcestampBranchTests(FakeBuildMixin, unittest.TestCase):
    """Builds without a ``branch`` property (forced builds): the first sourcestamp's branch,
    for the build and for the earlier builds alike."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS, branch_prop=False)
        yield self.insert_build(1, "feature", FAILURE, branch_prop=False)
        yield self.insert_build(2, "main", FAILURE, branch_prop=False)

    @defer.inlineCallbacks
    def test_previous_build_of_the_sourcestamp_branch(self):
        build = yield self.get_build(2)
        self.assertNotIn("branch", build["properties"])
        prev = yield previous_build_same_branch(self.master, build)
        self.assertEqual(prev["number"], 0)  # not #1, on feature
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["branch"], ctx["transition"]), ("main", "new failure"))

    @defer.inlineCallbacks
    def test_unreadable_old_build_is_skipped_and_logged(self):
        lines = logged_lines(self)
        real_get = self.master.data.get

        def get(path, *args, **kwargs):
            if path == ("buildrequests", 200):  # build #0's request
                return defer.fail(RuntimeError("gone"))
            return real_get(path, *args, **kwargs)

        self.patch(self.master.data, "get", get)
        build = yield self.get_build(2)
        prev = yield previous_build_same_branch(self.master, build)
        self.assertIsNone(prev)
        self.assertIn("buildbot-mailext: cannot read sourcestamp of build 100: gone", lines)


class BranchAndChangesTests(FakeBuildMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_branch_property_wins_over_the_sourcestamp(self):
        # README: ``branch`` is the branch property, else the first sourcestamp's branch
        yield self.insert_build(0, "main", FAILURE, branch_prop=False, props={"branch": "release/1"})
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["branch"], ctx["sourcestamps"][0]["branch"]), ("release/1", "main"))

    @defer.inlineCallbacks
    def test_unreadable_changes_are_logged_and_the_mail_goes_on(self):
        lines = logged_lines(self)
        yield self.insert_build(0, "main", FAILURE, changes=[("Jane <j@example.org>", "fix")])
        build = yield self.get_build(0)
        from buildbot_mailext import reads

        real_get = self.master.db.changes.getChangeFromSSid

        def get(ssid, *args, **kwargs):
            if ssid == 400:  # the head change of build 100, read for its changes
                return defer.fail(RuntimeError("db gone"))
            return real_get(ssid, *args, **kwargs)

        self.patch(self.master.db.changes, "getChangeFromSSid", get)
        self.patch(reads, "TTL", 0)  # nothing kept: every read is made
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["changes"], [])
        self.assertIn("buildbot-mailext: cannot read changes of build 100: db gone", lines)


class LongAndMissingValuesTests(FakeBuildMixin, unittest.TestCase):
    """Each build-level context value: capped when long, its documented fallback when absent."""

    @defer.inlineCallbacks
    def test_values(self):
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "main", FAILURE, steps=[("compile", FAILURE, ["oa"])])
        build = yield self.get_build(1)
        build["builder"] = dict(build["builder"], name=_long("n"), tags=[_long("t"), "fast"])
        build["state_string"] = _long("s")
        del build["properties"]["workername"]
        ctx = yield build_context(self.master, build, ("failing",), [_long("u")], 10)
        self.assertEqual(ctx["buildername"], _capped("n", 200))
        self.assertEqual(ctx["builder_tags"], [_capped("t", 100), "fast"])
        self.assertEqual(ctx["state_string"], _capped("s", 300))
        self.assertEqual(ctx["summary"], "Build failed: " + _capped("s", 300))
        self.assertEqual(ctx["worker"], "<unknown>")  # no workername property
        self.assertEqual(ctx["reason"], "because")  # no reason property: the buildset's
        self.assertEqual((ctx["previous_results"], ctx["previous_result"], ctx["transition"]),
                         (SUCCESS, "success", "new failure"))
        self.assertEqual(ctx["previous_build_url"], "http://localhost:8080/#/builders/79/builds/0")
        self.assertEqual(ctx["steps"][0]["url"], ctx["build_url"] + "/steps/0")
        self.assertEqual(ctx["blamelist"], [_capped("u", 200)])

        build["state_string"] = None
        build["properties"]["workername"] = (_long("w"), "Worker")
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["state_string"], ctx["summary"]), ("", "Build failed"))
        self.assertEqual(ctx["worker"], _capped("w", 200))


class SourcestampAndPropertyValuesTests(FakeBuildMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_values(self):
        yield self.insert_build(1, "main", FAILURE)
        build = yield self.get_build(1)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["sourcestamps"], [{
            "branch": "main", "revision": "rev1", "repository": "https://git.example.org/r.git",
            "project": "proj", "codebase": "",
        }])
        self.assertEqual((ctx["started_at"], ctx["complete_at"]),
                         ("1970-01-12 14:03:20 UTC", "1970-01-12 14:05:25 UTC"))

        build["properties"][_long("p")] = ("v", "test")
        build["properties"]["branch"] = (_long("b"), "Build")
        (ss,) = build["buildset"]["sourcestamps"]
        build["buildset"] = dict(build["buildset"], reason=_long("r"), sourcestamps=[
            dict(ss, branch=None, revision=_long("v"), project=_long("j"))])
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["properties"][_capped("p", 200)], "v")
        self.assertEqual(ctx["branch"], _capped("b", 300))
        self.assertEqual(ctx["reason"], _capped("r", 500))  # the buildset's
        self.assertEqual(ctx["sourcestamps"][0]["branch"], None)
        self.assertEqual(ctx["sourcestamps"][0]["revision"], _capped("v", 300))
        self.assertEqual(ctx["project"], _capped("j", 300))

        # nothing to go by: no branch, no reason; a project-less sourcestamp shows the title
        del build["properties"]["branch"]
        build["buildset"] = dict(build["buildset"], reason=None, sourcestamps=[
            dict(ss, branch=None, project="")])
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["branch"], ctx["reason"]), (None, None))
        self.assertTrue(self.master.config.title)
        self.assertEqual(ctx["project"], self.master.config.title)


class LogTailTests(FakeBuildMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_reads_only_the_last_n_lines_of_a_big_log(self):
        lines = [f"oline {i}" for i in range(10000)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        requested = self.spy_log_reads()
        build = yield self.get_build(0)
        # error_patterns=(): the tail alone (the error excerpt's own bound is tested in
        # test_excerpts.py)
        ctx = yield build_context(self.master, build, ("failing",), [], 40, error_patterns=())

        # The tail plus a bounded slack for the dropped command preamble, never the log.
        # (0, 0): the first line, where the worker writes the command line
        self.assertEqual(requested, [(10000 - 40 - HEADER_SLACK_LINES, 9999), (0, 0)])
        (step,) = ctx["failed_steps"]
        (tail,) = step["log_tail"]
        self.assertEqual(tail["lines"], [f"line {i}" for i in range(9960, 10000)])
        self.assertEqual(tail["total_lines"], 10000)
        self.assertTrue(tail["truncated"])
        self.assertEqual(tail["name"], "stdio")

    @defer.inlineCallbacks
    def test_prefixes_stripped_streams_kept(self):
        lines = ["hmake all", "h environment:", "h  HOME=/root", "ocompiling", "eerror: boom",
                 "hprogram finished with exit code 2"]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 40)
        tail = ctx["failed_steps"][0]["log_tail"][0]
        # The command preamble is dropped; how the command ended is kept.
        self.assertEqual(tail["lines"], ["compiling", "error: boom",
                                         "program finished with exit code 2"])
        self.assertEqual([e["stream"] for e in tail["entries"]], ["o", "e", "h"])
        self.assertFalse(tail["truncated"])
        self.assertEqual(tail["command"], "make all")  # the command that failed

    @defer.inlineCallbacks
    def test_command_line_shown_when_the_tail_does_not_reach_it(self):
        lines = ["hsh -c 'pytest -x tests'", "h in dir /w/build (timeout 1200 secs)",
                 "h environment:", "h  HOME=/root"]
        lines += [f"otest_{i} ... ok" for i in range(500)] + ["hprogram finished with exit code 1"]
        yield self.insert_build(0, "main", FAILURE, steps=[("tests", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        tail = ctx["failed_steps"][0]["log_tail"][0]
        self.assertEqual(tail["command"], "sh -c 'pytest -x tests'")
        self.assertEqual(tail["lines"][-1], "program finished with exit code 1")
        self.assertEqual(len(tail["lines"]), 10)

    def test_buildbot_stores_each_carriage_return_state_as_a_line(self):
        # Why the README says a progress line shows every state: Buildbot's own line
        # splitter (used when a step's output is stored) breaks at a lone "\r".
        from buildbot.util.lineboundaries import LineBoundaryFinder

        finder = LineBoundaryFinder()
        stored = (finder.append("progress 10%\rprogress 50%\rprogress 100%\n") or "")
        stored += finder.flush() or ""
        self.assertEqual(stored.splitlines(), ["progress 10%", "progress 50%", "progress 100%"])

    @defer.inlineCallbacks
    def test_hostile_lines_are_sanitised(self):
        log_dict = {"logid": 1, "name": "stdio", "num_lines": 3, "type": "s", "url": "u"}

        class FakeLogs:
            def getLogLines(self, logid, first_line, last_line):
                return defer.succeed(
                    "o\x1b[31mred\x1b[0m \ud800 surrogate\n"
                    "o" + "x" * 100000 + "\n"
                    "oprogress 10%\rprogress 100%\x00\n"
                )

        class FakeMaster:
            class db:
                logs = FakeLogs()

        tail = yield defer.ensureDeferred(read_log_tail(FakeMaster, log_dict, 10))
        first, long_line, progress = tail["lines"]
        self.assertEqual(first, "red \ufffd surrogate")
        first.encode("utf-8")  # must not raise
        self.assertLess(len(long_line), ctxmod.MAX_LINE_CHARS + 50)
        self.assertTrue(long_line.endswith("[... line truncated]"))
        self.assertEqual(progress, "progress 100%")

    @defer.inlineCallbacks
    def test_total_size_is_capped(self):
        log_dict = {"logid": 1, "name": "stdio", "num_lines": 1000, "type": "s", "url": "u"}

        class FakeLogs:
            def getLogLines(self, logid, first_line, last_line):
                return defer.succeed("".join(f"o{i:04d}" + "y" * 400 + "\n" for i in range(1000)))

        class FakeMaster:
            class db:
                logs = FakeLogs()

        tail = yield defer.ensureDeferred(read_log_tail(FakeMaster, log_dict, 1000, max_chars=4096))
        self.assertLessEqual(sum(len(l) + 1 for l in tail["lines"]), 4096)
        # the end of the log is what is kept
        self.assertTrue(tail["lines"][-1].startswith("0999"))
        self.assertTrue(tail["truncated"])

    @defer.inlineCallbacks
    def test_unreadable_log_does_not_break_context(self):
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, ["oa", "ob"])])

        def broken(*args):
            return defer.fail(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))

        self.patch(excerpts, "read_lines", broken)
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 40)
        tail = ctx["failed_steps"][0]["log_tail"][0]
        self.assertEqual(tail["lines"], ["[log tail unavailable: UnicodeDecodeError]"])
        self.flushLoggedErrors()


class MailSizeBoundTests(FakeBuildMixin, unittest.TestCase):
    """The bounds that keep a mail small however many steps fail with however big logs."""

    @defer.inlineCallbacks
    def context_of(self, failed_steps, lines_per_log, line_chars, log_tail_lines):
        line = "o" + "x" * (line_chars - 1)
        steps = [(f"step{i}", FAILURE, [line] * lines_per_log) for i in range(failed_steps)]
        yield self.insert_build(0, "main", FAILURE, steps=steps)
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], log_tail_lines)
        return ctx

    @staticmethod
    def tail_chars(step):
        return sum(len(line) + 1 for tail in step["log_tail"] for line in tail["lines"])

    @defer.inlineCallbacks
    def test_log_excerpts_of_one_mail_stay_within_the_mail_budget(self):
        # Five failed steps, each with a log whose tail alone fills the per-log cap:
        # without the per-mail budget they would add up to 5 x 64 KiB.
        per_log_cap_lines = ctxmod.MAX_TAIL_CHARS_PER_LOG // 480 + 10
        ctx = yield self.context_of(
            ctxmod.MAX_FAILED_STEPS_WITH_TAIL, per_log_cap_lines, 480, log_tail_lines=10000
        )
        per_step = [self.tail_chars(step) for step in ctx["failed_steps"]]
        self.assertEqual(len(per_step), 5)
        self.assertGreater(
            ctxmod.MAX_FAILED_STEPS_WITH_TAIL * ctxmod.MAX_TAIL_CHARS_PER_LOG,
            ctxmod.MAX_TAIL_CHARS_PER_MAIL,
        )  # else this test would prove nothing
        self.assertLessEqual(sum(per_step), ctxmod.MAX_TAIL_CHARS_PER_MAIL)
        # The first step gets its whole per-log share, the budget is used up (to within a
        # line), and the last step gets less than the first.
        self.assertGreater(per_step[0], ctxmod.MAX_TAIL_CHARS_PER_LOG - 481)
        self.assertGreater(sum(per_step), ctxmod.MAX_TAIL_CHARS_PER_MAIL - 481)
        self.assertLess(per_step[4], per_step[0])

    @defer.inlineCallbacks
    def test_at_most_five_failed_steps_carry_log_excerpts(self):
        ctx = yield self.context_of(7, 3, 10, log_tail_lines=40)
        failed = ctx["failed_steps"]
        # Every failed step is listed ...
        self.assertEqual([s["name"] for s in failed], [f"step{i}" for i in range(7)])
        # ... the first five with their log tail, the others without.
        limit = ctxmod.MAX_FAILED_STEPS_WITH_TAIL
        self.assertEqual(limit, 5)
        for step in failed[:limit]:
            self.assertEqual(step["log_tail"][0]["lines"], ["x" * 9] * 3, step["name"])
        for step in failed[limit:]:
            self.assertEqual(step["log_tail"], [], step["name"])


class BuildContextTests(FakeBuildMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(
            0, "main", FAILURE,
            steps=[("git", SUCCESS, ["ocloned"]), ("lint", WARNINGS, ["owarn"]),
                   ("compile", FAILURE, ["oa", "eb"]), ("upload", SUCCESS, None)],
            changes=[("Jane <jane@example.org>", "fix parser\n\n<script>alert(1)</script>")],
            props={"got_revision": "abcdef123", "reason": "nightly"},
        )
        self.build = yield self.get_build(0)
        self.ctx = yield build_context(self.master, self.build, ("failing",), ["jane"], 40)

    def test_values(self):
        ctx = self.ctx
        self.assertEqual(ctx["build"], self.build)  # a bounded copy (context.bounded_value)
        self.assertEqual(ctx["buildername"], "linux")
        self.assertEqual(ctx["buildnumber"], 0)
        self.assertEqual(ctx["results"], FAILURE)
        self.assertEqual(ctx["result"], "failure")
        self.assertIsNone(ctx["previous_result"])
        self.assertEqual(ctx["transition"], "first build")
        self.assertEqual(ctx["worker"], "wrk")
        self.assertEqual(ctx["branch"], "main")
        self.assertEqual(ctx["revision"], "abcdef123")
        self.assertEqual(ctx["reason"], "nightly")
        self.assertEqual(ctx["blamelist"], ["jane"])
        self.assertEqual(ctx["properties"]["got_revision"], "abcdef123")
        self.assertEqual(ctx["build_url"], "http://localhost:8080/#/builders/79/builds/0")
        self.assertEqual(ctx["project"], "proj")
        self.assertEqual(ctx["duration"], "2m 05s")
        self.assertEqual([s["name"] for s in ctx["steps"]], ["git", "lint", "compile", "upload"])
        self.assertEqual([s["name"] for s in ctx["failed_steps"]], ["compile"])
        self.assertEqual(ctx["failed_steps"][0]["url"], ctx["build_url"] + "/steps/2")
        self.assertEqual(ctx["failed_steps"][0]["log_tail"][0]["lines"], ["a", "b"])
        self.assertEqual(ctx["mode"], ["failing"])
        self.assertIs(ctx["is_buildset"], False)
        self.assertEqual(ctx["builds"], [{
            "buildername": "linux", "buildnumber": 0, "results": FAILURE, "result": "failure",
            "state_string": "finished", "url": ctx["build_url"],
        }])
        (change,) = ctx["changes"]
        self.assertEqual(change["author"], "Jane <jane@example.org>")
        self.assertIn("<script>", change["comments"])  # raw here; escaping is the HTML env's job
        self.assertEqual(change["files"], ["a.c", "b.c"])

    @defer.inlineCallbacks
    def test_builder_read_when_the_dict_has_none(self):
        build = yield self.get_build(0)
        del build["builder"], build["url"]
        ctx = yield build_context(self.master, build, None, None, 40)
        self.assertEqual(ctx["buildername"], "linux")
        self.assertEqual((ctx["builds"][0]["buildername"], ctx["builds"][0]["url"]),
                         ("linux", ctx["build_url"]))

    @defer.inlineCallbacks
    def test_forty_log_lines_by_default(self):
        yield self.insert_build(1, "main", FAILURE,
                                steps=[("compile", FAILURE, [f"o{i}" for i in range(50)])])
        build = yield self.get_build(1)
        ctx = yield build_context(self.master, build, None, None)
        self.assertEqual(ctx["failed_steps"][0]["log_tail"][0]["lines"], [str(i) for i in range(10, 50)])

    @defer.inlineCallbacks
    def test_log_tail_lines_zero_and_one(self):
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, None, None, 0)
        self.assertEqual(ctx["failed_steps"][0]["log_tail"], [])  # 0: no log tails at all
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, None, None, 1)
        self.assertEqual(ctx["failed_steps"][0]["log_tail"][0]["lines"], ["b"])

    @defer.inlineCallbacks
    def test_mode_forms(self):
        for mode, expected in (("all", ["all"]), (None, []), (["failing", "warnings"], ["failing", "warnings"])):
            build = yield self.get_build(0)
            ctx = yield build_context(self.master, build, mode, None, 0)
            self.assertEqual(ctx["mode"], expected, mode)

    def test_same_keys_as_sample_context(self):
        # validation renders against sample_context(): it must offer exactly what real mails get
        self.assertEqual(sorted(self.ctx), sorted(sample_context()))
        self.assertEqual(sorted(self.ctx["failed_steps"][0]), sorted(sample_context()["failed_steps"][0]))
        self.assertEqual(sorted(self.ctx["steps"][0]), sorted(sample_context()["steps"][0]))
        self.assertEqual(sorted(self.ctx["changes"][0]), sorted(sample_context()["changes"][0]))
        self.assertEqual(sorted(self.ctx["failed_steps"][0]["log_tail"][0]),
                         sorted(sample_context()["failed_steps"][0]["log_tail"][0]))

    @defer.inlineCallbacks
    def test_fetches_missing_details(self):
        # a generator whose formatter wanted no properties/steps still yields a full context
        build = yield self.master.data.get(("builders", BUILDER_ID, "builds", 0))
        yield utils.getDetailsForBuild(self.master, build)
        self.assertNotIn("steps", build)
        self.assertEqual(build["properties"], {})  # the data API's default: not fetched
        ctx = yield build_context(self.master, build, None, None, 40)
        self.assertEqual([s["name"] for s in ctx["failed_steps"]], ["compile"])
        self.assertEqual(ctx["failed_steps"][0]["log_tail"][0]["lines"], ["a", "b"])  # logs read too
        self.assertEqual(ctx["failed_steps"][0]["log_tail"][0]["url"],
                         ctx["build_url"] + "/steps/2/logs/stdio")
        self.assertEqual(ctx["branch"], "main")
        # the properties are read here: worker, got_revision, reason and the properties dict
        self.assertEqual((ctx["worker"], ctx["revision"], ctx["reason"]), ("wrk", "abcdef123", "nightly"))
        self.assertEqual(ctx["properties"]["got_revision"], "abcdef123")


class WorkerContextTests(unittest.TestCase):
    def test_keys_match_sample(self):
        class Cfg:
            title = "T"
            buildbotURL = "http://bb/"

        class M:
            config = Cfg

        ctx = worker_context(M, {"name": "w1\r\nx", "workerid": 1, "notify": ["a@b"],
                                 "workerinfo": {"admin": "adm"}, "last_connection": "yesterday"})
        self.assertEqual(sorted(ctx), sorted(sample_context(kind="worker")))
        self.assertEqual(ctx["worker"], "w1 x")
        self.assertEqual(ctx["worker_admin"], "adm")
        self.assertIsNone(ctx["worker_host"])


class PreviousBuildCacheTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_search_runs_once_per_build_dict(self):
        reads = []

        class FakeData:
            def get(self, path):
                reads.append(path)
                return defer.succeed(None)

        class FakeMaster:
            data = FakeData()

        build = {"number": 3, "builderid": 1, "buildid": 9, "properties": {"branch": ("b", "s")}}
        first = yield previous_build_same_branch(FakeMaster, build)
        reads_after_first = len(reads)
        second = yield previous_build_same_branch(FakeMaster, build)
        self.assertIsNone(first)
        self.assertIsNone(second)
        self.assertEqual(reads_after_first, 3)  # builds 2, 1, 0 looked at
        self.assertEqual(len(reads), reads_after_first)  # the second call read nothing


# --- exact outputs of the pure helpers (gaps found by `make mutate`) ----------------------


def _long(char, n=1000):
    return char * n


def _capped(char, cap):
    return char * cap + " [... line truncated]"


def test_change_summary_exact():
    change = {
        "author": _long("a"), "committer": _long("c"), "revision": _long("r"),
        "comments": "line 1\r\nline 2\rline 3\x00\x1b[31m", "branch": _long("b"),
        "repository": _long("p"), "project": _long("j"),
        "revlink": "https://git.example.org/commit/" + _long("l", 300),
        "when_timestamp": 0, "files": [_long("f")] + [f"f{i}" for i in range(60)],
    }
    assert ctxmod._change_summary(change) == {
        "author": _capped("a", 200), "committer": _capped("c", 200), "revision": _capped("r", 200),
        "comments": "line 1\nline 2\nline 3", "branch": _capped("b", 200),
        "repository": _capped("p", 300), "project": _capped("j", 200),
        "revlink": "https://git.example.org/commit/" + _long("l", 300),
        "when": "1970-01-01 00:00:00 UTC",
        "files": [_capped("f", 300)] + [f"f{i}" for i in range(49)], "files_total": 61,
    }
    # a revlink that is not one line of http(s) (too long to keep whole, or javascript:) is no link
    for bad in (_long("l"), "https://x.org/" + _long("l", 600), "javascript:alert(1)"):
        assert ctxmod._change_summary({"revlink": bad})["revlink"] is None, bad
    assert ctxmod._change_summary({}) == {
        "author": "", "committer": "", "revision": None, "comments": "", "branch": None,
        "repository": "", "project": "", "revlink": None, "when": None, "files": [], "files_total": 0,
    }


def test_step_summary_exact():
    step = {"name": _long("n"), "number": 4, "results": FAILURE, "state_string": _long("s"),
            "hidden": 1, "started_at": 10, "complete_at": 75}
    assert ctxmod._step_summary(step, "http://bb/#/builders/1/builds/2") == {
        "name": _capped("n", 200), "number": 4, "results": FAILURE, "result": "failure",
        "state_string": _capped("s", 200), "url": "http://bb/#/builders/1/builds/2/steps/4",
        "hidden": True, "duration": "1m 05s",
    }
    bare = ctxmod._step_summary({"number": 0}, "u")
    assert (bare["name"], bare["state_string"], bare["results"], bare["result"], bare["duration"]) == (
        "", "", None, None, None)


def test_clean_text_exact():
    assert ctxmod._clean_text("a\r\nb\rc\x07\x1b[1md", 100) == "a\nb\ncd"
    assert ctxmod._clean_text("x" * 10, 10) == "x" * 10
    assert ctxmod._clean_text("x" * 11, 10) == "x" * 10 + "\n[... truncated]"


def test_worker_context_exact():
    class Cfg:
        title = "T"
        buildbotURL = "http://bb/"

    class M:
        config = Cfg

    info = {"admin": _long("a"), "host": "h\r\nx"}
    ctx = worker_context(M, {"name": _long("w"), "workerid": 7, "notify": ("n@example.org",),
                             "workerinfo": info, "last_connection": b"yesterday"})
    del ctx["workerinfo"]  # cleaned as a whole; its own test is test_hostile.py's
    assert ctx == {
        "worker": _capped("w", 200), "workerid": 7, "worker_admin": _capped("a", 300),
        "worker_host": "h x", "last_connection": "yesterday",
        "notify": ["n@example.org"], "buildbot_url": "http://bb/", "title": "T",
        "template_error": None,
    }
    empty = worker_context(M, {})
    assert (empty["worker"], empty["workerid"], empty["worker_admin"], empty["worker_host"],
            empty["last_connection"], empty["notify"]) == ("<unknown>", None, None, None, None, [])


class LogStoreMixin:
    """read_log_tail against a log store that serves exactly the lines asked for."""

    def master_with(self, lines, fail=False):
        class FakeLogs:
            def getLogLines(self, logid, first_line, last_line):
                if fail:
                    return defer.fail(ValueError("bad chunk"))
                return defer.succeed("".join(l + "\n" for l in lines[first_line:last_line + 1]))

        class FakeMaster:
            class db:
                logs = FakeLogs()

        return FakeMaster

    def tail(self, lines, n, log_type="s", fail=False, max_chars=10**6):
        log_dict = {"logid": 9, "name": "stdio", "num_lines": len(lines), "type": log_type, "url": "U"}
        return defer.ensureDeferred(
            read_log_tail(self.master_with(lines, fail), log_dict, n, max_chars=max_chars)
        )


class ReadLogTailEdgeTests(LogStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_text_log_keeps_lines_whole_and_streams_empty(self):
        tail = yield self.tail(["oabc", "hdef"], 10, log_type="t")
        self.assertEqual(tail, {
            "name": "stdio", "url": "U", "command": None, "lines": ["oabc", "hdef"],
            "entries": [{"stream": "", "text": "oabc"}, {"stream": "", "text": "hdef"}],
            "truncated": False, "total_lines": 2,
        })

    @defer.inlineCallbacks
    def test_nothing_asked_or_nothing_there(self):
        self.assertEqual((yield self.tail(["oa"] * 5, 0)), {
            "name": "stdio", "url": "U", "command": None, "lines": [], "entries": [], "truncated": True, "total_lines": 5})
        self.assertEqual((yield self.tail([], 5)), {
            "name": "stdio", "url": "U", "command": None, "lines": [], "entries": [], "truncated": False, "total_lines": 0})
        one = yield self.tail(["oa"], 1)
        self.assertEqual((one["lines"], one["truncated"]), (["a"], False))
        nameless = yield defer.ensureDeferred(read_log_tail(self.master_with([]), {}, 5))
        self.assertEqual((nameless["name"], nameless["url"]), ("", None))
        # lines but no id: unreadable, said in the tail and the log, never an exception
        lines = logged_lines(self)
        idless = yield defer.ensureDeferred(read_log_tail(self.master_with(["oa"]), {"num_lines": 1}, 5))
        self.assertEqual(idless["lines"], ["[log tail unavailable: KeyError]"])
        self.assertIn("buildbot-mailext: cannot read tail of log None: 'logid'", lines)

    @defer.inlineCallbacks
    def test_truncated_only_when_output_is_left_out(self):
        exact = yield self.tail(["o1", "o2", "o3"], 3)
        self.assertFalse(exact["truncated"])
        more = yield self.tail(["o1", "o2", "o3", "o4"], 3)
        self.assertEqual((more["lines"], more["truncated"]), (["2", "3", "4"], True))
        # The window starts at line 1 (line 0 unread) though what was read fits: truncated.
        n = 3
        lines = ["oskipped"] + ["hpreamble"] * HEADER_SLACK_LINES + ["oa", "ob", "oc"]
        windowed = yield self.tail(lines, n)
        self.assertEqual((windowed["lines"], windowed["truncated"]), (["a", "b", "c"], True))

    @defer.inlineCallbacks
    def test_size_budget_is_exact(self):
        lines = [f"o{i}" + "x" * 7 for i in range(5)]  # 8 characters + newline each
        tail = yield self.tail(lines, 10, max_chars=27)
        self.assertEqual(tail["lines"], [l[1:] for l in lines[-3:]])
        self.assertTrue(tail["truncated"])

    @defer.inlineCallbacks
    def test_unreadable_log_exact(self):
        lines = logged_lines(self)
        tail = yield self.tail(["oa"], 5, fail=True)
        self.assertEqual(tail, {
            "name": "stdio", "url": "U", "command": None, "lines": ["[log tail unavailable: ValueError]"],
            "entries": [{"stream": "", "text": "[log tail unavailable: ValueError]"}],
            "truncated": True, "total_lines": 1,
        })
        self.assertIn("buildbot-mailext: cannot read tail of log 9: bad chunk", lines)


class ReadLogTailNoReadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_empty_log_is_not_read(self):
        class NoReads:
            def getLogLines(self, *args):
                raise AssertionError("an empty log must not be read")

        class FakeMaster:
            class db:
                logs = NoReads()

        log_dict = {"logid": 9, "name": "stdio", "num_lines": 0, "type": "s", "url": "U"}
        tail = yield defer.ensureDeferred(read_log_tail(FakeMaster, log_dict, 5))
        self.assertEqual((tail["lines"], tail["truncated"]), ([], False))
        log_dict["num_lines"] = 1
        one = yield defer.ensureDeferred(read_log_tail(FakeMaster, log_dict, 0))
        self.assertTrue(one["truncated"])  # one line, none shown


def test_worker_host_cap():
    class M:
        class config:
            title = "T"
            buildbotURL = "u"

    ctx = worker_context(M, {"workerinfo": {"host": "h" * 1000}})
    assert ctx["worker_host"] == "h" * 300 + " [... line truncated]"


# --- more exact outputs (survivors of the issue-13 `make mutate` run) ----------------------


def test_summary_says_how_the_build_ended():
    # README (Template context reference): ``summary`` is "Build failed: failed compile"
    state = {"state_string": "failed compile"}
    assert ctxmod._summary(state, SUCCESS) == "Build succeeded"
    assert ctxmod._summary(state, WARNINGS) == "Build had warnings: failed compile"
    assert ctxmod._summary({}, WARNINGS) == "Build had warnings"
    assert ctxmod._summary(state, CANCELLED) == "Build was cancelled"
    assert ctxmod._summary(state, None) == "Build in progress: failed compile"
    assert ctxmod._summary({"state_string": None}, None) == "Build in progress"
    assert ctxmod._summary(state, FAILURE) == "Build failed: failed compile"
    assert ctxmod._summary(state, EXCEPTION) == "Build failed: failed compile"
    assert ctxmod._summary({}, FAILURE) == "Build failed"
    # the state text is one line, capped at 300 characters
    assert ctxmod._summary({"state_string": "a\r\nb"}, FAILURE) == "Build failed: a b"
    assert ctxmod._summary({"state_string": _long("s")}, FAILURE) == "Build failed: " + _capped("s", 300)


def test_build_line_exact():
    build = {"builder": {"name": _long("n")}, "number": 12, "results": WARNINGS,
             "state_string": "a\nb", "url": "http://bb/#/builders/1/builds/12"}
    assert ctxmod.build_line(build) == {
        "buildername": _capped("n", 200), "buildnumber": 12, "results": WARNINGS,
        "result": "warnings", "state_string": "a b", "url": "http://bb/#/builders/1/builds/12",
    }
    assert ctxmod.build_line(dict(build, state_string=_long("s")))["state_string"] == _capped("s", 200)
    assert ctxmod.build_line({}) == {
        "buildername": "", "buildnumber": None, "results": None, "result": None,
        "state_string": "", "url": None,
    }


def test_revision_exact():
    rev = ctxmod._revision
    # several codebases: "cb1: rev1, cb2: rev2", sorted, codebases without a revision left out
    assert rev({"got_revision": ({"web": "w1", "core": "c1", "doc": ""}, "src")}, []) == "core: c1, web: w1"
    # no codebase has one: the sourcestamps' revision, the first that has one
    sourcestamps = [{"revision": None}, {"revision": "s2"}, {"revision": "s3"}]
    assert rev({"got_revision": ({"web": None}, "src")}, sourcestamps) == "s2"
    assert rev({}, sourcestamps) == "s2"
    assert rev({}, [{"revision": ""}]) is None
    assert rev({"got_revision": (_long("g"), "src")}, []) == _capped("g", 200)
    assert rev({}, [{"revision": _long("r")}]) == _capped("r", 200)


def test_safe_url_length_bound():
    url = "https://x.org/" + "l" * (500 - len("https://x.org/"))
    assert ctxmod.safe_url(url) == url
    assert ctxmod.safe_url(url + "l") is None  # 501 characters: not kept whole, no link


def test_worker_context_workerinfo_and_notify():
    class M:
        class config:
            title = "T"
            buildbotURL = "u"

    ctx = worker_context(M, {"workerinfo": {"admin": "a\r\nb", "os": "linux"},
                             "notify": [_long("n")]})
    assert ctx["workerinfo"] == {"admin": "a\nb", "os": "linux"}  # bounded_value of it
    assert ctx["notify"] == [_capped("n", 300)]


class CommandLineTests(LogStoreMixin, unittest.TestCase):
    """``command``: the first header line of a stdio log, when it is one."""

    @defer.inlineCallbacks
    def command_of(self, first_line):
        tail = yield self.tail([first_line, "oout"], 10)
        return tail["command"]

    @defer.inlineCallbacks
    def test_first_line_forms(self):
        self.assertEqual((yield self.command_of("hmake all")), "make all")
        self.assertEqual((yield self.command_of("h:")), ":")        # a one-character command
        self.assertEqual((yield self.command_of("hw -s")), "w -s")  # its second character a space
        self.assertIsNone((yield self.command_of("h  HOME=/root")))  # an indented detail line
        self.assertIsNone((yield self.command_of("h")))              # an empty header line
        self.assertIsNone((yield self.command_of("ocompiling")))     # output, not a header

    @defer.inlineCallbacks
    def test_log_claiming_lines_it_does_not_serve(self):
        # num_lines says 2, the store gives nothing (chunks not written yet): no crash
        class Empty:
            class db:
                class logs:
                    @staticmethod
                    def getLogLines(logid, first_line, last_line):
                        return defer.succeed("")

        log_dict = {"logid": 9, "name": "stdio", "num_lines": 2, "type": "s", "url": "U"}
        tail = yield defer.ensureDeferred(read_log_tail(Empty, log_dict, 10))
        self.assertEqual((tail["command"], tail["lines"]), (None, []))

    @defer.inlineCallbacks
    def test_short_log_is_read_once(self):
        # the window starts at line 0: the command comes from it, no second read of line 0
        reads = []

        class Logs:
            def getLogLines(self, logid, first_line, last_line):
                reads.append((first_line, last_line))
                return defer.succeed("hmake\noout\n")

        class M:
            class db:
                logs = Logs()

        log_dict = {"logid": 9, "name": "stdio", "num_lines": 2, "type": "s", "url": "U"}
        tail = yield defer.ensureDeferred(read_log_tail(M, log_dict, 10))
        self.assertEqual(tail["command"], "make")
        self.assertEqual(reads, [(0, 1)])


class LineCutTests(LogStoreMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_line_cut_before_its_visible_text_says_so(self):
        # only the start of a huge line is cleaned; when that start is all control characters
        # the line still says it was cut
        tail = yield self.tail(["o" + "\x00" * 5000 + "visible"], 10)
        self.assertEqual(tail["lines"], [" [... line truncated]"])

    @defer.inlineCallbacks
    def test_size_budget_counts_each_newline(self):
        lines = [f"o{i}" + "x" * 7 for i in range(5)]  # 8 characters + newline each
        tail = yield self.tail(lines, 10, max_chars=35)
        self.assertEqual(tail["lines"], [l[1:] for l in lines[-3:]])  # 27 <= 35 < 36


class ErrorExcerptBudgetTests(FakeBuildMixin, unittest.TestCase):
    """Error excerpts count against the per-mail budget of log excerpts too."""

    BIG = "o" + "x" * 255  # 256 characters with its newline: 256 of them fill a log's 64 KiB

    @defer.inlineCallbacks
    def context_of(self, steps):
        yield self.insert_build(0, "main", FAILURE,
                                steps=[(f"step{i}", FAILURE, lines) for i, lines in enumerate(steps)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 256,
                                  error_patterns=("error:",))
        tails = [t for step in ctx["failed_steps"] for t in step["log_tail"]]
        used = sum(len(line) + 1 for t in tails
                   for line in t["lines"] + ((t["excerpt"] or {}).get("lines") or []))
        self.assertLessEqual(used, ctxmod.MAX_TAIL_CHARS_PER_MAIL)
        return tails

    @defer.inlineCallbacks
    def test_no_excerpt_once_the_tails_used_the_budget_up(self):
        self.assertEqual(ctxmod.MAX_TAIL_CHARS_PER_MAIL, 2 * 256 * 256)  # else this proves nothing
        tails = yield self.context_of([[self.BIG] * 256, ["oerror: boom"] + [self.BIG] * 256,
                                       ["oerror: late"]])
        self.assertEqual(len(tails[1]["lines"]), 256)
        self.assertIsNone(tails[1]["excerpt"])  # budget 0 left: the error above is not shown
        self.assertEqual(len(tails), 2)  # nor the third step's log: it is listed without a tail

    @defer.inlineCallbacks
    def test_no_excerpt_when_the_tail_itself_did_not_fit(self):
        # 256 characters left; the last line of the third log is longer: its tail is empty
        # and no excerpt is added either
        tails = yield self.context_of([[self.BIG] * 256, [self.BIG] * 255,
                                       ["oerror: boom", "o" + "y" * 299]])
        self.assertEqual((tails[2]["lines"], tails[2]["excerpt"]), ([], None))
        self.assertTrue(tails[2]["truncated"])

    @defer.inlineCallbacks
    def test_second_log_of_a_step_after_the_budget_is_used_up(self):
        yield self.insert_build(0, "main", FAILURE, steps=[
            ("a", FAILURE, [self.BIG] * 256), ("b", FAILURE, [self.BIG] * 256)])
        yield self.master.db.insert_test_data([  # a second log, "junit", on step b
            fakedb.Log(id=6001, stepid=1001, name="junit", slug="junit", type="t", num_lines=1),
            fakedb.LogChunk(logid=6001, first_line=0, last_line=0, content="tests failed"),
        ])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 256)
        self.assertEqual([[t["name"] for t in s["log_tail"]] for s in ctx["failed_steps"]],
                         [["stdio"], ["stdio"]])  # no room left for junit

    @defer.inlineCallbacks
    def test_excerpt_lines_count_against_the_budget_exactly(self):
        # Step a: a full 64 KiB tail plus a one-line excerpt ("error: boom", 12 characters
        # with its newline): 65524 left for step b, whose tail is 255 full lines and a first
        # line of t characters (t + 1 with its newline).
        shown = []
        for number, t in enumerate((243, 244)):  # 65524 exactly; one more
            steps = [("a", FAILURE, ["oerror: boom"] + [self.BIG] * 256),
                     ("b", FAILURE, ["o" + "z" * t] + [self.BIG] * 255)]
            yield self.insert_build(number, f"br{number}", FAILURE, steps=steps)
            build = yield self.get_build(number)
            ctx = yield build_context(self.master, build, ("failing",), [], 256,
                                      error_patterns=("error:",))
            a, b = (s["log_tail"][0] for s in ctx["failed_steps"])
            self.assertEqual(a["excerpt"]["lines"], ["error: boom"])
            shown.append(len(b["lines"]))
        self.assertEqual(shown, [256, 255])

    @defer.inlineCallbacks
    def test_error_the_tail_shows_is_not_repeated(self):
        # the dropped header lines below the error make the tail reach above the line the
        # excerpt search starts from: the error is in the tail, so no excerpt repeats it
        tails = yield self.context_of([["oerror: boom"] + ["h  ENV=x"] * 5 + ["ook"] * 2])
        self.assertEqual(tails[0]["lines"], ["error: boom", "ok", "ok"])
        self.assertIsNone(tails[0]["excerpt"])


def test_failed_test_rules():
    # Buildbot's test result categories (buildbot.util.test_result_submitter)
    passed = ctxmod._test_passed
    assert passed({"category": "pass_only"}, {"value": "took 3s"}) is True
    for category in ("fail_only", "code_issue"):
        # only failures are stored there, whatever the value says
        for value in ("1", "ok", "assert 1 == 2"):
            assert passed({"category": category}, {"value": value}) is False, (category, value)
    for value, expected in (("1", True), ("0", False), (" 1 ", True), ("True", True),
                            ("PASS", True), ("Passed", True), ("ok", True), ("FAIL", False),
                            (None, False)):
        assert passed({"category": "pass_fail"}, {"value": value}) is expected, value
    message = ctxmod._test_message
    assert message({"category": "pass_fail"}, {"value": "0"}) == ""  # only "0": no message
    assert message({"category": "fail_only"}, {"value": "assert 1 == 2\r\nE x"}) == "assert 1 == 2 E x"
    assert message({"category": "code_issue"}, {"value": _long("m")}) == _capped("m", 300)
    assert message({"category": "fail_only"}, {}) == ""


class CulpritsSectionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_passing_build_and_requester_forms(self):
        # README: ``requester`` is the forced build's owner property, or None
        for owner, requester in ((None, None), ("", None), (["alice"], None),
                                 ("Olivia\r\n<o@example.org>", "Olivia <o@example.org>"),
                                 (_long("o"), _capped("o", 200))):
            props = {} if owner is None else {"owner": (owner, "Force Build Form")}
            section = yield defer.ensureDeferred(
                ctxmod.culprits_context(None, {"results": SUCCESS}, props))
            self.assertEqual(section, {
                "culprits": [], "culprits_more": 0, "culprits_more_unknown": False,
                "culprits_since": None, "requester": requester,
            }, owner)


class FailedTestsSectionTests(unittest.TestCase):
    """``test_results``: per result set with failures, at most 50 tests (the rest counted)."""

    def section(self, sets, results):
        class Data:
            def get(self, path, filters=()):
                if path[0] == "builders":
                    # the builder's sets of this build (reads.build_test_result_sets)
                    assert path == ("builders", 5, "test_result_sets"), path
                    ((name, op, values),) = [(f.field, f.op, f.values) for f in filters]
                    assert (name, op, values) == ("buildid", "eq", [1])
                    return defer.succeed(sets)
                return defer.succeed(results.get(path[1], []))

        class M:
            data = Data()

        return defer.ensureDeferred(ctxmod.failed_tests_context(M, {"buildid": 1, "builderid": 5}))

    @defer.inlineCallbacks
    def test_sets_tests_names_and_bounds(self):
        def result_set(setid, failed, **kw):
            return dict({"test_result_setid": setid, "description": f"set{setid}",
                         "category": "fail_only", "tests_passed": 3, "tests_failed": failed}, **kw)

        sets = [result_set(1, 0), result_set(2, None), result_set(3, 53)]
        sets += [result_set(10 + i, 1) for i in range(10)]  # 11 sets with failures in all
        sets[3].update(description=_long("d"), category=_long("c"))
        sets[4].update(description=None, category=None)
        results = {
            12: [{"test_name": "only", "value": "bad"}],
            3: [{"test_name": "t_named", "value": "boom"},
                {"test_code_path": "tests/a.py::t", "value": "x"},
                {"value": "y"},
                {"test_name": _long("n"), "value": "z"}]
               + [{"test_name": f"t{i}", "value": "f"} for i in range(49)],
        }
        section = yield self.section(sets, results)
        sets_out = section["test_results"]
        # sets without failures are skipped; at most 10 sets are looked at
        self.assertEqual([s["description"] for s in sets_out],
                         ["set3", _capped("d", 200), ""] + [f"set{10 + i}" for i in range(2, 7)])
        self.assertEqual([s["category"] for s in sets_out[1:3]], [_capped("c", 100), ""])
        self.assertEqual((sets_out[3]["tests"], sets_out[3]["more"]), ([{"name": "only", "message": "bad"}], 0))
        first = sets_out[0]
        self.assertEqual(len(first["tests"]), 50)
        self.assertEqual(first["more"], 3)
        self.assertEqual(first["tests"][:4], [
            {"name": "t_named", "message": "boom"},
            {"name": "tests/a.py::t", "message": "x"},
            {"name": "(unnamed test)", "message": "y"},
            {"name": _capped("n", 300), "message": "z"},
        ])
        self.assertEqual((first["category"], first["passed"], first["failed"]), ("fail_only", 3, 53))

    @defer.inlineCallbacks
    def test_unreadable_results_are_logged(self):
        lines = logged_lines(self)

        class M:
            class data:
                @staticmethod
                def get(path, filters=()):
                    return defer.fail(RuntimeError("gone"))

        section = yield defer.ensureDeferred(ctxmod.failed_tests_context(M, {"buildid": 7, "builderid": 5}))
        self.assertEqual(section, {"test_results": []})
        self.assertIn("buildbot-mailext: cannot read test results of build 7: RuntimeError: gone", lines)


class SmallHelperTests(unittest.TestCase):
    """The helpers every context value goes through (issue 13: survivors of the run over
    context.py's small helpers): exact outputs at their edges."""

    def test_format_duration_edges(self):
        from buildbot_mailext.context import format_duration

        self.assertIsNone(format_duration(None))
        self.assertIsNone(format_duration(-1))
        self.assertEqual(format_duration(0), "0s")
        self.assertEqual(format_duration(0.4), "0s")
        self.assertEqual(format_duration(59), "59s")
        self.assertEqual(format_duration(3599), "59m 59s")
        self.assertEqual(format_duration(3600), "1h 00m 00s")
        self.assertEqual(format_duration(86399), "23h 59m 59s")
        self.assertEqual(format_duration(86400), "1d 00h 00m")

    def test_result_name_of_a_result_buildbot_does_not_know(self):
        from buildbot.process.results import Results

        from buildbot_mailext.context import result_name

        self.assertEqual(result_name(len(Results) - 1), Results[-1])
        self.assertEqual(result_name(len(Results)), str(len(Results)))
        self.assertEqual(result_name(-1), "-1")
        self.assertIsNone(result_name(None))

    def test_bounded_value_cuts_nesting_keys_and_values(self):
        from buildbot_mailext.context import MAX_DEPTH, MAX_VALUE_CHARS, bounded_value

        nested: object = "leaf"
        for _ in range(MAX_DEPTH + 2):
            nested = [nested]
        out = bounded_value(nested)
        for _ in range(MAX_DEPTH):
            out = out[0]
        self.assertEqual(out, "[...]")  # exactly MAX_DEPTH levels kept
        as_tuple = bounded_value(("a", ("b", ("c",))))
        self.assertEqual(as_tuple, ("a", ("b", ("c",))))
        deep_dict = {"k": {"k": {"k": {"k": {"k": {"k": "v"}}}}}}
        self.assertEqual(bounded_value(deep_dict)["k"]["k"]["k"]["k"]["k"], "[...]")
        long_key = "K" * 300
        [key] = bounded_value({long_key: 1}).keys()
        self.assertEqual(key, "K" * 200 + " [... line truncated]")
        self.assertEqual(bounded_value({7: "x"}), {7: "x"})  # non-string keys kept
        text = bounded_value(object())
        self.assertTrue(text.startswith("<object object at"))
        self.assertLessEqual(len(bounded_value("y" * 5000)), MAX_VALUE_CHARS + 40)

    def test_times_naive_and_aware(self):
        import datetime

        from buildbot_mailext.context import _fmt_time, _to_epoch

        naive = datetime.datetime(2026, 11, 26, 12, 0, 0)
        aware = datetime.datetime(2026, 11, 26, 13, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
        self.assertEqual(_to_epoch(naive), 1795694400.0)  # naive means UTC
        self.assertEqual(_to_epoch(aware), 1795694400.0)
        self.assertEqual(_fmt_time(1795694400), "2026-11-26 12:00:00 UTC")
        self.assertEqual(_fmt_time(aware), "2026-11-26 12:00:00 UTC")
        self.assertEqual(_fmt_time("yesterday"), "yesterday")

    def test_bytes_values_read_as_utf8(self):
        from buildbot_mailext.context import bounded_value

        # bytes become text (invalid UTF-8 one U+FFFD a byte), keys and values alike
        self.assertEqual(bounded_value({b"caf\xc3\xa9": b"na\xefve \xff"}),
                         {"caf\u00e9": "na\ufffdve \ufffd"})
        # cut by characters, not bytes: 2100 two-byte C1 controls (4200 bytes, more than the
        # 4064 characters scanned for a 1000-character value) are all read and removed
        self.assertEqual(bounded_value(b"\xc2\x85" * 2100 + b"ok"), "ok")
        # a truncation mark only when something was left unread or cut
        self.assertEqual(bounded_value(b"\xf0\x9f\x98\x80" * 1000), "\U0001f600" * 1000)
        self.assertEqual(bounded_value(b"\xf0\x9f\x98\x80" * 1001),
                         "\U0001f600" * 1000 + "\n[... truncated]")
        self.assertEqual(bounded_value(b"ok" + b"\x00" * 100000), "ok\n[... truncated]")
        # all bytes read, but characters past the scanned 4064 (where "tail" is) left out
        self.assertEqual(bounded_value(b"ok" + b"\x00" * 5000 + b"tail"), "ok\n[... truncated]")

    def test_truncation_mark_only_when_something_was_cut(self):
        from buildbot_mailext.context import MAX_VALUE_CHARS, bounded_value

        # _head reads max_chars * _SCAN_FACTOR + 64 characters: a value of exactly that length
        # was read whole, so no mark, whatever the cleaning removed
        window = 200 * ctxmod._SCAN_FACTOR + 64
        self.assertEqual(ctxmod._change_summary({"author": "Jane" + "\x00" * (window - 4)})["author"],
                         "Jane")
        window = MAX_VALUE_CHARS * ctxmod._SCAN_FACTOR + 64
        self.assertEqual(bounded_value(b"ok" + b"\x00" * (window - 2)), "ok")
        self.assertEqual(bounded_value("ok" + "\x00" * (window - 2)), "ok")
        # a field whose visible text lies past what is read says it was cut
        author = ctxmod._change_summary({"author": "Jane" + "\x00" * 5000 + "Doe"})["author"]
        self.assertEqual(author, "Jane [... line truncated]")

    def test_values_that_are_not_text(self):
        # an svn-style revision number in got_revision shows as its digits
        self.assertEqual(ctxmod._revision({"got_revision": (1234, "SVN")}, []), "1234")
        self.assertEqual(ctxmod._revision({"got_revision": ({"lib": 7, "app": None}, "SVN")}, []),
                         "lib: 7")

    def test_bounded_value_cuts_nested_tuples_too(self):
        from buildbot_mailext.context import MAX_DEPTH, bounded_value

        # the build dict's properties are (value, source) tuples: a deep value inside one is
        # cut at the same depth as anywhere else
        deep: object = "leaf"
        for _ in range(MAX_DEPTH + 2):
            deep = (deep,)
        out = bounded_value({"properties": {"p": (deep, "src")}})
        value = out["properties"]["p"][0]
        for _ in range(MAX_DEPTH - 3):
            value = value[0]
        self.assertEqual(value, "[...]")

    def test_times_are_utc_whatever_the_local_time_zone(self):
        import datetime
        import time

        local_time_zone(self, "Asia/Tokyo")
        self.assertEqual(time.localtime(0).tm_gmtoff, 9 * 3600)  # the zone is in force
        utc = datetime.timezone.utc
        # an epoch time is written in UTC, not in the master's local time
        self.assertEqual(ctxmod._change_summary({"when_timestamp": 1795694400})["when"],
                         "2026-11-26 12:00:00 UTC")
        self.assertEqual(ctxmod._fmt_time(datetime.datetime(2026, 11, 26, 21, 0, tzinfo=datetime.timezone(
            datetime.timedelta(hours=9)))), "2026-11-26 12:00:00 UTC")
        # a naive time is UTC too: started 12:00 (naive), ended 12:02:05 UTC: 2m 05s
        step = ctxmod._step_summary({"number": 0, "started_at": datetime.datetime(2026, 11, 26, 12, 0),
                                     "complete_at": datetime.datetime(2026, 11, 26, 12, 2, 5, tzinfo=utc)},
                                    "u")
        self.assertEqual(step["duration"], "2m 05s")


def local_time_zone(testcase, name: str) -> None:
    """Run the rest of ``testcase`` with the process's local time zone set to ``name``."""
    import os
    import time

    old = os.environ.get("TZ")

    def restore():
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()

    testcase.addCleanup(restore)
    os.environ["TZ"] = name
    time.tzset()


class LineCleaningTests(LogStoreMixin, unittest.TestCase):
    """What a log line shows: a line rewritten with carriage returns (a text log, or output
    stored without Buildbot's splitter) shows its last state, as a terminal would."""

    @defer.inlineCallbacks
    def test_carriage_returns(self):
        tail = yield self.tail([
            "progress 10%\rprogress 50%\rprogress 100%",   # the last redraw
            "progress 50%\rprogress 100%\r\r",             # trailing CRs: the last redraw too
            "Downloading 100%\r" + " " * 17 + "\r",        # cleared with spaces: a blank line
            "FAILED tests/test_x.py::TestX",               # a line ending in X is kept whole
        ], 10, log_type="t")
        self.assertEqual(tail["lines"], ["progress 100%", "progress 100%", " " * 17,
                                         "FAILED tests/test_x.py::TestX"])

    @defer.inlineCallbacks
    def test_log_name_capped(self):
        log_dict = {"logid": 9, "name": "n" * 1000, "num_lines": 0, "type": "s", "url": "U"}
        tail = yield defer.ensureDeferred(read_log_tail(self.master_with([]), log_dict, 10))
        self.assertEqual(tail["name"], _capped("n", 200))


class BranchOfTheWalkTests(FakeBuildMixin, unittest.TestCase):
    """The previous build of the same branch (README: the branch property, else the first
    sourcestamp's branch), for the build and for each earlier build alike."""

    @defer.inlineCallbacks
    def check(self, number, prev_number, branch, transition, edit=None):
        build = yield self.get_build(number)
        if edit:
            edit(build)
        prev = yield previous_build_same_branch(self.master, build)
        self.assertEqual(prev["number"] if prev else None, prev_number)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["branch"], ctx["transition"]), (branch, transition))

    @defer.inlineCallbacks
    def test_branch_property_wins_on_both_sides(self):
        # sourcestamp branch and branch property swapped from build to build: comparing by
        # sourcestamp on either side would pick #1
        yield self.insert_build(0, "main", SUCCESS, branch_prop=False, props={"branch": "release"})
        yield self.insert_build(1, "release", FAILURE, branch_prop=False, props={"branch": "main"})
        yield self.insert_build(2, "main", FAILURE, branch_prop=False, props={"branch": "release"})
        yield self.check(2, 0, "release", "new failure")

    @defer.inlineCallbacks
    def test_walk_on_a_builder_past_the_search_limit(self):
        n = ctxmod.PREVIOUS_BUILD_SEARCH_LIMIT + 10
        yield self.insert_build(n - 3, "main", FAILURE)
        yield self.insert_build(n - 2, "main", SUCCESS)
        yield self.insert_build(n - 1, "feature", FAILURE)
        yield self.insert_build(n, "main", FAILURE)
        yield self.check(n, n - 2, "main", "new failure")

    @defer.inlineCallbacks
    def test_build_without_any_branch(self):
        # no branch property, and a buildset without sourcestamps (a scheduler may make one):
        # no branch, so no earlier build of it
        yield self.insert_build(0, "main", SUCCESS, branch_prop=False)
        yield self.insert_build(1, "main", FAILURE, branch_prop=False)

        def no_sourcestamps(build):
            build["buildset"] = dict(build["buildset"], sourcestamps=[])

        yield self.check(1, None, None, "first build", edit=no_sourcestamps)
