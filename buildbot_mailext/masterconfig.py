"""What a notifier can know about the ``master.cfg`` that Buildbot is loading.

A reporter is built *while* ``master.cfg`` runs (``buildbot checkconfig``, start,
reconfig), before Buildbot has read ``c['builders']``, so it cannot look names up at that
moment. This module owns the one way it can: find the configuration dictionary being
executed (``BuildmasterConfig``, through the frame of Buildbot's
``buildbot.config.master.loadConfigDict``) and register a check that Buildbot runs as a
*configurator* once the whole file has run (``MasterConfig.loadFromDict`` runs
configurators first, inside the same config-error collection, so a ``config.error`` raised
there is reported by ``checkconfig`` like any other).

:class:`KnownNames` is what such a check sees: the builder names, builder tags and
scheduler names the configuration defines. :func:`in_master_dir` resolves a relative path
from ``master.cfg`` the way Buildbot resolves its own: against the master directory, even
when ``buildbot checkconfig DIR`` runs from elsewhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from buildbot.interfaces import IConfigurator
from zope.interface import implementer


@dataclass(frozen=True)
class KnownNames:
    """Names defined by a master configuration, for checking what routes refer to."""

    builders: tuple = ()
    tags: tuple = ()
    schedulers: tuple = ()
    # True when another master of the cluster may run builders this file does not define.
    multi_master: bool = False

    @classmethod
    def from_config_dict(cls, config_dict: dict) -> "KnownNames":
        """Read a ``BuildmasterConfig`` dict as the user wrote it (BuilderConfig objects or
        dicts in ``c['builders']``); anything malformed is skipped (Buildbot reports it)."""
        builders, tags = [], set()
        for builder in _as_list(config_dict.get("builders")):
            name = _attr(builder, "name")
            if isinstance(name, str):
                builders.append(name)
            for tag in _as_list(_attr(builder, "tags")):
                if isinstance(tag, str):
                    tags.add(tag)
        schedulers = [
            s.name for s in _as_list(config_dict.get("schedulers"))
            if isinstance(getattr(s, "name", None), str)
        ]
        return cls(
            builders=tuple(builders),
            tags=tuple(sorted(tags)),
            schedulers=tuple(schedulers),
            multi_master=bool(config_dict.get("multiMaster")),
        )


    @classmethod
    def from_master_config(cls, master_config: Any) -> "KnownNames":
        """The same names from the ``MasterConfig`` a running master holds
        (``master.config``); empty when there is none."""
        schedulers = getattr(master_config, "schedulers", None)
        return cls.from_config_dict(
            {
                "builders": getattr(master_config, "builders", None),
                "schedulers": list(schedulers.values()) if isinstance(schedulers, dict) else None,
                "multiMaster": getattr(master_config, "multiMaster", False),
            }
        )


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _attr(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _loading_namespace() -> Optional[dict]:
    """The globals ``master.cfg`` is executed in (``loadConfigDict``'s ``localDict``), or
    None when no master configuration is being loaded (a notifier built in a test)."""
    try:
        from buildbot.config import master as config_master
    except ImportError:  # pragma: no cover
        return None
    code = config_master.loadConfigDict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            namespace = frame.f_locals.get("localDict")
            return namespace if isinstance(namespace, dict) else None
        frame = frame.f_back
    return None


def in_master_dir(path: Any) -> Any:
    """A relative ``path`` given in ``master.cfg`` made absolute against the master
    directory while Buildbot loads the file (``checkconfig DIR`` runs from anywhere; a
    running master runs in its directory, where a relative path already means the same).
    ``None``, absolute paths and calls outside config loading: unchanged."""
    if path is None or not isinstance(path, (str, os.PathLike)) or os.path.isabs(path):
        return path
    basedir = loading_basedir()
    if basedir is None:
        return path
    return os.path.join(os.path.abspath(basedir), os.fspath(path))


def loading_basedir() -> Optional[str]:
    """The master directory whose ``master.cfg`` Buildbot is executing right now (for
    ``buildbot checkconfig``, start or reconfig), or None outside config loading."""
    namespace = _loading_namespace()
    basedir = namespace.get("basedir") if namespace else None
    return basedir if isinstance(basedir, str) else None


@implementer(IConfigurator)
class _AfterLoadCheck:
    """A Buildbot configurator that only reads: it runs ``check`` on the finished config."""

    def __init__(self, check: Callable[[KnownNames], None]) -> None:
        self.check = check

    def configure(self, config_dict: dict) -> None:
        configurators = config_dict.get("configurators")
        if isinstance(configurators, list) and self in configurators:
            later = configurators[configurators.index(self) + 1:]
            if any(not isinstance(c, _AfterLoadCheck) for c in later):
                # A configurator listed after this one may still add builders (Buildbot's
                # JanitorConfigurator does): check once they all ran. Buildbot's loop over
                # the list reaches what is appended to it.
                configurators.append(_AfterLoadCheck(self.check))
                return
        self.check(KnownNames.from_config_dict(config_dict))


def check_after_load(check: Callable[[KnownNames], None]) -> bool:
    """Run ``check(KnownNames)`` once the ``master.cfg`` being loaded has run to its end.

    Returns False (and registers nothing) when no master configuration is being loaded, or
    when the file has not defined ``BuildmasterConfig`` yet at this point (it is usually
    its first line: ``c = BuildmasterConfig = {}``).
    """
    namespace = _loading_namespace()
    config_dict = namespace.get("BuildmasterConfig") if namespace else None
    if not isinstance(config_dict, dict):
        return False
    configurators = config_dict.setdefault("configurators", [])
    if not isinstance(configurators, list):
        return False  # a tuple or worse: Buildbot reports what it cannot use
    configurators.append(_AfterLoadCheck(check))
    return True
