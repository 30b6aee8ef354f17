"""Unit tests (issue 9) on Buildbot's fake master and in-memory database: culprits, the
error excerpt's bounded reads, failed tests, author addresses and URL hygiene."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from buildbot.process.results import FAILURE, SUCCESS, WARNINGS
from buildbot.test import fakedb

from buildbot_mailext import excerpts
from buildbot_mailext.context import build_context, safe_url
from buildbot_mailext.culprits import author_address, author_login

from test_context import BUILDER_ID, FakeBuildMixin, build_rows


class AuthorAddressTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(author_address("Jane <jane@example.org>"), "jane@example.org")
        self.assertEqual(author_address("jane@example.org"), "jane@example.org")
        # parseaddr reads this as "dependabot"
        self.assertEqual(author_address("dependabot[bot] <noreply@github.com>"), "noreply@github.com")
        self.assertIsNone(author_address("jane"))
        self.assertIsNone(author_address("Eve\r\nBcc: v@example.org <eve@example.org>"))
        self.assertIsNone(author_address(None))

    def test_login(self):
        self.assertEqual(author_login("jane"), "jane")
        self.assertIsNone(author_login("Jane <jane@example.org>"))
        self.assertIsNone(author_login("ja\nne"))

    def test_safe_url(self):
        self.assertEqual(safe_url("https://git.example.org/c/1"), "https://git.example.org/c/1")
        for bad in ("javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,x",
                    "https://x\r\nBcc: y", "http://x\"onmouseover=1", None, ""):
            self.assertIsNone(safe_url(bad), bad)


def change_row(changeid, ssid, author, revision, parent=None, comments=None, revlink=None):
    return fakedb.Change(changeid=changeid, author=author, comments=comments or f"{revision}: msg",
                         branch="main", revision=revision, sourcestampid=ssid,
                         parent_changeids=parent, revlink=revlink or f"https://git/{revision}")


class CulpritHistoryMixin(FakeBuildMixin):
    """#0 passes (A); #1 fails (B); #2 fails (C, D in one build); #3 passes with warnings;
    #4 fails (E)."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "main", FAILURE)
        yield self.insert_build(2, "main", FAILURE, props={"owner": "Olivia <olivia@example.org>"})
        yield self.insert_build(3, "main", WARNINGS)
        yield self.insert_build(4, "main", FAILURE)
        # build n uses sourcestamp 400 + n (test_context.build_rows)
        yield self.master.db.insert_test_data([
            change_row(1, 400, "Alice <alice@example.org>", "A"),
            change_row(2, 401, "Bob <bob@example.org>", "B", parent=1),
            change_row(3, 402, "dependabot[bot] <noreply@github.com>", "C", parent=2),
            change_row(4, 402, "carol@example.org", "D", parent=3,
                       comments="D: <b>first line</b>\nsecond line", revlink="javascript:alert(1)"),
            change_row(5, 403, "Dora <dora@example.org>", "W", parent=4),
            change_row(6, 404, "Ed <ed@example.org>", "E", parent=5),
        ])



