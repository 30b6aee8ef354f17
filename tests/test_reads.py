"""reads.build_changes gives what Buildbot's ``builds/N/changes`` gives, on histories
Hypothesis makes up (branches, codebases, results, completion order, change chains), and
finds the previous successful build a page at a time (issue 8).

Buildbot's own endpoint is the oracle: both run on Buildbot's fake master with its real
(in-memory SQLite) database, so the comparison needs Buildbot >= 4.2 (older fake DBs have
no getChangesForBuild)."""

from __future__ import annotations

import unittest as std_unittest

from hypothesis import given, settings
from hypothesis import strategies as st

from buildbot.process.results import FAILURE, SUCCESS, WARNINGS
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster

from buildbot_mailext import reads
from buildbot_mailext.culprits import find_culprits
from fakedb_compat import fake_db_lacks_changes_for_build
import test_hostile as hostile
from test_hostile import PROFILE, _sync

BUILDER_ID = 79
REPOS = {"": "https://git.example.org/app.git", "lib": "https://git.example.org/lib.git"}


def history_rows(builds: list[dict]) -> list:
    """fakedb rows: build #n (id 100 + n) on BUILDER_ID, one buildset per build, one
    sourcestamp per codebase, each with ``changes`` new changes chained per codebase."""
    rows = [fakedb.Master(id=92), fakedb.Worker(id=13, name="wrk"),
            fakedb.Builder(id=BUILDER_ID, name="linux")]
    last_change: dict[str, int] = {}
    changeid = 1
    for n, b in enumerate(builds):
        bsid, brid = 300 + n, 200 + n
        rows += [fakedb.Buildset(id=bsid, results=b["results"], reason="because"),
                 fakedb.BuildRequest(id=brid, buildsetid=bsid, builderid=BUILDER_ID),
                 fakedb.Build(id=100 + n, number=n, builderid=BUILDER_ID, buildrequestid=brid,
                              workerid=13, masterid=92, results=b["results"], state_string="finished",
                              started_at=1000 + n, complete_at=b["complete_at"])]
        for k, codebase in enumerate(b["codebases"]):
            ssid = 1000 + 10 * n + k
            rows += [fakedb.SourceStamp(id=ssid, branch=b["branch"], revision=f"r{n}{codebase}",
                                        codebase=codebase, repository=REPOS[codebase], project="p"),
                     fakedb.BuildsetSourceStamp(buildsetid=bsid, sourcestampid=ssid)]
            for _ in range(b["changes"]):
                rows.append(fakedb.Change(
                    changeid=changeid, author=f"A{changeid} <a{changeid}@example.org>",
                    comments=f"change {changeid}", branch=b["branch"], revision=f"c{changeid}",
                    sourcestampid=ssid, codebase=codebase, repository=REPOS[codebase],
                    parent_changeids=last_change.get(codebase)))
                last_change[codebase] = changeid
                changeid += 1
    return rows


@st.composite
def histories(draw):
    n = draw(st.integers(min_value=1, max_value=9))
    # distinct completion times in any order: Buildbot orders by complete_at, not number
    # (ties it leaves to the database; reads.py breaks them by number, tested apart)
    completion = draw(st.permutations(range(n)))
    return [{
        "results": draw(st.sampled_from([SUCCESS, SUCCESS, FAILURE, WARNINGS])),
        "branch": draw(st.sampled_from(["main", "main", "dev"])),
        "codebases": draw(st.sampled_from([("",), ("",), ("", "lib")])),
        "changes": draw(st.integers(min_value=0, max_value=2)),
        "complete_at": 5000 + 10 * completion[i],
    } for i in range(n)]


def new_master():
    h = hostile._Harness()
    h.setup_test_reactor()
    master = fakemaster.make_master(h, wantData=True, wantDb=True, wantMq=True)
    return master if isinstance(master, fakemaster.FakeMaster) else _sync(master)  # 4.0: no Deferred


def make_master(builds: list[dict]):
    master = new_master()
    _sync(master.db.insert_test_data(history_rows(builds)))
    return master


