"""The ``difflab`` command: one module per command, one table of commands.

A command is a module with ``HELP`` (its line in ``difflab --help``), ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int``; adding one is a new module here and one
entry in :data:`COMMANDS`. Errors a user can fix (:data:`common.USER_ERRORS`) print one line
naming the command and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys

from .. import __version__
from ..train import TrainingInterrupted
from . import bench, check, demo, distill, dreambooth, memory, sample, studio, train
from . import eval as eval_
from .common import USER_ERRORS, plain_warnings, terminate_as_interrupt

COMMANDS = {
    "demo": demo,
    "train": train,
    "sample": sample,
    "eval": eval_,
    "distill": distill,
    "dreambooth": dreambooth,
    "memory": memory,
    "bench": bench,
    "check": check,
    "studio": studio,
}
EPILOG = "Run 'difflab COMMAND --help' for the options of a command."


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    """The parser of ``difflab``: a subcommand per entry of ``commands`` (default :data:`COMMANDS`)."""
    p = argparse.ArgumentParser(prog="difflab", description="Train, sample and measure diffusion models.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in (commands or COMMANDS).items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return p


def main(argv=None, commands: dict | None = None) -> int:
    """Parse ``argv`` and run the command; 2 on a user error (one line on stderr) or no command;
    128 + the signal's number (130 SIGINT, 143 SIGTERM) when interrupted, with no traceback."""
    commands = commands or COMMANDS
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with terminate_as_interrupt(), plain_warnings(args.command):
            return commands[args.command].run(args)
    except USER_ERRORS as e:
        print(f"difflab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"difflab {args.command}: {e}\nto resume, run the same command again: difflab {shlex.join(argv)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"difflab {args.command}: interrupted by {signal.Signals(signum).name}; the files it was writing were not "
              "replaced", file=sys.stderr)
        return 128 + signum


__all__ = ["COMMANDS", "build_parser", "main"]
