"""``buildbot-mailext preflight``: check a mail setup from the shell, with the same messages
the master prints at start.

Two forms::

    buildbot-mailext preflight MASTER_DIR        # every mail notifier in MASTER_DIR/master.cfg
    buildbot-mailext preflight --relayhost HOST[:PORT] --from ADDR --to ADDR [--to ADDR ...]

Exit status: 0 when every check passes, 1 when any fails (whatever the notifiers'
``preflight`` mode), 2 for usage errors (unreadable master.cfg, bad options).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from buildbot_mailext import preflight
from buildbot_mailext.addresses import address_errors
from buildbot_mailext.relay import SmtpSettings, check_smtp_settings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "preflight",
        help="check that the SMTP relay will take the mail (no mail is sent)",
        description="Talk to the relay like a real mail would (resolve, connect, EHLO, STARTTLS, "
        "AUTH, MAIL FROM, RCPT TO), then RSET and QUIT: no mail is sent. Give a master "
        "directory to check its notifiers, or --relayhost/--from/--to. Exit 0 if all is "
        "well, 1 if any check fails.",
    )
    parser.add_argument("master_dir", nargs="?", metavar="MASTER_DIR", help="a Buildbot master directory")
    parser.add_argument("--config", default="master.cfg", help="config file name in MASTER_DIR (default master.cfg)")
    parser.add_argument("--relayhost", help="HOST, HOST:PORT, [HOST] or [HOST]:PORT (Postfix syntax)")
    parser.add_argument("--port", type=int, default=25, dest="smtpPort", help="port when --relayhost has none (25)")
    parser.add_argument("--from", dest="fromaddr", help="envelope sender (the notifier's fromaddr)")
    parser.add_argument("--to", action="append", default=[], help="recipient to check (repeatable)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--starttls", "--use-tls", dest="useTls", action="store_true", help="STARTTLS (required)")
    tls.add_argument("--smtps", "--use-smtps", dest="useSmtps", action="store_true", help="implicit TLS")
    parser.add_argument("--tls-ca-file", help="PEM file of a private CA that signed the relay's certificate")
    parser.add_argument("--no-tls-verify", dest="tls_verify", action="store_false", help="do not verify the certificate")
    parser.add_argument("--user", dest="smtpUser", help="SMTP AUTH user")
    parser.add_argument(
        "--password-env", metavar="VAR",
        help="name of an environment variable holding the SMTP password (not on the command line: ps shows it)",
    )
    parser.add_argument("--allow-plaintext-auth", action="store_true", help="allow AUTH without TLS")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per step (default 30)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.master_dir and args.relayhost:
        print("preflight: give either MASTER_DIR or --relayhost, not both", file=sys.stderr)
        return 2
    if args.master_dir:
        targets = _targets_from_master(args.master_dir, args.config)
        if targets is None:
            return 2
        if not targets:
            print(f"preflight: no MailNotifier in {os.path.join(args.master_dir, args.config)}: nothing to check")
            return 0
    elif args.relayhost:
        if not args.fromaddr:
            print("preflight: --from ADDR is required with --relayhost", file=sys.stderr)
            return 2
        # The same strict address gate as master.cfg's fromaddr and MailRoute(to=...).
        address_problems = address_errors(args.fromaddr, "preflight", "--from") + [
            error for to in args.to for error in address_errors(to, "preflight", "--to")
        ]
        if address_problems:
            for problem in address_problems:
                print(problem, file=sys.stderr)
            return 2
        password = os.environ.get(args.password_env) if args.password_env else None
        if args.password_env and password is None:
            print(f"preflight: environment variable {args.password_env} is not set", file=sys.stderr)
            return 2
        kwargs = dict(
            relayhost=args.relayhost, smtpPort=args.smtpPort, useTls=args.useTls, useSmtps=args.useSmtps,
            smtpUser=args.smtpUser, smtpPassword=password, tls_ca_file=args.tls_ca_file,
            tls_verify=args.tls_verify, allow_plaintext_auth=args.allow_plaintext_auth, smtp_timeout=args.timeout,
        )
        errors = check_smtp_settings(**kwargs)
        if errors:
            for e in errors:
                print(f"preflight: {e}", file=sys.stderr)
            return 1
        targets = [("--relayhost " + args.relayhost, SmtpSettings.from_notifier_args(**kwargs), args.fromaddr, args.to)]
    else:
        print("preflight: give MASTER_DIR, or --relayhost HOST[:PORT] --from ADDR --to ADDR", file=sys.stderr)
        return 2

    failed = 0
    for name, settings, fromaddr, recipients in targets:
        result = preflight.probe(settings, fromaddr, recipients, timeout=args.timeout if args.relayhost else None)
        result.title = name
        if not result.ok:
            failed += 1
        if not result.ok or not args.quiet:
            print(result.render())
    return 1 if failed else 0


def _targets_from_master(master_dir: str, config_file: str) -> Optional[list[tuple[str, SmtpSettings, str, list[str]]]]:
    """Load master.cfg in-process (without its own config-load preflight) and collect
    (label, settings, fromaddr, recipients) for every MailNotifier in c['services']."""
    from buildbot.reporters.mail import MailNotifier

    from buildbot_mailext.cli import load_master_config

    config_dict = load_master_config(master_dir, config_file, "preflight")
    if config_dict is None:
        return None
    services = list(config_dict.get("services") or []) + list(config_dict.get("reporters") or [])
    targets = []
    for service in services:
        if not isinstance(service, MailNotifier):
            continue
        name = f"notifier {getattr(service, 'name', None) or type(service).__name__!r}"
        try:
            settings, fromaddr, recipients = _notifier_targets(service)
        except ValueError as e:
            print(f"preflight: {name}: {e}", file=sys.stderr)
            return None
        targets.append((name, settings, fromaddr, recipients))
    return targets


def _notifier_targets(notifier: Any) -> tuple[SmtpSettings, str, list[str]]:
    """MailExtNotifier knows its own targets; for a stock MailNotifier, read the arguments it
    was constructed with (BuildbotService keeps them until reconfigService)."""
    targets = getattr(notifier, "preflight_targets", None)
    if callable(targets):
        settings, fromaddr, recipients = targets()
        return settings, fromaddr, list(recipients)
    # Stock MailNotifier's signature is the start of ours, positional order included.
    from buildbot_mailext.addresses import envelope_recipients
    from buildbot_mailext.notifier import SMTP_ARGUMENTS, notifier_arguments

    try:
        arguments = notifier_arguments(
            *(getattr(notifier, "_config_args", ()) or ()),
            **(getattr(notifier, "_config_kwargs", {}) or {}),
        )
    except TypeError as e:
        raise ValueError(f"cannot read its arguments: {e}") from None
    settings = SmtpSettings.from_notifier_args(**{k: arguments[k] for k in SMTP_ARGUMENTS})
    return settings, arguments["fromaddr"], envelope_recipients(arguments["extraRecipients"] or [])
