"""Reads about a finished build that several parts of one mail need, made once and cheaply.

This module owns these reads and the short-lived cache that shares them:

- :func:`build_changes`: what ``builds/N/changes`` answers (the changes since the previous
  successful build with the same sourcestamps), which stock's blamelist
  (``getResponsibleUsersForBuild``, run by every build generator) and the template context
  (``context.build_context``) both need;
- :func:`build_sourcestamps` and :func:`head_change`: a build's sourcestamps and the newest
  change of a sourcestamp, which that answer and the culprits walk (``culprits.py``) both
  need for the same builds;
- :func:`build_properties`, with :func:`remember_build`: the build and properties Buildbot's
  generators already fetched, which stock's blamelist hook (given only a build id) needs;
- :func:`step_logs` and :func:`build_test_result_sets`: what the data API answers for a
  step's logs and a build's test result sets, without the read of the step or the build
  that those endpoints make first (the context knows both already).

Why not ``master.data.get(("builds", N, "changes"))`` itself: Buildbot's
``getPrevSuccessfulBuild`` fetches up to 1,000 earlier successful builds of the builder in
one query (ordered by an unindexed column) to find the previous one, which is almost always
the first of them; on a builder with a long history that one read costs more than all the
others of a failure mail together (issue 8: the report path is bound by database time).
:func:`build_changes` gives the same answer from pages of :data:`PREVIOUS_SUCCESS_PAGE`
builds, in the same order (newest ``complete_at`` first; ties, which Buildbot leaves to the
database, by the higher number), and shares the sourcestamp and change reads with the
culprits walk: a failure mail costs about a third fewer database round trips.

The answers are kept a short time (``TTL`` seconds, at most ``MAX_ENTRIES``) on the master
object: long enough for the generators and formatters of one event (or a burst of them),
short enough that a later event of the same build reads afresh.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from buildbot.data import resultspec
from buildbot.process.results import SUCCESS
from buildbot.util import datetime2epoch

TTL = 60.0
MAX_ENTRIES = 2048
# Earlier successful builds read per query when looking for the previous one.
PREVIOUS_SUCCESS_PAGE = 20
_CACHE_ATTRIBUTE = "mailext_build_reads"
# The fields of a change as the data API gives them (besides "sourcestamp", added below).
_CHANGE_FIELDS = ("changeid", "author", "committer", "comments", "branch", "revision", "revlink",
                  "when_timestamp", "category", "parent_changeids", "repository", "codebase",
                  "project", "files", "properties")
# The fields of a log as the data API gives them (besides "logid", the model's "id").
_LOG_FIELDS = ("name", "slug", "stepid", "complete", "num_lines", "type")


def model_field(obj: Any, name: str, default: Any = None) -> Any:
    """A field of what ``master.db`` returns: Buildbot 4.0 returns dicts, 4.1+ dataclasses."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def parent_ids(change: Any) -> list:
    """A change's parent change ids as a list (Buildbot 4.0's fake DB keeps the bare
    column value, an int)."""
    parents = model_field(change, "parent_changeids") or []
    return [parents] if isinstance(parents, int) else list(parents)


def _cache(master: Any) -> dict:
    cache = getattr(master, _CACHE_ATTRIBUTE, None)
    if cache is None:
        cache = {}
        setattr(master, _CACHE_ATTRIBUTE, cache)
    return cache


async def _cached(master: Any, key: tuple, read: Callable[[], Awaitable[Any]]) -> Any:
    """``read()``'s answer for ``key``, read at most once per ``TTL`` seconds."""
    cache = _cache(master)
    now = float(master.reactor.seconds())
    hit = cache.get(key)
    if hit is not None and now - hit[0] < TTL:
        return hit[1]
    value = await read()
    _store(master, key, value)
    return value


