"""``buildbot-mailext preview``: the mail each route would send, without sending it.

Two forms::

    buildbot-mailext preview MASTER_DIR [--builder NAME] [--build NUMBER] [--route NAME] [--out DIR]
    buildbot-mailext preview [--template NAME] [--templates-dir DIR] [--out DIR]   # sample build

With ``MASTER_DIR`` it loads that master's ``master.cfg`` and reads its database read-only
(:mod:`buildbot_mailext.master_dir`), takes a real finished build (default: the last finished
build of the builder, or of every builder, with a progress bar), and runs every mail notifier's
own report generators, formatter and message assembly on it: the mail is byte for byte what the
notifier would hand to its transport, which is the one step left out. ``--sample`` renders the
master's routes against the built-in sample build instead (a master with no builds yet); without
``MASTER_DIR`` the packaged or ``--templates-dir`` templates are rendered against it.

Each mail is written as ``.eml``, ``.txt`` and ``.html``; paths and headers are printed.
Exit status: 0, 1 when a template does not render (file and line on stderr), 2 for usage
errors (no such builder or build, unreadable master.cfg or database).
"""

from __future__ import annotations

import argparse
import email
import os
import re
import sys
from email import policy
from typing import Any, Optional

from buildbot_mailext import message as mime
from buildbot_mailext.addresses import address_errors
from buildbot_mailext.master_dir import (
    TEMPLATE_ERROR_EXIT, USAGE_EXIT, MasterDir, MasterDirError, add_master_dir_arguments,
)

DEFAULT_OUT = "mailext-preview"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "preview",
        help="render the mail each route would send for a real build (no mail is sent)",
        description="With MASTER_DIR: read the master's master.cfg and its database (read-only, safe "
        "while the master runs) and render, for a real finished build, exactly the mail each "
        "matching route would send. Without MASTER_DIR, or with --sample: render against a "
        "built-in sample failing build. Writes NAME.eml, NAME.txt and NAME.html and prints their "
        "paths and the headers. Exit 1 when a template does not render, 2 for usage errors.",
    )
    add_master_dir_arguments(parser, optional=True)
    parser.add_argument("--builder", metavar="NAME", help="only this builder (default: every builder)")
    parser.add_argument(
        "--build", type=int, metavar="NUMBER", help="this build number of --builder (default: its last finished build)"
    )
    parser.add_argument("--route", metavar="NAME", help="only this route (default: every route that matches)")
    parser.add_argument("--out", metavar="DIR", help=f"folder for the .eml/.txt/.html files (default ./{DEFAULT_OUT})")
    parser.add_argument(
        "--sample", action="store_true", help="render against the built-in sample build (a master with no builds yet)"
    )
    sample = parser.add_argument_group("without MASTER_DIR")
    sample.add_argument("--template", default="build_failure", help="template name (default build_failure)")
    sample.add_argument("--templates-dir", help="your templates folder (searched before the packaged ones)")
    sample.add_argument("--from", dest="fromaddr", default="buildbot@example.org", help="From address")
    sample.add_argument("--to", action="append", default=None, help="recipient (repeatable)")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.master_dir:
        if args.builder or args.build is not None or args.route:
            print("preview: --builder, --build and --route need MASTER_DIR", file=sys.stderr)
            return USAGE_EXIT
        return _preview_templates(args)
    if args.build is not None and not args.builder:
        print("preview: --build NUMBER needs --builder NAME", file=sys.stderr)
        return USAGE_EXIT
    from buildbot_mailext.master_dir import run_command

    return run_command(lambda: MasterPreview(args).run())


# --- output ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "mail"


