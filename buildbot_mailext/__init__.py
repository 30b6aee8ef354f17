"""buildbot-mailext: build mail for Buildbot that reaches the right lists, through the mail
setup a site really has.

Public names (also reachable through ``buildbot.plugins``):

- :class:`MailExtNotifier` -- drop-in ``MailNotifier`` subclass with per-builder routes.
- :class:`MailRoute` -- which builds go to which recipients with which template.
- :class:`MailExtFormatter` -- the Jinja2 file-template formatter (usable in stock generators).
"""

__version__ = "0.1.0"

from buildbot_mailext.formatter import MailExtFormatter  # noqa: E402
from buildbot_mailext.notifier import MailExtNotifier  # noqa: E402
from buildbot_mailext.routes import MailRoute  # noqa: E402

__all__ = ["MailExtFormatter", "MailExtNotifier", "MailRoute", "__version__"]