def needs_getChangesForBuild(test):
    master = new_master()
    reason = "Buildbot < 4.2's fake DB has no getChangesForBuild to compare with"
    return std_unittest.skipIf(fake_db_lacks_changes_for_build(master), reason)(test)


class BuildChangesAreBuildbotsTests(std_unittest.TestCase):
    @needs_getChangesForBuild
    @settings(settings.get_profile(PROFILE))
    @given(builds=histories())
    def test_same_answer_as_the_builds_changes_endpoint(self, builds):
        master = make_master(builds)
        for n in range(len(builds)):
            expected = _sync(master.data.get(("builds", 100 + n, "changes")))
            got = _sync(reads.build_changes(master, 100 + n))
            self.assertEqual(got, list(expected), f"build #{n} of {builds}")

    @needs_getChangesForBuild
    def test_previous_success_found_past_several_pages(self):
        # #0 passes on main; then 2.5 pages of successful builds on dev; #50 fails on main:
        # its changes are those since #0, found on the third page.
        builds = [{"results": SUCCESS, "branch": "main", "codebases": ("",), "changes": 1,
                   "complete_at": 5000}]
        builds += [{"results": SUCCESS, "branch": "dev", "codebases": ("",), "changes": 0,
                    "complete_at": 5000 + n} for n in range(1, 50)]
        builds.append({"results": FAILURE, "branch": "main", "codebases": ("",), "changes": 2,
                       "complete_at": 9000})
        master = make_master(builds)
        pages = []
        get = master.data.get

        def spy(path, *args, **kwargs):
            if path[-1] == "builds":
                pages.append(kwargs.get("offset"))
            return get(path, *args, **kwargs)

        master.data.get = spy
        got = _sync(reads.build_changes(master, 150))
        self.assertEqual([c["revision"] for c in got], ["c3", "c2"])
        self.assertEqual(pages, [0, 20, 40])
        master.data.get = get
        self.assertEqual(got, list(_sync(master.data.get(("builds", 150, "changes")))))

    def test_ties_in_completion_time_go_to_the_higher_number(self):
        # Buildbot leaves equal complete_at to the database; reads.py takes the newer build.
        builds = [{"results": SUCCESS, "branch": "main", "codebases": ("",), "changes": 1,
                   "complete_at": 5000} for _ in range(3)]
        builds.append({"results": FAILURE, "branch": "main", "codebases": ("",), "changes": 1,
                       "complete_at": 6000})
        master = make_master(builds)
        got = _sync(reads.build_changes(master, 103))
        self.assertEqual([c["revision"] for c in got], ["c4"])  # since #2 (c3), not #0 or #1


class SharedReadsTests(std_unittest.TestCase):
    """The blamelist's changes and the culprits walk read each build's sourcestamps and
    each head change once between them."""

    def test_culprits_after_build_changes_read_no_sourcestamp_or_head_change_again(self):
        builds = [{"results": SUCCESS, "branch": "main", "codebases": ("",), "changes": 1, "complete_at": 5000},
                  {"results": FAILURE, "branch": "main", "codebases": ("",), "changes": 1, "complete_at": 5010}]
        master = make_master(builds)
        calls = []
        for component, name in ((master.db.sourcestamps, "getSourceStampsForBuild"),
                                (master.db.changes, "getChangeFromSSid")):
            def spy(key, *args, _real=getattr(component, name), _name=name, **kwargs):
                calls.append((_name, key))
                return _real(key, *args, **kwargs)
            setattr(component, name, spy)
        _sync(reads.build_changes(master, 101))
        read_by_changes = list(calls)
        self.assertEqual(sorted(set(calls)), sorted(calls), "a read made twice")
        build = _sync(master.data.get(("builds", 101)))
        previous = _sync(master.data.get(("builds", 100)))

        async def earlier():
            yield previous

        culprits = _sync(find_culprits(master, build, earlier()))
        self.assertEqual([reads.model_field(c, "revision") for c in culprits["changes"]], ["c2"])
        self.assertEqual(calls, read_by_changes)  # the culprits read nothing of these again

    def test_a_remembered_build_is_not_read_again_by_the_blamelist(self):
        from buildbot_mailext import MailExtNotifier

        builds = [{"results": SUCCESS, "branch": "main", "codebases": ("",), "changes": 1, "complete_at": 5000},
                  {"results": FAILURE, "branch": "main", "codebases": ("",), "changes": 1, "complete_at": 5010}]
        master = make_master(builds)
        _sync(master.db.insert_test_data([
            fakedb.BuildProperty(buildid=101, name="owner", value="Olivia <olivia@example.org>", source="test")]))
        build = _sync(master.data.get(("builds", 101)))
        build["properties"] = _sync(master.data.get(("builds", 101, "properties")))
        reads.remember_build(master, build)  # as RouteGenerator.generate does
        paths = []
        get = master.data.get

        def spy(path, *args, **kwargs):
            paths.append(path)
            return get(path, *args, **kwargs)

        master.data.get = spy
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off")
        users = _sync(notifier.getResponsibleUsersForBuild(master, 101))
        self.assertEqual(users, ["A2 <a2@example.org>", "Olivia <olivia@example.org>"])
        self.assertNotIn(("builds", 101), paths)
        self.assertNotIn(("builds", 101, "properties"), paths)