class CulpritTests(CulpritHistoryMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def context(self, number):
        build = yield self.get_build(number)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        return ctx

    @defer.inlineCallbacks
    def test_second_failure_lists_new_and_old_culprits(self):
        ctx = yield self.context(2)
        got = [(c["revision"], c["new"], c["first_build"]["number"]) for c in ctx["culprits"]]
        self.assertEqual(got, [("D", True, 2), ("C", True, 2), ("B", False, 1)])
        self.assertEqual(ctx["culprits_since"], {
            "number": 0, "url": "http://localhost:8080/#/builders/79/builds/0", "result": "success"})
        self.assertIs(ctx["culprits_more_unknown"], False)
        d = ctx["culprits"][0]
        self.assertEqual(d["first_build"], {
            "number": 2, "url": "http://localhost:8080/#/builders/79/builds/2", "result": "failure"})
        self.assertEqual((d["files_count"], d["login"]), (0, None))
        self.assertEqual(d["title"], "D: <b>first line</b>")
        self.assertIsNone(d["revlink"])  # javascript: dropped
        self.assertEqual(d["address"], "carol@example.org")
        self.assertEqual(ctx["culprits"][1]["address"], "noreply@github.com")
        self.assertEqual(ctx["requester"], "Olivia <olivia@example.org>")
        self.assertEqual(ctx["culprits_more"], 0)

    @defer.inlineCallbacks
    def test_culprits_of_a_build_whose_previous_build_was_not_searched_yet(self):
        # the notifier's culprit addresses read culprits_context on the report's build dict,
        # which the context (or a route) may not have seen yet: the walk searches it then
        from buildbot_mailext.context import PREVIOUS_BUILD_KEY, culprits_context

        build = yield self.get_build(2)
        self.assertNotIn(PREVIOUS_BUILD_KEY, build)
        section = yield defer.ensureDeferred(culprits_context(self.master, build, build["properties"]))
        got = [(c["revision"], c["new"], c["first_build"]["number"]) for c in section["culprits"]]
        self.assertEqual(got, [("D", True, 2), ("C", True, 2), ("B", False, 1)])
        self.assertEqual(build[PREVIOUS_BUILD_KEY]["number"], 1)

    @defer.inlineCallbacks
    def test_warnings_end_a_failure_run(self):
        # Buildbot's builds/N/changes counts only SUCCESS: it would list B, C, D, W, E here
        ctx = yield self.context(4)
        self.assertEqual([c["revision"] for c in ctx["culprits"]], ["E"])
        self.assertEqual(ctx["culprits_since"]["number"], 3)

    @defer.inlineCallbacks
    def test_first_failure_lists_its_own_change(self):
        ctx = yield self.context(1)
        self.assertEqual([(c["revision"], c["new"]) for c in ctx["culprits"]], [("B", True)])

    @defer.inlineCallbacks
    def test_passing_build_has_no_culprits(self):
        ctx = yield self.context(3)
        self.assertEqual(ctx["culprits"], [])

    @defer.inlineCallbacks
    def test_walk_is_bounded_and_counted(self):
        from buildbot_mailext import culprits as mod
        self.patch(mod, "MAX_CULPRITS", 1)
        ctx = yield self.context(2)
        self.assertEqual([c["revision"] for c in ctx["culprits"]], ["D"])
        self.assertEqual(ctx["culprits_more"], 2)


class ErrorExcerptTests(FakeBuildMixin, unittest.TestCase):
    def spy_reads(self):
        """Every range read from the log (the tail and the scan), but the failed command line."""
        return self.spy_log_reads(skip_first_line=True)

    @defer.inlineCallbacks
    def test_first_error_5000_lines_before_the_end(self):
        lines = [f"onoise {i}" for i in range(3000)] + ["esrc/a.c:3:1: error: boom"]
        lines += [f"oteardown {i}" for i in range(1, 5000)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 40)
        (tail,) = ctx["failed_steps"][0]["log_tail"]
        excerpt = tail["excerpt"]
        self.assertEqual(excerpt["first_line"], 3001)
        self.assertEqual([e["text"] for e in excerpt["entries"] if e["match"]],
                         ["src/a.c:3:1: error: boom"])
        self.assertEqual(excerpt["lines"][:3], ["noise 2997", "noise 2998", "noise 2999"])
        self.assertEqual(excerpt["lines"][-1], f"teardown {excerpts.CONTEXT_AFTER}")
        self.assertEqual(excerpt["gap"], 8000 - 40 - 3001 - excerpts.CONTEXT_AFTER)
        self.assertEqual(tail["lines"][-1], "teardown 4999")

    @defer.inlineCallbacks
    def test_no_match_tail_only(self):
        lines = [f"onoise {i}" for i in range(3000)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 40)
        self.assertIsNone(ctx["failed_steps"][0]["log_tail"][0]["excerpt"])

    @defer.inlineCallbacks
    def test_route_patterns_replace_the_defaults(self):
        lines = ["oerror: default pattern", "oBOOM custom"] + [f"onoise {i}" for i in range(100)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10,
                                  error_patterns=[r"^BOOM"])
        excerpt = ctx["failed_steps"][0]["log_tail"][0]["excerpt"]
        self.assertEqual([e["text"] for e in excerpt["entries"] if e["match"]], ["BOOM custom"])

    @defer.inlineCallbacks
    def test_a_short_log_is_read_once_for_its_tail_command_and_excerpt(self):
        # issue 8: 1,500 lines, the error at line 11, a 40-line tail: one query serves the
        # tail, the command line (line 0) and the scan above the tail
        lines = ["hmake all", "h using PTY: False"] + [f"onoise {i}" for i in range(8)]
        lines += ["esrc/a.c:3:1: error: boom"] + [f"onoise {i}" for i in range(1489)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        requested = self.spy_log_reads()
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 40)
        (tail,) = ctx["failed_steps"][0]["log_tail"]
        self.assertEqual(requested, [(0, 1499)])
        self.assertEqual(tail["command"], "make all")
        self.assertEqual(tail["lines"][-1], "noise 1488")
        self.assertEqual([e["text"] for e in tail["excerpt"]["entries"] if e["match"]],
                         ["src/a.c:3:1: error: boom"])
        self.assertEqual(tail["excerpt"]["first_line"], 11)

    @defer.inlineCallbacks
    def test_reads_are_bounded_whatever_the_log_size(self):
        # 60,000 lines without an error: the scan reads ERROR_SCAN_LINES lines above the
        # tail, in chunks, never from line 0 (a 2,000,000-line log costs the same)
        lines = [f"onoise {i}" for i in range(60000)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        requested = self.spy_reads()
        build = yield self.get_build(0)
        yield build_context(self.master, build, ("failing",), [], 40)
        lowest = min(first for first, _ in requested)
        self.assertEqual(lowest, 60000 - 40 - excerpts.ERROR_SCAN_LINES)
        read = sum(last - first + 1 for first, last in requested)
        self.assertLessEqual(read, excerpts.ERROR_SCAN_LINES + 40 + 200)
        self.assertTrue(all(last - first < excerpts.SCAN_CHUNK_LINES + 240
                            for first, last in requested))

    @defer.inlineCallbacks
    def test_chunked_reader_gives_what_getloglines_gives(self):
        lines = [f"o{'x' * (i % 70)} line {i} \u00e9" for i in range(2500)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, None)])
        rows = [fakedb.Log(id=77, stepid=1000, name="stdio", slug="stdio", type="s",
                           num_lines=len(lines))]
        # chunks of at most 1000 lines, as Buildbot's appendLog stores them
        for first in range(0, len(lines), 1000):
            chunk = lines[first:first + 1000]
            rows.append(fakedb.LogChunk(logid=77, first_line=first,
                                        last_line=first + len(chunk) - 1,
                                        content="\n".join(chunk)))
        yield self.master.db.insert_test_data(rows)
        for first, last in ((0, 0), (5, 1499), (999, 1000), (2400, 2499), (0, 2499)):
            ours = yield excerpts.read_lines(self.master, 77, first, last)
            stock = yield self.master.db.logs.getLogLines(77, first, last)
            self.assertEqual(ours, stock, (first, last))

    @defer.inlineCallbacks
    def test_header_lines_never_match(self):
        lines = ["hcommand: make error: not this", "oline"] + [f"onoise {i}" for i in range(100)]
        yield self.insert_build(0, "main", FAILURE, steps=[("compile", FAILURE, lines)])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertIsNone(ctx["failed_steps"][0]["log_tail"][0]["excerpt"])


