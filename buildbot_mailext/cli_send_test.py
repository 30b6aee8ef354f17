"""``buildbot-mailext send-test MASTER_DIR --to ADDR [--notifier NAME]``: one real mail through a
notifier's own transport, to prove the relay path end to end without breaking a build.

The notifier is configured exactly as the master configures it (master.cfg loaded in-process,
secrets rendered, ``reconfigService`` run: :mod:`buildbot_mailext.master_dir`), so the mail
leaves through the same relayhost, TLS policy, CA file and AUTH. No database is opened.

It prints the conversation summary: the server, the TLS version and the name the certificate
was verified for, the accepted (and refused) recipients, the final reply and the queue id the
relay gave. Exit status: 0 when the relay accepted the mail, 1 when it did not, 2 for usage
errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from buildbot_mailext import message as mime
from buildbot_mailext.master_dir import USAGE_EXIT, MasterDir, MasterDirError, add_master_dir_arguments, run_command
from buildbot_mailext.addresses import address_errors

SUBJECT = "buildbot-mailext test mail"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "send-test",
        help="send one real test mail through a notifier's configured relay",
        description="Send ONE real test mail through the relay a notifier in MASTER_DIR/master.cfg "
        "is configured with (relayhost, TLS, AUTH, secrets rendered as the master renders them), "
        "and print the conversation summary: server, TLS version and verified name, accepted "
        "recipients, queue id. Exit 0 if the relay accepted the mail, 1 if not.",
    )
    add_master_dir_arguments(parser)
    parser.add_argument("--to", required=True, metavar="ADDR", help="the recipient of the test mail")
    parser.add_argument("--notifier", metavar="NAME", help="which notifier (needed when there are several)")
    return parser


def run(args: argparse.Namespace) -> int:
    bad = address_errors(args.to, "send-test", "--to")  # the gate master.cfg's addresses pass
    if bad:
        print("\n".join(bad), file=sys.stderr)
        return USAGE_EXIT
    return run_command(lambda: SendTest(args).run())


# --- TLS facts ---------------------------------------------------------------------------------


def describe_tls(settings: Any, delivery: Any) -> str:
    """One line: the transport's own account of the TLS session (``Delivery.tls``: version,
    cipher, verified name), plus what the certificate was checked against."""
    if settings.tls == "none":
        return "none (plain SMTP: useTls/useSmtps not set)"
    if not delivery.tls:
        return f"{settings.tls.upper()} configured, no TLS session was established"
    if not settings.tls_verify:
        return delivery.tls
    trust = f"CA file {settings.tls_ca_file}" if settings.tls_ca_file else "the system's trust store"
    return f"{delivery.tls}, against {trust}"


# --- the command -------------------------------------------------------------------------------


class SendTest:
    def __init__(self, args: argparse.Namespace):
        self.args = args

    async def run(self) -> int:
        from buildbot_mailext.notifier import MailExtNotifier

        master_dir = MasterDir(self.args.master_dir, self.args.config)
        try:
            master_dir.load_config()
            notifier = master_dir.notifier(self.args.notifier)
            if not isinstance(notifier, MailExtNotifier):
                raise MasterDirError(
                    f"notifier {notifier.name!r} is a stock {type(notifier).__name__}: send-test sends through "
                    "MailExtNotifier's transport; check a stock notifier with `buildbot-mailext preflight`"
                )
            await master_dir.open(database=False)
            await master_dir.configure_notifier(notifier)
            return await self._send(master_dir, notifier)
        except MasterDirError as e:
            print(f"send-test: {e}", file=sys.stderr)
            return e.exit_code
        finally:
            await master_dir.close()

    async def _send(self, master_dir: MasterDir, notifier: Any) -> int:
        transport = notifier.transport
        settings = transport.settings
        title = master_dir.config.title or "Buildbot"
        msg = mime.build_email(
            subject=f"{SUBJECT} from {title} (notifier {notifier.name})",
            from_addr=notifier.fromaddr,
            to=[self.args.to],
            text=(
                f"This is a test mail from `buildbot-mailext send-test {master_dir.basedir}`.\n\n"
                f"It left through the relay of notifier {notifier.name!r}: {settings.route_label()}.\n"
                "If you read it, build mail from this master can reach this address.\n"
            ),
            html=None,
            headers={"X-Buildbot-Mailext-Test": "send-test"},
        )
        envelope_from = mime.bare_address(notifier.fromaddr)
        recipients = mime.envelope_recipients([self.args.to])
        print(f"send-test: notifier {notifier.name!r}: sending to {', '.join(recipients)} via {settings.route_label()}")
        # MasterDir.close() stops the notifier afterwards: QUIT on the cached connection.
        delivery = await transport.send(envelope_from, recipients, mime.message_bytes(msg), "send-test")
        return self._report(settings, delivery, msg)

    def _report(self, settings: Any, delivery: Any, msg: Any) -> int:
        """The summary, from the transport's Delivery (transport.py) of this one attempt."""
        refused = {**delivery.refused_permanently, **delivery.refused_temporarily}
        rows = [
            ("server", settings.route_label()),
            ("TLS", describe_tls(settings, delivery)),
            ("AUTH", f"as {settings.user}" if settings.user else "none"),
            ("from", mime.bare_address(str(msg["From"]))),
            ("Message-ID", str(msg["Message-ID"])),
            ("accepted", ", ".join(delivery.accepted) or "none"),
            ("refused", "; ".join(f"{r} ({why})" for r, why in refused.items()) or "none"),
            ("reply", delivery.reply or "none"),
            ("queue id", delivery.queue_id or "(the reply names none)"),
        ]
        if delivery.failure is not None:
            rows.append(("failure", f"{delivery.failure.kind}: {delivery.failure}"))
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"  {name + ':':<{width + 1}} {value}")
        print("send-test: " + ("the relay accepted the mail" if delivery.delivered else "NOT delivered (see above)"))
        return 0 if delivery.delivered else 1
