"""Progress and cancel, through one small object.

The CLI renders it with tqdm, the UI with gr.Progress, tests ignore it. Cancel is a
flag the sampling loop checks after every step (and the VAE decode between its blocks);
a job's time limit (Settings.job_time_limit) reads as a cancel once it has passed.
"""

from __future__ import annotations

import functools
import threading
import time


class GenerationCancelled(Exception):
    """Raised when the user cancels; images finished before the cancel are kept."""


class JobTimedOut(GenerationCancelled):
    """Raised when a job runs past its time limit (Settings.job_time_limit)."""


class Progress:
    """Receives (stage, step, total, preview) updates; subclass or pass `on_update` to show them.

    `preview`, when not None, is a function of no arguments returning a PIL picture of the
    current latents (see studio.previews); only those who show previews pay for calling it.
    """

    # Class-level defaults, so that subclasses which skip __init__ still work.
    _deadline: float | None = None  # time.monotonic() after which the job has timed out
    _time_limit: float | None = None

    def __init__(self, on_update=None):
        self._on_update = on_update
        self._cancel = threading.Event()

    def start_deadline(self, seconds: float | None) -> None:
        """Time the job out `seconds` from now (None: never). Studio.run calls it when the job starts,
        so that time spent waiting in a queue does not count."""
        self._time_limit = seconds
        self._deadline = None if seconds is None else time.monotonic() + seconds

    @property
    def timed_out(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def update(self, stage: str, step: int, total: int, preview=None) -> None:
        if self._on_update is not None:
            self._on_update(stage, step, total, preview)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or self.timed_out

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise GenerationCancelled("cancelled by the user")
        if self.timed_out:
            raise JobTimedOut(
                f"the job ran longer than the limit of {self._time_limit:g} s per job "
                "(job_time_limit; raise it with --job-time-limit or STUDIO_JOB_TIME_LIMIT)"
            )

    def diffusers_callback(self, stage: str, total: int):
        """A `callback_on_step_end` for diffusers pipelines: reports each step, stops after a cancel."""
        from studio.previews import latent_preview  # torch: imported once a pipeline runs, not with this module

        def callback(pipe, step_index, timestep, callback_kwargs):
            latents = callback_kwargs.get("latents")
            preview = None if latents is None else functools.partial(latent_preview, pipe, latents)
            self.update(stage, step_index + 1, total, preview)
            if self.cancelled:
                pipe._interrupt = True  # diffusers skips the remaining steps; the task then raises
            return callback_kwargs

        return callback


class TqdmProgress(Progress):
    """A progress bar per stage on stderr (the CLI's)."""

    def __init__(self, disable: bool = False):
        super().__init__()
        self._bar = None
        self._stage = None
        self._disable = disable

    def update(self, stage: str, step: int, total: int, preview=None) -> None:
        from tqdm import tqdm

        if stage != self._stage or self._bar is None or step < self._bar.n:
            self.close()
            self._bar = tqdm(total=total, desc=stage, leave=False, disable=self._disable, unit="step")
            self._stage = stage
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
