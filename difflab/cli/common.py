"""What every command shares: the device default, parsing helpers, the error policy."""
from __future__ import annotations

import argparse

import torch


class UsageError(ValueError):
    """A bad argument: printed as one line naming it, exit status 2."""


def device(name: str | None) -> str:
    """``name``, or ``"cuda"`` when a GPU is there, else ``"cpu"``."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_classes(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse ``type=``)."""
    try:
        return [int(c) for c in text.replace(" ", "").split(",") if c != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes must be comma-separated integers like 0,1,2, got {text!r}")


# Errors a command turns into one line on stderr and exit status 2 (no traceback).
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)
