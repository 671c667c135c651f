"""The studio's web UI and API: `python app.py` (see `python app.py --help`).

A thin adapter over `Studio`: every tab builds a request from the one request schema
(`studio.requests`) and calls `Studio.run`; nothing here samples, loads or edits images
beyond turning widget values into request fields. Each tab's main function has a stable
`api_name`, so `gradio_client` drives every task:

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    gallery, seed, status = client.predict(prompt="a large red circle", seed=1, api_name="/text_to_image")

How the server is exposed (bind address, auth, upload limit, which files it may read) is
`studio/server.py`. Build the app in-process with `build_app(studio, settings)`.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import queue
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import types
import typing
import warnings
import zipfile
from pathlib import Path

import gradio as gr
from PIL import Image, ImageChops

from studio import server
from studio.images import open_image, sha256_bytes
from studio.outputs import atomic_write_new
from studio.progress import GenerationCancelled, JobTimedOut, Progress
from studio.requests import (
    MAX_BATCH_SIZE,
    SCHEDULER_NAMES,
    BaseRequest,
    StudioInputError,
)
from studio.settings import Settings

log = logging.getLogger("studio.app")

DEFAULT_SCHEDULER = "model default"
HISTORY_LIMIT = 200  # images kept in a session's history gallery
# Gradio's upload cache (uploads, and copies of the results it served) is swept hourly of files older
# than a day; inputs the studio stored in outputs/inputs/ (for replay and "send to") are kept a week.
UPLOAD_CACHE_SWEEP = (3600, 24 * 3600)
INPUT_MAX_AGE = 7 * 24 * 3600
PREVIEW_SECONDS = 0.25  # the least time between two live previews of one job
# Brush colours: the toy world's palette (the embedded model knows these) plus black, white and grey.
SKETCH_COLORS = ["#000000", "#ffffff", "#808080", "#dc1e1e", "#fa8700", "#f0dc00", "#1ea53c", "#285ae1", "#912dc8"]
MASK_COLOR = ("#ff00ff", 0.6)

CSS = """
.gradio-container { width: 100% !important; max-width: 1320px !important; margin: 0 auto !important; }
#studio-header h1 { margin: 0 0 2px 0; }
#studio-header p { margin: 0; opacity: 0.75; }
.studio-status p { margin: 4px 0; }
"""


# ------------------------------------------------------------------------------------------------
# Widgets from the request schema
# ------------------------------------------------------------------------------------------------


def schema_checked(component):
    """Let the request schema, not the widget, check the value: an out-of-range API value then gets an
    error naming the field (`num_inference_steps: ... (got 0)`) instead of gradio's anonymous bounds
    message. (Set on the instance: a Component subclass would make gradio write an app.pyi file.)"""
    precision = getattr(component, "precision", None)

    def preprocess(payload):
        if precision == 0 and isinstance(payload, float) and payload.is_integer():
            return int(payload)
        return payload

    component.preprocess = preprocess
    return component


def uploaded_file(component):
    """An image input that hands over the uploaded file itself, undecoded: `open_image` then checks it
    (pixel count from the header before any decoding, raster formats only) with a readable message.
    Gradio's own preprocessing would decode it first, and fail on a non-image with an anonymous error."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            _require_uploaded(payload.path, component.label)
            return payload.path
        return _readable(original, payload, component.label)

    component.preprocess = preprocess
    return component


def uploaded_files(component):
    """A gr.File input that accepts only files uploaded to this server (never a path on its disk)."""
    original = component.preprocess

    def preprocess(payload):
        items = getattr(payload, "root", None) if payload is not None else None
        for item in items if isinstance(items, list) else [payload]:
            if item is not None and getattr(item, "path", None):
                _require_uploaded(item.path, component.label)
        return original(payload)

    component.preprocess = preprocess
    return component


def _require_uploaded(path: str, label) -> None:
    """RequestGuard already refuses file inputs that are not uploads; this holds even where a route
    bypasses it. The message is the same whether or not the path exists: it tells nothing of the disk."""
    from gradio.utils import get_upload_folder

    if not server.is_inside(path, get_upload_folder()):
        raise gr.Error(f"{_what(label)}: upload the file; paths on the server are not accepted", print_exception=False)


