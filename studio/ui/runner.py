"""StudioUI, what every tab shares: the studio, the device lock, per-session cancel, staged inputs, previews."""

from __future__ import annotations

import io
import logging
import queue
import secrets
import sys
import threading
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from studio.console import quiet_libraries
from studio.images import open_image, sha256_bytes
from studio.outputs import atomic_write_new
from studio.progress import Progress, StageClock, duration_text
from studio.requests import StudioInputError
from studio.settings import Settings

log = logging.getLogger(__name__)

HISTORY_LIMIT = 200  # images kept in a session's history gallery
INPUT_MAX_AGE = 7 * 24 * 3600  # inputs the studio stored in outputs/inputs/ (for replay and "send to")
PREVIEW_SECONDS = 0.25  # the least time between two live previews of one job
# A job that finishes within this shows just its result: each preview costs a decode, a PNG and a message,
# a tenth of a 64x64 image's time, and nobody reads a preview shown for a fraction of a second.
FIRST_PREVIEW_SECONDS = 0.5
# Each progress message costs the page a re-render of the loading states it keeps (widgets.NO_PROGRESS), on
# the machine's cores beside the render: a job's first moments show just the page's own timer from the click,
# its latest progress is said once it has run this long, and then about every PROGRESS_SECONDS per stage.
FIRST_PROGRESS_SECONDS = 0.3
PROGRESS_SECONDS = 0.25  # the least time between two progress messages of one stage (its last step always goes)
COST_FIELDS = ("width", "height", "use_lora")  # request fields that change what a step costs (rates kept apart)


class SessionProgress(Progress):
    """A Progress whose cancel flag is the session's current job flag (one Cancel stops a whole batch)."""

    def __init__(self, on_update, cancel_flag: threading.Event):
        super().__init__(on_update)
        self._cancel = cancel_flag


