"""The job gate the HTTP API shares with the UI: the same device lock, a bounded wait, progress and cancel.

Every API job takes `StudioUI.device_lock`, the lock the UI's jobs (and model preloading and settings
changes) hold while they use the device, so an API job and a UI job never run at once. At most
`queue_size` API jobs wait for the lock; one more is refused (`QueueFull`, HTTP 503). The running
API job is visible to /sdapi/v1/progress (steps, live preview) and stopped by /sdapi/v1/interrupt
(the whole job, after its current step) or /sdapi/v1/skip (the current iteration of an n_iter job).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from studio.console import quiet_libraries
from studio.progress import GenerationCancelled, JobTimedOut, Progress

PREVIEW_SECONDS = 0.25  # the least time between two live previews of one job (as the UI)


class QueueFull(Exception):
    """More API jobs wait for the device than --queue-size allows."""


class ApiJob:
    """The running API job: what /progress reports and what /interrupt and /skip stop."""

    def __init__(self, job_count: int, name: str = ""):
        self.name = name
        self.job_count = max(1, job_count)
        self.job_no = 0  # the iteration running (n_iter)
        self.step = 0
        self.total = 0
        self.stage = "starting"
        self.started = time.monotonic()
        self.timestamp = time.strftime("%Y%m%d%H%M%S")
        self.interrupted = False
        self.skipped = False
        self.want_preview = False  # set once a client asks /progress for the current image
        self.preview = None  # the latest live preview (PIL), made in the sampling thread
        self._last_preview = 0.0
        self._iteration_cancel = threading.Event()

    # -- stopping ----------------------------------------------------------------------------

    def interrupt(self) -> None:
        self.interrupted = True
        self._iteration_cancel.set()

    def skip(self) -> None:
        self.skipped = True
        self._iteration_cancel.set()

    # -- running -----------------------------------------------------------------------------

    def progress(self) -> Progress:
        """A fresh Progress for the next iteration; its cancel flag is the iteration's."""
        self._iteration_cancel = threading.Event()
        if self.interrupted:
            self._iteration_cancel.set()
        progress = Progress(self._on_update)
        progress._cancel = self._iteration_cancel
        return progress

    def _on_update(self, stage, step, total, preview=None) -> None:
        self.stage, self.step, self.total = stage, step, total
        if preview is not None and self.want_preview and time.monotonic() - self._last_preview >= PREVIEW_SECONDS:
            self._last_preview = time.monotonic()
            image = preview()
            if image is not None:
                self.preview = image

    def fraction(self) -> float:
        within = self.step / self.total if self.total else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)


class JobGate:
    """Runs API jobs one at a time on the UI's device lock, with at most `queue_size` waiting."""

    def __init__(self, ui, queue_size: int):
        self.ui = ui  # a StudioUI: .studio, .settings, .device_lock
        self.queue_size = queue_size
        self.waiting = 0
        self.current: ApiJob | None = None
        self._lock = threading.Lock()

    @contextmanager
    def job(self, job_count: int = 1, name: str = ""):
        """Wait for the device (or raise QueueFull), then hold it while the block runs."""
        with self._lock:
            if self.waiting >= self.queue_size:
                raise QueueFull(f"queue full: {self.waiting} job(s) already wait for the device (--queue-size)")
            self.waiting += 1
        try:
            self.ui.device_lock.acquire()
        finally:
            with self._lock:
                self.waiting -= 1
        job = ApiJob(job_count, name)
        self.current = job
        try:
            quiet_libraries()
            yield job
        finally:
            self.current = None
            self.ui.device_lock.release()

    def run_iterations(self, job: ApiJob, requests: list) -> list:
        """Run each request (one per iteration) on the studio; returns the Results finished.

        Skip drops the current iteration and goes on; interrupt stops the job (finished iterations kept).
        A job's time limit is an error, not a skip.
        """
        results = []
        for index, request in enumerate(requests):
            if job.interrupted:
                break
            job.job_no, job.step, job.total = index, 0, 0
            try:
                results.append(self.ui.studio.run(request, job.progress()))
            except JobTimedOut:
                raise
            except GenerationCancelled:
                if job.interrupted:
                    break
                continue  # skipped: the next iteration
        return results

    def interrupt(self) -> bool:
        job = self.current
        if job is None:
            return False
        job.interrupt()
        return True

    def skip(self) -> bool:
        job = self.current
        if job is None:
            return False
        job.skip()
        return True

    def busy_with_other_work(self) -> bool:
        """The device is held by something that is not an API job (a UI job, preloading)."""
        return self.current is None and self.ui.device_lock.locked()
