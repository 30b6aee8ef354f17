"""Routing: which builds go to which recipients, with which template.

This module owns :class:`MailRoute` (the object users write in ``master.cfg``) and
:class:`RouteGenerator`, the Buildbot report generator a route becomes. A generator
decides *whether* a build deserves a mail; the formatter decides *what* it says; the
notifier decides *how it travels*. Each route is its own generator, so two routes that
match one build produce two reports, hence two mails to two recipient lists.

Modes are Buildbot's (``failing``, ``passing``, ``warnings``, ``exception``,
``cancelled``, ``change``, ``problem``, and the shortcuts ``all`` / ``warnings``) plus
three transitions computed against the previous build of the same builder *and branch*:
``new_failure``, ``still_failing`` and ``fixed``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from email.utils import parseaddr
from types import SimpleNamespace
from typing import Any, ClassVar, Sequence

from buildbot import util
from buildbot.process.results import EXCEPTION, FAILURE
from buildbot.reporters import utils
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.generators.buildset import BuildSetStatusGenerator
from buildbot.reporters.generators.worker import WorkerMissingGenerator
from twisted.internet import defer

from buildbot_mailext import reads
from buildbot_mailext.addresses import address_errors, is_valid_address
from buildbot_mailext.context import previous_build_same_branch, transition_for
from buildbot_mailext.excerpts import error_pattern_errors
from buildbot_mailext.masterconfig import KnownNames

# mode name -> the transition text (from context.transition_for) that satisfies it
TRANSITION_MODES = {
    "new_failure": "new failure",
    "still_failing": "still failing",
    "fixed": "fixed",
}
STOCK_MODES = BuildStatusGenerator.possible_modes
KNOWN_MODES = tuple(STOCK_MODES) + tuple(TRANSITION_MODES)
# Stock modes that look at the previous build too.
MODES_NEEDING_PREVIOUS = {"change", "problem", *TRANSITION_MODES}

DEFAULT_LOG_TAIL_LINES = 40
GROUP_BY = ("build", "buildset")
# RFC 2919 list-id: dot-atom-text, e.g. "builds.example.org"
_LIST_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)+$")


def list_id_header(value: Any) -> str | None:
    """The ``List-Id`` header value for ``value`` ("Label <id.example.org>", "id.example.org"
    or "<id.example.org>"), or None when it is not a valid RFC 2919 list identifier."""
    if not isinstance(value, str) or re.search(r"[\x00-\x1f\x7f]", value):
        return None
    match = re.match(r"^\s*(?P<label>[^<>]*?)\s*<(?P<id>[^<>]+)>\s*$", value)
    label, list_id = (match.group("label"), match.group("id")) if match else ("", value.strip())
    if not _LIST_ID.match(list_id) or '"' in label:
        return None
    return f"{label} <{list_id}>" if label else f"<{list_id}>"


def exclude_pattern_errors(patterns: Any, where: str) -> list[str]:
    """Config errors for ``exclude_recipients`` (fnmatch patterns)."""
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        return [f"{where}: 'exclude_recipients' must be a list of fnmatch patterns such as "
                f"['*noreply*', 'dependabot*'], got {patterns!r}"]
    return []


def excluded(address: str, patterns: Sequence[str]) -> bool:
    """Does ``address`` ("Name <a@b>" or "a@b") match one of the fnmatch ``patterns``?
    Matched case-insensitively against the whole text and the bare address."""
    if not patterns:
        return False
    text = address.lower()
    _, bare = parseaddr(text)
    return any(fnmatch.fnmatchcase(text, p.lower()) or (bare and fnmatch.fnmatchcase(bare, p.lower()))
               for p in patterns)


def expand_modes(mode: str | Sequence[str]) -> tuple[str, ...]:
    """Apply Buildbot's shortcuts: ``"all"`` and a lone ``"warnings"`` string."""
    if isinstance(mode, str):
        if mode == "all":
            return ("failing", "passing", "warnings", "exception", "cancelled")
        if mode == "warnings":
            return ("failing", "warnings")
        return (mode,)
    return tuple(mode)


def normalize_addresses(to: str | Sequence[str] | None) -> list[str]:
    """A lone string is one address (stock MailNotifier splits it into characters,
    Buildbot #3913); a list or tuple is kept in order."""
    if to is None:
        return []
    if isinstance(to, str):
        return [to]
    return list(to)


def normalize_names(names: Any) -> Any:
    """``builders``, ``tags``, ``branches``, ``schedulers``: a lone string is *one* name
    (``builders="linux"`` means ``["linux"]``, not five one-letter builders); a list or
    tuple becomes a list; anything else is kept for ``config_errors`` to report."""
    if isinstance(names, str):
        return [names]
    if isinstance(names, tuple):
        return list(names)
    return names