class FailedTestsTests(FakeBuildMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_failed_tests_listed(self):
        yield self.insert_build(0, "main", FAILURE, steps=[("pytest", FAILURE, None)])
        yield self.master.db.insert_test_data([
            fakedb.TestResultSet(id=7, builderid=BUILDER_ID, buildid=100, stepid=1000,
                                 description="pytest", category="pass_fail",
                                 value_unit="boolean", tests_passed=1, tests_failed=2),
            fakedb.TestName(id=1, builderid=BUILDER_ID, name="test_ok"),
            fakedb.TestName(id=2, builderid=BUILDER_ID, name="test_crlf\r\nBcc: x"),
            fakedb.TestName(id=3, builderid=BUILDER_ID, name="test_<b>"),
            fakedb.TestResult(id=1, builderid=BUILDER_ID, test_result_setid=7, test_nameid=1, value="1"),
            fakedb.TestResult(id=2, builderid=BUILDER_ID, test_result_setid=7, test_nameid=2, value="0"),
            fakedb.TestResult(id=3, builderid=BUILDER_ID, test_result_setid=7, test_nameid=3, value="0"),
        ])
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        (result_set,) = ctx["test_results"]
        self.assertEqual((result_set["passed"], result_set["failed"]), (1, 2))
        self.assertEqual([t["name"] for t in result_set["tests"]],
                         ["test_crlf Bcc: x", "test_<b>"])

    @defer.inlineCallbacks
    def test_no_test_results(self):
        yield self.insert_build(0, "main", FAILURE)
        build = yield self.get_build(0)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["test_results"], [])