def _parts(raw: bytes) -> tuple[Any, str, str]:
    """(parsed message, text part, html part) of the bytes that would go over SMTP."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    return msg, text.get_content() if text else "", html.get_content() if html else ""


def header_lines(msg: Any) -> list[str]:
    """The headers an operator reads (not the MIME plumbing)."""
    return [
        f"{name}: {value}"
        for name, value in msg.items()
        if not name.lower().startswith("content-") and name.lower() != "mime-version"
    ]


def write_mail(out_dir: str, name: str, raw: bytes) -> tuple[list[str], Any, str]:
    """Write NAME.eml/.txt/.html; returns (paths, parsed message, text part)."""
    os.makedirs(out_dir, exist_ok=True)
    msg, text, html = _parts(raw)
    base = os.path.join(out_dir, name)
    paths = [base + ".eml", base + ".txt", base + ".html"]
    with open(paths[0], "wb") as f:
        f.write(raw)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(text)
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(html)
    return paths, msg, text


# --- the sample build, no master -----------------------------------------------------------


def _preview_templates(args: argparse.Namespace) -> int:
    from buildbot_mailext.samples import sample_context
    from buildbot_mailext.templates import TemplateSet

    # The same address gate as master.cfg's fromaddr and MailRoute(to=...).
    bad = address_errors(args.fromaddr, "preview", "--from") + [
        error for to in args.to or [] for error in address_errors(to, "preview", "--to")
    ]
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return 2
    templates = TemplateSet(args.templates_dir)
    problems = templates.validate(args.template)
    if problems:
        for problem in problems:
            print(f"template {args.template!r}: {problem}", file=sys.stderr)
        return TEMPLATE_ERROR_EXIT
    is_worker = args.template.startswith("worker")  # same rule as the formatter's
    context = sample_context(kind="worker" if is_worker else "build")
    rendered = templates.render(args.template, context)
    headers = {}
    if not is_worker:
        headers = mime.buildbot_headers(context["buildername"], context["result"], context["build_url"])
    msg = mime.build_email(
        subject=rendered.subject,
        from_addr=args.fromaddr,
        to=args.to or ["dev-list@example.org"],
        text=rendered.text,
        html=rendered.html,
        headers=headers,
    )
    print("\n".join(header_lines(msg)))
    print()
    print(rendered.text)
    if args.out:
        paths, _, _ = write_mail(args.out, args.template, mime.message_bytes(msg))
        print("wrote " + ", ".join(paths), file=sys.stderr)
    return 0


# --- a real master ---------------------------------------------------------------------------


class _Recorder:
    """Stands in for the notifier's last hop, ``sendMail(message, recipients)``: everything
    before it (generators, formatter, recipients, headers, message assembly) is the
    notifier's own code."""

    def __init__(self) -> None:
        self.mails: list[tuple[bytes, list[str]]] = []

    def sendMail(self, message: Any, recipients: Any, label: Optional[str] = None) -> Any:
        from twisted.internet import defer

        # as MailExtNotifier.sendMail turns a message into the bytes it sends
        raw = mime.message_bytes(message) if hasattr(message, "as_bytes") else message.as_string().encode()
        self.mails.append((raw, list(recipients)))
        return defer.succeed(None)