def closest(name: str, known: Sequence[str]) -> str:
    """``; did you mean 'linux'?`` (difflib's closest known names), plus the known names
    when there are few enough to list: the fix, in the error message itself."""
    hint = ""
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if matches:
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?"
    if not known:
        return hint + " (this configuration defines none)"
    listed = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
    return f"{hint} (known: {listed})"


class MailRoute(util.ComparableMixin):
    """One mailing rule: builds matching the filters and modes go to ``to``.

    ``to`` accepts a string or a list. ``builders``, ``tags``, ``branches`` and
    ``schedulers`` filter like ``BuildStatusGenerator`` (lists or None). ``template``
    names a template set (``NAME.subject.j2``, ``NAME.txt.j2``, ``NAME.html.j2``).
    ``subject``, when given, is a Jinja2 template string that replaces the subject
    template for this route only.
    """

    compare_attrs: ClassVar[Sequence[str]] = (
        "to",
        "builders",
        "tags",
        "branches",
        "schedulers",
        "mode",
        "template",
        "subject",
        "send_to_interested_users",
        "name",
        "log_tail_lines",
        "notify_culprits",
        "exclude_recipients",
        "error_patterns",
        "list_id",
        "reply_to",
        "group_by",
        "max_mails",
    )

    def __init__(
        self,
        to: str | Sequence[str] | None,
        builders: list[str] | None = None,
        tags: list[str] | None = None,
        branches: list[str] | None = None,
        schedulers: list[str] | None = None,
        mode: str | Sequence[str] = ("failing",),
        template: str = "build_failure",
        subject: str | None = None,
        send_to_interested_users: bool = False,
        name: str | None = None,
        log_tail_lines: int = DEFAULT_LOG_TAIL_LINES,
        notify_culprits: bool = False,
        exclude_recipients: Sequence[str] = (),
        error_patterns: Sequence[str] | None = None,
        list_id: str | None = None,
        reply_to: str | None = None,
        group_by: str = "build",
        max_mails: tuple[int, float] | None = None,
    ) -> None:
        self.to = normalize_addresses(to)
        self.builders = normalize_names(builders)
        self.tags = normalize_names(tags)
        self.branches = normalize_names(branches)
        self.schedulers = normalize_names(schedulers)
        self.mode = expand_modes(mode)
        self.template = template
        self.subject = subject
        self.send_to_interested_users = send_to_interested_users
        self.log_tail_lines = log_tail_lines
        self.notify_culprits = notify_culprits
        self.exclude_recipients = (
            (exclude_recipients,) if isinstance(exclude_recipients, str)
            else tuple(exclude_recipients or ())
        )
        self.error_patterns = None if error_patterns is None else (
            (error_patterns,) if isinstance(error_patterns, str) else error_patterns
        )
        self.list_id = list_id
        self.reply_to = reply_to
        self.group_by = group_by
        self.max_mails = tuple(max_mails) if isinstance(max_mails, list) else max_mails
        self.name = name if name is not None else self._default_name()

    def _default_name(self) -> str:
        # Stable across reconfigs (no ids, no addresses of objects): what it watches and
        # where it sends.
        # Tolerates values config_errors() will refuse: the error must be able to name it.
        watched = self.builders or self.tags or ["all"]
        if not isinstance(watched, list):
            watched = [watched]
        to = ",".join(str(a) for a in self.to) if isinstance(self.to, list) else str(self.to)
        return f"{'+'.join(str(w) for w in watched)}->{to or 'interested-users'}"

    def __repr__(self) -> str:
        return f"MailRoute({self.name!r})"

    def config_errors(self) -> list[str]:
        """Everything wrong with this route, each naming the setting and the fix."""
        where = f"MailRoute {self.name!r}"
        errors: list[str] = []
        if not self.to and not self.send_to_interested_users:
            errors.append(
                f"{where}: 'to' is empty and send_to_interested_users is False, so this route "
                "would never mail anyone; give to='list@example.org' or set "
                "send_to_interested_users=True"
            )
        for address in self.to:
            errors.extend(address_errors(address, where, "to"))
        for mode in self.mode:
            if mode not in KNOWN_MODES:
                errors.append(
                    f"{where}: unknown mode {mode!r}; use one of {', '.join(KNOWN_MODES)} "
                    "(or the string 'all')"
                )
        for setting in ("builders", "tags", "branches", "schedulers"):
            value = getattr(self, setting)
            if value is not None and not (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            ):
                errors.append(
                    f"{where}: '{setting}' must be a name, a list of names (strings) or "
                    f"None, got {value!r}"
                )
            elif value is not None and not value:
                errors.append(
                    f"{where}: '{setting}' is empty, so this route would never send; "
                    f"leave it out (or None) to match them all"
                )
        if self.builders is not None and self.tags is not None:
            errors.append(
                f"{where}: give either 'builders' or 'tags', not both (Buildbot's rule); "
                "split it into two routes"
            )
        if not isinstance(self.template, str) or not self.template:
            errors.append(f"{where}: 'template' must be a template name such as 'build_failure'")
        if self.subject is not None and not isinstance(self.subject, str):
            errors.append(f"{where}: 'subject' must be a Jinja2 template string or None")
        if not isinstance(self.log_tail_lines, int) or self.log_tail_lines < 0:
            errors.append(f"{where}: 'log_tail_lines' must be a whole number >= 0")
        errors.extend(self._issue9_errors(where))
        return errors

    def _issue9_errors(self, where: str) -> list[str]:
        """notify_culprits, exclude_recipients, error_patterns, list_id, reply_to,
        group_by, max_mails."""
        errors = []
        if not isinstance(self.notify_culprits, bool):
            errors.append(f"{where}: 'notify_culprits' must be True or False")
        errors.extend(exclude_pattern_errors(self.exclude_recipients, where))
        errors.extend(error_pattern_errors(self.error_patterns, where))
        if self.list_id is not None and not list_id_header(self.list_id):
            errors.append(
                f"{where}: list_id {self.list_id!r} is not a list identifier; write it as "
                "'builds.example.org' or 'Build results <builds.example.org>' (RFC 2919)"
            )
        if self.reply_to is not None and not is_valid_address(self.reply_to):
            errors.append(
                f"{where}: reply_to {self.reply_to!r} is not a valid email address; write "
                "it as 'dev@example.org' or 'Developers <dev@example.org>'"
            )
        if self.group_by not in GROUP_BY:
            errors.append(
                f"{where}: group_by {self.group_by!r} is unknown; use 'build' (one mail per "
                "build) or 'buildset' (one mail when the whole buildset has finished)"
            )
        if self.max_mails is not None and not (
            isinstance(self.max_mails, tuple) and len(self.max_mails) == 2
            and isinstance(self.max_mails[0], int) and not isinstance(self.max_mails[0], bool)
            and self.max_mails[0] >= 1
            and isinstance(self.max_mails[1], (int, float)) and self.max_mails[1] > 0
        ):
            errors.append(
                f"{where}: max_mails must be (count, seconds) with count >= 1 and seconds > 0, "
                f"e.g. max_mails=(5, 3600), or None; got {self.max_mails!r}"
            )
        return errors

    def unknown_name_errors(self, known: KnownNames) -> list[str]:
        """The builders, tags and schedulers this route names that the master's
        configuration does not define: such a route would silently never send."""
        where = f"MailRoute {self.name!r}"
        errors = []
        for setting, defined, what in (
            ("builders", known.builders, "c['builders'] has no builder named"),
            ("tags", known.tags, "no builder in c['builders'] has the tag"),
            ("schedulers", known.schedulers, "c['schedulers'] has no scheduler named"),
        ):
            names = getattr(self, setting)
            if not isinstance(names, list):
                continue  # config_errors() reports it
            for name in names:
                if isinstance(name, str) and name not in defined:
                    errors.append(
                        f"{where}: {setting}: {what} {name!r}, so this route would never "
                        f"send{closest(name, defined)}"
                    )
        return errors

    @property
    def wants_previous_build(self) -> bool:
        return bool(MODES_NEEDING_PREVIOUS & set(self.mode))


