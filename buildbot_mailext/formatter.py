"""The Buildbot message formatter of buildbot-mailext.

This module owns :class:`MailExtFormatter`, which plugs the file templates of
:mod:`buildbot_mailext.templates` and the context of :mod:`buildbot_mailext.context` into
Buildbot's message formatter interface (``buildbot.reporters.message.MessageFormatterBase``).

Its message dict works in stock generators and a stock ``MailNotifier`` (the body is the HTML
part, ``type`` is "html") and carries both parts in ``extra_info["mailext"]`` so our notifier can
send a multipart/alternative mail.

A custom template that fails at send time must not lose the mail: the formatter then renders the
packaged template of the same kind, says in the mail that (and why) the custom template failed,
and logs one line.
"""

from __future__ import annotations

from typing import Any
from typing import ClassVar
from typing import Sequence

from twisted.python import log

from buildbot import config
from buildbot.reporters.message import MessageFormatterBase
from buildbot.util.twisted import async_to_deferred

from buildbot_mailext.context import MAX_ITEMS
from buildbot_mailext.context import build_context
from buildbot_mailext.context import build_line
from buildbot_mailext.context import result_name
from buildbot_mailext.samples import sample_context
from buildbot_mailext.context import worker_context
from buildbot_mailext.masterconfig import in_master_dir
from buildbot_mailext.templates import RenderedMail
from buildbot_mailext.templates import TemplateSet
from buildbot_mailext.templates import collapse_subject
from buildbot_mailext.templates import error_location

__all__ = ["MailExtFormatter"]

DEFAULT_WORKER_TEMPLATE = "worker_missing"


def _is_worker_template(name: str) -> bool:
    return name.startswith("worker")


