"""The notifier's issue-9 paths on Buildbot's fake master: stock hooks (a subclass that
overrides ``createEmail``/``processRecipients`` keeps working), exclude_recipients,
notify_culprits through ``lookup``, list and thread headers, and the max_mails digest
across a reconfig.

The stock-hook tests follow the scenarios of Buildbot's own
``master/buildbot/test/unit/reporters/test_mail.py`` (``TestMailNotifier.test_buildMessage``
and the ``sendToInterestedUsers`` cases; Buildbot, GPLv2, Copyright Buildbot Team Members),
rewritten for ``MailExtNotifier``. The transport is the recorder of test_notifier.py (a
fake reactor opens no sockets); what reaches a real SMTP server is covered end to end in
tests/e2e/test_culprits_threads.py.
"""

from __future__ import annotations

from unittest.mock import Mock

from buildbot.process.results import FAILURE, SUCCESS
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.message import MessageFormatter
from buildbot.test import fakedb
from twisted.internet import defer
from twisted.trial import unittest

from buildbot_mailext import MailExtNotifier, MailRoute
from buildbot_mailext.threads import thread_root_id

from test_notifier import NotifierMixin, RecordingTransport


def stub_formatter():
    formatter = Mock(spec=MessageFormatter)
    formatter.format_message_for_build.return_value = {
        "body": "body", "type": "text", "subject": "subject", "extra_info": None,
    }
    formatter.want_properties = False
    formatter.want_steps = False
    formatter.want_logs = False
    formatter.want_logs_content = False
    return formatter


