"""Culprits: the changes that may have broken a build, and who made them.

This module owns answering "which change broke it" for a failing build:

- the changes since the last *passing* build (success or warnings) of the same builder and
  branch, per codebase, newest first, each with **the build it first appeared in**, so a mail
  can set the changes new in this build apart from those that were already failing;
- the requester of a forced build (the ``owner`` property), a culprit candidate too;
- :func:`author_address`: the address in an author string, robust to bot authors such as
  ``dependabot[bot] <noreply@github.com>`` (``email.utils.parseaddr`` reads that as
  ``dependabot``).

Why not ``builds/N/changes``: Buildbot's endpoint counts only SUCCESS as passing (a build with
warnings does not end a failure run), and without a passing build it walks the change chain to
the beginning of history, one query per change. Here the walk is bounded
(:data:`MAX_CULPRIT_WALK`) and the builds searched are bounded by the same limit as the
previous-build search.

Reads go through ``master.db`` (Buildbot's own thread pool), never blocking the reactor.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.python import log

from buildbot.process.results import EXCEPTION, FAILURE, SUCCESS, WARNINGS

from buildbot_mailext.reads import build_sourcestamps, head_change, model_field, parent_ids

__all__ = ["author_address", "author_login", "find_culprits", "MAX_CULPRITS", "MAX_CULPRIT_WALK"]

# Changes listed in a mail; the rest are counted ("and N more").
MAX_CULPRITS = 50
# Changes walked (and counted) at most per codebase: bounds the DB reads of one mail.
MAX_CULPRIT_WALK = 200

_FAILING = (FAILURE, EXCEPTION)
_PASSING = (SUCCESS, WARNINGS)
_ANGLE_ADDRESS = re.compile(r"<\s*([^<>\s@]+@[^<>\s@]+)\s*>\s*$")
_BARE_ADDRESS = re.compile(r"^\s*([^<>\s@\"]+@[^<>\s@\"]+?)\.?\s*$")


def author_address(author: Any) -> str | None:
    """The mail address in an author string, or None when there is none.

    ``Jane <jane@example.org>`` and ``jane@example.org`` give ``jane@example.org``;
    ``dependabot[bot] <noreply@github.com>`` gives ``noreply@github.com`` (not
    ``dependabot``, as ``parseaddr`` would); ``jane`` gives None (a lookup may know it).
    CR/LF or other control characters anywhere make it None: such an author is not mailed.
    """
    if not isinstance(author, str) or re.search(r"[\x00-\x1f\x7f]", author):
        return None
    match = _ANGLE_ADDRESS.search(author) or _BARE_ADDRESS.match(author)
    return match.group(1) if match else None


def author_login(author: Any) -> str | None:
    """``author`` when it is a plain name without an address ("jane"), for a ``lookup``;
    None when it holds an address or control characters."""
    if not isinstance(author, str) or re.search(r"[\x00-\x1f\x7f<>@]", author):
        return None
    return author.strip() or None


async def _head_changes(master, build: dict) -> dict[str, Any]:
    """codebase -> the newest change in the build's sourcestamps (a ChangeModel). The
    sourcestamps of the build being mailed are in its buildset already (Buildbot's
    generators fetched it): one query less than asking for them again. The reads are
    shared with ``reads.build_changes``, which needs the same ones."""
    buildset = build.get("buildset")
    sourcestamps = buildset.get("sourcestamps") if isinstance(buildset, dict) else None
    if sourcestamps is None:
        sourcestamps = await build_sourcestamps(master, build["buildid"])
    heads: dict[str, Any] = {}
    for ss in sourcestamps:
        change = await head_change(master, model_field(ss, "ssid"))
        if change is not None:
            heads[model_field(ss, "codebase") or ""] = change
    return heads


def _changeids(heads: dict[str, Any]) -> dict[str, int]:
    """codebase -> changeid, from ``_head_changes``' codebase -> change."""
    return {cb: model_field(change, "changeid") for cb, change in heads.items()}


async def find_culprits(master, build: dict, earlier_builds) -> dict:
    """The culprits of ``build`` (a data API build dict).

    ``earlier_builds`` is an async iterable of the earlier finished builds of the same
    builder and branch, newest first (``context.earlier_builds_same_branch``). Returns::

        {"changes": [ChangeModel-like, ...],   # newest first, at most MAX_CULPRITS
         "first_build": {changeid: build dict},  # the build each change first appeared in
         "more": int,                           # changes walked but not listed
         "more_unknown": bool,                  # the walk stopped before the end
         "since": build dict | None,            # the last passing build, if found
         "failing_builds": [build dict, ...]}   # earlier failing builds in this run

    Never raises: a database problem is logged in one line and gives no culprits.
    """
    try:
        return await _find_culprits(master, build, earlier_builds)
    except Exception as e:  # culprits are nice to have: never lose the mail over them
        log.msg(f"buildbot-mailext: cannot compute culprits of build {build.get('buildid')}: "
                f"{type(e).__name__}: {e}")
        return {"changes": [], "first_build": {}, "more": 0, "more_unknown": False,
                "since": None, "failing_builds": []}


async def _find_culprits(master, build: dict, earlier_builds) -> dict:
    failing: list[dict] = []
    since = None
    async for earlier in earlier_builds:
        if earlier.get("results") in _FAILING:
            failing.append(earlier)
            continue
        if earlier.get("results") in _PASSING:
            since = earlier
            break
    # changeid -> the builds whose newest change it is (the current one included)
    head_builds: dict[int, list[dict]] = {}
    current_changes = await _head_changes(master, build)
    current_heads = _changeids(current_changes)
    for cb, changeid in current_heads.items():
        head_builds.setdefault(changeid, []).append(build)
    for earlier in failing:
        for changeid in _changeids(await _head_changes(master, earlier)).values():
            head_builds.setdefault(changeid, []).append(earlier)
    stop_at = _changeids(await _head_changes(master, since)) if since else {}

    walked: list[tuple[Any, dict]] = []
    more_unknown = False
    for cb, changeid in sorted(current_heads.items()):
        first: dict | None = None
        change = current_changes[cb]  # the head itself, read with it (no getChange for it)
        count = 0
        while change is not None and model_field(change, "changeid") != stop_at.get(cb):
            for candidate in head_builds.get(model_field(change, "changeid"), []):
                if first is None or candidate["number"] < first["number"]:
                    first = candidate
            walked.append((change, first or build))
            count += 1
            parents = parent_ids(change)
            if count >= MAX_CULPRIT_WALK:
                more_unknown = bool(parents)
                break
            if not parents or stop_at.get(cb) in parents:
                break
            change = await master.db.changes.getChange(parents[0])
    # newest first across codebases (change ids grow with time)
    walked.sort(key=lambda pair: model_field(pair[0], "changeid"), reverse=True)
    listed = walked[:MAX_CULPRITS]
    return {
        "changes": [c for c, _ in listed],
        "first_build": {model_field(c, "changeid"): b for c, b in listed},
        "more": len(walked) - len(listed),
        "more_unknown": more_unknown,
        "since": since,
        "failing_builds": failing,
    }
