"""Routing rules (buildbot_mailext.routes): MailRoute validation, mode matching, and the
route's filters applied by its generator to a build on Buildbot's fake master."""

import mock
import pytest
from buildbot.process.results import EXCEPTION, FAILURE, SUCCESS, WARNINGS
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin
from buildbot.test.util.reporter import ReporterTestMixin
from twisted.internet import defer
from twisted.trial import unittest

from buildbot_mailext.addresses import is_valid_address
from buildbot_mailext.formatter import MailExtFormatter
from buildbot_mailext.masterconfig import KnownNames
from buildbot_mailext.routes import MailRoute, RouteGenerator, expand_modes, wanted_by_results


def test_lone_string_is_one_recipient_not_characters():
    # Buildbot #3913: stock splits extraRecipients="a@b.org" into characters.
    assert MailRoute("dev@example.org").to == ["dev@example.org"]
    assert MailRoute(["a@example.org", "b@example.org"]).to == ["a@example.org", "b@example.org"]


def test_lone_string_is_one_builder_tag_branch_or_scheduler():
    route = MailRoute(
        "dev@example.org", builders="linux", branches="main", schedulers=("nightly",)
    )
    assert route.builders == ["linux"]  # not ['l', 'i', 'n', 'u', 'x']
    assert route.branches == ["main"] and route.schedulers == ["nightly"]
    assert route.name == "linux->dev@example.org"
    assert route.config_errors() == []
    assert MailRoute("dev@example.org", tags="release").tags == ["release"]


def test_unknown_names_are_errors_with_the_closest_known_names():
    known = KnownNames(
        builders=("linux", "linux-arm", "docs"), tags=("release",), schedulers=("force",)
    )
    route = MailRoute("dev@example.org", builders=["linxu", "docs"], schedulers=["nightly"])
    assert route.unknown_name_errors(known) == [
        "MailRoute 'linxu+docs->dev@example.org': builders: c['builders'] has no builder "
        "named 'linxu', so this route would never send; did you mean 'linux'? "
        "(known: docs, linux, linux-arm)",
        "MailRoute 'linxu+docs->dev@example.org': schedulers: c['schedulers'] has no "
        "scheduler named 'nightly', so this route would never send (known: force)",
    ]
    assert MailRoute("d@example.org", tags=["release"]).unknown_name_errors(known) == []
    assert MailRoute("d@example.org", tags=["relase"]).unknown_name_errors(known) == [
        "MailRoute 'relase->d@example.org': tags: no builder in c['builders'] has the tag "
        "'relase', so this route would never send; did you mean 'release'? (known: release)"
    ]


def test_known_names_read_from_a_config_dict_as_written():
    from buildbot.plugins import schedulers, util

    factory = util.BuildFactory()
    config_dict = {
        "builders": [
            util.BuilderConfig(name="linux", workernames=["w"], factory=factory, tags=["a"]),
            {"name": "docs", "workernames": ["w"], "factory": factory, "tags": ["b", "a"]},
        ],
        "schedulers": [schedulers.ForceScheduler(name="force", builderNames=["linux"])],
    }
    known = KnownNames.from_config_dict(config_dict)
    assert known == KnownNames(
        builders=("linux", "docs"), tags=("a", "b"), schedulers=("force",)
    )
    assert KnownNames.from_config_dict({"multiMaster": True}).multi_master


def test_default_name_is_stable_and_descriptive():
    a = MailRoute("dev@example.org", builders=["runtests"])
    b = MailRoute("dev@example.org", builders=["runtests"])
    assert a.name == b.name == "runtests->dev@example.org"
    assert a == b  # reconfig with an identical route does not churn
    assert a != MailRoute("dev@example.org", builders=["docs"])


