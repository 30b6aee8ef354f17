"""buildbot-mailext: build mail for Buildbot that reaches the right lists, through the mail
setup a site really has.

Public names (also reachable through ``buildbot.plugins``):

- :class:`MailExtNotifier` -- drop-in ``MailNotifier`` subclass with per-builder routes.
- :class:`MailRoute` -- which builds go to which recipients with which template.
- :class:`MailExtFormatter` -- the Jinja2 file-template formatter (usable in stock generators).

They are imported on first use, so ``buildbot-mailext --version`` and the submodules
stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "MailExtNotifier": "buildbot_mailext.notifier",
    "MailRoute": "buildbot_mailext.routes",
    "MailExtFormatter": "buildbot_mailext.formatter",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'buildbot_mailext' has no attribute {name!r}")
