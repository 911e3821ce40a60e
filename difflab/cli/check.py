"""``difflab check``: verify a checkpoint and print what it holds (:mod:`difflab.io.verify`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io.verify import check_sha256, format_report, verify_checkpoint

HELP = "verify a checkpoint (format, spec, finiteness, shapes, hash) and print what it holds"
DESCRIPTION = ("Check that a checkpoint is a difflab safetensors file, that every tensor is finite, that its weights fit "
               "the network its spec describes and (with --sha256) that it is the file you expect; then print its kind, "
               "step, network, tensor groups and training settings. Exit status 0 when every check passes, 2 otherwise.")


class CheckFailed(ValueError):
    """A checkpoint failed a check: one line on stderr (the report, with every problem, is on stdout)."""


def sha256_hex(text: str) -> str:
    """64 hexadecimal digits (an argparse ``type=``)."""
    try:
        return check_sha256(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits (as sha256sum prints), got {text!r}") from None


def add_arguments(c) -> None:
    c.add_argument("checkpoint", type=Path, metavar="CKPT", help="a .safetensors file, or a run folder holding checkpoint.safetensors")
    c.add_argument("--sha256", type=sha256_hex, default=None, help="the file's expected SHA-256 (64 hex digits)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"{args.checkpoint} does not exist")
    report = verify_checkpoint(args.checkpoint, sha256=args.sha256)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if not report.ok:
        n = len(report.problems)
        more = f" (and {n - 1} more, listed above)" if n > 1 else ""
        raise CheckFailed(f"{report.path} failed {n} check{'s' if n > 1 else ''}: {report.problems[0]}{more}")
    return 0