def test_default_name_lists_every_builder_and_recipient():
    route = MailRoute(["a@example.org", "b@example.org"], builders=["b1", "b2"])
    assert route.name == "b1+b2->a@example.org,b@example.org"
    assert MailRoute("a@example.org", tags=["t1", "t2"]).name == "t1+t2->a@example.org"
    assert MailRoute([], send_to_interested_users=True).name == "all->interested-users"


def test_valid_route_has_no_errors():
    route = MailRoute(
        ["Dev List <dev@example.org>"], builders=["runtests"], mode=("failing", "fixed")
    )
    assert route.config_errors() == []


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(to="not-an-address"), "'not-an-address' in 'to' is not a valid email address"),
        (dict(to="dev@example.org\r\nBcc: x@y.org"), "is not a valid email address"),
        (dict(to="dev@example.org", mode=("failing", "sometimes")), "unknown mode 'sometimes'"),
        (dict(to=[]), "'to' is empty and send_to_interested_users is False"),
        (
            dict(to="d@example.org", builders=5),
            "MailRoute '5->d@example.org': 'builders' must be a name, a list of names",
        ),
        (
            dict(to="d@example.org", builders=[]),
            "'builders' is empty, so this route would never send; leave it out (or None) "
            "to match them all",
        ),
        (
            dict(to="d@example.org", tags=[("linux",)]),
            "'tags' must be a name, a list of names (strings) or None, got [('linux',)]",
        ),
        (
            dict(to="d@example.org", builders=["a"], tags=["t"]),
            "give either 'builders' or 'tags', not both",
        ),
        (dict(to="d@example.org", log_tail_lines=-1), "'log_tail_lines' must be a whole number"),
    ],
)
def test_config_errors_name_the_setting(kwargs, expected):
    errors = MailRoute(**kwargs).config_errors()
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("MailRoute ") for e in errors)


W = "MailRoute 'r'"


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(to=[]), f"{W}: 'to' is empty and send_to_interested_users is False, so this route would "
         "never mail anyone; give to='list@example.org' or set send_to_interested_users=True"),
        (dict(to="x"), f"{W}: 'x' in 'to' is not a valid email address (no '@'); write it as "
         "'user@example.org' or 'Name <user@example.org>'"),
        (dict(mode="often"), f"{W}: unknown mode 'often'; use one of change, failing, passing, problem, "
         "warnings, exception, cancelled, new_failure, still_failing, fixed (or the string 'all')"),
        (dict(builders=["a"], tags=["t"]), f"{W}: give either 'builders' or 'tags', not both "
         "(Buildbot's rule); split it into two routes"),
        (dict(template=""), f"{W}: 'template' must be a template name such as 'build_failure'"),
        (dict(template=7), f"{W}: 'template' must be a template name such as 'build_failure'"),
        (dict(subject=5), f"{W}: 'subject' must be a Jinja2 template string or None"),
        (dict(log_tail_lines=-1), f"{W}: 'log_tail_lines' must be a whole number >= 0"),
    ],
)
def test_config_error_texts(kwargs, expected):
    kwargs.setdefault("to", "d@example.org")
    assert MailRoute(name="r", **kwargs).config_errors() == [expected]


def test_default_template_is_the_packaged_failure_template():
    from buildbot_mailext.templates import TemplateSet

    route = MailRoute("d@example.org")
    assert route.template == "build_failure"
    assert TemplateSet().validate(route.template) == []


def test_zero_log_tail_lines_is_valid():
    assert MailRoute("d@example.org", log_tail_lines=0).config_errors() == []


@pytest.mark.parametrize(
    "address, valid",
    [
        ("dev@example.org", True),
        ("Dev List <dev@example.org>", True),
        ('"Doe, John" <john@example.org>', True),
        ("buildbot@localhost", True),  # accepted by stock MailNotifier; local delivery
        ("root@[127.0.0.1]", True),
        ("no-at-sign", False),
        ("two words@example.org", False),
        ("dev@example.org\nBcc: x@example.org", False),
        ("dev@exa mple.org", False),
        ("@example.org", False),
        ("dev@", False),
        (None, False),
    ],
)
def test_address_validation(address, valid):
    assert is_valid_address(address) is valid