class MailExtFormatter(MessageFormatterBase):
    """Render mails from Jinja2 file templates (``NAME.subject.j2``, ``NAME.txt.j2``, ``NAME.html.j2``).

    ``template`` is the template name for build mails; missing-worker mails use ``template`` when
    its name starts with "worker", otherwise "worker_missing". ``templates_dir`` is searched before
    the packaged templates. ``ctx`` is a dict of extra variables merged into every context.
    Templates are validated when the formatter is created (i.e. at config load), so errors are
    reported by ``buildbot checkconfig`` rather than at the first failing build.
    """

    template_type = "html"

    compare_attrs: ClassVar[Sequence[str]] = [
        "template",
        "templates_dir",
        "log_tail_lines",
        "subject",
        "want_properties",
        "want_steps",
        "want_logs",
        "want_logs_content",
        "context",
        "error_patterns",
    ]

    def __init__(
        self,
        template: str = "build_failure",
        templates_dir: str | None = None,
        log_tail_lines: int = 40,
        want_properties: bool = True,
        want_steps: bool = True,
        want_logs: bool = False,
        want_logs_content: bool | list = False,
        ctx: dict | None = None,
        subject: str | None = None,
        error_patterns: Sequence[str] | None = None,
    ):
        super().__init__(
            ctx=ctx,
            want_properties=want_properties,
            want_steps=want_steps,
            want_logs=want_logs,
            want_logs_content=want_logs_content,
        )
        self.template = template
        # Relative to the master directory, like the notifier's templates_dir.
        self.templates_dir = templates_dir = in_master_dir(templates_dir)
        self.log_tail_lines = log_tail_lines
        # An inline Jinja2 subject (MailRoute(subject=...)) replaces NAME.subject.j2.
        self.subject = subject
        # None: the default error patterns (excerpts.DEFAULT_ERROR_PATTERNS); (): none
        self.error_patterns = error_patterns
        self.templates = TemplateSet(templates_dir)
        # the packaged templates alone: what we fall back to when a custom template breaks
        self.packaged = TemplateSet(None)
        if not isinstance(log_tail_lines, int) or log_tail_lines < 0:
            config.error(f"MailExtFormatter: log_tail_lines must be an int >= 0, not {log_tail_lines!r}")
        for error in self.check_templates():
            config.error(f"MailExtFormatter: {error}")

    def __repr__(self) -> str:
        return f"MailExtFormatter(template={self.template!r}, templates_dir={self.templates_dir!r})"

    def check_templates(self) -> list[str]:
        """Validate the template(s) this formatter will render; returns error sentences."""
        names = [self.template]
        if not _is_worker_template(self.template):
            # formatMessageForMissingWorker renders this one: a broken override should show now too
            names.append(DEFAULT_WORKER_TEMPLATE)
        errors = []
        for name in names:
            sample = sample_context(kind="worker" if _is_worker_template(name) else "build")
            sample.update(self.context)
            errors.extend(self.templates.validate(name, sample))
        if self.subject is not None:
            sample = sample_context()
            sample.update(self.context)
            errors.extend(self.templates.validate_string(self.subject, "subject", sample))
        # Both templates report a missing templates_dir: say it once.
        return list(dict.fromkeys(errors))

    # --- rendering with fallback ---------------------------------------------------------------

    def _fallback_name(self, name: str, context: dict, kind: str) -> str:
        if name in self.packaged.names():
            return name
        if kind == "worker":
            return DEFAULT_WORKER_TEMPLATE
        return "build_summary" if context.get("result") in ("success", "warnings") else "build_failure"

    def render(self, name: str, context: dict, kind: str = "build") -> tuple[RenderedMail, str, str | None]:
        """Render ``name``; on any error render the packaged fallback instead.

        Returns (mail, name actually rendered, error text or None).
        """
        try:
            mail = self.templates.render(name, context)
            if self.subject is not None and kind == "build":
                mail.subject = collapse_subject(self.templates.render_string(self.subject, context))
            return mail, name, None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            # file and line also for errors raised while rendering (an undefined variable)
            where, line = error_location(e)
            if where:
                error = f"{where}:{line or '?'}: {error}"
        fallback = self._fallback_name(name, context, kind)
        log.msg(
            f"buildbot-mailext: template {name!r} (templates_dir={self.templates_dir!r}) failed "
            f"to render ({error}); sending the packaged template {fallback!r} instead"
        )
        fallback_context = dict(context)
        fallback_context["template_error"] = f"template {name!r}: {error}"
        try:
            return self.packaged.render(fallback, fallback_context), fallback, error
        except Exception as e2:
            # the packaged templates are tested; if even they fail, still send something readable
            log.msg(f"buildbot-mailext: packaged template {fallback!r} failed too: {e2!r}")
            return self._last_resort(context, error, e2), "(none)", error

    @staticmethod
    def _last_resort(context: dict, error: str, error2: Exception) -> RenderedMail:
        import html as html_mod

        what = context.get("buildername") or context.get("worker") or "?"
        subject = collapse_subject(f"[{context.get('title', 'Buildbot')}] {what}: {context.get('result', '')}")
        text = (
            f"{subject}\n\n{context.get('build_url', context.get('buildbot_url', ''))}\n\n"
            f"The mail templates failed: {error}; packaged template: {error2!r}\n"
        )
        return RenderedMail(subject=subject, text=text, html=f"<pre>{html_mod.escape(text)}</pre>")

    def message_dict(self, mail: RenderedMail, name: str, error: str | None) -> dict:
        """The formatter's answer to Buildbot for one rendered mail (also what ``preview
        --sample`` hands the notifier)."""
        return {
            "body": mail.html,
            "type": self.template_type,
            "subject": mail.subject,
            "extra_info": {
                "mailext": {
                    "text": mail.text,
                    "html": mail.html,
                    "subject": mail.subject,
                    "template": name,
                    "template_error": error,
                }
            },
        }

    # --- MessageFormatterBase interface --------------------------------------------------------

    @async_to_deferred
    async def format_message_for_build(
        self, master, build: dict, is_buildset: bool = False, users: list[str] | None = None,
        mode: Any = None, **kwargs: Any,
    ) -> dict:
        context = await build_context(
            master, build, mode, users or [], self.log_tail_lines, self.error_patterns
        )
        context["is_buildset"] = is_buildset
        context.update(self.context)
        mail, name, error = self.render(self.template, context)
        return self.message_dict(mail, name, error)

    @async_to_deferred
    async def format_message_for_buildset(
        self, master, buildset: dict, builds: list[dict], users: list[str] | None = None,
        mode: Any = None, **kwargs: Any,
    ) -> dict:
        """One mail for a buildset: the context of the first build, with ``builds`` listing all.

        ``results``/``result`` are those of the buildset (the worst of its builds) when known.
        """
        if not builds:
            return {"body": None, "type": self.template_type, "subject": None, "extra_info": None}
        # Every build gets its full context (failed steps, excerpts, culprits): a buildset
        # mail names what broke in each of them. Names and state strings are bounded like
        # every other value from a build (build_line).
        builds = list(builds)[:MAX_ITEMS]
        contexts = [
            await build_context(master, b, mode, users or [], self.log_tail_lines,
                                self.error_patterns)
            for b in builds
        ]
        context = dict(contexts[0])
        summaries = []
        for build, build_ctx in zip(builds, contexts):
            line = dict(build_line(build), url=build_ctx["build_url"])
            for key in ("transition", "failed_steps", "culprits", "culprits_more",
                        "culprits_more_unknown", "culprits_since", "test_results", "branch",
                        "revision", "summary"):
                line[key] = build_ctx.get(key)
            summaries.append(line)
        context["builds"] = summaries
        context["is_buildset"] = True
        if buildset.get("results") is not None:
            context["results"] = buildset["results"]
            context["result"] = result_name(buildset["results"])
        context.update(self.context)
        mail, name, error = self.render(self.template, context)
        return self.message_dict(mail, name, error)

    @async_to_deferred
    async def formatMessageForMissingWorker(self, master, worker: dict) -> dict:
        name = self.template if _is_worker_template(self.template) else DEFAULT_WORKER_TEMPLATE
        context = worker_context(master, worker)
        context.update(self.context)
        mail, rendered, error = self.render(name, context, kind="worker")
        return self.message_dict(mail, rendered, error)