class EndpointWithoutTheReadBeforeTests(std_unittest.TestCase):
    """reads.step_logs and reads.build_test_result_sets answer what the data API answers for
    a step's logs and a build's test result sets, without reading the step or the build
    again (the context knows both): one query each instead of two."""

    def setUp(self):
        builds = [{"results": FAILURE, "branch": "main", "codebases": ("",), "changes": 0,
                   "complete_at": 5000 + n} for n in range(2)]
        self.master = make_master(builds)
        rows = []
        for n in range(2):
            buildid, stepid = 100 + n, 1000 + n
            rows += [fakedb.Step(id=stepid, buildid=buildid, number=1, name="compile", results=FAILURE),
                     fakedb.Log(id=2 * stepid, stepid=stepid, name="stdio", slug="stdio", type="s",
                                num_lines=7, complete=1),
                     fakedb.Log(id=2 * stepid + 1, stepid=stepid, name="warnings <html>", slug="warnings_html",
                                type="t", num_lines=0, complete=0)]
            for k in range(2):  # two sets per build, on the same builder: only the build's count
                rows.append(fakedb.TestResultSet(
                    id=10 * buildid + k, builderid=BUILDER_ID, buildid=buildid, stepid=stepid,
                    description=f"set {k} of build {buildid}", category="pass_fail", value_unit="boolean",
                    tests_passed=3 + k, tests_failed=k, complete=1))
        _sync(self.master.db.insert_test_data(rows))
        self.reads = []
        for component, name in ((self.master.db.steps, "getStep"), (self.master.db.builds, "getBuild")):
            def spy(*args, _real=getattr(component, name), _name=name, **kwargs):
                self.reads.append(_name)
                return _real(*args, **kwargs)
            setattr(component, name, spy)

    def test_step_logs_are_the_steps_logs_endpoint(self):
        for stepid in (1000, 1001, 4242):
            del self.reads[:]
            got = _sync(reads.step_logs(self.master, stepid))
            self.assertEqual(self.reads, [], "step_logs read the step")
            self.assertEqual(got, list(_sync(self.master.data.get(("steps", stepid, "logs")))))
        self.assertEqual([(log["logid"], log["slug"], log["type"]) for log in _sync(reads.step_logs(self.master, 1001))],
                         [(2002, "stdio", "s"), (2003, "warnings_html", "t")])

    def test_build_test_result_sets_are_the_builds_endpoint(self):
        for buildid in (100, 101):
            del self.reads[:]
            got = _sync(reads.build_test_result_sets(self.master, BUILDER_ID, buildid))
            self.assertEqual(self.reads, [], "build_test_result_sets read the build")
            self.assertEqual(got, list(_sync(self.master.data.get(("builds", buildid, "test_result_sets")))))
            self.assertEqual([s["test_result_setid"] for s in got], [10 * buildid, 10 * buildid + 1])