def test_empty_to_is_fine_with_interested_users():
    assert MailRoute([], send_to_interested_users=True).config_errors() == []


def test_mode_shortcuts_match_buildbot():
    assert expand_modes("all") == ("failing", "passing", "warnings", "exception", "cancelled")
    assert expand_modes("warnings") == ("failing", "warnings")
    assert expand_modes("failing") == ("failing",)


@pytest.mark.parametrize(
    "mode, results, previous, wanted",
    [
        (("failing",), FAILURE, None, True),
        (("failing",), SUCCESS, FAILURE, False),
        (("passing",), SUCCESS, None, True),
        (("warnings",), WARNINGS, SUCCESS, True),
        (("exception",), EXCEPTION, SUCCESS, True),
        (("change",), SUCCESS, FAILURE, True),
        (("change",), SUCCESS, SUCCESS, False),
        (("problem",), FAILURE, SUCCESS, True),
        (("problem",), FAILURE, FAILURE, False),
        (("new_failure",), FAILURE, SUCCESS, True),
        (("new_failure",), FAILURE, FAILURE, False),
        (("new_failure",), FAILURE, None, True),  # first build of the branch fails
        (("new_failure",), SUCCESS, None, False),
        (("still_failing",), FAILURE, FAILURE, True),
        (("still_failing",), FAILURE, SUCCESS, False),
        (("fixed",), SUCCESS, FAILURE, True),
        (("fixed",), SUCCESS, SUCCESS, False),
        (("fixed",), FAILURE, FAILURE, False),
        (("new_failure", "fixed"), SUCCESS, FAILURE, True),
        # no previous build on the branch: nothing "changed", no "problem" began
        (("change",), SUCCESS, None, False),
        (("problem",), FAILURE, None, False),
    ],
)
def test_wanted_by_results(mode, results, previous, wanted):
    assert wanted_by_results(mode, results, previous) is wanted


def test_route_names_are_checked_after_every_configurator_ran():
    # A configurator listed after the notifier's check may add builders (Buildbot's
    # JanitorConfigurator does); run Buildbot's own configurator loop on such a list.
    from buildbot.config.master import MasterConfig
    from buildbot.interfaces import IConfigurator
    from zope.interface import implementer

    from buildbot_mailext.masterconfig import _AfterLoadCheck

    @implementer(IConfigurator)
    class AddsBuilder:
        def configure(self, config_dict):
            config_dict["builders"].append({"name": "janitor"})

    seen = []
    config_dict = {"builders": [{"name": "linux"}]}
    config_dict["configurators"] = [
        _AfterLoadCheck(seen.append), AddsBuilder(), _AfterLoadCheck(seen.append)
    ]
    MasterConfig().run_configurators("master.cfg", config_dict)
    assert [known.builders for known in seen] == [("linux", "janitor")] * 2


# --- the route's filters, applied by its generator to a finished build -------------------
#
# Buildbot's fake master and its ReporterTestMixin build: builder "Builder0", build property
# branch "refs/pull/34/merge", scheduler "checkin". The route's generator must hand each
# filter to Buildbot's own check: a filter that is dropped on the way lets every build through.


