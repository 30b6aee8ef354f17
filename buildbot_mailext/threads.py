"""Mail threads and list headers: what makes a mail client file our mails sensibly.

This module owns the header *values* (message.py sets them through its one-line gate):

- a stable thread root ``Message-ID`` per (builder, branch) on the ``fromaddr`` domain, and
  ``In-Reply-To``/``References`` pointing at it, so every mail about one builder and branch
  lands in one thread (mail clients thread on ``References`` even when the root itself was
  never received);
- ``List-Id`` (RFC 2919) from ``MailRoute(list_id=...)``.

``Reply-To`` and ``X-Auto-Response-Suppress`` are set by ``message.build_email`` itself.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from buildbot_mailext.addresses import bare_address

__all__ = ["build_branch", "thread_headers", "thread_root_id"]


def build_branch(build: dict) -> str | None:
    """The branch of a data API build dict: its ``branch`` property, else the branch of its
    first sourcestamp (as ``context`` compares builds)."""
    props = build.get("properties") or {}
    value = props.get("branch")
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = value[0]
    if value is None:
        sourcestamps = (build.get("buildset") or {}).get("sourcestamps") or []
        if sourcestamps:
            value = sourcestamps[0].get("branch")
    return value


def thread_root_id(builder: str, branch: Any, fromaddr: str) -> str:
    """``<buildbot.thread.HASH@DOMAIN>``: the same for every mail about ``builder`` on
    ``branch`` from ``fromaddr``; the hash keeps hostile names out of the header."""
    key = f"{builder}\x00{'' if branch is None else branch}".encode("utf-8", "replace")
    digest = hashlib.sha256(key).hexdigest()[:24]
    domain = bare_address(fromaddr).rpartition("@")[2] or "buildbot.localdomain"
    return f"<buildbot.thread.{digest}@{domain}>"


def thread_headers(builds: Sequence[dict], fromaddr: str) -> dict[str, str]:
    """``In-Reply-To`` and ``References`` for a mail about one build; none for several
    (a buildset mail spans builders, so it belongs to no builder's thread)."""
    if len(builds) != 1:
        return {}
    build = builds[0]
    builder = (build.get("builder") or {}).get("name") or str(build.get("builderid"))
    root = thread_root_id(builder, build_branch(build), fromaddr)
    return {"In-Reply-To": root, "References": root}
