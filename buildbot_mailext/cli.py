"""The ``buildbot-mailext`` command: one entry point, one module per subcommand.

This module owns argument parsing and dispatch only; each subcommand lives in its own
``cli_<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from buildbot_mailext import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildbot-mailext",
        description="Operator tools for buildbot-mailext (Buildbot build mail).",
    )
    parser.add_argument("--version", action="version", version=f"buildbot-mailext {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in subcommands().values():
        module.add_parser(subparsers)
    return parser


def subcommands() -> dict:
    """Subcommand name -> its module (imported lazily: ``--version`` stays instant)."""
    from buildbot_mailext import cli_preflight, cli_preview, cli_send_test

    return {"preflight": cli_preflight, "preview": cli_preview, "send-test": cli_send_test}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return subcommands()[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
