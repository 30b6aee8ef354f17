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
from types import SimpleNamespace
from typing import Any, ClassVar, Sequence

from buildbot import util
from buildbot.process.results import EXCEPTION, FAILURE
from buildbot.reporters import utils
from buildbot.reporters.generators.build import BuildStatusGenerator
from buildbot.reporters.generators.worker import WorkerMissingGenerator
from twisted.internet import defer

from buildbot_mailext.addresses import address_errors
from buildbot_mailext.context import previous_build_same_branch, transition_for
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


class RouteGenerator(BuildStatusGenerator):
    """The report generator of one :class:`MailRoute`.

    Reports it produces carry ``report["mailext_route"]`` so the notifier sends each one
    as its own mail to the route's recipients instead of merging them.
    """

    compare_attrs: ClassVar[Sequence[str]] = ["route"]

    def __init__(self, route: MailRoute, message_formatter: Any) -> None:
        stock_modes = tuple(m for m in route.mode if m in STOCK_MODES)
        super().__init__(
            mode=stock_modes,
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
        return f"RouteGenerator_{self.route.name}"

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
        if not self.is_message_needed_by_props(build):
            return None
        previous_results = None
        if self.route.wants_previous_build:
            # Already skips builds that say nothing about the code (retry, cancelled, skipped).
            prev = yield previous_build_same_branch(master, build)
            previous_results = prev["results"] if prev else None
        if not wanted_by_results(self.mode, build["results"], previous_results):
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