class RebuildCulpritTests(FakeBuildMixin, unittest.TestCase):
    """#0 passes (A); #1 fails (B); #2 fails again on the same sourcestamp (a rebuild);
    #3 fails on the sourcestamp of #0 (a flaky rebuild of a passing revision)."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "main", FAILURE)
        for number, ssid in ((2, 401), (3, 400)):
            rows = [r for r in build_rows(number, "main", FAILURE)
                    if not isinstance(r, (fakedb.SourceStamp, fakedb.BuildsetSourceStamp))]
            rows.append(fakedb.BuildsetSourceStamp(buildsetid=300 + number, sourcestampid=ssid))
            yield self.master.db.insert_test_data(rows)
        yield self.master.db.insert_test_data([
            change_row(1, 400, "Alice <alice@example.org>", "A"),
            change_row(2, 401, "Bob <bob@example.org>", "B", parent=1),
        ])

    @defer.inlineCallbacks
    def culprits(self, number):
        build = yield self.get_build(number)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        return [(c["revision"], c["new"], c["first_build"]["number"]) for c in ctx["culprits"]]

    @defer.inlineCallbacks
    def test_rebuild_names_the_build_the_change_first_failed_in(self):
        self.assertEqual((yield self.culprits(2)), [("B", False, 1)])

    @defer.inlineCallbacks
    def test_flaky_rebuild_of_the_passing_revision_names_nobody(self):
        self.assertEqual((yield self.culprits(3)), [])


class CodebaseCulpritTests(FakeBuildMixin, unittest.TestCase):
    """Two codebases in one build: each is walked back to its own last passing change."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "main", FAILURE)
        # a second sourcestamp (codebase "lib") in each buildset
        rows = []
        for number in (0, 1):
            rows += [
                fakedb.SourceStamp(id=450 + number, branch="main", revision=f"lib{number}",
                                   codebase="lib", repository="https://git.example.org/lib.git"),
                fakedb.BuildsetSourceStamp(buildsetid=300 + number, sourcestampid=450 + number),
            ]
        rows += [
            change_row(1, 400, "Alice <alice@example.org>", "app-A"),
            change_row(2, 401, "Bob <bob@example.org>", "app-B", parent=1),
            fakedb.Change(changeid=3, author="Lena <lena@example.org>", comments="lib-A",
                          branch="main", revision="lib-A", sourcestampid=450, codebase="lib",
                          repository="https://git.example.org/lib.git"),
            fakedb.Change(changeid=4, author="Liam <liam@example.org>", comments="lib-B",
                          branch="main", revision="lib-B", sourcestampid=451, codebase="lib",
                          repository="https://git.example.org/lib.git", parent_changeids=3),
        ]
        yield self.master.db.insert_test_data(rows)

    @defer.inlineCallbacks
    def test_each_codebase_stops_at_its_own_passing_change(self):
        build = yield self.get_build(1)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(sorted(c["revision"] for c in ctx["culprits"]), ["app-B", "lib-B"])
        self.assertTrue(all(c["new"] for c in ctx["culprits"]))


