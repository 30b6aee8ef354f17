"""The notifier: a drop-in ``MailNotifier`` subclass that wires the mail path together.

It owns configuration glue (``checkConfig`` validates and reports every problem with
``config.error``; ``reconfigService`` applies) and the order of the one-way path::

    build event -> route generators (routes.py) -> formatter (formatter.py)
                -> claim (outbox.py: of several masters, one mails each event)
                -> MIME message (message.py) -> outbox (outbox.py: stored, then sent
                   and retried through transport.py)

Reports made by a route are sent one mail per report, to that route's recipients.
Reports from plain generators (``generators=``, or the stock defaults when neither
``routes`` nor ``generators`` is given) keep stock semantics: one mail per event, to the
interested users and ``extraRecipients``.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
from email.message import EmailMessage
import re
from typing import Any, Sequence

from buildbot import config
from buildbot.process.properties import Properties
from buildbot.process.results import statusToString
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.mail import MailNotifier
from buildbot.reporters.utils import (
    getURLForBuild,
    merge_reports_prop,
    merge_reports_prop_take_first,
)
from twisted.internet import defer
from twisted.python import log

from buildbot_mailext import message as mime
from buildbot_mailext import outbox as outbox_mod
from buildbot_mailext import postfix_queue
from buildbot_mailext import preflight as preflight_mod
from buildbot_mailext.addresses import address_errors, is_valid_address, split_recipients
from buildbot_mailext.formatter import MailExtFormatter
from buildbot_mailext.masterconfig import KnownNames, check_after_load, in_master_dir
from buildbot_mailext.relay import SmtpSettings, check_smtp_settings
from buildbot_mailext.routes import (
    MailExtWorkerMissingGenerator,
    MailRoute,
    exclude_pattern_errors,
    excluded,
    list_id_header,
    route_generator,
)
from buildbot_mailext import culprits as culprits_mod
from buildbot_mailext import digest as digest_mod
from buildbot_mailext import reads
from buildbot_mailext.context import culprits_context, previous_build_same_branch, transition_for
from buildbot_mailext.threads import thread_headers
from buildbot_mailext.templates import TemplateSet
from buildbot_mailext.transport import Delivery, MailTransport

# Template used when no routes are configured: it must read well for every result,
# since the stock default modes mail passing builds too.
DEFAULT_BUILD_TEMPLATE = "build_summary"
# Addresses no mail should go to (fnmatch, case-insensitive, on "Name <addr>" and on addr):
# bots and no-reply senders, whose authors appear among culprits and interested users.
DEFAULT_EXCLUDE_RECIPIENTS = ("*noreply*", "*no-reply*", "*[[]bot[]]*")
DIGEST_TEMPLATE = "digest"
WORKER_MISSING_TEMPLATE = "worker_missing"


def notifier_arguments(
    fromaddr,
    relayhost="localhost",
    lookup=None,
    extraRecipients=None,
    sendToInterestedUsers=True,
    extraHeaders=None,
    useTls=False,
    useSmtps=False,
    smtpUser=None,
    smtpPassword=None,
    smtpPort=25,
    dumpMailsToLog=False,
    generators=None,
    routes=None,
    templates_dir=None,
    preflight="fail",
    smtp_timeout=30.0,
    tls_ca_file=None,
    tls_verify=True,
    allow_plaintext_auth=False,
    worker_missing=True,
    smtp_cache_time=2.0,
    smtp_max_sessions=4,
    track_local_mta=None,
    postfix_stuck_after=postfix_queue.DEFAULT_STUCK_AFTER,
    retry_initial=outbox_mod.DEFAULT_RETRY_INITIAL,
    retry_max_delay=outbox_mod.DEFAULT_RETRY_MAX_DELAY,
    give_up_after=outbox_mod.DEFAULT_GIVE_UP_AFTER,
    outbox_max_messages=outbox_mod.DEFAULT_MAX_MESSAGES,
    outbox_max_bytes=outbox_mod.DEFAULT_MAX_BYTES,
    outbox_lease=outbox_mod.DEFAULT_LEASE,
    exclude_recipients=None,
) -> dict[str, Any]:
    """Every argument ``MailExtNotifier`` takes, with its default: stock ``MailNotifier``'s
    in stock's positional order, then ours. ``checkConfig`` and ``reconfigService`` both
    read their arguments through this one signature."""
    return dict(locals())


def argument_error(kwargs: dict[str, Any], error: TypeError) -> str:
    """What is wrong with the arguments of a call to ``notifier_arguments`` that raised
    ``error``, worded alike on every Python (3.13 appends its own "Did you mean ...?" to the
    TypeError, older ones do not): unknown keywords with the closest known name, else the
    TypeError's own text without the function name."""
    known = list(inspect.signature(notifier_arguments).parameters)
    problems = []
    for name in (k for k in kwargs if k not in known):
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(f"unknown argument {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    if problems:
        return "; ".join(problems)
    text = str(error).partition(") ")[2] or str(error)
    return re.sub(r"\.? Did you mean .*$", "", text)


# The arguments stock MailNotifier.checkConfig/reconfigService take besides fromaddr
# and generators, and the ones that describe the SMTP connection.
STOCK_ARGUMENTS = (
    "relayhost", "lookup", "extraRecipients", "sendToInterestedUsers", "extraHeaders",
    "useTls", "useSmtps", "smtpUser", "smtpPassword", "smtpPort", "dumpMailsToLog",
)
SMTP_ARGUMENTS = (
    "relayhost", "smtpPort", "useTls", "useSmtps", "smtpUser", "smtpPassword",
    "tls_ca_file", "tls_verify", "allow_plaintext_auth", "smtp_timeout",
    "smtp_cache_time", "smtp_max_sessions",
)
OUTBOX_ARGUMENTS = (
    "retry_initial", "retry_max_delay", "give_up_after", "outbox_max_messages",
    "outbox_max_bytes", "outbox_lease", "smtp_timeout",
)


def _subset(arguments: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: arguments[name] for name in names}


class MailExtNotifier(MailNotifier):
    """``MailNotifier`` with per-builder routes, file templates, a verified-TLS,
    relayhost-aware transport and a preflight. Every stock argument keeps its meaning."""

    def checkConfig(self, *args, **kwargs):
        try:
            arguments = notifier_arguments(*args, **kwargs)
        except TypeError as e:  # a misspelt or missing argument in master.cfg
            self.name = self.name or "MailExtNotifier"
            config.error(f"MailExtNotifier: {argument_error(kwargs, e)}")
            return
        fromaddr = arguments["fromaddr"]
        routes, generators = arguments["routes"], arguments["generators"]
        extraHeaders, preflight = arguments["extraHeaders"], arguments["preflight"]
        errors: list[str] = address_errors(fromaddr, "MailExtNotifier", "fromaddr")
        errors.extend(self._extra_recipient_errors(arguments["extraRecipients"]))
        routes = self._route_list(routes, errors)
        templates_dir = self._resolve_templates_dir(arguments["templates_dir"])
        if generators is not None and not isinstance(generators, list):
            errors.append("MailExtNotifier: generators must be a list (or None)")
            generators = None
        if templates_dir is not None and not os.path.isdir(str(templates_dir)):
            errors.append(
                f"MailExtNotifier: templates_dir {templates_dir!r} is not a directory; "
                "create it or fix the path (a relative path is relative to the master "
                "directory)"
            )
            templates_dir = None
        for route in routes:
            errors.extend(route.config_errors())
        if routes and not errors:
            # The builders are known only once master.cfg has run to its end.
            check_after_load(lambda known: self._check_route_names(routes, known))
        if not isinstance(arguments["worker_missing"], bool):
            errors.append(
                f"MailExtNotifier: worker_missing must be True (mail a worker's notify "
                f"addresses when it goes missing, as stock) or False, not "
                f"{arguments['worker_missing']!r}"
            )
        worker_missing = self._worker_missing_wanted(arguments, generators)
        errors.extend(self._template_errors(routes, generators, worker_missing, templates_dir))
        errors.extend(mime.extra_header_errors(extraHeaders))
        smtp = _subset(arguments, SMTP_ARGUMENTS)
        errors.extend(check_smtp_settings(**smtp))
        errors.extend(preflight_mod.check_preflight_mode(preflight))
        errors.extend(outbox_mod.check_outbox_options(**_subset(arguments, OUTBOX_ARGUMENTS)))
        errors.extend(self._tracking_errors(arguments["track_local_mta"], arguments["postfix_stuck_after"]))
        if arguments["exclude_recipients"] is not None:
            errors.extend(
                exclude_pattern_errors(arguments["exclude_recipients"], "MailExtNotifier")
            )

        if self.name is None:
            self.name = self._stable_name(fromaddr, routes, generators, templates_dir)
        for error in errors:
            config.error(error)

        # Formatters validate their templates when built: only build them from a config
        # that passed, or every template error would be reported twice.
        built = (
            [] if errors
            else self._build_generators(routes, generators, worker_missing, templates_dir)
        )
        stock = _subset(arguments, STOCK_ARGUMENTS)
        if not isinstance(extraHeaders, dict):
            stock["extraHeaders"] = None  # reported above, in our words
        # Checked above with the strict gate (stock's unanchored check would both miss
        # "a@x.org, b@x.org" and refuse buildbot@localhost).
        stock["extraRecipients"] = None
        super().checkConfig(fromaddr, generators=built, **stock)
        if errors:
            return
        # What `preflight_targets()` and the CLI probe: known only after validation.
        self._preflight_targets = (
            SmtpSettings.from_notifier_args(**smtp),
            fromaddr,
            self._probe_recipients(routes, arguments["extraRecipients"]),
        )
        preflight_mod.run_at_config_load(*self._preflight_targets, preflight, self.name)

    @defer.inlineCallbacks
    def reconfigService(self, *args, **kwargs):
        arguments = notifier_arguments(*args, **kwargs)  # secrets are rendered by now
        fromaddr, preflight = arguments["fromaddr"], arguments["preflight"]
        routes = self._route_list(arguments["routes"], [])
        templates_dir = self._resolve_templates_dir(arguments["templates_dir"])
        yield super().reconfigService(
            fromaddr,
            generators=self._build_generators(
                routes,
                arguments["generators"],
                self._worker_missing_wanted(arguments, arguments["generators"]),
                templates_dir,
            ),
            **_subset(arguments, STOCK_ARGUMENTS),
        )
        self.routes = routes
        self._warn_unknown_route_names(routes)
        self.templates_dir = templates_dir
        self.preflight = preflight
        exclude = arguments["exclude_recipients"]
        self.exclude_recipients = tuple(
            DEFAULT_EXCLUDE_RECIPIENTS if exclude is None else exclude
        )
        self._digest_templates = TemplateSet(templates_dir)
        for route in routes:
            if route.max_mails:
                # held reports survive a reconfig: the budget lives on the master
                digest_mod.budget_for(self.master, route, self, self._send_digest)
        settings = SmtpSettings.from_notifier_args(**_subset(arguments, SMTP_ARGUMENTS))
        relay_changed = False
        if getattr(self, "transport", None) is None:
            self.transport = MailTransport(settings)
        elif self.transport.settings != settings:
            self.transport.settings = settings
            relay_changed = True
        self._configure_outbox(arguments)
        if relay_changed:
            # Pending mail goes to the new server now: that is usually why the config changed.
            self.outbox.wake_now()
        for warning in settings.startup_warnings():
            log.msg(f"{self.name}: {warning}")
        # Not awaited: a slow relay must not delay the master's start. (It only probes
        # when the config-load preflight had to skip AUTH for secrets.)
        recipients = self._probe_recipients(routes, arguments["extraRecipients"])
        preflight_mod.run_at_start(settings, fromaddr, recipients, preflight, self.name)
        yield self._configure_postfix_tracking(
            settings, arguments["track_local_mta"], arguments["postfix_stuck_after"]
        )

    def _configure_outbox(self, arguments: dict[str, Any]) -> None:
        policy = outbox_mod.RetryPolicy(
            arguments["retry_initial"], arguments["retry_max_delay"], arguments["give_up_after"]
        )
        limits = outbox_mod.OutboxLimits(arguments["outbox_max_messages"], arguments["outbox_max_bytes"])
        if getattr(self, "outbox", None) is None:
            # Filed under the notifier's name, which does not depend on relay settings:
            # a reconfig that changes the relay finds the same rows (issue 12).
            self.outbox = outbox_mod.Outbox(
                self.master, self.name, self.transport, self._build_digest, policy, limits,
                arguments["outbox_lease"], on_delivery=self._follow_in_postfix,
            )
        else:
            self.outbox.policy, self.outbox.limits = policy, limits
            self.outbox.lease = arguments["outbox_lease"]

    @defer.inlineCallbacks
    def startService(self):
        yield super().startService()
        try:
            yield self.outbox.start()
        except Exception as e:
            log.msg(
                f"{self.name}: the mail outbox cannot use the master's database ({e}); "
                "mail cannot be queued: check db_url in master.cfg and run 'buildbot upgrade-master'"
            )
            raise

    @defer.inlineCallbacks
    def stopService(self):
        digest_mod.release_budgets(self.master, self)
        yield super().stopService()
        if getattr(self, "outbox", None) is not None:
            yield self.outbox.stop()
        if getattr(self, "postfix_tracker", None) is not None:
            yield self.postfix_tracker.stop()
        if getattr(self, "transport", None) is not None:
            yield self.transport.stop()

    # ------------------------------------------------------------------ Postfix tracking

    @staticmethod
    def _tracking_errors(track_local_mta, postfix_stuck_after) -> list[str]:
        errors = []
        if track_local_mta not in (None, True, False):
            errors.append(
                f"MailExtNotifier: track_local_mta={track_local_mta!r}: must be True, False or None "
                "(None: follow mail in the local Postfix's queue when relayhost is this machine)"
            )
        number = isinstance(postfix_stuck_after, (int, float)) and not isinstance(postfix_stuck_after, bool)
        if not number or not 0 < postfix_stuck_after < float("inf"):
            errors.append(
                f"MailExtNotifier: postfix_stuck_after={postfix_stuck_after!r}: must be a positive number of "
                "seconds (default 300: a mail still in Postfix's queue after 5 minutes is reported)"
            )
        return errors

    def _configure_postfix_tracking(self, settings, track_local_mta, stuck_after) -> defer.Deferred:
        """Follow mail past the local Postfix (``track_local_mta``; None: when the relay is on
        this machine and has a postqueue). Poll every 60 s, or sooner when ``stuck_after`` is
        shorter, so that a stuck mail is reported when it becomes stuck."""
        wanted = postfix_queue.relay_is_local(settings) if track_local_mta is None else track_local_mta
        tracker = getattr(self, "postfix_tracker", None)
        if not wanted:
            self.postfix_tracker = None
            return tracker.stop() if tracker is not None else defer.succeed(None)
        interval = min(postfix_queue.DEFAULT_POLL_INTERVAL, float(stuck_after))
        if tracker is None:
            self.postfix_tracker = postfix_queue.PostfixQueueTracker(
                self.name, stuck_after, interval, reactor=self.master.reactor, relay_port=settings.port,
                explicit=bool(track_local_mta),
            )
        else:
            tracker.stuck_after, tracker.poll_interval = float(stuck_after), interval
            # A reconfig may point at another relay, or fix what made the queue unreadable.
            tracker.relay_port, tracker.explicit, tracker.not_postfix = settings.port, bool(track_local_mta), False
        return defer.succeed(None)

    def _follow_in_postfix(self, delivery: Delivery) -> Delivery:
        # Postfix said 250 "queued as ID": the mail is Postfix's now; watch it leave.
        tracker = getattr(self, "postfix_tracker", None)
        if tracker is not None and delivery.delivered and delivery.queue_id:
            tracker.track(delivery.queue_id, delivery.label)
        return delivery

    # ------------------------------------------------------------------ config helpers

    @staticmethod
    def _route_list(routes, errors: list[str]) -> list[MailRoute]:
        if routes is None:
            return []
        if not isinstance(routes, (list, tuple)):
            errors.append("MailExtNotifier: routes must be a list of MailRoute(...)")
            return []
        good = []
        for route in routes:
            if isinstance(route, MailRoute):
                good.append(route)
            else:
                errors.append(
                    f"MailExtNotifier: routes must contain MailRoute(...) objects, got {route!r}"
                )
        return good

    @staticmethod
    def _extra_recipient_errors(extra_recipients) -> list[str]:
        if extra_recipients is None:
            return []
        if not isinstance(extra_recipients, (list, tuple)):
            return [
                f"MailExtNotifier: extraRecipients must be a list of addresses, got "
                f"{extra_recipients!r}; write extraRecipients=['ops@example.org']"
            ]
        return [
            error
            for address in extra_recipients
            for error in address_errors(address, "MailExtNotifier", "extraRecipients")
        ]

    @staticmethod
    def _check_route_names(routes: list[MailRoute], known: KnownNames) -> None:
        if known.multi_master:
            return  # another master may run that builder: _warn_unknown_route_names says it
        for error in (e for route in routes for e in route.unknown_name_errors(known)):
            config.error(error)

    def _warn_unknown_route_names(self, routes: list[MailRoute]) -> None:
        # At start and reconfig, against the configuration the master runs: says it when
        # the config-load check could not run (BuildmasterConfig defined after the
        # notifier) or must not refuse (multiMaster).
        known = KnownNames.from_master_config(getattr(self.master, "config", None))
        if not known.builders:
            return  # no master configuration to compare with (e.g. Buildbot's fake master)
        where = " on this master (multiMaster=True)" if known.multi_master else ""
        for error in (e for route in routes for e in route.unknown_name_errors(known)):
            log.msg(f"{self.name}: warning: {error}{where}")

    @staticmethod
    def _resolve_templates_dir(templates_dir):
        # A relative templates_dir means the master directory's folder, as for every other
        # path in master.cfg (the formatter resolves it the same way).
        return in_master_dir(templates_dir)

    @staticmethod
    def _worker_missing_wanted(arguments: dict[str, Any], generators) -> bool:
        # Stock mails a worker's notify addresses when it goes missing; routes only add
        # build mails, so they keep it unless worker_missing=False. Explicit generators
        # replace every default, as in stock.
        return generators is None and arguments["worker_missing"] is not False

    @staticmethod
    def _template_errors(routes, generators, worker_missing: bool, templates_dir) -> list[str]:
        template_set = TemplateSet(templates_dir)
        names = {r.template for r in routes if isinstance(r.template, str) and r.template}
        if any(r.max_mails for r in routes):
            names.add(DIGEST_TEMPLATE)  # a broken custom digest.*.j2 shows at checkconfig
        if not routes and generators is None:
            names.add(DEFAULT_BUILD_TEMPLATE)
        if worker_missing:
            names.add(WORKER_MISSING_TEMPLATE)
        errors = []
        for name in sorted(names):
            for problem in template_set.validate(name):
                errors.append(f"MailExtNotifier: template {name!r}: {problem}")
        for route in routes:
            if isinstance(route.subject, str):
                errors.extend(
                    f"MailRoute {route.name!r}: subject: {p}"
                    for p in template_set.validate_string(route.subject, "subject")
                )
        return errors

    @staticmethod
    def _probe_recipients(routes, extraRecipients) -> list[str]:
        return mime.envelope_recipients(
            [a for r in routes for a in r.to] + list(extraRecipients or [])
        )

    def _stable_name(self, fromaddr, routes, generators, templates_dir) -> str:
        # Derived from what the mail says and whom it goes to, never from how it travels:
        # a reconfig that changes relay settings keeps the name, so the service is
        # reconfigured rather than replaced and its queued mail (filed under the name in
        # the outbox) goes out through the new relay.
        parts = [
            repr(fromaddr),
            repr(templates_dir),
            *(repr(sorted(vars(r).items(), key=lambda kv: kv[0])) for r in routes),
            *(g.generate_name() for g in (generators or [])),
        ]
        digest = hashlib.sha1("\n".join(parts).encode("utf-8", "replace")).hexdigest()[:10]
        return f"MailExtNotifier_{digest}"

    def _build_generators(self, routes, generators, worker_missing: bool, templates_dir) -> list:
        built = [
            route_generator(
                route,
                MailExtFormatter(
                    template=route.template,
                    templates_dir=templates_dir,
                    log_tail_lines=route.log_tail_lines,
                    subject=route.subject,
                    error_patterns=route.error_patterns,
                ),
            )
            for route in routes
        ]
        if generators is not None:
            built.extend(generators)
        elif not routes:
            # Exactly stock's default build mails (who gets mail does not change).
            built.append(
                BuildStatusGenerator(
                    add_patch=True,
                    message_formatter=MailExtFormatter(
                        template=DEFAULT_BUILD_TEMPLATE, templates_dir=templates_dir
                    ),
                )
            )
        if worker_missing:
            built.append(
                MailExtWorkerMissingGenerator(
                    workers="all",
                    message_formatter=MailExtFormatter(
                        template=WORKER_MISSING_TEMPLATE, templates_dir=templates_dir
                    ),
                )
            )
        return built

    def preflight_targets(self) -> tuple[SmtpSettings, str, list[str]]:
        """(settings, fromaddr, recipients) the preflight probes for this notifier."""
        return self._preflight_targets

    # ------------------------------------------------------------------ sending

    @defer.inlineCallbacks
    def sendMessage(self, reports):
        routed = [r for r in reports if r.get("mailext_route") is not None]
        plain = [r for r in reports if r.get("mailext_route") is None]
        # Exactly one mail per event across masters: every master sees every build event,
        # and only the one that inserts the claim first composes the mail.
        claims = [self._claim(f"route {r['mailext_route'].name}", [r]) for r in routed]
        if plain:
            claims.append(self._claim("generators", plain))
        won = yield defer.gatherResults(claims)
        if plain and not won.pop():
            plain = []
        routed = [r for r, ok in zip(routed, won) if ok]
        # Composed side by side, not one after the other: the mails of one build reach the
        # transport in the same reactor turn and leave in one SMTP session.
        sending = [
            self._guarded(self._send_route_report(r), f"route {r['mailext_route'].name!r}")
            for r in routed
        ]
        if plain:
            sending.append(self._guarded(self._send_plain_reports(plain), "generator reports"))
        yield defer.gatherResults(sending)

    @defer.inlineCallbacks
    def _claim(self, what: str, reports) -> Any:
        try:
            won = yield self.outbox.claim(what, self._event_identity(reports))
        except Exception as e:  # better a possible duplicate (several masters) than no mail
            log.msg(f"{self.name}: {what}: {self._event_text(reports)}: cannot record the claim in the "
                    f"database ({e}); mailing it anyway")
            return True
        if not won:
            log.msg(f"{self.name}: {what}: {self._event_text(reports)} is mailed by another master")
        return won

    @staticmethod
    def _event_identity(reports) -> list:
        """What makes these reports one event: the builds and whether each was finished,
        or (worker-missing and other build-less mail) the text every master renders alike."""
        builds = merge_reports_prop(reports, "builds") or []
        if builds:
            return sorted([b["buildid"], bool(b.get("complete"))] for b in builds)
        return [[str(r.get("worker")), str(r.get("subject")), str(r.get("body"))] for r in reports]

    @staticmethod
    def _event_text(reports) -> str:
        builds = merge_reports_prop(reports, "builds") or []
        if builds:
            return ", ".join(f"build {b['builder']['name']!r} #{b['number']}" for b in builds)
        return "this event"

    def _guarded(self, d: defer.Deferred, what: str) -> defer.Deferred:
        # One mail failing to compose (a bug, not a mail problem) must not stop the others;
        # say which mail it was before the traceback.
        return d.addErrback(
            log.err, f"{self.name}: could not compose the mail for {what} (a bug: please report it)"
        )

    # ------------------------------------------------------------------ route mails

    @defer.inlineCallbacks
    def _send_route_report(self, report):
        route: MailRoute = report["mailext_route"]
        builds = report.get("builds") or []
        to = list(route.to)
        if route.send_to_interested_users:
            interested = yield self._interested_addresses(report.get("users") or [])
            to.extend(a for a in sorted(interested) if a not in to)
        if route.notify_culprits:
            culprits = yield self._culprit_addresses(builds)
            to.extend(a for a in culprits if a not in to)
        to = self._without_excluded(to, route.exclude_recipients)
        if route.max_mails:
            budget = digest_mod.budget_for(self.master, route, self, self._send_digest)
            entries = yield self._digest_entries(report)
            fixed = any(e["transition"] == "fixed" for e in entries)
            if not fixed and not budget.admit():
                budget.hold(entries, to)
                log.msg(
                    f"{self.name}: route {route.name!r}: more than {budget.count} mails in "
                    f"{budget.seconds:g}s; {', '.join(e['label'] for e in entries)} held for "
                    f"the digest ({len(budget.held)} held so far)"
                )
                return
        yield self._compose_and_send([report], to=to, cc=[], what=f"route {route.name!r}",
                                     route=route, outbox_route=f"route {route.name}")

    @defer.inlineCallbacks
    def _culprit_addresses(self, builds):
        """Addresses of the culprits' authors and of the forced build's requester, looked
        up through ``lookup`` as stock does for interested users."""
        authors: list[str] = []
        for build in builds:
            section = yield defer.ensureDeferred(
                culprits_context(self.master, build, build.get("properties") or {})
            )
            for change in section["culprits"]:
                who = change["address"] or change["login"]
                if who is None:
                    log.msg(f"{self.name}: culprit author {change['author']!r} holds no usable "
                            "address (control characters?); not mailed")
                elif who not in authors:
                    authors.append(who)
            requester = section["requester"]
            if requester and requester not in authors:
                authors.append(culprits_mod.author_address(requester) or requester)
        addresses = []
        for author in authors:
            found = author
            if self.lookup:
                found = yield defer.maybeDeferred(self.lookup.getAddress, author)
            address = culprits_mod.author_address(found) if found else None
            if address is None or not is_valid_address(address):
                log.msg(f"{self.name}: culprit {mime.one_line(author, 200)!r} has no mail "
                        "address (set lookup= to map names to addresses); not mailed")
                continue
            if address not in addresses:
                addresses.append(address)
        return addresses

    def _without_excluded(self, addresses, route_patterns=()):
        """``addresses`` minus those matching ``exclude_recipients`` (notifier's and the
        route's). The very same object when nothing is excluded (stock hooks may return
        any sequence)."""
        patterns = tuple(getattr(self, "exclude_recipients", ())) + tuple(route_patterns)
        if not patterns or isinstance(addresses, str):
            return addresses
        kept = [a for a in addresses if not excluded(str(a), patterns)]
        if len(kept) == len(list(addresses)):
            return addresses
        dropped = [a for a in addresses if a not in kept]
        log.msg(f"{self.name}: not mailing {', '.join(mime.one_line(a, 200) for a in dropped)} "
                "(exclude_recipients)")
        return kept

    @defer.inlineCallbacks
    def _digest_entries(self, report):
        entries = []
        for build in report.get("builds") or []:
            prev = yield previous_build_same_branch(self.master, build)
            builder = (build.get("builder") or {}).get("name", "")
            entries.append({
                "buildername": mime.one_line(builder, 200),
                "buildnumber": build["number"],
                "result": statusToString(build.get("results")),
                "transition": transition_for(build.get("results"), prev["results"] if prev else None),
                "url": getURLForBuild(self.master, build["builderid"], build["number"]),
                "subject": mime.one_line(report.get("subject") or "", 200),
                "label": f"build {mime.one_line(builder, 80)!r} #{build['number']}",
            })
        return entries

    @defer.inlineCallbacks
    def _send_digest(self, budget, held, recipients, dropped):
        """The digest of a route's held reports (called by digest.MailBudget.flush)."""
        route = next((r for r in self.routes if r.name == budget.name), None)
        context = {
            "title": self.master.config.title,
            "buildbot_url": self.master.config.buildbotURL,
            "route": budget.name,
            "max_mails": budget.count,
            "period": budget.seconds,
            "builds": held,
            "more": dropped,
            "template_error": None,
        }
        try:
            mail = self._digest_templates.render(DIGEST_TEMPLATE, context)
        except Exception as e:  # a broken custom digest template: the packaged one
            log.msg(f"{self.name}: digest template failed ({type(e).__name__}: {e}); "
                    "using the packaged one")
            mail = TemplateSet(None).render(DIGEST_TEMPLATE, context)
        msg = mime.build_email(
            subject=mail.subject, from_addr=self.fromaddr, to=recipients, text=mail.text,
            html=mail.html, headers=self._list_headers(route),
            reply_to=route.reply_to if route else None,
        )
        label = f"route {budget.name!r} digest of {len(held)} build(s) {mime.header_value(msg, 'Message-ID')}"
        envelope = mime.envelope_recipients(recipients)
        if not envelope:
            log.msg(f"{self.name}: {label}: no recipients (nobody to mail), nothing sent")
            return
        yield self._guarded(
            self.sendMail(msg, envelope, label=label, route=f"route {budget.name}"), label)

    # ------------------------------------------------------------------ plain generators

    @defer.inlineCallbacks
    def _send_plain_reports(self, reports):
        """Stock's path, hook for hook: ``createEmail`` -> ``findInterrestedUsersEmails`` ->
        ``processRecipients`` -> ``sendMail``, so a subclass overriding any of them keeps
        working as it did with stock ``MailNotifier``."""
        subject = merge_reports_prop_take_first(reports, "subject") or "Buildbot mail"
        msgdict = {
            "body": merge_reports_prop(reports, "body"),
            "subject": subject,
            "type": merge_reports_prop_take_first(reports, "type"),
            # our createEmail renders both parts from these; stock's uses "body"
            "mailext_reports": reports,
        }
        builds = merge_reports_prop(reports, "builds")
        m = yield self.createEmail(
            msgdict,
            self.master.config.title,
            merge_reports_prop(reports, "results"),
            builds,
            merge_reports_prop(reports, "patches"),
            merge_reports_prop(reports, "logs"),
        )
        users = merge_reports_prop(reports, "users")
        if merge_reports_prop_take_first(reports, "worker") is None:
            recipients = yield self.findInterrestedUsersEmails(list(users))
            all_recipients = self.processRecipients(recipients, m)
        else:
            # Worker-missing mail goes to the worker's notify addresses, as in stock.
            all_recipients = self._without_excluded(list(users))
            if isinstance(m, EmailMessage) and "To" not in m:
                mime.set_recipients(m, "To", all_recipients)
        all_recipients = self._without_excluded(all_recipients)
        if isinstance(all_recipients, (list, tuple, set)):
            # the address gate for the envelope too, whatever a hook returned
            for value, reason in split_recipients(list(all_recipients))[1]:
                log.msg(f"{self.name}: recipient {mime.one_line(repr(value), 300)} left out: "
                        f"not a valid address ({reason}); the mail goes to the others")
            all_recipients = mime.envelope_recipients(list(all_recipients))
        if not all_recipients:
            what = self._label("generator", builds or [], m) if isinstance(m, EmailMessage) else "mail"
            log.msg(f"{self.name}: {what}: no recipients (nobody to mail), nothing sent")
            return
        yield self.sendMail(m, all_recipients)

    @defer.inlineCallbacks
    def createEmail(self, msgdict, title, results, builds=None, patches=None, logs=None):
        """Stock's hook, our message: multipart/alternative when our formatter made the
        report, every header through message.py's hygiene; To/Cc are set later by
        ``processRecipients`` (as in stock)."""
        reports = msgdict.get("mailext_reports")
        if reports:
            text, html = self._bodies(reports)
        else:
            body = msgdict.get("body")
            if isinstance(body, bytes):
                body = body.decode("utf-8", "replace")
            text, html = (None, body) if msgdict.get("type") == "html" else (body, None)
        m = yield self._message(
            builds or [], subject=msgdict.get("subject") or "Buildbot mail", to=[], cc=[],
            text=text, html=html,
            attachments=self._attachments(patches or [], logs or [], builds or []),
        )
        return m

    def processRecipients(self, blamelist, m):
        """Stock's hook: interested users in To, ``extraRecipients`` in Cc (To when no
        interested users), minus ``exclude_recipients``; returns the envelope list."""
        if not isinstance(m, EmailMessage):
            return super().processRecipients(blamelist, m)
        to, cc = self._stock_to_cc(blamelist)
        to, cc = self._without_excluded(to), self._without_excluded(cc)
        # through the address gate: only valid addresses are written and mailed
        to = mime.set_recipients(m, "To", to)
        cc = [a for a in mime.set_recipients(m, "Cc", cc) if a not in to]
        return to + cc

    @defer.inlineCallbacks
    def getResponsibleUsersForBuild(self, master, buildid):
        """Stock's blamelist (every change's author, the ``owner`` and ``owners``
        properties), sorted, from the build's changes as ``reads.build_changes`` keeps them:
        the mail's context needs the same read, made once (issue 8). A read that fails
        leaves the blamelist empty (one log line): the mail still goes to its other
        recipients, where stock's would be lost with a traceback."""
        try:
            changes = yield defer.ensureDeferred(reads.build_changes(master, buildid))
            properties = yield defer.ensureDeferred(reads.build_properties(master, buildid))
        except Exception as e:
            log.msg(f"{self.name}: cannot read the changes or properties of build {buildid} "
                    f"({type(e).__name__}: {e}); mailed without its interested users")
            return []
        blamelist = {change["author"] for change in changes}
        if "owner" in properties:
            owner = properties["owner"][0]
            blamelist.update([owner] if isinstance(owner, str) else owner)
        if "owners" in properties:
            blamelist.update(properties["owners"][0])
        return sorted(blamelist)

    @defer.inlineCallbacks
    def findInterrestedUsersEmails(self, users):
        """Stock's hook, with ``lookup`` as stock uses it (a lookup that fails leaves that
        user out, logged) and the address gate instead of stock's loose check."""
        if not self.sendToInterestedUsers:
            return set()
        found = yield self._interested_addresses(list(users))
        kept = set()
        for address in found:
            if is_valid_address(address):
                kept.add(address)
            else:
                log.msg(f"{self.name}: interested user {mime.one_line(repr(address), 200)} "
                        "left out: not a valid address")
        return kept

    def _stock_to_cc(self, interested) -> tuple[list[str], list[str]]:
        # Same rule as stock processRecipients(): extras go to Cc when mailing
        # interested users, so they can tell they are copied. Only interested users that
        # pass the address gate count: when none does, the extras are the To, as in stock
        # with nobody interested. (The others stay in To so the compose step logs them.)
        rejected = [a for a in interested if not is_valid_address(a)]
        to = sorted({a for a in interested if is_valid_address(a)}, key=str)
        extras = list(self.extraRecipients or [])
        if self.sendToInterestedUsers and to:
            return to + rejected, [e for e in extras if e not in to]
        return sorted(set(to) | set(extras)) + rejected, []

    @defer.inlineCallbacks
    def _interested_addresses(self, users):
        """Stock's lookup and "two @" repair (findInterrestedUsersEmails), minus its loose
        address check: what comes out goes through the address gate when the mail is
        composed. A lookup that fails or answers something that is not text leaves that
        user out (one log line), never the mail."""
        addresses = []
        for user in users:
            address = user
            if self.lookup:
                try:
                    address = yield defer.maybeDeferred(self.lookup.getAddress, user)
                except Exception as e:
                    log.msg(
                        f"{self.name}: lookup of {mime.one_line(repr(user), 200)} failed "
                        f"({mime.one_line(e, 200)}); that user is left out"
                    )
                    continue
            if isinstance(address, bytes):
                address = address.decode("utf-8", "replace")
            if address is None or (isinstance(address, str) and not address.strip()):
                continue  # stock: getAddress did not like this user; or no one (anonymous)
            if not isinstance(address, str):
                log.msg(
                    f"{self.name}: lookup of {mime.one_line(repr(user), 200)} gave "
                    f"{type(address).__name__}, not an address; that user is left out"
                )
                continue
            # Git can give 'User' <user@foo.com>@foo.com: stock chops the last @.
            if address.count("@") > 1:
                address = address[: address.rindex("@")]
            addresses.append(address)
        return addresses

    # ------------------------------------------------------------------ composing

    @staticmethod
    def _list_headers(route) -> dict[str, str]:
        if route is None or not route.list_id:
            return {}
        return {"List-Id": list_id_header(route.list_id)}

    @defer.inlineCallbacks
    def _message(self, builds, subject, to, cc, text, html, attachments, route=None):
        """One mail about ``builds``: Buildbot's list-filter headers, the thread of its
        builder and branch, the route's list headers, the user's extraHeaders."""
        headers: dict[str, str] = {}
        if builds:
            build = builds[0]
            builder = build.get("builder")
            if builder is None:  # a build dict without details (stock createEmail accepts it)
                builder = (yield self.master.data.get(("builders", build["builderid"]))) or {}
                builder = {"name": builder.get("name", ""), "builderid": build["builderid"]}
            headers.update(mime.buildbot_headers(
                builder["name"],
                statusToString(build["results"]),
                getURLForBuild(self.master, build["builderid"], build["number"]),
            ))
            headers.update(thread_headers([dict(build, builder=builder)], self.fromaddr)
                           if len(builds) == 1 else {})
        headers.update(self._list_headers(route))
        extra = self.extraHeaders
        if extra and len(builds) == 1:
            props = Properties.fromDict(builds[0]["properties"])
            props.master = self.master
            extra = yield props.render(extra)
        msg = mime.build_email(
            subject=subject,
            from_addr=self.fromaddr,
            to=to,
            cc=cc,
            text=text,
            html=html,
            headers=headers,
            extra_headers=extra,
            attachments=attachments,
            reply_to=route.reply_to if route is not None else None,
        )
        return msg

    @defer.inlineCallbacks
    def _compose_and_send(self, reports, to: Sequence[str], cc: Sequence[str], what: str,
                          route=None, outbox_route: str = "generators"):
        builds = merge_reports_prop(reports, "builds") or []
        text, html = self._bodies(reports)
        subject = merge_reports_prop_take_first(reports, "subject") or "Buildbot mail"
        msg = yield self._message(
            builds, subject=subject, to=to, cc=cc, text=text, html=html,
            attachments=self._attachments(
                merge_reports_prop(reports, "patches") or [],
                merge_reports_prop(reports, "logs") or [], builds,
            ),
            route=route,
        )
        # The address gate: build_email and envelope_recipients write only the values that
        # are one valid address each; the others are left out alone (logged below) and the
        # mail goes to everyone else.
        rejected = split_recipients([*to, *cc])[1]
        recipients = mime.envelope_recipients([*to, *cc])
        label = self._label(what, builds, msg)
        for value, reason in rejected:
            log.msg(
                f"{self.name}: {label}: recipient {mime.one_line(repr(value), 300)} left out: "
                f"not a valid address ({reason}); the mail goes to the others"
            )
        if not recipients:
            log.msg(f"{self.name}: {label}: no recipients (nobody to mail), nothing sent")
            return
        yield self.sendMail(msg, recipients, label=label, route=outbox_route)

    @staticmethod
    def _label(what: str, builds, msg) -> str:
        if builds:
            b = builds[0]
            subject = f"build {mime.one_line(b['builder']['name'], 80)!r} #{b['number']}"
        else:
            subject = "mail"
        return f"{what} {subject} {mime.header_value(msg, 'Message-ID')}"

    @staticmethod
    def _bodies(reports) -> tuple[str | None, str | None]:
        """Text and HTML bodies of the reports, concatenated like stock merges them."""
        texts, htmls = [], []
        for report in reports:
            ours = (report.get("extra_info") or {}).get("mailext")
            if ours:
                texts.append(ours["text"])
                htmls.append(ours["html"])
                continue
            body = report.get("body")
            if isinstance(body, bytes):
                body = body.decode("utf-8", "replace")
            if body is None:
                continue
            (htmls if report.get("type") == "html" else texts).append(str(body))
        return ("\n".join(texts) if texts else None, "\n".join(htmls) if htmls else None)

    @staticmethod
    def _attachments(patches, logs, builds) -> list[tuple[str, bytes]]:
        # Stock attaches patches (add_patch) and log contents (want_logs_content).
        attachments = []
        for index, patch in enumerate(patches):
            body = patch["body"]
            attachments.append(
                (f"source patch {index}", body if isinstance(body, bytes) else body.encode())
            )
        for entry in logs:
            name = f"{entry['stepname']}.{entry['name']}"
            if len(builds) > 1:
                name = f"{entry['buildername']}.{name}"
            content = entry["content"]["content"]
            attachments.append((name, content.encode("utf-8", "replace")))
        return attachments

    def sendMail(self, m, recipients, label: str | None = None, route: str = "generators"):
        """Write one message to the outbox; its first attempt follows at once. Fires once
        the mail is stored (not when delivered); never errbacks."""
        label = label or f"mail {mime.header_value(m, 'Message-ID')}"
        data = mime.message_bytes(m, label) if hasattr(m, "as_bytes") else m.as_string().encode()
        if self.dumpMailsToLog:
            log.msg(f"mail data:\n{data.decode('utf-8', 'replace')}")
        mail = outbox_mod.NewMail(
            route=route, label=label, subject=mime.one_line(mime.header_value(m, "Subject"), 200),
            envelope_from=mime.bare_address(self.fromaddr), recipients=list(recipients), message=data,
        )
        d = self.outbox.queue(mail)
        d.addErrback(
            lambda f: log.msg(
                f"{self.name}: mail {label}: NOT queued: the outbox cannot write to the master's "
                f"database ({f.getErrorMessage()}); mail lost: check the database (db_url)"
            )
        )
        return d

    def _build_digest(self, route: str, items: list, recipients: list) -> bytes:
        """The digest that stands for the mails of ``route`` held back by a full outbox."""
        lines = [
            f"The mail outbox of {self.name} is full (outbox_max_messages / outbox_max_bytes),",
            f"so these {len(items)} mails for {route} were folded into this one:",
            "",
            *(f"- {item['subject']}  [{item['label']}]" for item in items),
            "",
            "Make room: let pending mail leave (is the relay up?) or drop dead letters with",
            "'buildbot-mailext outbox MASTER_DIR drop --dead'.",
        ]
        msg = mime.build_email(
            subject=f"[Buildbot] {outbox_mod.digest_summary(len(items))} ({route})",
            from_addr=self.fromaddr, to=recipients, cc=[], text="\n".join(lines), html=None,
        )
        return mime.message_bytes(msg)
