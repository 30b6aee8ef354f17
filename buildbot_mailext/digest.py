"""Flood control: ``MailRoute(max_mails=(count, seconds))`` and the digest that follows.

This module owns the per-route mail budget. A route sends at most ``count`` mails in a
period of ``seconds`` (the period starts with its first mail); past that, its reports are
held and sent as **one digest** when the period ends (each build with result, transition
and link), then normal mail resumes. A *fixed* mail is never held back and does not use
the budget.

A budget lives on the master (``master.mailext_budgets``, keyed by route name), not on the
notifier or its generators: a reconfig replaces those, and the held reports must still go
out at the end of the period. The notifier that owns the route's name now is the one that
sends the digest (``MailBudget.sender``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.python import log

__all__ = ["MailBudget", "budget_for", "release_budgets"]

# How long a digest waits when no notifier owns its route (a reconfig in progress).
REARM_SECONDS = 5.0
# Builds listed in one digest; the rest are counted.
MAX_DIGEST_BUILDS = 200


class MailBudget:
    """The mail budget of one route: admits or holds reports, sends the digest."""

    def __init__(self, name: str, count: int, seconds: float, reactor: Any) -> None:
        self.name = name
        self.count = count
        self.seconds = seconds
        self.reactor = reactor
        self.period_start: float | None = None
        self.sent = 0
        self.held: list[dict] = []
        self.dropped = 0
        self.recipients: list[str] = []
        self.timer = None
        # called with (budget, held entries, recipients, dropped count); set by the notifier
        self.sender: Callable | None = None
        self.owner: Any = None

    def _now(self) -> float:
        return self.reactor.seconds() if self.reactor is not None else time.time()

    def admit(self) -> bool:
        """May one more mail go out now? (Counts it if so.)"""
        now = self._now()
        if self.period_start is None or (now >= self.period_start + self.seconds and not self.held):
            self.period_start, self.sent = now, 0
        if self.sent < self.count and not self.held:
            self.sent += 1
            return True
        return False

    def hold(self, entries: list[dict], recipients: list[str]) -> None:
        """Keep ``entries`` (one per build) for the digest mailed at the end of the period."""
        for entry in entries:
            if len(self.held) < MAX_DIGEST_BUILDS:
                self.held.append(entry)
            else:
                self.dropped += 1
        for address in recipients:
            if address not in self.recipients:
                self.recipients.append(address)
        if self.timer is None or not self.timer.active():
            delay = max(0.0, self.period_start + self.seconds - self._now())
            self.timer = self.reactor.callLater(delay, self.flush)

    def flush(self) -> None:
        """Send the digest of what was held (if a notifier owns this route now)."""
        self.timer = None
        if not self.held:
            return
        if self.sender is None:
            log.msg(f"buildbot-mailext: route {self.name!r}: digest of {len(self.held)} "
                    f"build(s) waits for its notifier (reconfig in progress)")
            self.timer = self.reactor.callLater(REARM_SECONDS, self.flush)
            return
        held, recipients, dropped = self.held, self.recipients, self.dropped
        self.held, self.recipients, self.dropped = [], [], 0
        # a new period starts with the digest
        self.period_start, self.sent = self._now(), 0
        d = defer.maybeDeferred(self.sender, self, held, recipients, dropped)
        d.addErrback(log.err, f"buildbot-mailext: route {self.name!r}: the digest of "
                              f"{len(held)} build(s) could not be composed (a bug: please report it)")


def budget_for(master, route, owner, sender: Callable) -> MailBudget:
    """The budget of ``route`` (created on first use), now owned by ``owner``."""
    budgets = getattr(master, "mailext_budgets", None)
    if budgets is None:
        budgets = master.mailext_budgets = {}
    count, seconds = route.max_mails
    budget = budgets.get(route.name)
    if budget is None:
        budget = budgets[route.name] = MailBudget(route.name, count, seconds, master.reactor)
    budget.count, budget.seconds = count, seconds
    budget.owner, budget.sender = owner, sender
    return budget


def release_budgets(master, owner) -> None:
    """``owner`` stops: its budgets keep their held reports and wait for a new owner."""
    for budget in (getattr(master, "mailext_budgets", None) or {}).values():
        if budget.owner is owner:
            budget.owner, budget.sender = None, None