class RouteFilterTests(TestReactorMixin, ReporterTestMixin, unittest.TestCase):
    BRANCH = "refs/pull/34/merge"

    @defer.inlineCallbacks
    def setUp(self):
        self.setup_test_reactor()
        self.setup_reporter_test()
        self.master = yield fakemaster.make_master(self, wantData=True, wantDb=True, wantMq=True)
        self.build_dict = yield self.insert_build_finished(FAILURE)
        # after the builder row: Buildbot < 4.2's fake DB refuses tags of an unknown builder
        yield self.master.db.insert_test_data(
            [fakedb.Tag(id=1, name="linux"), fakedb.BuildersTags(id=1, builderid=79, tagid=1)]
        )

    @defer.inlineCallbacks
    def reported(self, **filters):
        """Does a failing-mode route with these filters report the failed build?"""
        route = MailRoute("dev@example.org", **filters)
        assert route.config_errors() == []
        generator = RouteGenerator(route, MailExtFormatter())
        reporter = mock.Mock()
        reporter.getResponsibleUsersForBuild.return_value = defer.succeed([])
        build = yield self.master.data.get(("builds", 20))
        report = yield generator.generate(
            self.master, reporter, ("builds", 20, "finished"), build
        )
        if report is not None:
            self.assertIs(report["mailext_route"], route)
            # rendered by the route's own formatter (both parts), not a stock default
            self.assertIn("Builder0", report["extra_info"]["mailext"]["text"])
        return report is not None

    @defer.inlineCallbacks
    def test_the_blamelist_hook_reads_no_build_properties_again(self):
        # issue 8: the generator keeps the build it prepared (reads.remember_build); our
        # notifier's getResponsibleUsersForBuild, given only the id, reads it from there
        from buildbot_mailext import MailExtNotifier

        paths = []
        get = self.master.data.get

        def spy(path, *args, **kwargs):
            paths.append(tuple(path))
            return get(path, *args, **kwargs)

        self.patch(self.master.data, "get", spy)
        generator = RouteGenerator(MailRoute("dev@example.org"), MailExtFormatter())
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off")
        build = yield get(("builds", 20))
        report = yield generator.generate(self.master, notifier, ("builds", 20, "finished"), build)
        self.assertIsNotNone(report)
        self.assertEqual(paths.count(("builds", 20, "properties")), 1, paths)  # getDetailsForBuild's

    @defer.inlineCallbacks
    def test_only_the_logs_of_failed_steps_are_read(self):
        # issue 8: by default (want_logs=False, as stock's formatters) the generator does
        # not list the logs of every step (two queries a step: the step, then its logs);
        # the context reads the logs of each failed step, one query, for its tail.
        from buildbot_mailext import MailExtNotifier

        yield self.master.db.insert_test_data(
            [fakedb.Step(id=500 + n, buildid=20, number=n, name=f"passing{n}", results=SUCCESS) for n in range(3)]
            + [fakedb.Log(id=600 + n, stepid=500 + n, name="stdio", slug="stdio", type="s", num_lines=0)
               for n in range(3)]
            + [fakedb.Step(id=510, buildid=20, number=7, name="compile", results=FAILURE),
               fakedb.Log(id=610, stepid=510, name="stdio", slug="stdio", type="s", num_lines=1),
               fakedb.LogChunk(logid=610, first_line=0, last_line=0, compressed=0, content="eerror: boom")])
        steps_read, logs_read = [], []
        for component, name, seen in ((self.master.db.steps, "getStep", steps_read),
                                      (self.master.db.logs, "getLogs", logs_read)):
            def spy(*args, _real=getattr(component, name), _seen=seen, **kwargs):
                _seen.append(kwargs.get("stepid", args[0] if args else None))
                return _real(*args, **kwargs)
            self.patch(component, name, spy)
        generator = RouteGenerator(MailRoute("dev@example.org"), MailExtFormatter())
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off")
        build = yield self.master.data.get(("builds", 20))
        report = yield generator.generate(self.master, notifier, ("builds", 20, "finished"), build)
        self.assertIn("error: boom", report["extra_info"]["mailext"]["text"])
        self.assertEqual((steps_read, logs_read), ([], [510]))

    @defer.inlineCallbacks
    def test_a_blamelist_that_cannot_be_read_leaves_the_mail_to_its_route(self):
        # The changes read fails (a database error): stock's mail would be lost with a
        # traceback; ours goes to the route's list without interested users, one log line
        from buildbot_mailext import MailExtNotifier, reads
        from test_context import logged_lines

        def broken(master, buildid):
            raise RuntimeError("db gone")

        self.patch(reads, "_changes_since_previous_success", broken)
        lines = logged_lines(self)
        generator = RouteGenerator(MailRoute("dev@example.org"), MailExtFormatter())
        notifier = MailExtNotifier(fromaddr="bb@example.org", preflight="off", name="mailer")
        build = yield self.master.data.get(("builds", 20))
        report = yield generator.generate(self.master, notifier, ("builds", 20, "finished"), build)
        self.assertIsNotNone(report)
        self.assertEqual(report["users"], [])
        self.assertIn("mailer: cannot read the changes or properties of build 20 (RuntimeError: db gone); "
                      "mailed without its interested users", lines)

    @defer.inlineCallbacks
    def test_branches_filter(self):
        self.assertTrue((yield self.reported(branches=[self.BRANCH])))
        self.assertTrue((yield self.reported(branches=["main", self.BRANCH])))
        self.assertFalse((yield self.reported(branches=["main", "release"])))
        self.assertTrue((yield self.reported(branches=None)))

    @defer.inlineCallbacks
    def test_tags_filter(self):
        self.assertTrue((yield self.reported(tags=["linux"])))
        self.assertTrue((yield self.reported(tags=["windows", "linux"])))
        self.assertFalse((yield self.reported(tags=["windows"])))

    @defer.inlineCallbacks
    def test_builders_filter(self):
        self.assertTrue((yield self.reported(builders=["Builder0"])))
        self.assertFalse((yield self.reported(builders=["Builder1"])))

    @defer.inlineCallbacks
    def test_schedulers_filter(self):
        self.assertTrue((yield self.reported(schedulers=["checkin"])))
        self.assertFalse((yield self.reported(schedulers=["nightly"])))