def wanted_by_results(mode: Sequence[str], results: int, previous_results: int | None) -> bool:
    """Does a build with ``results`` (after ``previous_results`` on the same builder and
    branch, or None) satisfy any of ``mode``? Stock modes keep their stock meaning."""
    stock = [m for m in mode if m in STOCK_MODES]
    if stock:
        # Reuse Buildbot's own rule; it reads nothing of the generator but ``mode``.
        prev = None if previous_results is None else {"results": previous_results}
        build = {"results": results, "prev_build": prev}
        if BuildStatusGenerator.is_message_needed_by_results(SimpleNamespace(mode=stock), build):
            return True
    transition = transition_for(results, previous_results)
    if transition == "first build" and results in (FAILURE, EXCEPTION):
        # Nothing failed before it on this branch: for a mailing list that is news.
        transition = "new failure"
    return any(TRANSITION_MODES.get(m) == transition for m in mode)


class _RouteGeneratorMixin:
    """What both route generators share: stock filters from the route, every mode of the
    route (ours included), and the per-build decision (filters, modes, transitions)."""

    compare_attrs: ClassVar[Sequence[str]] = ["route"]

    def __init__(self, route: MailRoute, message_formatter: Any) -> None:
        super().__init__(
            mode=tuple(m for m in route.mode if m in STOCK_MODES),
            tags=route.tags,
            builders=route.builders,
            schedulers=route.schedulers,
            branches=route.branches,
            message_formatter=message_formatter,
        )
        self.route = route
        # The generator's own mode keeps every mode (stock check() would reject ours).
        self.mode = route.mode

    def check(self) -> None:
        # MailRoute.config_errors() validated everything already (with better messages).
        pass

    def generate_name(self) -> str:
        return f"{type(self).__name__}_{self.route.name}"

    @defer.inlineCallbacks
    def route_wants(self, master, build: dict):
        """Does this route want a mail about the finished ``build``?"""
        if build.get("results") is None or not self.is_message_needed_by_props(build):
            return False
        previous_results = None
        if self.route.wants_previous_build:
            # Already skips builds that say nothing about the code (retry, cancelled, skipped).
            prev = yield previous_build_same_branch(master, build)
            previous_results = prev["results"] if prev else None
        return wanted_by_results(self.mode, build["results"], previous_results)


