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

    def note(self, text: str) -> None:
        """A line for the user on how the job ran (Imagic reusing a cached fine-tune); kept with the result."""
        self.notes.append(text)

    @property
    def notes(self) -> list[str]:
        if "_notes" not in self.__dict__:  # (subclasses may skip __init__)
            self._notes = []
        return self._notes

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


class StageClock:
    """Times a job's stages from its progress updates: steps per second per stage, and the time left.

    `rates` (stage -> steps/s) start from an earlier run's, so an estimate exists before the first step;
    each stage's rate is then measured afresh from its own updates (the first update starts the clock, so
    set-up before the first step is not counted as stepping)."""

    def __init__(self, rates: dict | None = None):
        self.rates: dict[str, float] = dict(rates or {})
        self._started: dict[str, tuple[int, float]] = {}  # stage -> (step, time.monotonic()) at its first update

    def update(self, stage: str, step: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        first = self._started.setdefault(stage, (step, now))
        if step > first[0] and now > first[1]:
            self.rates[stage] = (step - first[0]) / (now - first[1])

    def seconds_left(self, plan: list[tuple[str, int]], stage: str | None = None, step: int = 0) -> float | None:
        """Seconds to finish `plan` ([(stage, steps)], in order) from `step` of `stage` (None: before the first);
        None before any stage has a rate. A stage not measured yet is taken at the slowest measured rate
        (a step of the first run's later stages costs about what its first stage's did)."""
        names = [name for name, _ in plan]
        position = names.index(stage) if stage in names else (0 if stage is None else None)
        known = [rate for name, rate in self.rates.items() if name in names and rate > 0]
        if position is None or not known:
            return None
        total = 0.0
        for index, (name, steps) in enumerate(plan[position:], start=position):
            left = steps - step if index == position and stage is not None else steps
            if left > 0:
                total += left / (self.rates.get(name) or min(known))
        return total


def duration_text(seconds: float) -> str:
    """"9 s", "2 min 5 s": an estimate as people read it."""
    seconds = max(0, round(seconds))
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