def test_every_issue9_setting_names_its_own_error_and_the_fix():
    route = MailRoute("dev@example.org", name="dev", notify_culprits="yes", exclude_recipients=["x", ""],
                      error_patterns=[1], list_id="not a list id!", reply_to="bad address", group_by="week",
                      max_mails=(True, 5))
    assert route.config_errors() == [
        "MailRoute 'dev': 'notify_culprits' must be True or False",
        "MailRoute 'dev': 'exclude_recipients' must be a list of fnmatch patterns such as ['*noreply*', "
        "'dependabot*'], got ('x', '')",
        "MailRoute 'dev': error_patterns: 1 is not a valid regular expression (first argument must be "
        "string or compiled pattern); fix or remove it",
        "MailRoute 'dev': list_id 'not a list id!' is not a list identifier; write it as 'builds.example.org' "
        "or 'Build results <builds.example.org>' (RFC 2919)",
        "MailRoute 'dev': reply_to 'bad address' is not a valid email address; write it as 'dev@example.org' "
        "or 'Developers <dev@example.org>'",
        "MailRoute 'dev': group_by 'week' is unknown; use 'build' (one mail per build) or 'buildset' (one mail "
        "when the whole buildset has finished)",
        "MailRoute 'dev': max_mails must be (count, seconds) with count >= 1 and seconds > 0, e.g. "
        "max_mails=(5, 3600), or None; got (True, 5)",
    ]


def test_good_issue9_settings_pass_and_each_bad_one_is_caught():
    good = dict(list_id="Build results <builds.example.org>", reply_to="Developers <dev@example.org>",
                max_mails=(5, 3600), exclude_recipients=["*noreply*"], group_by="buildset")
    assert MailRoute("dev@example.org", **good).config_errors() == []
    for bad in (dict(max_mails=(5, -1)), dict(exclude_recipients=[1])):
        [error] = MailRoute("dev@example.org", name="dev", **bad).config_errors()
        assert error.startswith(("MailRoute 'dev': max_mails", "MailRoute 'dev': 'exclude_recipients'")), error


