"""The run folder of :func:`difflab.train.fit`: one run at a time, and no debris after a crash.

A run folder holds ``checkpoint.safetensors`` (the state, written atomically), ``checkpoint.json``
(a copy of its metadata for people: the "pointer" to the step it holds), ``log.jsonl`` (one JSON
entry per logged step) and, while a run is alive, ``train.lock``. On start, :func:`open_run`:

1. takes the lock: a JSON file holding the process id, host and start time, created with
   ``O_EXCL`` so two runs cannot both take it. A lock whose process is gone (same host, the pid
   is not running) is stale: it is taken over with a warning. A live one, or one from another
   host (whose process cannot be checked), is refused with :class:`RunLockedError`;
2. removes the temporary files an interrupted atomic write left behind (``.checkpoint.*.tmp``);
3. rewrites ``checkpoint.json`` from the checkpoint's own header when a crash fell between the
   two writes (the JSON then named the step before);
4. truncates ``log.jsonl`` to the steps the resumed state has taken (a crash after a log line
   but before the next checkpoint would otherwise log those steps twice), dropping a torn last line.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from pathlib import Path

from difflab.io.checkpoint import atomic_write_text, read_metadata, temporary_files

LOCK_NAME = "train.lock"
LOG_NAME = "log.jsonl"


class RunLockedError(ValueError):
    """Another live run holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # torn or unreadable: treated as stale


def acquire_lock(folder) -> Path:
    """Take ``folder/train.lock`` for this process (see the module doc); returns its path."""
    path = Path(folder) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            pid, host = held.get("pid"), held.get("host")
            same_host = host == me["host"]
            if isinstance(pid, int) and same_host and pid != me["pid"] and _pid_alive(pid):
                raise RunLockedError(f"{folder} is in use by another run (process {pid} on {host}, started "
                                     f"{held.get('started')}); wait for it, or give another --out")
            if isinstance(pid, int) and host and not same_host:
                raise RunLockedError(f"{folder} is locked by process {pid} on host {host}, which cannot be checked from "
                                     f"here; if no run is using the folder, delete {path}")
            warnings.warn(f"{path}: taking over a stale lock (process {pid} on {host} is not running)", stacklevel=3)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me) + "\n")
        return path
    raise RunLockedError(f"could not take the lock {path}: another run keeps taking it")


def release_lock(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    if _read_lock(path).get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_debris(checkpoint: Path) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes of ``checkpoint``, its ``.json``
    and the log left beside it; returns them."""
    names = (checkpoint.name, checkpoint.with_suffix(".json").name, LOG_NAME)
    removed = [p for name in names for p in temporary_files(checkpoint.parent, name)]
    for p in removed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return removed


def sync_pointer(checkpoint: Path) -> bool:
    """Rewrite ``checkpoint.json`` from the checkpoint's header when it is missing or names
    another step; True when it was rewritten."""
    pointer = checkpoint.with_suffix(".json")
    if not checkpoint.is_file():
        return False
    meta = read_metadata(checkpoint)
    try:
        if json.loads(pointer.read_text(encoding="utf-8")) == meta:
            return False
    except (OSError, ValueError):
        pass
    atomic_write_text(pointer, json.dumps(meta, sort_keys=True, indent=1) + "\n")
    return True


def truncate_log(log: Path, step: int) -> int:
    """Keep the entries of ``log`` (JSON lines with a ``"step"``) up to ``step``, dropping a torn
    last line; returns the number of lines dropped."""
    if not log.is_file():
        return 0
    lines = log.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(log, "".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


@contextlib.contextmanager
def locked_run(checkpoint: Path, enabled: bool = True):
    """Hold the lock of the folder of ``checkpoint`` for the ``with`` block (steps 1-3 of the
    module doc); ``enabled=False`` (ranks other than 0) does nothing."""
    if not enabled:
        yield None
        return
    lock = acquire_lock(checkpoint.parent)
    try:
        remove_debris(checkpoint)
        with contextlib.suppress(ValueError, FileNotFoundError):  # a damaged checkpoint is reported on resume
            sync_pointer(checkpoint)
        yield lock
    finally:
        release_lock(lock)


__all__ = ["LOCK_NAME", "LOG_NAME", "RunLockedError", "acquire_lock", "release_lock", "remove_debris", "sync_pointer",
           "truncate_log", "locked_run"]