class StockHookTests(NotifierMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_build_message_goes_through_every_stock_hook(self):
        # Buildbot's TestMailNotifier.test_buildMessage, with MailExtNotifier
        build = yield self.insert_build_finished(SUCCESS)
        formatter = stub_formatter()
        notifier = yield self.make_notifier(
            fromaddr="from@example.org",
            generators=[BuildStatusGenerator(message_formatter=formatter, mode=("passing",))],
        )
        notifier.findInterrestedUsersEmails = Mock(spec=notifier.findInterrestedUsersEmails)
        notifier.findInterrestedUsersEmails.return_value = "<recipients>"
        notifier.processRecipients = Mock(spec=notifier.processRecipients)
        notifier.processRecipients.return_value = "<processedrecipients>"
        notifier.createEmail = Mock(spec=notifier.createEmail)
        notifier.createEmail.return_value = "<email>"
        notifier.sendMail = Mock(spec=notifier.sendMail)
        yield notifier._got_event(("builds", 10, "finished"), build)

        formatter.format_message_for_build.assert_called_with(
            self.master, build, is_buildset=False, mode=("passing",), users=["me@foo"])
        notifier.findInterrestedUsersEmails.assert_called_with(["me@foo"])
        notifier.processRecipients.assert_called_with("<recipients>", "<email>")
        notifier.sendMail.assert_called_with("<email>", "<processedrecipients>")
        self.assertEqual(notifier.createEmail.call_count, 1)

    @defer.inlineCallbacks
    def check_interested(self, exp_recipients, exp_to, exp_cc=None, **kwargs):
        # Buildbot's do_test_sendToInterestedUsers: a plain dict as the message
        notifier = yield self.make_notifier(fromaddr="from@example.org", **kwargs)
        recipients = yield notifier.findInterrestedUsersEmails(
            ["Big Bob <bob@mayhem.net>", "narrator"])
        m = {"To": None, "CC": None}
        self.assertEqual(sorted(notifier.processRecipients(recipients, m)), sorted(exp_recipients))
        self.assertEqual((m["To"], m["CC"]), (exp_to, exp_cc))

    def test_interested_users_lookup(self):
        return self.check_interested(
            ["Big Bob <bob@mayhem.net>", "narrator@example.org"],
            '"=?utf-8?q?Big_Bob?=" <bob@mayhem.net>, narrator@example.org',
            lookup="example.org")

    def test_interested_users_extra_recipients_in_cc(self):
        return self.check_interested(
            ["Big Bob <bob@mayhem.net>", "marla@mayhem.net"],
            '"=?utf-8?q?Big_Bob?=" <bob@mayhem.net>', "marla@mayhem.net",
            extraRecipients=["marla@mayhem.net"])

    def test_interested_users_off(self):
        return self.check_interested(
            ["marla@mayhem.net"], "marla@mayhem.net",
            extraRecipients=["marla@mayhem.net"], sendToInterestedUsers=False)

    @defer.inlineCallbacks
    def test_create_email_renders_extra_headers_for_one_build(self):
        # Buildbot's test_createEmail_extraHeaders_one_build / _two_builds
        from buildbot.process.properties import Property

        build = yield self.insert_build_finished(SUCCESS)
        build["properties"]["hhh"] = ("vvv", "fake")
        notifier = yield self.make_notifier(extraHeaders={"hhh": Property("hhh")})
        msgdict = {"body": "Unicode body (\u00e5\u00e4\u00f6).", "subject": "s",
                   "type": "plain", "extra_info": None}
        m = yield notifier.createEmail(msgdict, "project-n\u00e5me", SUCCESS, [build])
        self.assertIn("hhh: vvv", m.as_string())
        self.assertIn("\u00e5\u00e4\u00f6", m.get_content())
        two = yield notifier.createEmail(msgdict, "p", SUCCESS, [build, dict(build)])
        self.assertNotIn("hhh: vvv", two.as_string())  # not rendered for several builds

    @defer.inlineCallbacks
    def test_create_email_attaches_patches_and_logs(self):
        # Buildbot's test_createEmail_message_with_patch_and_log_containing_unicode
        build = yield self.insert_build_finished(SUCCESS)
        notifier = yield self.make_notifier()
        logs = [{"stepname": "fakestep", "name": "stdio",
                 "content": {"content": "Unicode log \u00e9"}}]
        m = yield notifier.createEmail(
            {"body": "b", "subject": "s", "type": "plain"}, "p", SUCCESS, [build],
            [{"body": "\u00e5\u00e4\u00f6"}], logs)
        names = [part.get_filename() for part in m.iter_attachments()]
        self.assertEqual(names, ["source patch 0", "fakestep.stdio"])
        log_part = list(m.iter_attachments())[1]
        self.assertEqual(log_part.get_content_charset(), "utf-8")
        self.assertEqual(log_part.get_content(), "Unicode log \u00e9")

    @defer.inlineCallbacks
    def test_subclass_hooks_shape_the_sent_mail(self):
        class SiteNotifier(MailExtNotifier):
            def createEmail(self, msgdict, title, results, builds=None, patches=None, logs=None):
                d = super().createEmail(msgdict, title, results, builds, patches, logs)

                def tag(m):
                    m["X-Site"] = "tagged"
                    return m
                return d.addCallback(tag)

            def processRecipients(self, recipients, m):
                addresses = super().processRecipients(recipients, m)
                return addresses + ["audit@example.org"]

        self.patch(__import__("test_notifier"), "MailExtNotifier", SiteNotifier)
        notifier = yield self.make_notifier(
            extraRecipients=["ops@example.org"],
            generators=[BuildStatusGenerator(mode=("failing",))],
        )
        self.assertIsInstance(notifier, SiteNotifier)
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        self.assertEqual(sent["msg"]["X-Site"], "tagged")
        # me@foo: the build's interested user (the address gate accepts dotless domains)
        self.assertEqual(sent["to"], ["me@foo", "ops@example.org", "audit@example.org"])


class RecipientTests(NotifierMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def add_change(self, author, owner=None):
        rows = [fakedb.Change(changeid=900, author=author, comments="c", branch="master",
                              revision="r9", sourcestampid=234)]
        if owner:
            rows.append(fakedb.BuildProperty(buildid=20, name="owner", value=owner))
        yield self.master.db.insert_test_data(rows)

    @defer.inlineCallbacks
    def test_default_exclusions_keep_bots_out_of_stock_mail(self):
        notifier = yield self.make_notifier(
            extraRecipients=["ops@example.org"],
            generators=[BuildStatusGenerator(mode=("failing",))])
        yield self.master.db.insert_test_data([
            fakedb.BuildProperty(buildid=20, name="owner",
                                 value="dependabot[bot] <noreply@github.com>")])
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        self.assertEqual(sent["to"], ["me@foo", "ops@example.org"])
        self.assertNotIn("noreply", str(sent["msg"]["To"]) + str(sent["msg"]["Cc"]))

    @defer.inlineCallbacks
    def test_route_exclusions_and_notify_culprits_through_lookup(self):
        notifier = yield self.make_notifier(
            lookup="example.org",
            exclude_recipients=[],
            routes=[MailRoute("dev@example.org", notify_culprits=True,
                              exclude_recipients=["ghost*"])],
        )
        yield self.add_change("jane", owner="ghost@example.org")
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        # the culprit "jane" is looked up; the requester is excluded by the route
        self.assertIn("jane@example.org", sent["to"])
        self.assertNotIn("ghost@example.org", sent["to"])
        self.assertEqual(sent["to"][0], "dev@example.org")

    @defer.inlineCallbacks
    def test_list_and_thread_headers(self):
        notifier = yield self.make_notifier(
            fromaddr="CI <ci@builds.example.org>",
            routes=[MailRoute("dev@example.org", list_id="ci.example.org",
                              reply_to="Developers <dev@example.org>")],
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        msg, raw = sent["msg"], sent["raw"]
        self.assertEqual(msg["List-Id"], "<ci.example.org>")
        self.assertEqual(msg["X-Auto-Response-Suppress"], "All")
        # the branch property of ReporterTestMixin's build
        root = thread_root_id("Builder0", "refs/pull/34/merge", "ci@builds.example.org")
        self.assertEqual(msg["In-Reply-To"], root)
        self.assertEqual(msg["References"], root)
        self.assertTrue(root.endswith("@builds.example.org>"))
        self.assertEqual(msg["Reply-To"], "Developers <dev@example.org>")
        self.assertNotIn(b"\r\nBcc:", raw.split(b"\r\n\r\n")[0])

    def test_hostile_list_headers_are_config_errors(self):
        errors = MailRoute("dev@example.org", list_id="a.b\r\nBcc: x",
                           reply_to="Dev\r\nBcc: x@example.org <dev@example.org>").config_errors()
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("list_id", errors[0])
        self.assertIn("reply_to", errors[1])

    def test_thread_root_is_stable_per_builder_and_branch(self):
        a = thread_root_id("b", "main", "x@example.org")
        self.assertEqual(a, thread_root_id("b", "main", "Other <x@example.org>"))
        self.assertNotEqual(a, thread_root_id("b", "dev", "x@example.org"))
        self.assertNotEqual(a, thread_root_id("c", "main", "x@example.org"))
        self.assertNotIn("\n", thread_root_id("b\r\nBcc: y", "m\n", "x@example.org"))


class DigestTests(NotifierMixin, unittest.TestCase):
    def config(self, to="dev@example.org"):
        return dict(
            fromaddr="buildbot@example.org", preflight="off",
            routes=[MailRoute(to, name="flood", mode=("failing", "fixed"), max_mails=(1, 60))],
        )

    def test_broken_custom_digest_template_is_a_config_error(self):
        import os
        import tempfile

        from buildbot.config.errors import ConfigErrors, capture_config_errors

        with tempfile.TemporaryDirectory() as folder:
            for part, text in (("subject", "{{ nope }}"), ("txt", "t"), ("html", "h")):
                with open(os.path.join(folder, f"digest.{part}.j2"), "w") as f:
                    f.write(text)
            with self.assertRaises(ConfigErrors) as caught:
                with capture_config_errors(raise_on_error=True):
                    MailExtNotifier(templates_dir=folder, **self.config())
        self.assertIn("template 'digest'", "\n".join(caught.exception.errors))
        self.assertIn("'nope' is undefined", "\n".join(caught.exception.errors))

    @defer.inlineCallbacks
    def test_digest_survives_a_reconfig_that_replaces_the_notifier(self):
        old = yield self.make_notifier(**self.config())
        build = yield self.finish_build(old, FAILURE)
        # The same build event again stands in for a second build over the budget: held.
        # The claim (one mail per event across masters, tested in test_outbox.py) would
        # rightly drop a repeated event, so this test lets every event through.
        old._claim = lambda what, reports: defer.succeed(True)
        yield old._got_event(("builds", 20, "finished"), build)
        self.assertEqual(len(self.transport.sent), 1)
        # a reconfig with another recipient: another name, so another notifier object
        new = MailExtNotifier(**self.config(to="team@example.org"))
        self.assertNotEqual(new.name, old.name)
        yield old.disownServiceParent()
        yield new.setServiceParent(self.master)
        yield new.startService()
        self.addCleanup(new.stopService)
        new.transport.stop()
        new.transport = new.outbox.transport = RecordingTransport()
        self.reactor.advance(61)
        for _ in range(5):  # the outbox stores the mail, then makes its first attempt
            self.reactor.advance(1)
        (digest,) = new.transport.sent
        self.assertIn("digest: 1 build held by route flood", digest["msg"]["Subject"])
        self.assertIn("Builder0 #0: FAILURE", digest["msg"].get_body(("plain",)).get_content())
        self.assertEqual(digest["to"], ["dev@example.org"])  # who the held mail was for
        self.assertEqual(len(self.transport.sent), 1)  # the old notifier sent nothing more