def test_closest_lists_up_to_three_matches_and_twenty_known_names():
    from buildbot_mailext.routes import closest

    assert closest("linux", []) == " (this configuration defines none)"
    assert closest("linux", ["linux1", "linux2"]) == (
        "; did you mean 'linux2' or 'linux1'? (known: linux1, linux2)")
    four = ["linux1", "linux2", "linux3", "linux4"]
    assert closest("linux", four) == (
        "; did you mean 'linux4' or 'linux3' or 'linux2'? (known: linux1, linux2, linux3, linux4)")
    twenty = [f"b{i:02d}" for i in range(20)]
    assert closest("zzz", twenty) == f" (known: {', '.join(twenty)})"
    assert closest("zzz", twenty + ["b20"]) == f" (known: {', '.join(twenty)}, ...)"


@pytest.mark.parametrize("max_mails, ok", [
    (None, True), ((1, 0.5), True), ([2, 60], True), ((5, 3600), True),
    ((0, 60), False), ((5, 0), False), ((5, -1), False), ((True, 5), False), ((5.0, 60), False),
    ((5,), False), ((5, 60, 1), False), ((5, "x"), False), ("5/h", False),
])
def test_max_mails_is_a_count_of_at_least_one_and_a_positive_number_of_seconds(max_mails, ok):
    errors = MailRoute("dev@example.org", name="dev", max_mails=max_mails).config_errors()
    assert errors == ([] if ok else [
        "MailRoute 'dev': max_mails must be (count, seconds) with count >= 1 and seconds > 0, e.g. "
        f"max_mails=(5, 3600), or None; got {tuple(max_mails) if isinstance(max_mails, list) else max_mails!r}"])


def test_issue9_settings_are_kept_as_given_and_a_lone_pattern_is_one_pattern():
    route = MailRoute("dev@example.org")
    assert (route.notify_culprits, route.exclude_recipients, route.error_patterns, route.list_id,
            route.reply_to, route.max_mails) == (False, (), None, None, None, None)
    route = MailRoute("dev@example.org", exclude_recipients="*noreply*", error_patterns=r"^error:",
                      list_id="builds.example.org", reply_to="dev@example.org", max_mails=[5, 3600])
    assert (route.exclude_recipients, route.error_patterns, route.list_id, route.reply_to, route.max_mails) == (
        ("*noreply*",), (r"^error:",), "builds.example.org", "dev@example.org", (5, 3600))
    route = MailRoute("dev@example.org", exclude_recipients=["a*", "b*"], error_patterns=["x", "y"])
    assert (tuple(route.exclude_recipients), tuple(route.error_patterns)) == (("a*", "b*"), ("x", "y"))


@pytest.mark.parametrize("value, header", [
    ("builds.example.org", "<builds.example.org>"),
    ("<builds.example.org>", "<builds.example.org>"),
    ("  Build results  <builds.example.org> ", "Build results <builds.example.org>"),
    ('Say "hi" <builds.example.org>', None),
    ("Build\r\nBcc: x <builds.example.org>", None),
    ("builds.example.org\x7f", None),
    ("not a list id!", None),
    (5, None),
])
def test_list_id_header_value(value, header):
    from buildbot_mailext.routes import list_id_header

    assert list_id_header(value) == header


def test_excluded_matches_the_whole_text_or_the_bare_address_case_insensitively():
    from buildbot_mailext.routes import excluded

    assert excluded("Dependabot <dependabot@GitHub.com>", ["dependabot*"])
    assert excluded("Bot <NoReply@example.org>", ["*noreply*"])
    assert excluded("noreply@example.org", ["NOREPLY@*"])
    assert excluded("Bot <noreply@example.org>", ["NoReply@*"])  # the bare address only
    assert excluded("Build Bot <x@example.org>", ["BUILD BOT *"])  # the whole text only
    assert not excluded("Dev <dev@example.org>", ["*noreply*", "dependabot*"])
    assert not excluded("dev@example.org", [])