class _LoggedErrors:
    """Errors the notifier logs instead of raising (a mail that could not be composed)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        if event.get("isError"):
            from twisted.python import log

            why = event.get("why") or ""
            failure = event.get("failure")
            detail = f"{failure.type.__name__}: {failure.getErrorMessage()}" if failure is not None else log.textFromEventDict(event)
            self.lines.append(f"{why}: {detail}" if why else str(detail))


def _build_generators(notifier: Any) -> list[tuple[str, Any]]:
    """(route or generator name, generator) for every generator that mails finished builds."""
    from buildbot_mailext.routes import RouteGenerator

    found = []
    for gen in getattr(notifier, "generators", None) or []:
        if not any(key[0] == "builds" and key[2] == "finished" for key in getattr(gen, "wanted_event_keys", [])):
            continue
        name = gen.route.name if isinstance(gen, RouteGenerator) else gen.generate_name()
        found.append((name, gen))
    return found


def _why_not(gen: Any, build: dict) -> str:
    from buildbot_mailext.context import result_name

    result = result_name(build.get("results"))
    if hasattr(gen, "is_message_needed_by_props") and not gen.is_message_needed_by_props(build):
        return "its builders/tags/branches/schedulers filters leave this build out"
    return f"its mode ({', '.join(gen.mode)}) does not select this {result} build"


class MasterPreview:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = args.out or DEFAULT_OUT
        self.lines: list[str] = []  # printed once the progress bar is gone
        self.template_errors: list[str] = []
        self.mails_written = 0

    async def run(self) -> int:
        from twisted.python import log

        master_dir = MasterDir(self.args.master_dir, self.args.config)
        errors = _LoggedErrors()
        log.addObserver(errors)
        try:
            master_dir.load_config()
            notifiers = master_dir.mail_notifiers()
            if not notifiers:
                raise MasterDirError(f"no MailNotifier in {os.path.join(master_dir.basedir, master_dir.config_file)}")
            await master_dir.open(database=not self.args.sample)
            for notifier in notifiers:
                await master_dir.configure_notifier(notifier)
            generators = self._generators(notifiers)
            if self.args.sample:
                await self._preview_sample(master_dir.master, generators)
            else:
                builds = await self._builds(master_dir.master)
                await self._preview_builds(master_dir.master, generators, builds)
        except MasterDirError as e:
            print(f"preview: {e}", file=sys.stderr)
            return e.exit_code
        finally:
            log.removeObserver(errors)
            await master_dir.close()
        print("\n".join(self.lines))
        for line in errors.lines:
            print(f"preview: {line}", file=sys.stderr)
        for line in self.template_errors:
            print(f"preview: {line}", file=sys.stderr)
        if errors.lines:
            return USAGE_EXIT
        return TEMPLATE_ERROR_EXIT if self.template_errors else 0

    def _generators(self, notifiers: list[Any]) -> list[tuple[Any, str, Any]]:
        found = [(n, name, gen) for n in notifiers for name, gen in _build_generators(n)]
        if self.args.route is not None:
            names = ", ".join(repr(name) for _, name, _ in found) or "(none)"
            found = [item for item in found if item[1] == self.args.route]
            if not found:
                raise MasterDirError(f"no route named {self.args.route!r}; the routes are: {names}")
        if not found:
            raise MasterDirError("no mail notifier here mails finished builds (no routes or build generators)")
        return found

    async def _builds(self, master: Any) -> list[dict]:
        from buildbot.data import resultspec

        builders = list(await master.data.get(("builders",)) or [])
        if self.args.builder is not None:
            chosen = [b for b in builders if b["name"] == self.args.builder]
            if not chosen:
                names = ", ".join(sorted(repr(b["name"]) for b in builders)) or "(none)"
                raise MasterDirError(f"no builder named {self.args.builder!r} in the database; the builders are: {names}")
            builders = chosen
        builds = []
        for builder in sorted(builders, key=lambda b: b["name"]):
            if self.args.build is not None:
                build = await master.data.get(("builders", builder["builderid"], "builds", self.args.build))
                if not build:
                    raise MasterDirError(f"builder {builder['name']!r} has no build #{self.args.build}")
                if not build.get("complete"):
                    raise MasterDirError(
                        f"build #{self.args.build} of {builder['name']!r} has not finished: only a finished "
                        "build is mailed"
                    )
            else:
                last = await master.data.get(
                    ("builders", builder["builderid"], "builds"),
                    filters=[resultspec.Filter("complete", "eq", [True])],
                    order=["-number"],
                    limit=1,
                )
                build = list(last or [None])[0]
                if build is None:
                    self.lines.append(f"builder {builder['name']!r}: no finished build yet (--sample renders a sample)")
                    continue
            builds.append(build)
        if not builds:
            raise MasterDirError("no finished build to preview: run a build first, or use --sample")
        return builds

    async def _preview_builds(self, master: Any, generators: list, builds: list[dict]) -> None:
        from tqdm import tqdm

        with tqdm(total=len(builds), desc="preview", unit="build", file=sys.stderr, disable=len(builds) < 2) as bar:
            for build in builds:
                await self._preview_build(master, generators, build)
                bar.update(1)

    async def _preview_build(self, master: Any, generators: list, build: dict) -> None:
        from buildbot_mailext.context import result_name

        # One dict for every generator of the event, as Buildbot hands it to them.
        build = dict(build)
        builder = await master.data.get(("builders", build["builderid"]))
        name = builder["name"] if builder else str(build["builderid"])
        self.lines.append(f"build {name!r} #{build['number']}: {result_name(build.get('results'))}")
        key = ("builds", build["buildid"], "finished")
        for notifier, route, gen in generators:
            report = await gen.generate(master, notifier, key, build)
            if report is None:
                self.lines.append(f"  route {route!r}: no mail: {_why_not(gen, build)}")
                continue
            await self._compose(notifier, route, report, f"{name}-{build['number']}-{route}")

    async def _preview_sample(self, master: Any, generators: list) -> None:
        from buildbot_mailext.formatter import MailExtFormatter
        from buildbot_mailext.samples import sample_context

        self.lines.append("sample build 'linux-x86_64' #1234: failure (--sample: every route, whatever its mode)")
        for notifier, route, gen in generators:
            formatter = gen.formatter
            if not isinstance(formatter, MailExtFormatter):
                self.lines.append(f"  route {route!r}: skipped: its formatter is not a MailExtFormatter")
                continue
            context = sample_context()
            context.update(formatter.context)
            mail, rendered, error = formatter.render(formatter.template, context)
            report = dict(
                formatter.message_dict(mail, rendered, error),
                results=context["results"], builds=[context["build"]], buildset=context["build"]["buildset"],
                users=[], patches=None, logs=None,
            )
            if getattr(gen, "route", None) is not None:
                report["mailext_route"] = gen.route
            await self._compose(notifier, route, report, f"sample-{route}")

    async def _compose(self, notifier: Any, route: str, report: dict, file_name: str) -> None:
        recorder = _Recorder()
        notifier.sendMail = recorder.sendMail  # the one step left out: no mail is sent
        try:
            await notifier.sendMessage([report])
        finally:
            del notifier.sendMail
        ours = (report.get("extra_info") or {}).get("mailext") or {}
        if ours.get("template_error"):
            self.template_errors.append(
                f"route {route!r}: template error: {ours['template_error']} (the notifier would send the "
                f"packaged template {ours.get('template')!r} instead, as written here)"
            )
        if not recorder.mails:
            self.lines.append(f"  route {route!r}: no mail: no recipients")
            return
        for index, (raw, recipients) in enumerate(recorder.mails):
            name = _slug(file_name if index == 0 else f"{file_name}-{index}")
            paths, msg, _ = write_mail(self.out, name, raw)
            self.mails_written += 1
            self.lines.append(f"  route {route!r}: mail to {', '.join(recipients)} ({len(raw)} bytes)")
            self.lines.extend(f"    {line}" for line in header_lines(msg))
            self.lines.extend(f"    wrote {path}" for path in paths)
