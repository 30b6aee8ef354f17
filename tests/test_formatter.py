"""Tests of buildbot_mailext.formatter.MailExtFormatter inside stock Buildbot generators."""

from __future__ import annotations

import os
import shutil
import tempfile

import mock
from twisted.internet import defer
from twisted.python import log
from twisted.trial import unittest

from buildbot import config
from buildbot.config.errors import capture_config_errors
from buildbot.process.results import FAILURE
from buildbot.process.results import SUCCESS
from buildbot.reporters import utils
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.generators.buildset import BuildSetCombinedStatusGenerator
from buildbot.reporters.generators.worker import WorkerMissingGenerator
from buildbot.test import fakedb
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin

from fakedb_compat import patch_changes_for_build
from buildbot_mailext.formatter import MailExtFormatter


def tempdir(testcase):
    # not trial's mktemp(): under pytest it would create folders in the current directory
    path = tempfile.mkdtemp(prefix="mailext-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def write(directory, name, text):
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        f.write(text)


class FormatterTestBase(TestReactorMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.setup_test_reactor()
        self.master = yield fakemaster.make_master(self, wantData=True, wantDb=True, wantMq=True)
        patch_changes_for_build(self, self.master)
        self.reporter = mock.Mock()
        self.reporter.getResponsibleUsersForBuild.side_effect = (
            lambda master, buildid: defer.succeed(["jane@example.org"])
        )

    @defer.inlineCallbacks
    def insert_build(self, results=FAILURE, branch="main", log_lines=None, comments="fix it"):
        if log_lines is None:
            log_lines = ["ocompiling", "eerror: <script>alert('log')</script>",
                         "hprogram finished with exit code 2"]
        yield self.master.db.insert_test_data([
            fakedb.Master(id=92),
            fakedb.Worker(id=13, name="wrk"),
            fakedb.Builder(id=79, name="linux"),
            fakedb.Buildset(id=98, results=results, reason="because"),
            fakedb.SourceStamp(id=234, branch=branch, revision="abc123", project="proj"),
            fakedb.BuildsetSourceStamp(buildsetid=98, sourcestampid=234),
            fakedb.BuildRequest(id=11, buildsetid=98, builderid=79),
            fakedb.Build(id=20, number=3, builderid=79, buildrequestid=11, workerid=13, masterid=92,
                         results=results, state_string="failed compile",
                         started_at=10000001, complete_at=10000005),
            fakedb.Step(id=50, buildid=20, number=0, name="compile", results=results),
            fakedb.Log(id=60, stepid=50, name="stdio", slug="stdio", type="s",
                       num_lines=len(log_lines)),
            fakedb.LogChunk(logid=60, first_line=0, last_line=len(log_lines) - 1,
                            content="\n".join(log_lines)),
            fakedb.BuildProperty(buildid=20, name="branch", value=branch),
            fakedb.BuildProperty(buildid=20, name="workername", value="wrk"),
            fakedb.Change(changeid=13, branch=branch, revision="abc123", author="jane@example.org",
                          comments=comments, sourcestampid=234),
        ])
        build = yield self.master.data.get(("builds", 20))
        return build

    @defer.inlineCallbacks
    def generate(self, formatter, build, mode=("failing",)):
        gen = BuildStatusGenerator(mode=mode, message_formatter=formatter)
        report = yield gen.generate(self.master, self.reporter, ("builds", 20, "finished"), build)
        return report


class InStockGeneratorTests(FormatterTestBase):
    @defer.inlineCallbacks
    def test_build_status_generator_gets_html_body(self):
        build = yield self.insert_build()
        report = yield self.generate(MailExtFormatter(), build)
        self.assertEqual(report["type"], "html")
        self.assertIn("<!DOCTYPE html>", report["body"])
        self.assertIn('<a href="http://localhost:8080/#/builders/79/builds/3">linux #3</a>',
                      report["body"])
        self.assertEqual(report["subject"], "[Buildbot] first build: linux #3 (main) - failed compile")
        self.assertEqual(report["users"], ["jane@example.org"])
        mailext = report["extra_info"]["mailext"]
        self.assertEqual(mailext["template"], "build_failure")
        self.assertIsNone(mailext["template_error"])
        self.assertEqual(mailext["html"], report["body"])
        self.assertIn("linux #3 FAILURE", mailext["text"])
        self.assertIn("    | error: <script>alert('log')</script>", mailext["text"])
        # escaped in the HTML part, both the log line and ...
        self.assertNotIn("<script>", report["body"])
        self.assertIn("error: &lt;script&gt;alert(&#39;log&#39;)&lt;/script&gt;", report["body"])
        self.assertIn("Blamelist: jane@example.org", mailext["text"])

    @defer.inlineCallbacks
    def test_commit_comment_escaped(self):
        build = yield self.insert_build(comments="<script>alert('commit')</script>")
        report = yield self.generate(MailExtFormatter(template="build_summary"), build)
        self.assertNotIn("<script>", report["body"])
        self.assertIn("&lt;script&gt;alert(&#39;commit&#39;)&lt;/script&gt;", report["body"])
        self.assertIn("<script>alert('commit')</script>", report["extra_info"]["mailext"]["text"])

    @defer.inlineCallbacks
    def test_crlf_branch_stays_out_of_subject(self):
        build = yield self.insert_build(branch="main\r\nBcc: victim@example.org")
        report = yield self.generate(MailExtFormatter(), build)
        self.assertNotIn("\n", report["subject"])
        self.assertNotIn("\r", report["subject"])
        self.assertEqual(report["subject"],
                         "[Buildbot] first build: linux #3 (main Bcc: victim@example.org) - failed compile")

    @defer.inlineCallbacks
    def test_generator_filters_by_mode_before_formatting(self):
        build = yield self.insert_build(results=SUCCESS)
        report = yield self.generate(MailExtFormatter(), build, mode=("failing",))
        self.assertIsNone(report)
        build = yield self.master.data.get(("builds", 20))
        report = yield self.generate(MailExtFormatter(template="build_summary"), build,
                                     mode=("passing",))
        self.assertEqual(report["subject"], "[Buildbot] linux #3 success (main): first build")

    @defer.inlineCallbacks
    def test_buildset_combined_generator(self):
        yield self.insert_build()
        gen = BuildSetCombinedStatusGenerator(message_formatter=MailExtFormatter())
        report = yield gen.generate(self.master, self.reporter, ("buildsets", 98, "complete"),
                                    {"bsid": 98})
        self.assertEqual(report["type"], "html")
        self.assertIn("linux #3", report["subject"])
        self.assertIn("Failed steps", report["extra_info"]["mailext"]["text"])

    @defer.inlineCallbacks
    def test_worker_missing_generator(self):
        gen = WorkerMissingGenerator(message_formatter=MailExtFormatter())
        worker = {"name": "wrk<1>", "workerid": 13, "notify": ["admin@example.org"],
                  "workerinfo": {"admin": "Admin <admin@example.org>"},
                  "last_connection": "yesterday"}
        report = yield gen.generate(self.master, self.reporter, ("workers", 13, "missing"), worker)
        self.assertEqual(report["subject"], "[Buildbot] worker wrk<1> is missing")
        self.assertEqual(report["type"], "html")
        body = report["body"].decode("utf-8")  # the stock generator encodes the body
        self.assertIn("Worker <a href=\"http://localhost:8080/#/workers\">wrk&lt;1&gt;</a> is missing",
                      body)
        self.assertIn("Admin &lt;admin@example.org&gt;", body)

    @defer.inlineCallbacks
    def test_format_message_for_worker_returns_both_parts(self):
        f = MailExtFormatter()
        msg = yield f.formatMessageForMissingWorker(
            self.master, {"name": "w1", "notify": [], "workerinfo": {}, "last_connection": None})
        self.assertEqual(msg["extra_info"]["mailext"]["template"], "worker_missing")
        self.assertIn("Last connection: (unknown)", msg["extra_info"]["mailext"]["text"])


class FallbackTests(FormatterTestBase):
    @defer.inlineCallbacks
    def test_custom_template_failing_at_send_time_falls_back(self):
        tdir = tempdir(self)
        # passes validation (the sample context has a 'scheduler' property) but this build has none
        write(tdir, "build_failure.txt.j2",
              '{% extends "builtin/build_failure.txt.j2" %}'
              "{% block footer %}{{ properties.scheduler }}{% endblock %}")
        formatter = MailExtFormatter(templates_dir=tdir)
        observed = []
        log.addObserver(observed.append)
        self.addCleanup(log.removeObserver, observed.append)

        build = yield self.insert_build()
        report = yield self.generate(formatter, build)

        mailext = report["extra_info"]["mailext"]
        self.assertEqual(mailext["template"], "build_failure")
        self.assertIn("scheduler", mailext["template_error"])
        self.assertIn("the custom mail template failed", mailext["text"])
        self.assertIn("'scheduler'", mailext["text"])
        self.assertIn("The custom mail template failed", report["body"])
        self.assertIn("Failed steps", mailext["text"])  # the packaged template did the rest
        lines = [" ".join(str(m) for m in e.get("message", ())) for e in observed]
        fallback_lines = [l for l in lines if "buildbot-mailext: template 'build_failure'" in l]
        self.assertEqual(len(fallback_lines), 1, lines)
        self.assertIn("sending the packaged template 'build_failure' instead", fallback_lines[0])

    @defer.inlineCallbacks
    def test_custom_name_falls_back_to_kind_default(self):
        tdir = tempdir(self)
        write(tdir, "mine.subject.j2", "{{ properties.scheduler }}")
        write(tdir, "mine.txt.j2", "x")
        write(tdir, "mine.html.j2", "x")
        formatter = MailExtFormatter(template="mine", templates_dir=tdir)
        build = yield self.insert_build()
        report = yield self.generate(formatter, build)
        self.assertEqual(report["extra_info"]["mailext"]["template"], "build_failure")
        self.assertTrue(report["subject"].startswith("[Buildbot] first build: linux #3"))


class ConfigTests(unittest.TestCase):
    def test_unknown_template_is_a_config_error(self):
        with self.assertRaises(config.ConfigErrors) as cm:
            MailExtFormatter(template="no_such_template")
        self.assertIn("unknown template 'no_such_template'", str(cm.exception))

    def test_errors_are_collected_during_config_load(self):
        tdir = tempdir(self)
        write(tdir, "build_failure.subject.j2", "{{ oops }}")
        with capture_config_errors() as errors:
            MailExtFormatter(templates_dir=tdir)
        self.assertEqual(len(errors.errors), 1)
        self.assertIn("'oops' is undefined", errors.errors[0])
        self.assertIn("build_failure.subject.j2:1", errors.errors[0])

    def test_broken_worker_override_is_reported_too(self):
        tdir = tempdir(self)
        write(tdir, "worker_missing.txt.j2", "{% if %}")
        with self.assertRaises(config.ConfigErrors) as cm:
            MailExtFormatter(templates_dir=tdir)
        self.assertIn("worker_missing.txt.j2:1: Jinja2 syntax error", str(cm.exception))

    def test_extra_ctx_counts_for_validation(self):
        tdir = tempdir(self)
        write(tdir, "build_failure.subject.j2", "{{ team }}: {{ buildername }}")
        MailExtFormatter(templates_dir=tdir, ctx={"team": "core"})  # must not raise
        with self.assertRaises(config.ConfigErrors):
            MailExtFormatter(templates_dir=tdir)

    def test_compare_attrs(self):
        self.assertEqual(MailExtFormatter(), MailExtFormatter())
        self.assertEqual(MailExtFormatter(template="build_summary", log_tail_lines=10),
                         MailExtFormatter(template="build_summary", log_tail_lines=10))
        self.assertNotEqual(MailExtFormatter(), MailExtFormatter(template="build_summary"))
        self.assertNotEqual(MailExtFormatter(), MailExtFormatter(log_tail_lines=5))
        self.assertNotEqual(MailExtFormatter(), MailExtFormatter(want_logs_content=True))

    def test_negative_log_tail_lines(self):
        with self.assertRaises(config.ConfigErrors):
            MailExtFormatter(log_tail_lines=-1)


class ContextVarsTests(FormatterTestBase):
    @defer.inlineCallbacks
    def test_log_tail_lines_is_used(self):
        build = yield self.insert_build(log_lines=[f"oline {i}" for i in range(100)])
        formatter = MailExtFormatter(log_tail_lines=3)
        yield utils.getDetailsForBuild(self.master, build, want_properties=True, want_steps=True,
                                       want_previous_build=True, want_logs=True)
        msg = yield formatter.format_message_for_build(self.master, build, users=[], mode=("failing",))
        text = msg["extra_info"]["mailext"]["text"]
        self.assertIn("Last 3 of 100 lines", text)
        self.assertIn("| line 99", text)
        self.assertNotIn("| line 96", text)


class SubjectOverrideTests(FormatterTestBase):
    """MailExtFormatter(subject=...) (used by MailRoute(subject=...)) replaces NAME.subject.j2."""

    @defer.inlineCallbacks
    def test_inline_subject_replaces_file_subject_and_is_one_line(self):
        build = yield self.insert_build(branch="rel\r\n1")
        formatter = MailExtFormatter(subject="[{{ project }}]\n{{ buildername }} {{ branch }} {{ result }}")
        report = yield self.generate(formatter, build)
        self.assertEqual(report["subject"], "[proj] linux rel 1 failure")
        self.assertEqual(report["extra_info"]["mailext"]["subject"], report["subject"])

    def test_inline_subject_validated_at_config_time(self):
        with self.assertRaises(config.ConfigErrors) as cm:
            MailExtFormatter(subject="{{ buildnmae }}")
        self.assertIn("'buildnmae' is undefined", str(cm.exception))
        with self.assertRaises(config.ConfigErrors) as cm:
            MailExtFormatter(subject="{{ buildername ")
        self.assertIn("syntax error", str(cm.exception))

    def test_subject_is_part_of_compare_attrs(self):
        self.assertNotEqual(MailExtFormatter(), MailExtFormatter(subject="{{ result }}"))
        self.assertEqual(MailExtFormatter(subject="{{ result }}"), MailExtFormatter(subject="{{ result }}"))