class ChangesReadOnceTests(CulpritHistoryMixin, unittest.TestCase):
    """Issue 8: the blamelist (stock's getResponsibleUsersForBuild, which every build
    generator calls) and the mail's context need the same ``builds/N/changes`` read; it is
    made once (buildbot_mailext.reads), and the blamelist is stock's, to the letter."""

    def count_change_reads(self):
        from buildbot_mailext import reads as reads_mod

        reads = []
        real = reads_mod._changes_since_previous_success

        def counting(master, buildid):
            reads.append(buildid)
            return real(master, buildid)

        self.patch(reads_mod, "_changes_since_previous_success", counting)
        return reads

    @defer.inlineCallbacks
    def test_blamelist_is_stocks_and_the_context_reuses_the_changes_read(self):
        from buildbot.reporters.utils import getResponsibleUsersForBuild as stock_blamelist

        from buildbot_mailext import MailExtNotifier

        build = yield self.get_build(2)  # changes C, D (and B before); owner Olivia
        expected = yield stock_blamelist(self.master, build["buildid"])
        # what Buildbot answers (Buildbot < 4.2's fake DB gives fewer changes than a real one)
        revisions = sorted(c["revision"] for c in (yield self.master.data.get(("builds", build["buildid"], "changes"))))
        reads = self.count_change_reads()
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off")
        got = yield notifier.getResponsibleUsersForBuild(self.master, build["buildid"])
        self.assertEqual(got, expected)
        self.assertIn("Olivia <olivia@example.org>", got)
        ctx = yield build_context(self.master, build, ("failing",), got, 10)
        self.assertEqual(sorted(c["revision"] for c in ctx["changes"]), revisions)
        self.assertIn("C", revisions)
        self.assertEqual(reads, [build["buildid"]])  # one read for both

    @defer.inlineCallbacks
    def test_each_earlier_build_is_read_once_for_the_previous_build_and_the_culprits(self):
        # Build 2 fails after failing build 1 and passing build 0: the previous-build search
        # finds 1, the culprits walk goes on to 0 without reading 1 again (issue 8).
        build = yield self.get_build(2)
        build_1 = yield self.get_build(1)
        build_0 = yield self.get_build(0)
        reads = []
        get = self.master.data.get

        def counting_get(path, *args, **kwargs):
            if path[0] == "builders" and len(path) == 4 and path[2] == "builds":
                reads.append(path[3])
            return get(path, *args, **kwargs)

        self.patch(self.master.data, "get", counting_get)
        sourcestamps_read, changes_read = [], []
        for component, name, calls in ((self.master.db.sourcestamps, "getSourceStampsForBuild", sourcestamps_read),
                                       (self.master.db.changes, "getChange", changes_read)):
            def spy(key, *args, _real=getattr(component, name), _calls=calls, **kwargs):
                _calls.append(key)
                return _real(key, *args, **kwargs)
            self.patch(component, name, spy)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual((ctx["previous_result"], ctx["transition"]), ("failure", "still failing"))
        self.assertEqual([(c["revision"], c["first_build"]["number"]) for c in ctx["culprits"]],
                         [("D", 2), ("C", 2), ("B", 1)])
        self.assertEqual(ctx["culprits_since"]["number"], 0)
        self.assertEqual(reads, [1, 0])
        # The culprits take the mailed build's sourcestamps from its buildset (only the
        # blamelist's changes, reads.build_changes, read them) and its head change (D, id 4)
        # with them; each earlier build's sourcestamps are read once, shared by both.
        self.assertEqual(sorted(sourcestamps_read),
                         sorted([build["buildid"], build_1["buildid"], build_0["buildid"]]))
        self.assertNotIn(4, changes_read)  # (Buildbot's endpoint walks C and B by id too)
        self.assertIn(3, changes_read)

    @defer.inlineCallbacks
    def test_the_read_is_made_again_once_it_is_older_than_the_ttl(self):
        from buildbot_mailext import reads as reads_mod

        build = yield self.get_build(2)
        revisions = sorted(c["revision"] for c in (yield self.master.data.get(("builds", build["buildid"], "changes"))))
        reads = self.count_change_reads()
        yield defer.ensureDeferred(reads_mod.build_changes(self.master, build["buildid"]))
        self.reactor.advance(reads_mod.TTL + 1)
        changes = yield defer.ensureDeferred(reads_mod.build_changes(self.master, build["buildid"]))
        self.assertEqual(reads, [build["buildid"]] * 2)
        self.assertEqual(sorted(c["revision"] for c in changes), revisions)

    @defer.inlineCallbacks
    def test_blamelist_takes_the_owners_list_as_stock_does(self):
        from buildbot.reporters.utils import getResponsibleUsersForBuild as stock_blamelist

        from buildbot_mailext import MailExtNotifier

        yield self.insert_build(5, "main", FAILURE, props={"owners": ["Pat <pat@example.org>", "quinn"]})
        build = yield self.get_build(5)
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off")
        got = yield notifier.getResponsibleUsersForBuild(self.master, build["buildid"])
        self.assertEqual(got, (yield stock_blamelist(self.master, build["buildid"])))
        self.assertIn("quinn", got)


