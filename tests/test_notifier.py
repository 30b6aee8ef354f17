"""The notifier's decisions (buildbot_mailext.notifier) on Buildbot's fake master.

What reaches a real SMTP server is proven in test_transport.py and the end-to-end tests;
here the transport is replaced by a recorder (a fake reactor cannot open sockets) so the
tests can look at exactly what the notifier hands over: which mails, to whom, with which
bytes.
"""

import email
from email import policy

from buildbot.config.errors import ConfigErrors, capture_config_errors
from buildbot.process.results import FAILURE, SUCCESS
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.mail import MailNotifier
from buildbot.reporters.message import MessageFormatter
from buildbot.test.fake import fakemaster
from buildbot.test.reactor import TestReactorMixin
from buildbot.test.util.reporter import ReporterTestMixin
from twisted.internet import defer
from twisted.trial import unittest

from buildbot_mailext import MailExtNotifier, MailRoute
from buildbot_mailext.transport import Delivery


class RecordingTransport:
    """Stands in for MailTransport: records what the notifier's outbox asks it to send, and
    answers each attempt with a Delivery that says every recipient accepted it."""

    def __init__(self):
        self.sent = []
        self.settings = None

    def send(self, envelope_from, recipients, message, label):
        self.sent.append(
            {
                "from": envelope_from,
                "to": list(recipients),
                "msg": email.message_from_bytes(message, policy=policy.default),
                "raw": message,
                "label": label,
            }
        )
        return defer.succeed(Delivery(label, "recorder", accepted=list(recipients), reply="250 recorded"))

    def stop(self):
        return defer.succeed(None)