def checked_editor(component, max_pixels: int):
    """An ImageEditor whose uploads are size-checked from their headers before gradio decodes them."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "id", None) is None:
            for item in [payload.background, payload.composite, *(payload.layers or [])]:
                if item is not None and item.path:
                    _require_uploaded(item.path, component.label)
                    _check_header(item.path, max_pixels, component.label)
        return _readable(original, payload, component.label)

    component.preprocess = preprocess
    return component


def _what(label) -> str:
    return str(label or "image").split(":")[0]


def _check_header(path: str, max_pixels: int, label) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Exception:
        raise gr.Error(f"{_what(label)}: not a readable raster image", print_exception=False) from None
    if width * height > max_pixels:
        raise gr.Error(
            f"{_what(label)} is {width}x{height}, more than the limit of {max_pixels} pixels", print_exception=False
        )


def _readable(preprocess, payload, label):
    try:
        return preprocess(payload)
    except gr.Error:
        raise
    except Exception:  # PIL's errors for non-images, damaged files and decompression bombs
        raise gr.Error(
            f"{_what(label)}: not a readable raster image (or it is too large)", print_exception=False
        ) from None


def FieldSlider(*args, **kwargs) -> gr.Slider:  # noqa: N802 - reads like the widget it makes
    return schema_checked(gr.Slider(*args, **kwargs))


def FieldNumber(*args, **kwargs) -> gr.Number:  # noqa: N802
    return schema_checked(gr.Number(*args, **kwargs))


def _bounds(field) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        for attr in ("ge", "gt"):
            if getattr(item, attr, None) is not None:
                low = getattr(item, attr)
        for attr in ("le", "lt"):
            if getattr(item, attr, None) is not None:
                high = getattr(item, attr)
    return low, high


def _zero_means_none(field) -> bool:
    low, _ = _bounds(field)
    return low is not None and (low > 0 or any(getattr(item, "gt", None) == 0 for item in field.metadata))


def _label(name: str) -> str:
    return name.replace("_", " ")


def _split_optional(annotation):
    """(inner type, optional?) for `X | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def field_component(request_type: type[BaseRequest], name: str, **overrides) -> gr.components.Component:
    """A widget for one request field: its type, bounds, default and description come from the schema."""
    field = request_type.model_fields[name]
    default = None if field.is_required() else field.default
    task = request_type.model_fields["task"].default
    kwargs = {"label": _label(name), "info": field.description, "value": default, "elem_id": f"{task}-{name}"}
    kind, optional = _split_optional(field.annotation)
    low, high = _bounds(field)
    if typing.get_origin(kind) is typing.Literal:
        component = gr.Dropdown(choices=list(typing.get_args(kind)), **{**kwargs, **overrides})
    elif kind is bool:
        component = gr.Checkbox(**{**kwargs, **overrides})
    elif (
        kind in (int, float)
        and not optional
        and low is not None
        and high is not None
        and ((kind is int and high - low <= 512) or (kind is float and high - low <= 10 and not name.endswith("lr")))
    ):
        step = 1 if kind is int else 0.01
        component = FieldSlider(minimum=low, maximum=high, step=step, **{**kwargs, **overrides})
    elif kind in (int, float):
        if optional and _zero_means_none(field):
            kwargs["info"] = f"{field.description or ''} (0: not set)".strip()
        component = FieldNumber(precision=0 if kind is int else None, **{**kwargs, **overrides})
    else:
        component = gr.Textbox(lines=1, **{**kwargs, "value": default or ""} | overrides)
    return component


def _request_value(request_type: type[BaseRequest], name: str, value):
    """A widget's value as the request field wants it (empty text or number -> None where None is allowed)."""
    field = request_type.model_fields[name]
    _, optional = _split_optional(field.annotation)
    if value is None and not optional and not field.is_required():
        return field.default  # an API client left the parameter out
    if optional and value == 0 and _zero_means_none(field):
        return None  # a number box cannot be empty: 0 stands for "not set" where 0 is not allowed
    if isinstance(value, str) and optional and not value.strip():
        return None
    if isinstance(value, float) and field.annotation is int and value.is_integer():
        return int(value)
    return value


# ------------------------------------------------------------------------------------------------
# Input images: widget values -> checked PNG files inside the outputs folder
# ------------------------------------------------------------------------------------------------


def editor_background(value) -> Image.Image | None:
    """The image under an ImageEditor's layers: what was uploaded (None when nothing was)."""
    if not value:
        return None
    if isinstance(value, dict):
        return value.get("background")
    return value


def editor_composite(value) -> Image.Image | None:
    """What an ImageEditor shows: background and strokes together."""
    if not value:
        return None
    if isinstance(value, dict):
        return value.get("composite") or value.get("background")
    return value


def editor_mask(value) -> Image.Image | None:
    """The painted area of an ImageEditor's layers as a white-on-black mask (None when nothing is painted)."""
    if not isinstance(value, dict) or not value.get("layers"):
        return None
    mask = None
    for layer in value["layers"]:
        if layer is None:
            continue
        layer = layer.convert("RGBA")
        alpha = layer.getchannel("A")
        if alpha.getextrema() == (255, 255):  # an opaque layer (an API client's mask image): white = repaint
            painted = layer.convert("L").point(lambda v: 255 if v > 127 else 0)
        else:  # strokes painted in the browser: wherever there is paint
            painted = alpha.point(lambda a: 255 if a > 0 else 0)
        mask = painted if mask is None else ImageChops.lighter(mask, painted)
    if mask is None or mask.getbbox() is None:
        return None
    return mask.convert("L")


def _opaque(image: Image.Image) -> Image.Image:
    """RGBA whose alpha is fully opaque -> RGB (the editor exports every image as RGBA)."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    return image


# ------------------------------------------------------------------------------------------------
# The UI's services: the studio, the device lock, per-session cancel
# ------------------------------------------------------------------------------------------------


class SessionProgress(Progress):
    """A Progress whose cancel flag is the session's current job flag (one Cancel stops a whole batch)."""

    def __init__(self, on_update, cancel_flag: threading.Event):
        super().__init__(on_update)
        self._cancel = cancel_flag


class StudioUI:
    """Holds the Studio (swapped when settings change) and the state shared by all sessions."""

    def __init__(self, studio, settings: Settings):
        self.studio = studio
        self.settings = settings
        self.outputs = Path(settings.outputs_dir).resolve()
        self.device_lock = threading.Lock()  # one job at a time on the device (the queue also ensures it)
        self.jobs: dict[str, threading.Event] = {}  # session -> cancel flag of its running job
        self.preload_seconds: float | None = None
        self.preload_error: str | None = None
        self.last_prune = 0.0  # when stored inputs were last pruned (time.time())

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

    # -- running --------------------------------------------------------------------------------

    def output_target(self, task: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return str(self.outputs / f"{stamp}-{task}-{secrets.token_hex(3)}-{{index}}-{{seed}}.png")

    def stream(self, task: str, fields: dict, session: str, progress: gr.Progress):
        """Build the request, run it on the device, save the PNGs; returns (paths, result).

        A generator: while the job samples in a worker thread it yields live previews (PIL images,
        at most every PREVIEW_SECONDS) and reports steps to `progress`, both from this thread,
        the one gradio gave the event. Closing the generator (the browser went away) cancels the job.
        """
        request = self.studio.tasks.make_request(task, **fields)  # StudioInputError names the bad field and value
        cancel = threading.Event()
        self.jobs[session] = cancel
        events: queue.Queue = queue.Queue()
        outcome: dict = {}
        last_preview = [0.0]

        def on_update(stage, step, total, preview=None):
            events.put(("progress", (step, total), stage.replace("_", " ")))
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
                    events.put(("progress", 0, "starting (the first run loads the model)"))
                    result = self.studio.run(request, SessionProgress(on_update, cancel))
                outcome["value"] = result.save(self.output_target(task), overwrite=False), result
            except BaseException as error:  # re-raised in the event's thread below
                outcome["error"] = error
            finally:
                events.put(None)

        worker = threading.Thread(target=work, name=f"studio-{task}", daemon=True)
        worker.start()
        try:
            while (event := events.get()) is not None:
                kind, value, desc = event
                if kind == "preview":
                    yield value
                else:
                    progress(value, desc=desc, unit="steps")
        finally:
            if worker.is_alive():
                cancel.set()
            self.jobs.pop(session, None)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def cancel(self, session: str) -> bool:
        flag = self.jobs.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def preload(self) -> None:
        """Load the default model in the background so the first request does not wait for it."""
        started = time.perf_counter()
        try:
            with self.device_lock:
                quiet_libraries()
                loaded = self.studio.models.get(None)
            self.preload_seconds = time.perf_counter() - started
            log.info("model %s loaded on %s in %.1f s", loaded.ref.name, loaded.device, self.preload_seconds)
        except Exception as error:  # shown in the Models tab; the UI still works (other models)
            self.preload_error = str(error)
            log.warning("could not preload the model: %s", error)

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
            self.studio = Studio(settings)
            self.settings = settings


_quieted = False


def quiet_libraries() -> None:
    """Loading bars and deprecation chatter of diffusers/transformers are not for the server's console."""
    global _quieted
    if _quieted:
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _quieted = True


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "no-session"


def _friendly(error: Exception) -> gr.Error:
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


def with_signature(name: str, parameters: list[str], doc: str, body):
    """`body(values: dict, history, request, progress)` exposed to gradio as
    `name(param1=None, ..., history=None, request=None, progress=gr.Progress())`.

    Gradio names API parameters after the function's parameters, so clients call every task
    with the request schema's field names (`client.predict(prompt=..., seed=..., api_name=...)`);
    `history` is a gr.State, which the API neither shows nor asks for.
    """

    def function(*args):  # a generator, so gradio streams what body yields (live previews, then the result)
        *values, history, request, progress = args
        yield from body(dict(zip(parameters, values)), history, request, progress)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = [inspect.Parameter(p, kind, default=None) for p in [*parameters, "history"]]
    signature.append(inspect.Parameter("request", kind, default=None, annotation=gr.Request))
    signature.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    function.__signature__ = inspect.Signature(signature)
    function.__annotations__ = {"request": gr.Request}
    function.__name__ = function.__qualname__ = name
    function.__doc__ = doc
    return function


def _show_previews(stream):
    """Yield each preview image of a `StudioUI.stream` as a tab's outputs (only the gallery changes).

    Returns what the stream returns: (paths, result).
    """
    while True:
        try:
            image = next(stream)
        except StopIteration as done:
            return done.value
        yield [(image, "preview")], gr.skip(), gr.skip(), gr.skip(), gr.skip()


def _add_history(new: list, history) -> list:
    return (list(new) + list(history or []))[:HISTORY_LIMIT]


# ------------------------------------------------------------------------------------------------
# The tabs
# ------------------------------------------------------------------------------------------------


class TaskTab:
    """One generation tab: its widgets by request field, and how widget values become fields."""

    def __init__(self, spec):
        self.spec = spec  # the studio.tasks.Task this tab runs
        self.task = spec.name
        self.request_type = spec.request_type
        self.inputs: dict[str, gr.components.Component] = {}  # request field -> widget (the API's parameters)
        self.image_inputs: dict[str, str] = {}  # image field -> widget kind: "file", "editor" or "sketch"
        self.run_event = None
        self.cancel_button = None
        self.status = None

    def extra_fields(self) -> list[str]:
        return [
            name
            for name in self.request_type.model_fields
            if name not in BaseRequest.model_fields and name not in self.spec.image_fields and name != "task"
        ]

    def fields(self, values: dict, ui: StudioUI) -> dict:
        """Request fields from widget values (input images checked and stored as PNGs first)."""
        fields = {}
        for name, value in values.items():
            if name in self.image_inputs:
                continue
            if name == "scheduler" and value in (None, "", DEFAULT_SCHEDULER):
                value = None
            if name == "seed":
                value = None if value is None or value == -1 else int(value)
            if name in ("width", "height") and value == 0:
                value = None  # the model's own size
            fields[name] = _request_value(self.request_type, name, value)
        for name, kind in self.image_inputs.items():
            value = values.get(name)
            if kind == "editor":
                if "mask_image" in self.request_type.model_fields:
                    # The strokes painted on the editor's layer are the mask, unless one is uploaded.
                    if values.get("mask_image") is None:
                        fields["mask_image"] = ui.stage_image(editor_mask(value), "mask_image")
                value = editor_background(value)
            elif kind == "sketch":
                value = editor_composite(value)  # as drawn; the pipeline flattens it and reads its polarity
            staged = ui.stage_image(value, name)
            if staged is not None or name not in fields:
                fields[name] = staged
        missing = [name for name in self.spec.required_images if fields.get(name) is None]
        if missing:
            raise StudioInputError(f"add an image for {', '.join(missing)} first")
        return fields


def _common_controls(tab: TaskTab) -> None:
    fields = tab.request_type.model_fields
    with gr.Row(equal_height=False):
        tab.inputs["seed"] = FieldNumber(
            label="seed",
            value=-1,
            precision=0,
            info="-1: random (the seed used is shown)",
            scale=4,
            elem_id=f"{tab.task}-seed",
        )
        with gr.Column(scale=1, min_width=110):
            tab.random_seed = gr.Button("random", size="sm")
            tab.reuse_seed = gr.Button("reuse last", size="sm")
    with gr.Row():
        tab.inputs["width"] = FieldNumber(
            label="width", value=None, precision=0, info="0: the model's size", elem_id=f"{tab.task}-width"
        )
        tab.inputs["height"] = FieldNumber(
            label="height", value=None, precision=0, info="a multiple of 8", elem_id=f"{tab.task}-height"
        )
    with gr.Row():
        low, high = _bounds(fields["num_inference_steps"])
        tab.inputs["num_inference_steps"] = FieldSlider(
            low or 1,
            high or 500,
            value=fields["num_inference_steps"].default,
            step=1,
            label="num inference steps",
            elem_id=f"{tab.task}-num_inference_steps",
        )
        low, high = _bounds(fields["guidance_scale"])
        tab.inputs["guidance_scale"] = FieldSlider(
            low or 0,
            high or 50,
            value=fields["guidance_scale"].default,
            step=0.5,
            label="guidance scale",
            elem_id=f"{tab.task}-guidance_scale",
        )
    with gr.Row():
        tab.inputs["scheduler"] = gr.Dropdown(
            [DEFAULT_SCHEDULER, *SCHEDULER_NAMES],
            value=DEFAULT_SCHEDULER,
            label="scheduler",
            elem_id=f"{tab.task}-scheduler",
        )
        tab.inputs["batch_size"] = FieldSlider(
            1, MAX_BATCH_SIZE, value=1, step=1, label="batch size", elem_id=f"{tab.task}-batch_size"
        )


def _image_widgets(tab: TaskTab, max_pixels: int) -> None:
    """The task's input images: drawn on or painted on (its `image_widgets`), else uploaded files.
    Beside a painted image, the other images are optional uploads under an accordion (inpaint's mask)."""
    spec = tab.spec
    painted = [name for name in spec.image_fields if spec.image_widgets.get(name) in ("sketch", "editor")]
    files = [name for name in spec.image_fields if name not in painted]
    for name in painted:
        tab.image_inputs[name] = spec.image_widgets[name]
        tab.inputs[name] = checked_editor(_editor(tab, name), max_pixels)
    if not files:
        return
    labels = [spec.image_labels.get(name, _label(name)) for name in files]
    with gr.Accordion(f"…or upload the {', '.join(labels)}", open=False) if painted else gr.Row():
        for name, label in zip(files, labels):
            tab.image_inputs[name] = "file"
            tab.inputs[name] = uploaded_file(
                gr.Image(
                    label=label,
                    type="filepath",
                    image_mode=None,
                    sources=("upload", "clipboard"),
                    height=220 if painted else 300,
                    elem_id=f"{spec.name}-{name}",
                )
            )


def _editor(tab: TaskTab, name: str) -> gr.ImageEditor:
    """A sketch canvas (white, palette brushes) or an image to paint a mask on (one mask colour, eraser)."""
    sketch = tab.spec.image_widgets[name] == "sketch"
    options = dict(
        label=tab.spec.image_labels.get(name, _label(name)),
        type="pil",
        image_mode="RGBA",
        sources=("upload", "clipboard"),
        transforms=(),
        layers=False,
        height=560,
        elem_id=f"{tab.spec.name}-{name}",
    )
    if sketch:
        return gr.ImageEditor(
            value={"background": Image.new("RGB", (512, 512), "white"), "layers": [], "composite": None},
            brush=gr.Brush(colors=SKETCH_COLORS, default_color="#000000", default_size=8, color_mode="defaults"),
            canvas_size=(512, 512),
            **options,
        )
    return gr.ImageEditor(
        brush=gr.Brush(colors=[MASK_COLOR], default_color=MASK_COLOR, default_size=8, color_mode="fixed"),
        eraser=gr.Eraser(default_size=8),
        **options,
    )


def _build_task_tab(ui: StudioUI, tab: TaskTab, history: gr.State) -> None:
    task = tab.task
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            _image_widgets(tab, ui.settings.max_image_pixels)
            tab.inputs["prompt"] = gr.Textbox(
                label=tab.spec.prompt_label,
                placeholder=tab.spec.prompt_placeholder,
                lines=2,
                max_lines=6,
                elem_id=f"{task}-prompt",
            )
            tab.inputs["negative_prompt"] = gr.Textbox(
                label="negative prompt", lines=1, max_lines=4, elem_id=f"{task}-negative_prompt"
            )
            promoted = tab.spec.main_fields
            extras = tab.extra_fields()
            if any(name in promoted for name in extras):
                with gr.Row():
                    for name in extras:
                        if name in promoted:
                            tab.inputs[name] = field_component(tab.request_type, name)
            with gr.Row():
                run_button = gr.Button(
                    tab.spec.run_label, variant="primary", scale=3, elem_id=f"{task}-run"
                )
                tab.cancel_button = gr.Button("Cancel", variant="stop", scale=1, elem_id=f"{task}-cancel")
            with gr.Accordion("Settings", open=not tab.spec.image_fields, elem_id=f"{task}-settings"):
                _common_controls(tab)
            others = [name for name in extras if name not in promoted]
            if others:
                with gr.Accordion("Task options", open=False, elem_id=f"{task}-options"):
                    for name in others:
                        tab.inputs[name] = field_component(tab.request_type, name)
        with gr.Column(scale=4):
            gallery = gr.Gallery(
                label="result",
                columns=2,
                height=460,
                format="png",
                type="filepath",
                object_fit="contain",
                interactive=False,
                buttons=["download", "fullscreen"],
                elem_id=f"{task}-gallery",
            )
            seed_used = gr.Textbox(label="seed used", interactive=False, elem_id=f"{task}-seed-used")
            tab.status = gr.Markdown("", label="status", elem_classes="studio-status", elem_id=f"{task}-status")
    last_fields = gr.State(None)  # the last successful run's values (for the task's rerender_fields)
    parameters = list(tab.inputs)

    def body(values: dict, hist, request, progress):
        try:
            fields = tab.fields(values, ui)
            paths, result = yield from _show_previews(ui.stream(task, fields, _session(request), progress))
        except JobTimedOut as error:
            raise gr.Error(str(error), title="Stopped", print_exception=False) from None
        except GenerationCancelled:
            gr.Warning("Cancelled; nothing was finished, so nothing was saved.")
            yield [], gr.skip(), "Cancelled.", gr.skip(), gr.skip()  # no half-sampled preview left as a result
            return
        except gr.Error:
            raise
        except Exception as error:
            raise _friendly(error) from None
        captions = [f"seed {seed}" for seed in result.seeds]
        status = f"Saved {len(paths)} image{'s' if len(paths) > 1 else ''} in {result.seconds:.1f} s: " + ", ".join(
            f"`{Path(p).name}`" for p in paths
        )
        for warning in result.warnings:
            status += f"\n\n⚠️ {warning}"
            gr.Warning(warning)
        kept = {**values, "seed": result.seeds[0]}
        yield (
            [(str(path), caption) for path, caption in zip(paths, captions)],
            ", ".join(str(seed) for seed in result.seeds),
            status,
            _add_history([(str(p), f"{tab.spec.command} · {c}") for p, c in zip(paths, captions)], hist),
            kept,
        )

    doc = (
        f"{tab.spec.title}: {tab.spec.summary}; a `{task}` request from these fields, run on the device. "
        "Returns the PNGs (metadata intact), the seeds used and a status line."
    )
    outputs = [gallery, seed_used, tab.status, history, last_fields]
    tab.run_event = gr.on(
        [run_button.click, tab.inputs["prompt"].submit],
        with_signature(task, parameters, doc, body),
        inputs=[tab.inputs[name] for name in parameters] + [history],
        outputs=outputs,
        api_name=task,
        concurrency_id="device",
        concurrency_limit=1,
        show_progress_on=[gallery],
    )
    tab.random_seed.click(lambda: -1, None, tab.inputs["seed"], queue=False, api_visibility="private")
    tab.reuse_seed.click(
        lambda text: int(text.split(",")[0]) if text else -1,
        seed_used,
        tab.inputs["seed"],
        queue=False,
        api_visibility="private",
    )
    tab.extra_events = []
    for name in tab.spec.rerender_fields:
        # Moving the field re-renders the last run from its cached work (Imagic's fine-tune for η):
        # same image, text and seed; only this field changes.
        def rerender(last, value, hist, request: gr.Request, progress=gr.Progress(), name=name):
            if not last:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            yield from body({**last, name: value}, hist, request, progress)

        tab.extra_events.append(
            tab.inputs[name].release(
                rerender,
                [last_fields, tab.inputs[name], history],
                outputs,
                api_visibility="private",
                concurrency_id="device",
                concurrency_limit=1,
                show_progress_on=[gallery],
            )
        )


class BatchTab:
    run_event = None
    cancel_button = None
    status = None


def _build_batch_tab(ui: StudioUI, history: gr.State) -> BatchTab:
    tab = BatchTab()
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            gr.Markdown(
                "Upload a **jobs file**: JSONL, one request a line "
                '(`{"prompt": "a blue square", "seed": 3}`), or CSV with a header of request fields. '
                "Editing jobs name their images by file name: upload those images too. "
                "Bad lines are reported by number and the other jobs still run."
            )
            jobs = uploaded_files(gr.File(
                label="jobs (.jsonl or .csv)",
                file_types=[".jsonl", ".csv", ".json", ".txt"],
                type="filepath",
                height=150,
                elem_id="batch-jobs",
            ))
            images = uploaded_files(gr.File(
                label="images the jobs name (optional)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                height=150,
                elem_id="batch-images",
            ))
            with gr.Row():
                run_button = gr.Button("Run batch", variant="primary", scale=3, elem_id="batch-run")
                tab.cancel_button = gr.Button("Cancel", variant="stop", scale=1, elem_id="batch-cancel")
        with gr.Column(scale=4):
            gallery = gr.Gallery(
                label="results",
                columns=4,
                height=320,
                format="png",
                type="filepath",
                interactive=False,
                buttons=["download", "fullscreen"],
            )
            archive = gr.File(label="all results: PNGs and manifest.jsonl as a .zip", interactive=False, height=90)
            tab.status = gr.Markdown("", label="status", elem_classes="studio-status")
            log_box = gr.Textbox(label="log", lines=6, max_lines=16, interactive=False)

    def batch(jobs, images, history, request: gr.Request, progress=gr.Progress()):
        """Render a JSONL/CSV jobs file (and the images it names).

        Returns the PNGs, a .zip of them with manifest.jsonl, a status line and the per-line log."""
        return _run_batch(ui, jobs, images, history, request, progress)

    tab.run_event = run_button.click(
        batch,
        [jobs, images, history],
        [gallery, archive, tab.status, log_box, history],
        api_name="batch",
        concurrency_id="device",
        concurrency_limit=1,
    )
    return tab


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _run_batch(ui: StudioUI, jobs, images, history, request, progress):
    from studio.batch import read_jobs, run_batch

    if not jobs:
        raise gr.Error("Upload a jobs file (.jsonl or .csv) first.", title="Check the input", print_exception=False)
    work = Path(tempfile.mkdtemp(prefix="studio-batch-"))  # private: never served
    out_dir = ui.outputs / "batches" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    jobs_path = work / ("jobs.csv" if str(jobs).lower().endswith(".csv") else "jobs.jsonl")
    session = _session(request)
    cancel = threading.Event()
    lines: list[str] = []
    counter = {"job": 0, "failed": 0}
    cancelled = False
    try:
        shutil.copyfile(jobs, jobs_path)
        for image in images or []:
            # Uploaded names reduced to a plain file name inside the private folder.
            name = _SAFE_NAME.sub("_", Path(image).name).lstrip(".") or "image"
            shutil.copyfile(image, work / name)
        total = len(read_jobs(jobs_path, ui.settings.max_batch_lines))

        def progress_factory():
            if cancel.is_set():
                raise GenerationCancelled("cancelled by the user")
            counter["job"] += 1
            label = f"job {counter['job']}/{total}"
            progress((counter["job"] - 1, total), desc=label, unit="jobs")

            def on_update(stage, step, steps, preview=None):
                progress((step, steps), desc=f"{label} · {stage.replace('_', ' ')}", unit="steps")

            return SessionProgress(on_update, cancel)

        def on_job(job, status, detail):
            lines.append(f"line {job.line}: {status}: {detail}")
            counter["failed"] += status == "failed"

        ui.jobs[session] = cancel
        with ui.device_lock:
            # A line may name only the models this server lists, and images uploaded with the batch.
            run_batch(ui.studio, jobs_path, out_dir, progress_factory, on_job, allowed_models=ui.offered_models())
    except GenerationCancelled:
        cancelled = True
        lines.append("cancelled: the finished files are kept")
    except Exception as error:
        raise _friendly(error) from None
    finally:
        ui.jobs.pop(session, None)
        shutil.rmtree(work, ignore_errors=True)

    files = sorted(out_dir.rglob("*.png")) if out_dir.exists() else []
    archive = None
    if out_dir.exists():
        archive = out_dir.with_suffix(".zip")
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
            for path in sorted(out_dir.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    bundle.write(path, path.relative_to(out_dir).as_posix())
    status = f"{len(files)} image{'s' if len(files) != 1 else ''} in `{out_dir.name}`"
    failed = counter["failed"]
    if failed:
        status += f"; {failed} line{'s' if failed != 1 else ''} failed (see the log)"
    if cancelled:
        status = "Cancelled. " + status
    return (
        [(str(p), p.name) for p in files],
        str(archive) if archive else None,
        status,
        "\n".join(lines),
        _add_history([(str(p), f"batch · {p.stem}") for p in files], history),
    )


def _build_png_info_tab(ui: StudioUI, tabs: gr.Tabs, task_tabs: dict[str, TaskTab]) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            image = uploaded_file(
                gr.Image(
                    label="PNG",
                    type="filepath",
                    image_mode=None,
                    sources=("upload", "clipboard"),
                    height=380,
                    elem_id="png-info-image",
                )
            )
        with gr.Column(scale=5):
            parameters = gr.Textbox(label="parameters (A1111 format)", lines=4, interactive=False)
            record_view = gr.JSON(label="studio settings", open=True)
            send = gr.Button("Send to its tab", variant="primary", interactive=False, elem_id="png-info-send")
    record_state = gr.State(None)

    def png_info(image):
        """The settings a PNG carries: A1111's `parameters` text and the studio's record (request, seed, model)."""
        from studio.metadata import PARAMETERS_KEY, read_record, record_to_json

        if not image:
            return "", None, None
        try:
            record = read_record(Path(image))
            with Image.open(image) as opened:
                text = dict(getattr(opened, "text", {}) or {}).get(PARAMETERS_KEY, "")
        except StudioInputError as error:
            # The message names the server's temp path; the user knows which image they dropped.
            raise gr.Error(
                str(error).replace(repr(str(image)), "this image"), title="No settings found", print_exception=False
            ) from None
        except Exception:  # PIL on a non-image or a decompression bomb's header
            raise gr.Error("this is not a readable PNG", title="No settings found", print_exception=False) from None
        data = record_to_json(record)
        return text, data, data

    def send_label(data):
        if not data:
            return gr.Button("Send to its tab", interactive=False)
        task = ui.studio.tasks.get(data["request"]["task"])
        return gr.Button(f"Send to {task.title}", interactive=True)

    event = image.change(
        png_info,
        image,
        [parameters, record_view, record_state],
        api_name="png_info",
        concurrency_id="info",
        concurrency_limit=4,
    )
    event.then(send_label, record_state, send, api_visibility="private", queue=False)

    def send_to(data):
        if not data:
            return {}
        fields = dict(data["request"])
        task = fields.pop("task")
        tab = task_tabs.get(task)
        if tab is None:
            raise gr.Error(f"this studio has no tab for the task {task!r}")
        fields["seed"] = data.get("seed", fields.get("seed"))  # this image's own seed
        fields["batch_size"] = 1
        if fields.get("scheduler") is None:
            fields["scheduler"] = DEFAULT_SCHEDULER
        updates = {tabs: gr.Tabs(selected=task)}
        for name, widget in tab.inputs.items():
            if name in tab.image_inputs:
                path = ui.inside_outputs(fields.get(name))  # only inputs the studio stored itself
                if path is None:
                    continue
                if tab.image_inputs[name] in ("editor", "sketch"):
                    updates[widget] = {"background": str(path), "layers": [], "composite": str(path)}
                else:
                    updates[widget] = str(path)
            elif name in fields:
                updates[widget] = fields[name]
        return updates

    all_widgets = [tabs] + [widget for tab in task_tabs.values() for widget in tab.inputs.values()]
    send.click(send_to, record_state, all_widgets, api_visibility="private", queue=False)


def _build_models_tab(ui: StudioUI, demo: gr.Blocks, tab: gr.Tab) -> None:
    def choices():
        from studio.models import list_local_models

        found = [entry["reference"] for entry in list_local_models(ui.settings)]
        return found if ui.settings.model in found else [ui.settings.model, *found]

    settings = ui.settings
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            model = gr.Dropdown(
                [settings.model],
                value=settings.model,
                label="model",
                allow_custom_value=True,
                info="embedded, a diffusers folder, a cached hub id or a .safetensors file",
            )
            with gr.Row():
                device = gr.Dropdown(
                    ["auto", "cpu", "cuda", "mps"],
                    value=settings.device,
                    label="device",
                    allow_custom_value=True,
                    info="auto: cuda, then mps, then cpu; or cuda:1 …",
                )
                dtype = gr.Dropdown(["auto", "float32", "float16", "bfloat16"], value=settings.dtype, label="dtype")
            with gr.Row():
                attention = gr.Dropdown(["auto", "sdpa", "xformers"], value=settings.attention, label="attention")
                offload = gr.Dropdown(
                    ["none", "model", "sequential"],
                    value=settings.offload,
                    label="offload",
                    info="CPU offload (GPU only)",
                )
            with gr.Row():
                slicing = gr.Checkbox(
                    value=settings.attention_slicing, label="attention slicing", info="lower peak memory, slower"
                )
                tiling = gr.Checkbox(value=settings.vae_tiling, label="VAE tiling", info="decode large images in tiles")
            with gr.Row():
                apply = gr.Button("Apply", variant="primary")
                load = gr.Button("Load the model now")
                refresh = gr.Button("Refresh list")
        with gr.Column(scale=4):
            status = gr.Markdown(elem_classes="studio-status", elem_id="models-status")

    def describe():
        settings = ui.settings
        lines = [f"**Model:** `{settings.model}` · **device:** `{settings.device}` · **dtype:** `{settings.dtype}`"]
        loaded = ui.studio.models.loaded_models()
        for ref in loaded:
            lines.append(f"Loaded: `{ref.name}` ({ref.kind})")
        if not loaded:
            lines.append("No model loaded yet: it loads with the first request.")
        if ui.preload_error:
            lines.append(f"⚠️ {ui.preload_error}")
        lines.append(f"Outputs: `{ui.outputs}`")
        return "\n\n".join(lines)

    def apply_settings(model, device, dtype, attention, offload, slicing, tiling):
        try:
            from studio.devices import pick_device
            from studio.models import resolve_model_ref

            pick_device(device)  # clear errors now rather than at the next render
            resolve_model_ref(model or "embedded", ui.settings)
            ui.swap_settings(
                model=model or "embedded",
                device=device,
                dtype=dtype,
                attention=attention,
                offload=offload,
                attention_slicing=bool(slicing),
                vae_tiling=bool(tiling),
            )
            ui.preload_error = None
        except Exception as error:
            raise _friendly(error) from None
        return describe()

    def load_now(progress=gr.Progress()):
        progress(0, desc="loading the model")
        try:
            with ui.device_lock:
                ui.studio.models.get(None)
        except Exception as error:
            raise _friendly(error) from None
        return describe()

    def refresh_list():
        return gr.Dropdown(choices=choices()), describe()

    private = {"api_visibility": "private"}
    device_queue = {"concurrency_id": "device", "concurrency_limit": 1}
    apply.click(
        apply_settings, [model, device, dtype, attention, offload, slicing, tiling], status, **private, **device_queue
    )
    load.click(load_now, None, status, **private, **device_queue)
    refresh.click(refresh_list, None, [model, status], **private, queue=False)
    demo.load(refresh_list, None, [model, status], **private, queue=False)
    tab.select(refresh_list, None, [model, status], **private, queue=False)


def build_app(studio, settings: Settings, *, queue_size: int = server.DEFAULT_QUEUE_SIZE) -> gr.Blocks:
    """The whole UI as a gr.Blocks with its queue configured; serve it with `launch(demo, settings, ...)`.

    Nothing here loads a model or picks a device: `studio` does that on the first request.
    """
    ui = StudioUI(studio, settings)
    task_tabs: dict[str, TaskTab] = {}
    with gr.Blocks(title="Studio", analytics_enabled=False, delete_cache=UPLOAD_CACHE_SWEEP) as demo:
        history = gr.State([])  # this session's images, newest first: [(path, caption)]
        history_gallery = gr.Gallery(
            label="history",
            show_label=False,
            columns=6,
            height=220,
            format="png",
            type="filepath",
            object_fit="contain",
            fit_columns=False,
            interactive=False,
            buttons=["download", "fullscreen"],
            elem_id="history",
            render=False,
        )
        gr.Markdown(
            "# Studio\nText to image and image editing on this machine. Every PNG keeps its settings: "
            "drop one on **PNG info** to see or reuse them.",
            elem_id="studio-header",
        )
        with gr.Tabs() as tabs:
            for spec in studio.tasks:
                with gr.Tab(spec.title, id=spec.name):
                    task_tabs[spec.name] = TaskTab(spec)
                    _build_task_tab(ui, task_tabs[spec.name], history)
            with gr.Tab("Batch", id="batch"):
                batch_tab = _build_batch_tab(ui, history)
            with gr.Tab("PNG info", id="png_info"):
                _build_png_info_tab(ui, tabs, task_tabs)
            with gr.Tab("Models and settings", id="models") as models_tab:
                _build_models_tab(ui, demo, models_tab)
        with gr.Accordion("History: this session's images", open=True):
            history_gallery.render()

        run_tabs = [*task_tabs.values(), batch_tab]
        run_events = [tab.run_event for tab in run_tabs]
        run_events += [event for tab in task_tabs.values() for event in tab.extra_events]
        for event in run_events:
            event.then(lambda h: h, history, history_gallery, api_visibility="private", queue=False)

        def cancel(request: gr.Request) -> str:
            """Cancel this client's running job after its current step (finished images are kept)."""
            if ui.cancel(_session(request)):
                return "Cancelling after the current step…"
            return "Nothing is running in this session."

        # The API's cancel first, so that it is the one named /cancel.
        gr.Button(visible=False).click(cancel, None, gr.Textbox(visible=False), queue=False, api_name="cancel")
        for tab in run_tabs:
            # Stops this session's running job after its current step; the job then answers as usual
            # ("Cancelled.", or a batch's finished files). Not gradio's `cancels=`: that would detach the
            # page from the running job, so a batch's finished files would never be shown.
            tab.cancel_button.click(
                cancel,
                None,
                tab.status,
                queue=False,
                api_visibility="private",
                api_name=f"cancel_{getattr(tab, 'task', 'batch')}",
            )

    demo.studio_ui = ui  # for main() (preload) and tests
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


# ------------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------------


def launch(
    demo: gr.Blocks,
    settings: Settings,
    *,
    block: bool = True,
    auth=None,
    share: bool = False,
    max_upload=server.DEFAULT_MAX_UPLOAD,
    allowed_hosts=(),
    quiet: bool = False,
):
    """Serve the app as `main()` does (tests call this with block=False and a free port)."""
    options = server.launch_kwargs(
        settings, auth=auth, share=share, max_upload=max_upload, allowed_hosts=allowed_hosts, quiet=quiet
    )
    return demo.launch(prevent_thread_lock=not block, css=CSS, **options)


def main(argv: list[str] | None = None) -> int:
    args = server.build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("studio").setLevel(logging.INFO)  # model loading, preload time
    try:
        settings = server.settings_from_args(args)
        auth = server.parse_auth(args.auth or os.environ.get("STUDIO_AUTH"))
        server.check_exposure(settings.host, args.share, auth, args.insecure_no_auth)
        server.parse_size(args.max_upload)
    except StudioInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    server.environ_for_offline()  # before diffusers/transformers are imported: they read it then
    from studio.core import Studio  # torch

    imported = server.process_age()
    demo = build_app(Studio(settings), settings, queue_size=args.queue_size)
    allowed_hosts = [host.strip() for host in args.allowed_hosts.split(",") if host.strip()]
    _, local_url, _ = launch(
        demo,
        settings,
        block=False,
        auth=auth,
        share=args.share,
        max_upload=args.max_upload,
        allowed_hosts=allowed_hosts,
    )
    server.wait_until_ready(local_url)
    ready = server.process_age()
    print(
        f"ready at {local_url}: {ready:.1f} s after the process started "
        f"({imported:.1f} s to import gradio and torch, {ready - imported:.1f} s to build and serve)",
        flush=True,
    )
    if not args.no_preload:
        threading.Thread(target=demo.studio_ui.preload, name="preload", daemon=True).start()
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