class CulpritFieldsTests(CulpritHistoryMixin, unittest.TestCase):
    """The fields of one culprit (issue 13, survivors of culprits_context): a bare-name
    author gives a ``login`` for ``lookup``, an empty comment an empty title, a long first
    comment line a title capped at 200 characters."""

    @defer.inlineCallbacks
    def test_login_empty_title_and_capped_title(self):
        yield self.insert_build(5, "main", FAILURE)
        yield self.master.db.insert_test_data([
            fakedb.Change(changeid=7, author="jane", comments="", branch="main", revision="J",
                          sourcestampid=405, parent_changeids=6),
            fakedb.Change(changeid=8, author="Lena <lena@example.org>", comments="x" * 300 + "\nsecond line",
                          branch="main", revision="L", sourcestampid=405, parent_changeids=7),
        ])
        build = yield self.get_build(5)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        by_revision = {c["revision"]: c for c in ctx["culprits"]}
        self.assertEqual((by_revision["J"]["login"], by_revision["J"]["address"]), ("jane", None))
        self.assertEqual(by_revision["J"]["title"], "")
        self.assertIsNone(by_revision["L"]["login"])
        self.assertEqual(by_revision["L"]["title"], "x" * 200 + " [... line truncated]")


class BranchPropertyCulpritTests(FakeBuildMixin, unittest.TestCase):
    """An earlier build's branch is its ``branch`` property when it has one, as for the build
    mailed (the sourcestamp's branch is only the fallback): #1, a release build made from
    main's sourcestamp, is no passing build of main. #0 passes (A); #1 passes, branch
    property "release" (R); #2 fails on main (B)."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.insert_build(0, "main", SUCCESS)
        yield self.insert_build(1, "main", SUCCESS, branch_prop=False, props={"branch": "release"})
        yield self.insert_build(2, "main", FAILURE)
        yield self.master.db.insert_test_data([
            change_row(1, 400, "Alice <alice@example.org>", "A"),
            change_row(2, 401, "Rita <rita@example.org>", "R", parent=1),
            change_row(3, 402, "Bob <bob@example.org>", "B", parent=2),
        ])

    @defer.inlineCallbacks
    def test_the_last_passing_build_of_the_branch_is_found_by_its_branch_property(self):
        build = yield self.get_build(2)
        ctx = yield build_context(self.master, build, ("failing",), [], 10)
        self.assertEqual(ctx["culprits_since"]["number"], 0)
        self.assertEqual([c["revision"] for c in ctx["culprits"]], ["B", "R"])


class CulpritsWithoutTheContextTests(CulpritHistoryMixin, unittest.TestCase):
    """The notifier's ``culprits`` recipients (``_culprit_addresses``) call culprits_context
    on the build dict Buildbot handed over: when no route asked for the previous build,
    nothing was searched before, and the walk searches it itself."""

    @defer.inlineCallbacks
    def test_culprits_of_a_build_whose_previous_build_was_never_searched(self):
        from buildbot_mailext.context import PREVIOUS_BUILD_KEY, culprits_context

        build = yield self.get_build(4)  # fails after #3 passed with warnings: E is to blame
        self.assertNotIn(PREVIOUS_BUILD_KEY, build)
        section = yield defer.ensureDeferred(culprits_context(self.master, build, build["properties"]))
        self.assertEqual([(c["revision"], c["address"], c["new"]) for c in section["culprits"]],
                         [("E", "ed@example.org", True)])
        self.assertEqual(section["culprits_since"]["number"], 3)