def _store(master: Any, key: tuple, value: Any) -> None:
    cache = _cache(master)
    if len(cache) >= MAX_ENTRIES:
        # forget the oldest half: a burst of many builds keeps what its events still need
        for old, _ in sorted(cache.items(), key=lambda item: item[1][0])[: MAX_ENTRIES // 2]:
            del cache[old]
    cache[key] = (float(master.reactor.seconds()), value)


def remember_build(master: Any, build: dict) -> None:
    """Keep a build dict the generators just prepared (with its properties, when fetched)
    for :func:`build_properties` and :func:`build_changes`: stock's blamelist hook gets only
    the build id and would read both again."""
    _store(master, ("build", build["buildid"]), build)
    if build.get("properties"):
        _store(master, ("properties", build["buildid"]), build["properties"])


async def build_properties(master: Any, buildid: int) -> dict:
    """``master.data.get(("builds", buildid, "properties"))`` (shared: do not modify)."""
    async def read():
        return await master.data.get(("builds", buildid, "properties")) or {}
    return await _cached(master, ("properties", buildid), read)


async def build_sourcestamps(master: Any, buildid: int) -> list:
    """``master.db.sourcestamps.getSourceStampsForBuild(buildid)`` as a new list."""
    async def read():
        return list(await master.db.sourcestamps.getSourceStampsForBuild(buildid) or [])
    return list(await _cached(master, ("sourcestamps", buildid), read))


async def head_change(master: Any, ssid: int) -> Any:
    """The newest change of a sourcestamp (``getChangeFromSSid``), or None. Shared: do not
    modify it."""
    async def read():
        return await master.db.changes.getChangeFromSSid(ssid)
    return await _cached(master, ("head_change", ssid), read)


async def build_changes(master: Any, buildid: int) -> list:
    """What ``master.data.get(("builds", buildid, "changes"))`` answers, as a new list (the
    change dicts are shared: do not modify them)."""
    async def read():
        return await _changes_since_previous_success(master, buildid)
    return list(await _cached(master, ("changes", buildid), read))


async def step_logs(master: Any, stepid: int) -> list:
    """What ``master.data.get(("steps", stepid, "logs"))`` answers, without the read of the
    step that endpoint makes first (to resolve paths that name the step by build and number;
    this one names it by id)."""
    return [{"logid": model_field(log, "id"), **{name: model_field(log, name) for name in _LOG_FIELDS}}
            for log in await master.db.logs.getLogs(stepid=stepid) or []]


async def build_test_result_sets(master: Any, builderid: int, buildid: int) -> list:
    """What ``master.data.get(("builds", buildid, "test_result_sets"))`` answers, without
    the read of the build that endpoint makes first to learn its builder: the builder's
    sets, filtered on the build in the query."""
    return list(await master.data.get(("builders", builderid, "test_result_sets"),
                                      filters=[resultspec.Filter("buildid", "eq", [buildid])]) or [])


def _sourcestamp_keys(sourcestamps: list) -> set:
    return {(model_field(ss, "repository"), model_field(ss, "branch"), model_field(ss, "codebase"))
            for ss in sourcestamps}


async def _previous_success(master: Any, build: dict, sourcestamps: list) -> dict | None:
    """Buildbot's ``getPrevSuccessfulBuild``: the newest (by ``complete_at``) successful
    build of the same builder, numbered lower, with the same repositories, branches and
    codebases; read a page at a time instead of 1,000 builds at once."""
    wanted = _sourcestamp_keys(sourcestamps)
    offset = 0
    while True:
        page = await master.data.get(
            ("builders", build["builderid"], "builds"),
            filters=[resultspec.Filter("number", "lt", [build["number"]]),
                     resultspec.Filter("results", "eq", [SUCCESS])],
            order=("-complete_at", "-number"), limit=PREVIOUS_SUCCESS_PAGE, offset=offset)
        for candidate in page or []:
            if _sourcestamp_keys(await build_sourcestamps(master, candidate["buildid"])) == wanted:
                return candidate
        if len(page or []) < PREVIOUS_SUCCESS_PAGE:
            return None
        offset += PREVIOUS_SUCCESS_PAGE


async def _changes_since_previous_success(master: Any, buildid: int) -> list:
    # Buildbot's ChangesConnectorComponent.getChangesForBuild, step for step, with the
    # previous successful build found by _previous_success and the reads shared.
    async def read_build():
        return await master.data.get(("builds", buildid))
    build = await _cached(master, ("build", buildid), read_build)
    if not build:
        return []
    sourcestamps = await build_sourcestamps(master, buildid)
    heads = {}
    for ss in sourcestamps:
        heads[model_field(ss, "codebase")] = await head_change(master, model_field(ss, "ssid"))
    previous = await _previous_success(master, build, sourcestamps)
    since: dict = {}
    if previous is not None:
        for ss in await build_sourcestamps(master, previous["buildid"]):
            change = await head_change(master, model_field(ss, "ssid"))
            if change is not None:
                since[model_field(ss, "codebase")] = change
    changes = []
    for codebase, change in heads.items():
        if change is None:
            continue
        stop_at = model_field(since.get(codebase), "changeid")
        if stop_at is not None and stop_at == model_field(change, "changeid"):
            continue
        changes.append(change)
        parents = parent_ids(change)
        while parents and stop_at not in parents:
            change = await master.db.changes.getChange(parents[0])
            if change is None:  # Buildbot ticket 3461: parent ids can be corrupted
                break
            changes.append(change)
            parents = parent_ids(change)
    return [await _change_data(master, change) for change in changes]


async def _change_data(master: Any, change: Any) -> dict:
    """A change as the data API gives it: ``when_timestamp`` in epoch seconds and its
    sourcestamp in place of ``sourcestampid``."""
    data = {name: model_field(change, name) for name in _CHANGE_FIELDS}
    if data["when_timestamp"] is not None:
        data["when_timestamp"] = datetime2epoch(data["when_timestamp"])
    data["sourcestamp"] = await master.data.get(("sourcestamps", str(model_field(change, "sourcestampid"))))
    return data
