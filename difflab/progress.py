"""Progress on anything slow: a tqdm bar on a terminal, a few plain lines elsewhere.

A redrawn bar written to a log file or a CI console is one long line of carriage returns. When
stderr is not a terminal, :func:`progress_bar` prints a plain line at 0 %, every quarter and at
the end instead (``sampling: 250/500 (50%), 23.8 img/s, 10 s``), and ``write`` lines as they are.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

QUARTERS = (0.25, 0.5, 0.75)


class PlainProgress:
    """The part of tqdm's interface difflab uses (``update``, ``set_postfix``, ``write``,
    ``close``, ``n``), printing a line at the start, each quarter of ``total`` and the end."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", disable: bool = False, file=None):
        self.total, self.desc, self.unit, self.disable = int(total or 0), desc, unit, disable
        self.file = file or sys.stderr
        self.n, self.postfix, self.start, self._next, self._closed = 0, {}, time.perf_counter(), 0, False
        self._line()

    def _line(self) -> None:
        if self.disable:
            return
        seconds = time.perf_counter() - self.start
        rate = f", {self.n / seconds:.3g} {self.unit}/s" if self.n and seconds > 0 else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total or '?'}{pct}{rate}{post}, {seconds:.0f} s", file=self.file, flush=True)
        marks = [q for q in QUARTERS if self.total and self.n < q * self.total]
        self._next = marks[0] * self.total if marks else float("inf")

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next and (not self.total or self.n < self.total):
            self._line()

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = kw

    def write(self, text: str) -> None:
        if not self.disable:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if not self._closed and self.n and self.total and self.n >= self.total:
            self._line()
        self._closed = True


def progress_bar(total: int, desc: str = "", unit: str = "it", disable: bool = False):
    """A tqdm bar when stderr is a terminal, else a :class:`PlainProgress`."""
    if hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, disable)


def progress_range(*args, desc: str = "", unit: str = "it", disable: bool = False):
    """``range(*args)`` under :func:`progress_bar` (tqdm's ``trange``)."""
    steps = range(*args)
    bar = progress_bar(len(steps), desc=desc, unit=unit, disable=disable)
    try:
        for i in steps:
            yield i
            bar.update(1)
    finally:
        bar.close()


__all__ = ["PlainProgress", "progress_bar", "progress_range"]
