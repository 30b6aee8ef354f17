"""Jinja2 template handling for buildbot-mailext.

This module owns:

- where the packaged templates live (:data:`PACKAGED_TEMPLATES_DIR`),
- the two Jinja2 environments of a :class:`TemplateSet` (HTML with autoescape, text/subject
  without), their loaders (user directory first, then the packaged templates, plus the packaged
  templates again under the ``builtin/`` prefix so a user file can extend the packaged file of the
  same name), and the custom filters,
- rendering one template name into a :class:`RenderedMail` (subject, text, html),
- config-time validation (:meth:`TemplateSet.validate`) that turns every problem into a sentence a
  Buildbot admin can act on.

A template *name* ``NAME`` is the set of three files ``NAME.subject.j2``, ``NAME.txt.j2`` and
``NAME.html.j2``.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from buildbot.process.results import Results

from buildbot_mailext.message import MAX_SUBJECT, one_line

__all__ = [
    "PACKAGED_TEMPLATES_DIR",
    "PARTS",
    "RenderedMail",
    "TemplateSet",
    "collapse_subject",
    "error_location",
]

# The three files that make up one template name, in render order.
PARTS = ("subject", "txt", "html")

SUBJECT_MAX_CHARS = MAX_SUBJECT


def _find_packaged_templates_dir() -> str:
    # Installed: setup.py maps the top-level templates/ folder to the package
    # buildbot_mailext.packaged_templates (the name buildbot_mailext.templates is this module).
    try:
        from importlib.resources import files

        path = files("buildbot_mailext.packaged_templates")
        # FileSystemLoader needs a real directory; a zipped install would not give one, in which
        # case we fall through to the source-checkout location.
        candidate = os.fspath(path)  # type: ignore[arg-type]
        if os.path.isdir(candidate):
            return candidate
    except (ImportError, TypeError, AttributeError):
        pass
    # Source checkout: <repo>/buildbot_mailext/templates.py -> <repo>/templates
    return str(Path(__file__).resolve().parent.parent / "templates")


PACKAGED_TEMPLATES_DIR: str = _find_packaged_templates_dir()


@dataclass
class RenderedMail:
    subject: str
    text: str
    html: str


def collapse_subject(value: Any, limit: int = SUBJECT_MAX_CHARS) -> str:
    """Make ``value`` safe as a mail subject: one line, no control characters, at most
    ``limit`` characters (the header hygiene of :func:`buildbot_mailext.message.one_line`)."""
    return one_line(value, limit)


# --- filters -----------------------------------------------------------------------------------


def _filter_result_name(value: Any) -> str:
    if isinstance(value, int) and 0 <= value < len(Results):
        return Results[value]
    if value is None:
        return "not finished"
    return str(value)


_RESULT_COLORS = {
    "success": "#2e7d32",
    "warnings": "#ef6c00",
    "failure": "#c62828",
    "skipped": "#1565c0",
    "exception": "#8e24aa",
    "retry": "#1565c0",
    "cancelled": "#1565c0",
}


def _filter_result_color(value: Any) -> str:
    return _RESULT_COLORS.get(_filter_result_name(value), "#555555")


def _filter_oneline(value: Any, limit: int = 0) -> str:
    """Collapse to one line; handy for commit message titles in lists."""
    text = collapse_subject(value, limit=limit or 10**9)
    return text


def _filter_firstline(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.strip().splitlines()[0] if text.strip() else ""


def _filter_indent_lines(value: Any, prefix: str = "    ") -> str:
    text = "" if value is None else str(value)
    # blank lines stay empty: trailing spaces would only add noise to the text part
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


FILTERS = {
    "result_name": _filter_result_name,
    "result_color": _filter_result_color,
    "oneline": _filter_oneline,
    "firstline": _filter_firstline,
    "indent_lines": _filter_indent_lines,
}


# --- the template set --------------------------------------------------------------------------


def error_location(exc: BaseException) -> tuple[str | None, int | None]:
    """Return (template file, line) of the innermost template frame of ``exc``.

    Jinja2 rewrites tracebacks so that frames executing template code carry the template's file
    name and line number; the innermost such frame is where the problem is.
    """
    filename = getattr(exc, "filename", None)
    lineno = getattr(exc, "lineno", None)
    if filename and lineno:
        return filename, lineno
    where: tuple[str | None, int | None] = (None, None)
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.endswith(".j2"):
            where = (frame.filename, frame.lineno)
    return where


class TemplateSet:
    """The templates one formatter renders from: ``templates_dir`` (if any) then the packaged ones.

    Lookup order for a file name: the user's ``templates_dir``, then the packaged templates. Every
    packaged file is also available as ``builtin/<file>``, which is how a user file with the same
    name as a packaged one extends it (``{% extends "builtin/build_failure.html.j2" %}``).
    """

    def __init__(self, templates_dir: str | None = None):
        self.templates_dir = os.fspath(templates_dir) if templates_dir is not None else None
        self.packaged_dir = PACKAGED_TEMPLATES_DIR
        loaders: list[jinja2.BaseLoader] = []
        if self.templates_dir is not None:
            loaders.append(jinja2.FileSystemLoader(self.templates_dir))
        loaders.append(jinja2.FileSystemLoader(self.packaged_dir))
        loaders.append(jinja2.PrefixLoader({"builtin": jinja2.FileSystemLoader(self.packaged_dir)}))
        self.loader = jinja2.ChoiceLoader(loaders)
        self.html_env = self._make_env(autoescape=True)
        # subjects and text parts are not HTML: escaping would put "&lt;" into plain text mails
        self.text_env = self._make_env(autoescape=False)

    def _make_env(self, autoescape: bool) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=self.loader,
            autoescape=autoescape,
            # StrictUndefined also at send time: a typo must fail loudly (and the formatter then
            # falls back to the packaged template) rather than silently send a mail with holes.
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        env.filters.update(FILTERS)
        return env

    def __repr__(self) -> str:
        return f"TemplateSet(templates_dir={self.templates_dir!r})"

    def _env_for(self, part: str) -> jinja2.Environment:
        return self.html_env if part == "html" else self.text_env

    @staticmethod
    def file_name(name: str, part: str) -> str:
        return f"{name}.{part}.j2"

    def names(self) -> list[str]:
        """Template names for which the subject, text and html files all resolve."""
        files = set()
        for f in self.text_env.list_templates():
            if "/" in f or "\\" in f:
                # builtin/... duplicates and files in sub folders are not template names
                continue
            files.add(f)
        names = set()
        for f in files:
            if f.endswith(".subject.j2"):
                name = f[: -len(".subject.j2")]
                if all(self.file_name(name, part) in files for part in PARTS):
                    names.add(name)
        return sorted(names)

    def render(self, name: str, context: dict) -> RenderedMail:
        """Render the three parts of ``name``. Errors (Jinja2 or otherwise) propagate."""
        out = {}
        for part in PARTS:
            template = self._env_for(part).get_template(self.file_name(name, part))
            out[part] = template.render(context)
        return RenderedMail(
            subject=collapse_subject(out["subject"]), text=out["txt"], html=out["html"]
        )

    def _searched(self) -> str:
        if self.templates_dir is not None:
            return f"searched {self.templates_dir!r}, then the packaged templates in {self.packaged_dir!r}"
        return f"searched the packaged templates in {self.packaged_dir!r} (no templates_dir given)"

    def validate(self, name: str, context: dict | None = None) -> list[str]:
        """Config-time check of template ``name``; returns error sentences (empty list: fine).

        The template is rendered against ``context`` (default: the sample context of the right
        kind from :mod:`buildbot_mailext.context`) with StrictUndefined, so a misspelt variable is
        reported now instead of at the first failing build.
        """
        errors: list[str] = []
        if self.templates_dir is not None and not os.path.isdir(self.templates_dir):
            errors.append(f"templates_dir {self.templates_dir!r} does not exist or is not a directory")
        known = self.names()
        if name not in known:
            missing = [
                self.file_name(name, part)
                for part in PARTS
                if not self._resolves(self.file_name(name, part))
            ]
            errors.append(
                f"unknown template {name!r} (missing {', '.join(missing)}); "
                f"known templates: {', '.join(known) or '(none)'}; {self._searched()}"
            )
            return errors

        if context is None:
            from buildbot_mailext.samples import sample_context

            kind = "digest" if name == "digest" else "worker" if name.startswith("worker") else "build"
            context = sample_context(kind=kind)

        for part in PARTS:
            file_name = self.file_name(name, part)
            env = self._env_for(part)
            try:
                template = env.get_template(file_name)
                template.render(context)
            except jinja2.TemplateSyntaxError as e:
                path = e.filename or e.name or file_name
                errors.append(f"{path}:{e.lineno}: Jinja2 syntax error: {e.message}")
            except jinja2.TemplateNotFound as e:
                errors.append(
                    f"{self._path_of(file_name)}: includes or extends {e.name!r}, which does not "
                    f"exist ({self._searched()})"
                )
            except jinja2.UndefinedError as e:
                path, line = error_location(e)
                where = f"{path}:{line}" if path else self._path_of(file_name)
                errors.append(
                    f"{where}: undefined variable: {e.message}; the template context offers: "
                    f"{', '.join(sorted(context))}"
                )
            except Exception as e:  # any other render failure would also break the mail
                path, line = error_location(e)
                where = f"{path}:{line}" if path else self._path_of(file_name)
                errors.append(f"{where}: rendering failed: {type(e).__name__}: {e}")
        return errors

    def validate_string(self, source: str, what: str, context: dict | None = None) -> list[str]:
        """Config-time check of an inline template string (e.g. a route's ``subject``)."""
        if context is None:
            from buildbot_mailext.samples import sample_context

            context = sample_context()
        try:
            self.text_env.from_string(source).render(context)
        except jinja2.TemplateSyntaxError as e:
            return [f"{what} {source!r}: Jinja2 syntax error: {e.message}"]
        except jinja2.UndefinedError as e:
            return [
                f"{what} {source!r}: undefined variable: {e.message}; the template context "
                f"offers: {', '.join(sorted(context))}"
            ]
        except Exception as e:
            return [f"{what} {source!r}: rendering failed: {type(e).__name__}: {e}"]
        return []

    def render_string(self, source: str, context: dict) -> str:
        return self.text_env.from_string(source).render(context)

    def _resolves(self, file_name: str) -> bool:
        try:
            self.loader.get_source(self.text_env, file_name)
            return True
        except jinja2.TemplateNotFound:
            return False

    def _path_of(self, file_name: str) -> str:
        """The file ``file_name`` resolves to, found without reading it (reading may be what
        failed: a file that is not UTF-8)."""
        for directory in (self.templates_dir, self.packaged_dir):
            if directory is not None and os.path.isfile(os.path.join(directory, file_name)):
                return os.path.normpath(os.path.join(directory, file_name))
        return file_name