class StudioUI:
    """Holds the Studio (swapped when settings change) and the state shared by all sessions."""

    def __init__(self, studio, settings: Settings, tasks=None):
        # `studio`: a Studio, or None to make one (importing torch and diffusers) on first use, so that
        # `python app.py` serves its page before those imports (see `studio`).
        self._studio = studio
        self._studio_lock = threading.Lock()
        self.tasks = studio.tasks if studio is not None else tasks  # the registry: the tabs, the API's tasks
        self.settings = settings
        self.outputs = Path(settings.outputs_dir).resolve()
        self.device_lock = threading.Lock()  # one job at a time on the device (the queue also ensures it)
        self.jobs: dict[str, threading.Event] = {}  # session -> cancel flag of its running job
        self.preloading = False  # the default model is being loaded in the background (the page says so)
        self.preload_seconds: float | None = None
        self.preload_error: str | None = None
        self.last_prune = 0.0  # when stored inputs were last pruned (time.time())
        # (model, task, cost fields) -> {stage: steps/s} measured by the last such run: time estimates
        self.step_rates: dict[tuple, dict[str, float]] = {}
        self.first_preview_seconds = FIRST_PREVIEW_SECONDS  # no live preview before a job has run this long
        self.first_progress_seconds = FIRST_PROGRESS_SECONDS  # nor a progress message

    @property
    def studio(self):
        """The Studio every job runs on (made here on first use when none was given)."""
        with self._studio_lock:
            if self._studio is None:
                from studio.core import Studio

                self._studio = Studio(self.settings, self.tasks)
            return self._studio

    @studio.setter
    def studio(self, studio) -> None:
        with self._studio_lock:
            self._studio = studio

    # -- inputs ---------------------------------------------------------------------------------

    def stage_image(self, value, name: str) -> str | None:
        """Check an uploaded/painted image like Studio does and keep it as a PNG in outputs/inputs/.

        The request then names a file inside the outputs folder, so the PNG's metadata can be
        replayed and "send to" can bring the input back; nothing from outside the folder is read.
        """
        if value is None:
            return None
        try:
            image = open_image(value, max_pixels=self.settings.max_image_pixels, name=name, keep_alpha=True)
        except StudioInputError as error:
            if isinstance(value, str):  # name the upload, not the server's temp path
                raise StudioInputError(str(error).replace(repr(value), repr(Path(value).name))) from None
            raise
        image = _opaque(image)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.outputs / "inputs" / f"{sha256_bytes(data)[:20]}.png"
        self.prune_inputs()
        if not path.exists():
            atomic_write_new(path, data)
        return str(path)

    def prune_inputs(self, now: float | None = None) -> int:
        """Delete stored inputs older than INPUT_MAX_AGE (at most once an hour); returns how many."""
        now = time.time() if now is None else now
        if now - self.last_prune < 3600:
            return 0
        self.last_prune = now
        removed = 0
        for old in (self.outputs / "inputs").glob("*.png"):
            try:
                if now - old.stat().st_mtime > INPUT_MAX_AGE:
                    old.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def inside_outputs(self, path) -> Path | None:
        """The path if it is an existing file inside the outputs folder (symlinks resolved), else None."""
        if not path or not isinstance(path, str):
            return None
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        if resolved.is_file() and self.outputs in resolved.parents:
            return resolved
        return None

    def recent_outputs(self, limit: int = HISTORY_LIMIT) -> list[tuple[str, str]]:
        """The newest PNGs of the outputs folder (batch folders included, stored inputs not), newest first,
        as history items: what a reloaded page shows."""
        inputs = self.outputs / "inputs"
        found = []
        for path in self.outputs.rglob("*.png"):
            try:
                # Only the folder's own files: a link could show a file from anywhere on the machine.
                inside = self.outputs in path.resolve().parents  # not through a linked folder either
                if inside and inputs not in path.parents and not path.is_symlink() and path.is_file():
                    found.append((path.stat().st_mtime, path))
            except OSError:  # removed meanwhile
                continue
        newest = [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)[:limit]]
        return [(str(path), self._history_caption(path)) for path in newest]

    def _history_caption(self, path: Path) -> str:
        """"generate · seed 5", as a new result's caption; the file name for a PNG without studio metadata."""
        from studio.metadata import read_record

        try:
            record = read_record(path, self.tasks)
            return f"{self.tasks.get(record.request.task).command} · seed {record.seed}"
        except Exception:  # not a studio PNG, or a task this server does not have
            return path.name

    # -- running --------------------------------------------------------------------------------

    def output_target(self, task: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return str(self.outputs / f"{stamp}-{task}-{secrets.token_hex(3)}-{{index}}-{{seed}}.png")

    def stage_planner(self, task: str):
        """The task module's `planned_stages(request)` (Imagic's embedding, fine-tune and sampling), or None."""
        return getattr(sys.modules.get(self.tasks.get(task).run.__module__), "planned_stages", None)

    def planned_stages(self, request) -> list[tuple[str, int]] | None:
        """The stages a request's run reports, with their steps; None for a task that declares none."""
        planned = self.stage_planner(request.task)
        return planned(request) if planned is not None else None

    def rates_key(self, request) -> tuple:
        return (self.settings.model, request.task, *(getattr(request, name, None) for name in COST_FIELDS))

    def estimate(self, request, reused: bool = False) -> float | None:
        """Seconds a run of `request` should take here, from the last such run's steps/s (None: not measured
        yet, or a task without planned stages); `reused`: the last stage alone (the sampling, when Imagic
        reuses its cached fine-tune). `request` may be unvalidated (`model_construct`)."""
        plan = self.planned_stages(request)
        if not plan:
            return None
        return StageClock(self.step_rates.get(self.rates_key(request))).seconds_left(plan[-1:] if reused else plan)

    def stream(self, task: str, fields: dict, session: str, progress: gr.Progress):
        """Build the request, run it on the device, save the PNGs; returns (paths, result).

        A generator: while the job samples in a worker thread it yields live previews (PIL images, from
        FIRST_PREVIEW_SECONDS into the job, at most every PREVIEW_SECONDS) and reports steps to `progress`
        (from FIRST_PROGRESS_SECONDS, at most every PROGRESS_SECONDS per stage), both from this thread,
        the one gradio gave the event. Closing the generator (the browser went away) cancels the job.
        """
        request = self.studio.tasks.make_request(task, **fields)  # StudioInputError names the bad field and value
        cancel = threading.Event()
        self.jobs[session] = cancel
        events: queue.Queue = queue.Queue()
        outcome: dict = {}
        started = time.monotonic()
        last_preview = [started - PREVIEW_SECONDS + self.first_preview_seconds]
        last_progress = {"stage": None, "time": 0.0}
        plan = self.planned_stages(request)
        clock = StageClock(self.step_rates.get(self.rates_key(request)))

        def on_update(stage, step, total, preview=None):
            desc = stage.replace("_", " ")
            if plan:  # a running estimate: "imagic: embedding 40/150 · ~9 s left"
                clock.update(stage, step)
                left = clock.seconds_left(plan, stage, step)
                desc = f"{desc} {step}/{total}" + (f" · ~{duration_text(left)} left" if left is not None else "")
            now = time.monotonic()
            if stage != last_progress["stage"] or step >= total or now - last_progress["time"] >= PROGRESS_SECONDS:
                last_progress.update(stage=stage, time=now)
                events.put(("progress", (step, total), desc))
            if preview is not None and time.monotonic() - last_preview[0] >= PREVIEW_SECONDS:
                last_preview[0] = time.monotonic()
                image = preview()
                if image is not None:
                    events.put(("preview", image, None))

        def work():
            try:
                events.put(("progress", 0, "waiting for the device"))
                with self.device_lock:
                    quiet_libraries()
                    loading = not self.studio.models.loaded_models()
                    events.put(("progress", 0, "starting (the first run loads the model)" if loading else "starting"))
                    result = self.studio.run(request, SessionProgress(on_update, cancel))
                outcome["value"] = result.save(self.output_target(task), overwrite=False), result
            except BaseException as error:  # re-raised in the event's thread below
                outcome["error"] = error
            finally:
                events.put(None)

        worker = threading.Thread(target=work, name=f"studio-{task}", daemon=True)
        worker.start()
        show_progress_from = started + self.first_progress_seconds
        held = None  # the latest progress of the job's first moments, not shown yet
        try:
            while True:
                try:
                    event = events.get(timeout=max(0.0, show_progress_from - time.monotonic()) if held else None)
                except queue.Empty:  # the job runs on: show where it is
                    progress(held[0], desc=held[1], unit="steps")
                    held = None
                    continue
                if event is None:
                    break
                kind, value, desc = event
                if kind == "preview":
                    yield value
                elif time.monotonic() < show_progress_from:
                    held = value, desc
                else:
                    held = None  # older than this one
                    progress(value, desc=desc, unit="steps")
        finally:
            if worker.is_alive():
                cancel.set()
            self.jobs.pop(session, None)
            if plan and clock.rates:
                self.step_rates[self.rates_key(request)] = clock.rates
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def cancel(self, session: str) -> bool:
        flag = self.jobs.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def start_preload(self) -> None:
        """Load the default model in a background thread (the page says "loading" meanwhile)."""
        self.preloading = True
        threading.Thread(target=self.preload, name="preload", daemon=True).start()

    def preload(self) -> None:
        """Load the default model in the background so the first request does not wait for it."""
        started = time.perf_counter()
        self.preloading = True
        try:
            with self.device_lock:
                quiet_libraries()
                loaded = self.studio.models.get(None)  # the first use of `studio` imports torch and diffusers
            self.preload_seconds = time.perf_counter() - started
            log.info("model %s loaded on %s in %.1f s", loaded.ref.name, loaded.device, self.preload_seconds)
        except Exception as error:  # shown in the Models tab; the UI still works (other models)
            self.preload_error = str(error)
            log.warning("could not preload the model: %s", error)
        finally:
            self.preloading = False

    # -- settings -------------------------------------------------------------------------------

    def offered_models(self) -> set[str]:
        """The model references this server lists (the Models tab's choices)."""
        from studio.models import list_local_models

        return {self.settings.model, *(entry["reference"] for entry in list_local_models(self.settings))}

    def swap_settings(self, **changes) -> None:
        """New settings take effect through a fresh Studio (the old models are freed first)."""
        from studio.core import Studio

        settings = self.settings.with_(**changes)
        with self.device_lock:
            self.studio.models.clear()
            self._studio = Studio(settings, self.tasks)
            self.settings = settings


def _opaque(image: Image.Image) -> Image.Image:
    """RGBA whose alpha is fully opaque -> RGB (the editor exports every image as RGBA)."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    return image


def session_key(request: gr.Request | None) -> str:
    """The browser session (or API client) a request comes from: whose job a Cancel stops."""
    return getattr(request, "session_hash", None) or "no-session"


def friendly(error: Exception) -> gr.Error:
    """A readable one-line message for the browser, never a stack trace."""
    if isinstance(error, StudioInputError):
        return gr.Error(str(error), title="Check the input", print_exception=False)
    if isinstance(error, (RuntimeError, ValueError, OSError)):
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "out of memory" in message.lower():
            message += " — try a smaller size or batch, or enable memory options in Models and settings"
        log.warning("render failed: %s", message)
        return gr.Error(message, title="Could not render", print_exception=False)
    log.exception("unexpected error")
    return gr.Error(f"{type(error).__name__}: {error}", title="Unexpected error")


def add_history(new: list, history) -> list:
    """A session's history gallery with `new` images first, at most HISTORY_LIMIT."""
    return (list(new) + list(history or []))[:HISTORY_LIMIT]
