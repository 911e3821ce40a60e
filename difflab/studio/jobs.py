"""The studio's queue: jobs run in the order they came, on one worker thread; each job belongs to
the client (a browser tab) that submitted it, and only that client sees its progress and results.

A job is cancelled while queued by dropping it, while running by its sampler callback raising
:class:`JobCancelled` before the next step. A job that fails records the message and the worker
goes on with the next.
"""
from __future__ import annotations

import collections
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

# errors a request can cause (bad sizes, a model's own refusal): their message goes to the page as is
REQUEST_ERRORS = (ValueError, FileNotFoundError, ImportError)
KEEP_FINISHED = 500


class JobCancelled(Exception):
    """Raised inside a running job (by its sampler callback) when its client cancelled it."""


@dataclass
class Job:
    """One request of one client: ``status`` is queued, running, done, error or cancelled;
    ``progress`` in [0, 1]; ``preview`` a data URL of the current estimate; ``results`` the
    gallery entries it wrote; times from ``time.monotonic()``."""

    client: str
    request: object
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    status: str = "queued"
    progress: float = 0.0
    message: str = ""
    preview: str | None = None
    results: list = field(default_factory=list)
    error: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when the job's client asked to cancel it."""
        if self.cancel.is_set():
            raise JobCancelled()

    def snapshot(self, position: int | None) -> dict:
        """What the job's own client polls."""
        wait = None if self.started is None else self.started - self.submitted
        return {"id": self.id, "status": self.status, "progress": round(self.progress, 4), "message": self.message,
                "preview": self.preview, "results": list(self.results), "error": self.error, "position": position,
                "mode": getattr(self.request, "mode", None), "wait_s": wait}


class JobQueue:
    """First in, first out, on one worker thread calling ``run(job)``."""

    def __init__(self, run):
        self.run = run
        self.lock = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[str, Job] = {}
        self.stopped = False
        self.worker = threading.Thread(target=self.work, name="studio-worker", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> Job:
        with self.lock:
            self.waiting.append(job)
            self.jobs[job.id] = job
            self.lock.notify_all()
        return job

    def cancel(self, job_id: str, client: str) -> bool:
        """Cancel the client's job ``job_id`` (False when it has no such unfinished job)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.client != client or job.status not in ("queued", "running"):
                return False
            job.cancel.set()
            if job.status == "queued":
                self.waiting.remove(job)
                job.status, job.finished, job.message = "cancelled", time.monotonic(), "cancelled before it started"
            return True

    def for_client(self, client: str) -> list[dict]:
        """Snapshots of the client's jobs, oldest first, with their places in the queue."""
        with self.lock:
            order = {job.id: i for i, job in enumerate(self.waiting)}
            return [job.snapshot(order.get(job.id)) for job in self.jobs.values() if job.client == client]

    def work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.stopped:
                    self.lock.wait()
                if self.stopped:
                    return
                job = self.waiting.popleft()
                job.status, job.started = "running", time.monotonic()
            self.run_one(job)
            self.forget_old()

    def run_one(self, job: Job) -> None:
        try:
            job.check_cancelled()
            self.run(job)
            status = "done"
        except JobCancelled:
            status, job.message = "cancelled", "cancelled"
        except REQUEST_ERRORS as e:
            status, job.error = "error", str(e)
        except Exception as e:  # the worker must outlive any job: report, log, go on
            traceback.print_exc(file=sys.stderr)
            status, job.error = "error", f"internal error ({type(e).__name__}): {e}"
        with self.lock:
            job.status, job.finished, job.preview = status, time.monotonic(), None  # the results replace the preview
            if status == "done":
                job.progress = 1.0

    def forget_old(self) -> None:
        """Keep at most :data:`KEEP_FINISHED` finished jobs."""
        with self.lock:
            done = [j for j in self.jobs.values() if j.finished is not None]
            for job in done[:max(0, len(done) - KEEP_FINISHED)]:
                del self.jobs[job.id]

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()


__all__ = ["Job", "JobQueue", "JobCancelled", "REQUEST_ERRORS"]
