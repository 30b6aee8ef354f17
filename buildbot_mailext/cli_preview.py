"""``buildbot-mailext preview``: see what a template makes of a build, without a master.

It renders a template set against the sample build context (the same one config-time
validation uses), builds the very message the notifier would send, prints its headers
and text part, and optionally writes ``NAME.eml`` and ``NAME.html`` for a browser.
"""

from __future__ import annotations

import argparse
import os
import sys

from buildbot_mailext import message as mime
from buildbot_mailext.addresses import address_errors


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "preview",
        help="render a template against a sample failing build",
        description="Render TEMPLATE (default build_failure) against a sample failing build "
        "and print the resulting mail. Exit 1 when the template does not validate.",
    )
    parser.add_argument("--template", default="build_failure", help="template name")
    parser.add_argument(
        "--templates-dir", help="your templates folder (searched before the packaged ones)"
    )
    parser.add_argument("--from", dest="fromaddr", default="buildbot@example.org")
    parser.add_argument("--to", action="append", default=None, help="recipient (repeatable)")
    parser.add_argument("--out", help="folder to write NAME.eml and NAME.html into")
    return parser


def run(args: argparse.Namespace) -> int:
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
        return 1
    is_worker = args.template.startswith("worker")  # same rule as the formatter's
    context = sample_context(kind="worker" if is_worker else "build")
    rendered = templates.render(args.template, context)
    headers = {}
    if not is_worker:
        headers = mime.buildbot_headers(
            context["buildername"], context["result"], context["build_url"]
        )
    msg = mime.build_email(
        subject=rendered.subject,
        from_addr=args.fromaddr,
        to=args.to or ["dev-list@example.org"],
        text=rendered.text,
        html=rendered.html,
        headers=headers,
    )
    for name, value in msg.items():
        if not name.lower().startswith("content-") and name != "MIME-Version":
            print(f"{name}: {value}")
    print()
    print(rendered.text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, args.template)
        with open(base + ".eml", "wb") as f:
            f.write(mime.message_bytes(msg))
        with open(base + ".html", "w", encoding="utf-8") as f:
            f.write(rendered.html)
        print(f"wrote {base}.eml and {base}.html", file=sys.stderr)
    return 0
