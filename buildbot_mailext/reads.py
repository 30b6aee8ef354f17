"""Reads about a finished build that several parts of one mail need, made once.

This module owns :func:`build_changes`: ``builds/N/changes`` (the changes since the
previous successful build), which stock's blamelist (``getResponsibleUsersForBuild``, run
by every build generator) and the template context (``context.build_context``) both
need. Each read costs a walk over sourcestamps, changes and earlier builds (five to ten
queries); made once per build instead of twice, a failure mail costs ~15% fewer database
round trips (issue 8: the report path is bound by them).

The answers are kept a short time (``TTL`` seconds, at most ``MAX_ENTRIES`` builds) on the
master object: long enough for the generators and formatters of one event, short enough
that a later event of the same build reads afresh.
"""

from __future__ import annotations

from typing import Any

TTL = 60.0
MAX_ENTRIES = 256
_CACHE_ATTRIBUTE = "mailext_build_reads"


def _cache(master: Any) -> dict:
    cache = getattr(master, _CACHE_ATTRIBUTE, None)
    if cache is None:
        cache = {}
        setattr(master, _CACHE_ATTRIBUTE, cache)
    return cache


async def build_changes(master: Any, buildid: int) -> list:
    """``master.data.get(("builds", buildid, "changes"))`` as a list, read at most once per
    ``TTL`` seconds. Each caller gets its own list (the change dicts are shared)."""
    cache = _cache(master)
    now = float(master.reactor.seconds())
    hit = cache.get(buildid)
    if hit is not None and now - hit[0] < TTL:
        return list(hit[1])
    changes = list(await master.data.get(("builds", buildid, "changes")) or [])
    if len(cache) >= MAX_ENTRIES:
        # forget the oldest half: a burst of many builds keeps what its events still need
        for key, _ in sorted(cache.items(), key=lambda item: item[1][0])[: MAX_ENTRIES // 2]:
            del cache[key]
    cache[buildid] = (now, changes)
    return list(changes)