class RouteGenerator(_RouteGeneratorMixin, BuildStatusGenerator):
    """The report generator of one :class:`MailRoute`.

    Reports it produces carry ``report["mailext_route"]`` so the notifier sends each one
    as its own mail to the route's recipients instead of merging them.
    """

    @defer.inlineCallbacks
    def generate(self, master, reporter, key, build):
        _, _, event = key
        if event != "finished":
            return None
        formatter = self.formatter
        yield utils.getDetailsForBuild(
            master,
            build,
            want_properties=True,  # branch/scheduler filters read properties
            want_steps=formatter.want_steps,
            want_previous_build=False,  # ours is branch-aware, fetched below only if needed
            want_logs=formatter.want_logs,
            want_logs_content=formatter.want_logs_content,
        )
        reads.remember_build(master, build)  # the blamelist hook reads it by id
        if not (yield self.route_wants(master, build)):
            return None
        report = yield self.build_message(formatter, master, reporter, build)
        report["mailext_route"] = self.route
        return report


class MailExtWorkerMissingGenerator(WorkerMissingGenerator):
    """Stock ``WorkerMissingGenerator`` whose report keeps the formatter's
    ``extra_info``, so the worker-missing mail gets a text part as well as HTML."""

    @defer.inlineCallbacks
    def generate(self, master, reporter, key, worker):
        if not self._is_message_needed(worker):
            return None
        msg = yield self.formatter.formatMessageForMissingWorker(master, worker)
        return {
            "body": msg["body"],
            "subject": msg["subject"] or f"Buildbot worker {worker['name']} missing",
            "type": msg["type"],
            "results": None,
            "builds": None,
            "buildset": None,
            "users": worker["notify"],
            "patches": None,
            "logs": None,
            "worker": worker["name"],
            "extra_info": msg.get("extra_info"),
        }


class BuildsetRouteGenerator(_RouteGeneratorMixin, BuildSetStatusGenerator):
    """The report generator of a ``MailRoute(group_by="buildset")``: one report when the
    whole buildset has finished, covering every build of it that the route wants (filters,
    modes and transitions as for :class:`RouteGenerator`), or none."""

    @defer.inlineCallbacks
    def generate(self, master, reporter, key, message):
        formatter = self.formatter
        details = yield utils.getDetailsForBuildset(
            master,
            message["bsid"],
            want_properties=True,
            want_steps=formatter.want_steps,
            want_previous_build=False,
            want_logs=formatter.want_logs,
            want_logs_content=formatter.want_logs_content,
        )
        wanted = []
        for build in details["builds"]:
            if (yield self.route_wants(master, build)):
                wanted.append(build)
        if not wanted:
            return None
        users: set[str] = set()
        for build in wanted:
            users.update((yield reporter.getResponsibleUsersForBuild(master, build["buildid"])))
        msg = yield formatter.format_message_for_buildset(
            master, details["buildset"], wanted, users=sorted(users), mode=self.mode
        )
        return {
            "body": msg["body"],
            "subject": msg["subject"],
            "type": msg["type"],
            "results": details["buildset"].get("results"),
            "builds": wanted,
            "buildset": details["buildset"],
            "users": sorted(users),
            "patches": [],
            "logs": [],
            "extra_info": msg.get("extra_info"),
            "mailext_route": self.route,
        }


def route_generator(route: MailRoute, message_formatter: Any):
    """The generator a route becomes: per build, or per buildset (``group_by``)."""
    if route.group_by == "buildset":
        return BuildsetRouteGenerator(route, message_formatter)
    return RouteGenerator(route, message_formatter)