class NotifierMixin(TestReactorMixin, ReporterTestMixin):
    """A fake master and a notifier whose transport records (shared with other test
    modules; holds no tests of its own)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.setup_test_reactor()
        self.setup_reporter_test()
        self.master = yield fakemaster.make_master(
            self, wantData=True, wantDb=True, wantMq=True
        )

    @defer.inlineCallbacks
    def make_notifier(self, **kwargs):
        kwargs.setdefault("fromaddr", "Buildbot <buildbot@example.org>")
        kwargs.setdefault("preflight", "off")
        notifier = MailExtNotifier(**kwargs)
        yield notifier.setServiceParent(self.master)
        yield notifier.startService()
        self.addCleanup(notifier.stopService)
        self.smtp_settings = notifier.transport.settings  # what the real transport was given
        notifier.transport.stop()
        self.transport = notifier.transport = notifier.outbox.transport = RecordingTransport()
        return notifier

    def log_lines(self):
        from twisted.python import log

        lines = []
        observer = lambda event: lines.append(log.textFromEventDict(event) or "")  # noqa: E731
        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)
        return lines

    @defer.inlineCallbacks
    def finish_build(self, notifier, results, extra_rows=()):
        build = yield self.insert_build_finished(results)
        if extra_rows:
            # After the build's own rows: Buildbot < 4.2's fake DB refuses a property of a
            # build it does not know yet.
            yield self.master.db.insert_test_data(list(extra_rows))
        yield notifier._got_event(("builds", 20, "finished"), build)
        return build


class NotifierTestCase(NotifierMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_each_matching_route_sends_its_own_mail(self):
        notifier = yield self.make_notifier(
            routes=[
                MailRoute("dev-list@example.org", builders=["Builder0"]),
                MailRoute(["qa@example.org", "lead@example.org"], builders=["Builder0"]),
                MailRoute("docs@example.org", builders=["Builder1"]),
            ]
        )
        yield self.finish_build(notifier, FAILURE)
        recipients = sorted(tuple(s["to"]) for s in self.transport.sent)
        self.assertEqual(
            recipients, [("dev-list@example.org",), ("qa@example.org", "lead@example.org")]
        )
        for sent in self.transport.sent:
            msg = sent["msg"]
            self.assertEqual(sent["from"], "buildbot@example.org")
            self.assertEqual(msg.get_content_type(), "multipart/alternative")
            self.assertEqual(msg["X-Buildbot-Builder"], "Builder0")
            self.assertEqual(msg["X-Buildbot-Result"], "failure")
            self.assertIn("#/builders/79/builds/0", msg["X-Buildbot-URL"])
            self.assertEqual(msg["Auto-Submitted"], "auto-generated")
            self.assertIsNotNone(msg.get_body(("plain",)))
            self.assertIsNotNone(msg.get_body(("html",)))
            self.assertIn("Builder0", sent["label"])

    @defer.inlineCallbacks
    def test_route_adds_interested_users_when_asked(self):
        from buildbot.test import fakedb

        notifier = yield self.make_notifier(
            routes=[
                MailRoute("dev@example.org", send_to_interested_users=True, name="with-users"),
                MailRoute("ops@example.org", name="list-only"),
            ],
            sendToInterestedUsers=False,  # notifier-wide flag: routes decide for themselves
        )
        owner = fakedb.BuildProperty(buildid=20, name="owner", value="Owner <owner@example.org>")
        yield self.finish_build(notifier, FAILURE, extra_rows=[owner])
        by_route = {s["label"].split("'")[1]: s for s in self.transport.sent}
        # me@foo is the change's author: one address for the gate (dotless domains are
        # fine, as for fromaddr), though stock's looser VALID_EMAIL would have skipped it.
        self.assertEqual(
            by_route["with-users"]["to"], ["dev@example.org", "owner@example.org", "me@foo"]
        )
        self.assertEqual(by_route["list-only"]["to"], ["ops@example.org"])
        self.assertIn("owner@example.org", by_route["with-users"]["msg"]["To"])

    @defer.inlineCallbacks
    def test_reconfig_with_same_config_keeps_name_and_pending_mail(self):
        def config():
            return dict(
                fromaddr="buildbot@example.org",
                preflight="off",
                routes=[MailRoute("dev@example.org", builders=["Builder0"])],
            )

        notifier = MailExtNotifier(**config())
        yield notifier.setServiceParent(self.master)
        yield notifier.startService()
        transport, outbox = notifier.transport, notifier.outbox
        sibling = MailExtNotifier(**config())
        self.assertEqual(sibling.name, notifier.name)
        yield notifier.reconfigServiceWithSibling(sibling)
        self.assertIs(notifier.transport, transport)  # one transport across reconfig: its settings change
        self.assertIs(notifier.outbox, outbox)  # and one outbox: queued mail stays where it is
        yield notifier.stopService()

    def test_relay_settings_do_not_change_the_derived_name(self):
        # The outbox files queued mail under the name: a relay change + reconfig must find it.
        def make(**relay):
            return MailExtNotifier(
                "buildbot@example.org", routes=[MailRoute("a@example.org")], preflight="off", **relay
            ).name

        self.assertEqual(make(relayhost="old.example.org"), make(relayhost="[127.0.0.1]:2525", useTls=True))

    @defer.inlineCallbacks
    def test_passing_build_sends_nothing_in_mode_failing(self):
        notifier = yield self.make_notifier(routes=[MailRoute("dev@example.org")])
        yield self.finish_build(notifier, SUCCESS)
        self.assertEqual(self.transport.sent, [])

    @defer.inlineCallbacks
    def test_route_subject_override(self):
        notifier = yield self.make_notifier(
            routes=[MailRoute("dev@example.org", subject="[{{ buildername }}] {{ result }}")]
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        self.assertEqual(sent["msg"]["Subject"], "[Builder0] failure")

    @defer.inlineCallbacks
    def test_no_routes_no_generators_mails_like_stock(self):
        # Stock defaults: failing, passing and warnings builds are mailed to the
        # interested users and extraRecipients.
        notifier = yield self.make_notifier(extraRecipients=["ops@example.org"])
        yield self.finish_build(notifier, SUCCESS)
        (sent,) = self.transport.sent
        # The change's author me@foo is interested (To); the extras are copied (Cc).
        self.assertEqual(sent["to"], ["me@foo", "ops@example.org"])
        self.assertEqual(sent["msg"]["To"], "me@foo")
        self.assertEqual(sent["msg"]["Cc"], "ops@example.org")
        self.assertIsNotNone(sent["msg"].get_body(("plain",)))

    def worker_missing_event(self, notifier):
        worker = {
            "name": "linux-worker",
            "workerid": 3,
            "notify": ["admin@example.org"],
            "workerinfo": {"admin": "Admin <admin@example.org>", "host": "ci-3"},
            "last_connection": "Tue, 25 Nov 2025 17:02:11 UTC",
        }
        return notifier._got_event(("workers", 3, "missing"), worker)

    @defer.inlineCallbacks
    def test_routes_keep_stock_worker_missing_mail(self):
        notifier = yield self.make_notifier(
            routes=[MailRoute("dev-list@example.org", builders=["Builder0"])]
        )
        yield self.worker_missing_event(notifier)
        (sent,) = self.transport.sent
        self.assertEqual(sent["to"], ["admin@example.org"])  # the worker's notify, as stock
        self.assertIn("linux-worker", sent["msg"]["Subject"])
        self.assertIn("linux-worker", sent["msg"].get_body(("plain",)).get_content())

    @defer.inlineCallbacks
    def test_worker_missing_false_opts_out(self):
        for kwargs in ({"routes": [MailRoute("dev-list@example.org")]}, {}):
            notifier = yield self.make_notifier(worker_missing=False, **kwargs)
            yield self.worker_missing_event(notifier)
            self.assertEqual(self.transport.sent, [], kwargs)
            yield notifier.disownServiceParent()

    @defer.inlineCallbacks
    def test_unknown_route_names_are_logged_at_start(self):
        # What the master runs: when the config-load check could not run (BuildmasterConfig
        # defined after the notifier) or must not refuse (multiMaster), twistd.log says it.
        from buildbot.process.factory import BuildFactory
        from buildbot.config.builder import BuilderConfig
        from twisted.python import log

        self.master.config.builders = [
            BuilderConfig(name="linux", workernames=["w"], factory=BuildFactory())
        ]
        logged = []
        log.addObserver(logged.append)
        self.addCleanup(log.removeObserver, logged.append)
        for multi_master in (False, True):
            self.master.config.multiMaster = multi_master
            del logged[:]
            notifier = yield self.make_notifier(
                routes=[MailRoute("dev@example.org", builders=["linxu", "linux"])]
            )
            lines = [" ".join(e["message"]) for e in logged if "linxu" in " ".join(e.get("message", ()))]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("warning: MailRoute 'linxu+linux->dev@example.org': builders: "
                          "c['builders'] has no builder named 'linxu'", lines[0])
            self.assertEqual(multi_master, lines[0].endswith("(multiMaster=True)"))
            yield notifier.disownServiceParent()

    @defer.inlineCallbacks
    def test_plain_generators_keep_stock_semantics(self):
        notifier = yield self.make_notifier(
            extraRecipients=["ops@example.org"],
            generators=[
                BuildStatusGenerator(
                    mode=("failing",), message_formatter=MessageFormatter(template_type="plain")
                )
            ],
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        self.assertEqual(sent["to"], ["me@foo", "ops@example.org"])  # author, then extras
        # A stock formatter gives one plain part, exactly what stock would send.
        self.assertEqual(sent["msg"].get_content_type(), "text/plain")
        self.assertIn("Builder0", sent["msg"].get_content())


    # Every "queued as" id the local MTA gives goes to the Postfix queue tracker (which
    # tests/test_postfix.py runs against the real Postfix).
    @defer.inlineCallbacks
    def notifier_with_queue_ids(self, **kwargs):
        notifier = yield self.make_notifier(
            routes=[MailRoute("dev@example.org", name="dev")], relayhost="[127.0.0.1]:2525", **kwargs
        )
        recording_send = self.transport.send

        def send(*args):
            d = recording_send(*args)
            return d.addCallback(lambda delivery: setattr(delivery, "queue_id", "E63B916209A") or delivery)

        self.transport.send = send
        return notifier

    @defer.inlineCallbacks
    def test_queue_id_is_tracked(self):
        notifier = yield self.notifier_with_queue_ids(track_local_mta=True, postfix_stuck_after=5)
        self.addCleanup(notifier.postfix_tracker.stop)
        yield self.finish_build(notifier, FAILURE)
        (mail,) = notifier.postfix_tracker.outstanding()
        self.assertEqual(mail.queue_id, "E63B916209A")
        self.assertIn("route 'dev' build 'Builder0'", mail.label)
        self.assertEqual(notifier.postfix_tracker.stuck_after, 5)
        self.assertEqual(notifier.postfix_tracker.poll_interval, 5)  # never slower than stuck_after

    @defer.inlineCallbacks
    def test_tracking_off(self):
        notifier = yield self.notifier_with_queue_ids(track_local_mta=False)
        yield self.finish_build(notifier, FAILURE)
        self.assertIsNone(notifier.postfix_tracker)
        self.assertEqual(len(self.transport.sent), 1)

    @defer.inlineCallbacks
    def test_not_tracked_for_a_remote_relay(self):
        notifier = yield self.make_notifier(relayhost="[relay.example.org]:587")
        self.assertIsNone(notifier.postfix_tracker)


    @defer.inlineCallbacks
    def test_extra_recipients_go_to_cc_when_interested_users_are_mailed(self):
        # Stock processRecipients(): with sendToInterestedUsers and someone interested,
        # extraRecipients are copied (Cc), so they can tell they are not the culprit.
        from buildbot.test import fakedb

        notifier = yield self.make_notifier(extraRecipients=["ops@example.org"])
        yield self.master.db.insert_test_data(
            [fakedb.BuildProperty(buildid=20, name="owner", value="Owner <owner@example.org>")]
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        # the change's author (me@foo) and the owner are the interested users
        self.assertEqual(sent["msg"]["To"], "Owner <owner@example.org>, me@foo")
        self.assertEqual(sent["msg"]["Cc"], "ops@example.org")
        self.assertEqual(sorted(sent["to"]), ["me@foo", "ops@example.org", "owner@example.org"])

    @defer.inlineCallbacks
    def test_stock_arguments_are_accepted_and_take_effect(self):
        from buildbot.process.properties import Interpolate
        from buildbot.test import fakedb

        lines = self.log_lines()
        notifier = yield self.make_notifier(
            fromaddr="buildbot@localhost",  # no dot: stock accepts it, so must we
            relayhost="localhost",
            smtpPort=2525,
            lookup="example.org",  # a bare user name "jane" becomes jane@example.org
            extraRecipients=["ops@example.org"],
            sendToInterestedUsers=True,
            extraHeaders={"X-Project": "demo", "X-Owner": Interpolate("%(prop:owner)s")},
            dumpMailsToLog=True,
        )
        self.assertTrue(notifier.name.startswith("MailExtNotifier_"))
        self.assertEqual((self.smtp_settings.host, self.smtp_settings.port), ("localhost", 2525))
        yield self.master.db.insert_test_data(
            [fakedb.BuildProperty(buildid=20, name="owner", value="jane")]
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        msg = sent["msg"]
        self.assertEqual(sent["from"], "buildbot@localhost")
        self.assertEqual(msg["From"], "buildbot@localhost")
        self.assertEqual(msg["To"], "jane@example.org, me@foo")  # lookup applied to "jane"
        self.assertEqual(msg["Cc"], "ops@example.org")
        self.assertEqual(msg["X-Project"], "demo")
        self.assertEqual(msg["X-Owner"], "jane")  # rendered with the build's properties
        dumped = [line for line in lines if line.startswith("mail data:")]
        self.assertEqual(len(dumped), 1, lines)
        self.assertIn("X-Project: demo", dumped[0])

    @defer.inlineCallbacks
    def test_send_to_interested_users_false_mails_only_the_extra_recipients(self):
        from buildbot.test import fakedb

        notifier = yield self.make_notifier(
            lookup="example.org", extraRecipients=["ops@example.org"], sendToInterestedUsers=False
        )
        yield self.master.db.insert_test_data(
            [fakedb.BuildProperty(buildid=20, name="owner", value="jane")]
        )
        yield self.finish_build(notifier, FAILURE)
        (sent,) = self.transport.sent
        self.assertEqual(sent["to"], ["ops@example.org"])
        self.assertEqual(sent["msg"]["To"], "ops@example.org")
        self.assertIsNone(sent["msg"]["Cc"])

    @defer.inlineCallbacks
    def test_reconfig_applies_new_tls_and_auth_settings(self):
        # A real relay that refuses to take mail in clear and wants AUTH. The notifier is
        # first configured for plain SMTP without credentials, then reconfigured with
        # useTls and smtpUser/smtpPassword: the next mail must use them.
        import shutil
        import tempfile

        from buildbot_mailext import message as mime
        from smtp_servers import SmtpServer, TestCA

        ca_dir = tempfile.mkdtemp(prefix="mailext-test-")
        self.addCleanup(shutil.rmtree, ca_dir, True)
        ca = TestCA(ca_dir)
        srv = SmtpServer(tls=ca.server_context(), require_starttls=True, auth={"bb": "s3cret"})
        srv.start()
        self.addCleanup(srv.stop)

        def config(**smtp):
            return dict(
                fromaddr="buildbot@example.org",
                preflight="off",
                relayhost=f"[127.0.0.1]:{srv.port}",
                routes=[MailRoute("dev@example.org")],
                **smtp,
            )

        notifier = MailExtNotifier(**config())
        yield notifier.setServiceParent(self.master)
        yield notifier.startService()
        self.addCleanup(notifier.stopService)
        self.assertEqual(notifier.transport.settings.tls, "none")
        new = config(useTls=True, tls_ca_file=ca.ca_file, smtpUser="bb", smtpPassword="s3cret")
        yield notifier.reconfigServiceWithSibling(MailExtNotifier(**new))

        settings = notifier.transport.settings
        self.assertEqual(settings.tls, "starttls")
        self.assertEqual(settings.tls_ca_file, ca.ca_file)
        self.assertEqual((settings.user, settings.password), ("bb", "s3cret"))
        # What the relay sees: a mail accepted only after STARTTLS and a good AUTH.
        msg = mime.build_email(
            subject="after reconfig", from_addr="buildbot@example.org", to=["dev@example.org"],
            cc=[], text="body", html=None, headers={}, extra_headers=None, attachments=[],
        )
        yield notifier.sendMail(msg, ["dev@example.org"], label="after-reconfig")
        # sendMail fires once the mail is in the outbox; the attempt follows on the master's
        # (fake) clock, the SMTP conversation on the real reactor: drive both, with a bound.
        from twisted.internet import reactor as real_reactor
        from twisted.internet import task

        for _ in range(200):
            if srv.messages:
                break
            self.reactor.advance(0.1)
            yield task.deferLater(real_reactor, 0.05, lambda: None)
        self.assertEqual(srv.auth_attempts, [("bb", True)])
        (received,) = srv.messages
        self.assertIn(b"Subject: after reconfig", received.data)


class ConfigTestCase(unittest.TestCase):
    def config_errors(self, **kwargs):
        kwargs.setdefault("fromaddr", "buildbot@example.org")
        kwargs.setdefault("preflight", "off")
        with self.assertRaises(ConfigErrors) as caught:
            with capture_config_errors(raise_on_error=True):
                MailExtNotifier(**kwargs)
        return caught.exception.errors

    def test_is_a_mail_notifier(self):
        self.assertTrue(issubclass(MailExtNotifier, MailNotifier))

    def test_name_is_stable_and_distinct(self):
        def make(to):
            return MailExtNotifier(
                "buildbot@example.org", routes=[MailRoute(to)], preflight="off"
            ).name

        self.assertEqual(make("a@example.org"), make("a@example.org"))
        self.assertNotEqual(make("a@example.org"), make("b@example.org"))

    def test_several_errors_reported_together(self):
        errors = self.config_errors(
            fromaddr="not an address",
            routes=[
                MailRoute("bad-address"),
                MailRoute("d@example.org", mode="sometimes"),
                MailRoute("d@example.org", template="no_such_template"),
            ],
            extraHeaders={"Subject": "x"},
        )
        text = "\n".join(errors)
        self.assertIn("'not an address' in 'fromaddr' is not a valid email address", text)
        self.assertIn("'bad-address' in 'to' is not a valid email address", text)
        self.assertIn("unknown mode 'sometimes'", text)
        self.assertIn("template 'no_such_template'", text)
        self.assertIn("extraHeaders: 'Subject' is set by the notifier", text)

    def test_every_configured_address_goes_through_the_gate(self):
        errors = "\n".join(
            self.config_errors(
                fromaddr="Buildbot <buildbot@example.org>, x",
                extraRecipients=["ops@example.org", "a@x.org;b@x.org", "üser@example.org"],
                routes=[
                    MailRoute("dev@example.org, qa@example.org", name="r"),
                    MailRoute("a@x.org>", name="s"),
                ],
            )
        )
        self.assertIn(
            "MailExtNotifier: 'Buildbot <buildbot@example.org>, x' in 'fromaddr' is not a valid",
            errors,
        )
        self.assertIn("write a list: extraRecipients=['a@x.org', 'b@x.org']", errors)
        self.assertIn(
            "'üser@example.org' in 'extraRecipients' is not a valid email address (non-ASCII",
            errors,
        )
        self.assertIn("MailRoute 'r': 'dev@example.org, qa@example.org' in 'to' is 2 addresses", errors)
        self.assertIn("MailRoute 's': 'a@x.org>' in 'to' is not a valid email address", errors)
        self.assertNotIn("ops@example.org", errors)
        # stock's own, looser check is not run on top (it would refuse ops@localhost)
        self.assertNotIn("extra recipient", errors)

    def test_dotless_and_literal_addresses_are_fine_in_config(self):
        MailExtNotifier(
            "buildbot@localhost",
            extraRecipients=["ops@localhost", "root@[127.0.0.1]"],
            preflight="off",
        )

    def test_misspelt_argument_is_a_config_error(self):
        # The same words on every Python (3.13's TypeError adds its own "Did you mean").
        errors = self.config_errors(relay_host="[relay.example.org]:587")
        self.assertEqual(
            errors, ["MailExtNotifier: unknown argument 'relay_host'; did you mean 'relayhost'?"]
        )

    def test_unknown_argument_without_a_close_name(self):
        errors = self.config_errors(colour="blue")
        self.assertEqual(errors, ["MailExtNotifier: unknown argument 'colour'"])

    def test_routes_must_be_mail_routes(self):
        errors = self.config_errors(routes=[{"to": "a@example.org"}])
        self.assertIn("routes must contain MailRoute(...) objects", errors[0])

    def test_unknown_route_names_are_config_errors_unless_multi_master(self):
        from buildbot_mailext.masterconfig import KnownNames

        route = MailRoute("dev@example.org", builders=["linxu"])
        with self.assertRaises(ConfigErrors) as caught:
            with capture_config_errors(raise_on_error=True):
                MailExtNotifier._check_route_names([route], KnownNames(builders=("linux",)))
        (error,) = caught.exception.errors
        self.assertIn("no builder named 'linxu'", error)
        with capture_config_errors(raise_on_error=True):  # nothing raised: logged at start
            MailExtNotifier._check_route_names(
                [route], KnownNames(builders=("linux",), multi_master=True)
            )

    def test_worker_missing_must_be_a_bool(self):
        (error,) = self.config_errors(worker_missing="no")
        self.assertIn("worker_missing must be True", error)

    def test_missing_templates_dir(self):
        errors = self.config_errors(templates_dir="/nonexistent/mail-templates")
        self.assertIn("templates_dir '/nonexistent/mail-templates' is not a directory", errors[0])

    def test_tracking_options_are_checked(self):
        errors = self.config_errors(track_local_mta="yes", postfix_stuck_after=0)
        self.assertIn("track_local_mta='yes': must be True, False or None", errors[0])
        self.assertIn("postfix_stuck_after=0: must be a positive number of seconds", errors[1])

    def test_bad_route_subject_template(self):
        errors = self.config_errors(
            routes=[MailRoute("a@example.org", subject="{{ oops ", name="r")]
        )
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(
            errors[0].startswith("MailRoute 'r': subject: subject '{{ oops ': Jinja2 syntax error: "),
            errors[0],
        )


class StartupWarningTestCase(TestReactorMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_tls_verify_false_is_logged_at_start(self):
        from twisted.python import log

        self.setup_test_reactor()
        master = yield fakemaster.make_master(self, wantData=True, wantDb=True, wantMq=True)
        lines = []
        observer = lambda event: lines.append(log.textFromEventDict(event) or "")  # noqa: E731
        log.addObserver(observer)
        self.addCleanup(log.removeObserver, observer)
        notifier = MailExtNotifier(
            "buildbot@example.org",
            relayhost="[127.0.0.1]:2525",
            useTls=True,
            tls_verify=False,
            preflight="off",
        )
        yield notifier.setServiceParent(master)
        yield notifier.startService()
        self.addCleanup(notifier.stopService)
        warnings = [line for line in lines if "tls_verify=False" in line]
        self.assertEqual(len(warnings), 1, lines)
        self.assertIn("127.0.0.1:2525", warnings[0])
        self.assertIn("NOT verified", warnings[0])
