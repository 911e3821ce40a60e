"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, stop.

:func:`graceful_stop` installs handlers for SIGINT and SIGTERM for the life of a run. The first
signal only raises a flag; the loop checks it after each optimizer step, writes a checkpoint and
raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``, so code that does not know it still
stops). A second signal stops at once by raising ``KeyboardInterrupt`` wherever the run is: a
checkpoint write it cuts short leaves the previous checkpoint intact (writes are atomic).
Handlers can only be installed from the main thread; elsewhere the run keeps Python's defaults.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after ``step`` steps; ``checkpoint`` holds that step (or None)."""

    def __init__(self, step: int, checkpoint: str | None, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        where = f"the checkpoint {checkpoint} holds step {step}" if checkpoint else "nothing was saved (no run folder)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {where}")

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class StopFlag:
    """What the handlers set: the first signal's number, or None."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def graceful_stop(enabled: bool = True):
    """Yield a :class:`StopFlag` raised by the first SIGINT or SIGTERM; see the module doc."""
    flag = StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt  # the second signal: stop now
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["TrainingInterrupted", "StopFlag", "graceful_stop", "SIGNALS"]
