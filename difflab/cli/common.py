"""What every command shares: the device default, parsing helpers, the error policy."""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch

from ..io.spec import checkpoint_spec
from ..pipelines.checkpoint import check_image_kind
from ..train import TrainingDivergedError


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
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, TrainingDivergedError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks run and no temporary file is left."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def plain_warnings(command: str):
    """Show warnings as ``difflab COMMAND: warning: message`` lines (no file, line or source)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"difflab {command}: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def terminate_as_interrupt():
    """Turn SIGTERM into :class:`Terminated` for the ``with`` block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# argparse types: a bad value is refused while parsing, naming the option, before any work


def _number(text: str, kind, what: str, ok) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, counts)."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def finite_float(text: str) -> float:
    """A finite number (guidance scales): nan and inf are refused."""
    return _number(text, float, "a finite number", math.isfinite)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (eta)."""
    return _number(text, float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_name(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, refused when this machine lacks it."""
    kind, _, index = text.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use one of cpu, cuda, cuda:N, mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    return text


def add_device(parser) -> None:
    """The ``--device`` option every command shares."""
    parser.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")


def output_file(path: Path, flag: str = "--out") -> Path:
    """Refuse an output path that is a folder, or whose folder cannot be made, before any work."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name such as {path / 'samples.png'}")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: {path.parent} is a file, not a folder")
    return path


def image_checkpoint(path: Path, flag: str, command: str) -> dict:
    """The metadata of the checkpoint at ``path``, refused before any work when it is missing or
    its network kind does not make images."""
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    kind, meta = checkpoint_spec(path)
    check_image_kind(kind, command)
    return meta


def output_folder(path: Path, flag: str = "--out") -> Path:
    """Refuse an output folder that is an existing file, before any work."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder (it is created when missing)")
    return path
