"""The ``buildbot-mailext`` command: one entry point, one module per subcommand.

This module owns argument parsing and dispatch, and loading a master directory's
master.cfg for the subcommands that read one; each subcommand lives in its own
``cli_<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

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
    from buildbot_mailext import cli_outbox, cli_preflight, cli_preview, cli_send_test

    return {"preflight": cli_preflight, "preview": cli_preview, "send-test": cli_send_test, "outbox": cli_outbox}


def load_master_config(master_dir: str, config_file: str, command: str) -> Optional[dict]:
    """MASTER_DIR/config_file's BuildmasterConfig dict, loaded in-process as the master
    would (without the notifiers' config-load preflight); None after printing why not."""
    from buildbot.config.errors import ConfigErrors, capture_config_errors
    from buildbot.config.master import loadConfigDict

    from buildbot_mailext import preflight

    basedir = os.path.abspath(master_dir)
    if not os.path.isfile(os.path.join(basedir, config_file)):
        print(f"{command}: {os.path.join(basedir, config_file)} does not exist", file=sys.stderr)
        return None
    try:
        with preflight.suppressed(), capture_config_errors(raise_on_error=True):
            _, config_dict = loadConfigDict(basedir, config_file)
    except ConfigErrors as e:
        print(f"{command}: {config_file} has configuration errors:", file=sys.stderr)
        for err in e.errors:
            print("  " + err, file=sys.stderr)
        return None
    return config_dict


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return subcommands()[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
