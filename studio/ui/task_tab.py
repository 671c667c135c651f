"""One generation tab per registered task: its widgets from the request schema, its API endpoint, its events."""

from __future__ import annotations

import inspect
from pathlib import Path

import gradio as gr
from PIL import Image

from studio.progress import GenerationCancelled, JobTimedOut
from studio.recommended import recommendations_for_reference
from studio.requests import (
    MAX_BATCH_SIZE,
    SCHEDULER_NAMES,
    BaseRequest,
    StudioInputError,
)
from studio.vae import VAE_REFUSED_TASKS

from .models_tab import upscaler_dropdown, vae_dropdown
from .runner import StudioUI, add_history, friendly, session_key
from .widgets import (
    NO_PROGRESS,
    FieldNumber,
    FieldSlider,
    checked_editor,
    editor_background,
    editor_composite,
    editor_mask,
    field_bounds,
    field_component,
    field_label,
    request_value,
    uploaded_file,
)

DEFAULT_SCHEDULER = "model default"
# Brush colours: the toy world's palette (the embedded model knows these) plus black, white and grey.
SKETCH_COLORS = ["#000000", "#ffffff", "#808080", "#dc1e1e", "#fa8700", "#f0dc00", "#1ea53c", "#285ae1", "#912dc8"]
MASK_COLOR = ("#ff00ff", 0.6)
# The user's own choices (what to draw, which noise): a model's recommended settings never set them.
UNRECOMMENDED = ("prompt", "negative_prompt", "seed", "training_seed")


class TaskTab:
    """One generation tab: its widgets by request field, and how widget values become fields."""

    def __init__(self, spec):
        self.spec = spec  # the studio.tasks.Task this tab runs
        self.task = spec.name
        self.request_type = spec.request_type
        self.inputs: dict[str, gr.components.Component] = {}  # request field -> widget (the API's parameters)
        self.image_inputs: dict[str, str] = {}  # image field -> widget kind: "file", "editor" or "sketch"
        self.defaults: dict = {}  # field -> the default model's recommended value (the widgets start there)
        self.run_event = None
        self.cancel_button = None
        self.status = None
        self.gallery = None
        self.selected = None  # gr.State: the index of the result picked in the gallery
        self.send_buttons: dict[str, gr.Button] = {}  # target task -> its "→ <title>" button

    def extra_fields(self) -> list[str]:
        return [
            name
            for name in self.request_type.model_fields
            if name not in BaseRequest.model_fields and name not in self.spec.image_fields and name != "task"
        ]

    def field_value(self, name: str, value):
        """One widget's value as its request field."""
        if name == "scheduler" and value in (None, "", DEFAULT_SCHEDULER):
            value = None
        if name == "seed":
            value = None if value is None or value == -1 else int(value)
        if name in ("width", "height") and value == 0:
            value = None  # the model's own size
        return request_value(self.request_type, name, value)

    def widget_value(self, name: str, value):
        """A request field's value as its widget shows it (the inverse of `field_value`)."""
        if name == "scheduler" and value is None:
            return DEFAULT_SCHEDULER
        return value

    def recommendable(self) -> list[str]:
        """The widgets a model's recommendations set: every setting but the texts, the seed and the images."""
        return [name for name in self.inputs if name not in self.image_inputs and name not in UNRECOMMENDED]

    def shown(self, recommended: dict) -> dict:
        """field -> the widget value a model with these recommendations starts at (else the schema's default)."""
        fields = self.request_type.model_fields
        return {
            name: self.widget_value(name, recommended.get(name, fields[name].default)) for name in self.recommendable()
        }

    def follow_model(self, old: dict, new: dict, values: list) -> list:
        """Widget updates after the model changed from one with recommendations `old` to one with `new`:
        a widget still at the old model's value takes the new one's; a value the user set stays (gr.skip())."""
        before, after = self.shown(old), self.shown(new)
        updates = []
        for name, value in zip(self.recommendable(), values):
            unchanged = self.field_value(name, value) == self.field_value(name, before[name])
            updates.append(after[name] if unchanged and after[name] != before[name] else gr.skip())
        return updates

    def fields(self, values: dict, ui: StudioUI) -> dict:
        """Request fields from widget values (input images checked and stored as PNGs first)."""
        fields = {name: self.field_value(name, value) for name, value in values.items() if name not in self.image_inputs}
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


def build_task_tab(ui: StudioUI, tab: TaskTab, history: gr.State) -> None:
    """The tab's widgets and events; its run event is the API endpoint `/<task>`."""
    task = tab.task
    # The widgets start at the default model's recommendations (its studio.json or family preset).
    tab.defaults = recommendations_for_reference(ui.settings.model).for_task(task)
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
                            tab.inputs[name] = _task_field(tab, name)
            with gr.Row():
                run_button = gr.Button(
                    tab.spec.run_label, variant="primary", scale=3, elem_id=f"{task}-run"
                )
                tab.cancel_button = gr.Button("Cancel", variant="stop", scale=1, elem_id=f"{task}-cancel")
            estimate = None
            if ui.stage_planner(task) is not None:  # Imagic: how long its training will take, before it starts
                estimate = gr.Markdown(
                    lambda: _estimate_text(ui, tab, list(tab.shown(tab.defaults).values())),
                    elem_id=f"{task}-estimate",
                    elem_classes="studio-status",
                )
            with gr.Accordion("Settings", open=not tab.spec.image_fields, elem_id=f"{task}-settings"):
                _common_controls(tab)
                if task not in VAE_REFUSED_TASKS:
                    tab.inputs["vae"] = vae_dropdown(ui, task)
            others = [name for name in extras if name not in promoted]
            if others:
                # text_to_image's options are all the hires fix's (hr_*): say so in the title
                title = "Hires fix" if all(name.startswith("hr_") for name in others) else "Task options"
                with gr.Accordion(title, open=False, elem_id=f"{task}-options"):
                    for name in others:
                        if name == "hr_upscaler":  # the built-in upscalers and the models folders' ones
                            tab.inputs[name] = upscaler_dropdown(ui, task, tab.request_type.model_fields[name])
                        else:
                            tab.inputs[name] = _task_field(tab, name)
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
                elem_classes="studio-images",
            )
            tab.gallery = gallery
            tab.selected = gr.State(None)
            targets = send_targets(ui.tasks)
            with gr.Row(elem_classes="studio-send-to"):
                for target, _field in targets["image"]:
                    tab.send_buttons[target.name] = gr.Button(
                        f"→ {target.title}", size="sm", min_width=60, elem_id=f"{task}-send-{target.name}"
                    )
                for target in targets["settings"]:
                    tab.send_buttons[target.name] = gr.Button(
                        f"settings → {target.title}", size="sm", min_width=60, elem_id=f"{task}-send-{target.name}"
                    )
            seed_used = gr.Textbox(label="seed used", interactive=False, elem_id=f"{task}-seed-used")
            tab.status = gr.Markdown("", label="status", elem_classes="studio-status", elem_id=f"{task}-status")
    last_fields = gr.State(None)  # the last successful run's values (for the task's rerender_fields)
    parameters = list(tab.inputs)

    def body(values: dict, hist, request, progress):
        try:
            fields = tab.fields(values, ui)
            paths, result = yield from _show_previews(ui.stream(task, fields, session_key(request), progress))
        except JobTimedOut as error:
            raise gr.Error(str(error), title="Stopped", print_exception=False) from None
        except GenerationCancelled:
            gr.Warning("Cancelled; nothing was finished, so nothing was saved.")
            yield [], gr.skip(), "Cancelled.", gr.skip(), gr.skip(), None  # no half-sampled preview left as a result
            return
        except gr.Error:
            raise
        except Exception as error:
            raise friendly(error) from None
        captions = [f"seed {seed}" for seed in result.seeds]
        status = f"Saved {len(paths)} image{'s' if len(paths) > 1 else ''} in {result.seconds:.1f} s: " + ", ".join(
            f"`{Path(p).name}`" for p in paths
        )
        for warning in result.warnings:
            status += f"\n\n⚠️ {warning}"
            gr.Warning(warning)
        for note in result.notes:
            status += f"\n\nℹ️ {note}"
        kept = {**values, "seed": result.seeds[0]}
        yield (
            [(str(path), caption) for path, caption in zip(paths, captions)],
            ", ".join(str(seed) for seed in result.seeds),
            status,
            add_history([(str(p), f"{tab.spec.command} · {c}") for p, c in zip(paths, captions)], hist),
            kept,
            None,
        )

    doc = (
        f"{tab.spec.title}: {tab.spec.summary}; a `{task}` request from these fields, run on the device. "
        "Returns the PNGs (metadata intact), the seeds used and a status line."
    )
    outputs = [gallery, seed_used, tab.status, history, last_fields, tab.selected]  # a new result: none picked
    images = list(tab.image_inputs)

    def check(*values):
        """At the click, before waiting for the device: refuse a missing image, in one message."""
        required = tab.spec.required_images
        missing = [
            name
            for name, value in zip(images, values)
            if name in required and not _has_image(value, tab.image_inputs[name])
        ]
        if missing:
            labels = "; ".join(tab.spec.image_labels.get(name, field_label(name)) for name in missing)
            sketches = all(tab.image_inputs[name] == "sketch" for name in missing)
            what = "draw or upload a sketch" if sketches else "add an image"
            raise gr.Error(f"{tab.spec.title}: {what} first ({labels})", print_exception=False)

    # The browser's run: a stale status ("Cancelled.") cleared in the page, then queued for the device. A tab
    # that needs an image checks it first (at once, never waiting for the device, a toast on this tab); that
    # costs a round trip, so a tab without required images goes straight to the queue. API clients call
    # `/<task>` directly (its own checks answer them).
    triggers = [run_button.click, tab.inputs["prompt"].submit]
    run = dict(
        fn=with_signature(task, parameters, doc, body),
        inputs=[tab.inputs[name] for name in parameters] + [history],
        outputs=outputs,
        api_name=task,
        concurrency_id="device",
        concurrency_limit=1,
        show_progress_on=[tab.status],  # never over the gallery: it keeps the last preview until the next
    )
    if tab.spec.required_images:
        checked = gr.on(  # its refusal leaves the status line as it is
            triggers,
            check,
            [tab.inputs[name] for name in images],
            None,
            api_visibility="private",
            show_progress="hidden",
            concurrency_limit=None,  # never waits for the device, nor for another check
        )
        checked.success(None, None, tab.status, js="() => ''", api_visibility="private")
        tab.run_event = checked.success(**run)
    else:
        gr.on(triggers, None, None, tab.status, js="() => ''", api_visibility="private")
        tab.run_event = gr.on(triggers, **run)
    gallery.select(_selected_index, None, tab.selected, queue=False, api_visibility="private", **NO_PROGRESS)
    tab.random_seed.click(lambda: -1, None, tab.inputs["seed"], queue=False, api_visibility="private", **NO_PROGRESS)
    tab.reuse_seed.click(
        lambda text: int(text.split(",")[0]) if text else -1,
        seed_used,
        tab.inputs["seed"],
        queue=False,
        api_visibility="private",
        **NO_PROGRESS,
    )
    tab.extra_events = []
    if estimate is not None:
        # Said again when a step count changes, and after each run (its measured speed is the next estimate's).
        costly = [tab.inputs[name] for name in tab.recommendable()]
        update_estimate = {
            "fn": lambda *values: _estimate_text(ui, tab, list(values)),
            "inputs": costly,
            "outputs": estimate,
            "queue": False,
            "api_visibility": "private",
            **NO_PROGRESS,
        }
        gr.on([widget.change for widget in costly], **update_estimate)
        tab.run_event.then(**update_estimate)
    for name in tab.spec.rerender_fields:
        # Moving the field re-renders the last run from its cached work (Imagic's fine-tune for η):
        # same image, text and seed; only this field changes.
        def rerender(last, value, hist, request: gr.Request, progress=gr.Progress(), name=name):
            if not last:
                yield (gr.skip(),) * 6
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
                show_progress_on=[tab.status],
            )
        )


def _estimate_text(ui: StudioUI, tab: TaskTab, values: list) -> str:
    """The tab's time estimate from the widgets' values and this machine's measured speed."""
    from studio.progress import duration_text

    fields = {name: tab.field_value(name, value) for name, value in zip(tab.recommendable(), values)}
    request = tab.request_type.model_construct(**{k: v for k, v in fields.items() if v is not None})
    try:
        seconds, reused = ui.estimate(request), ui.estimate(request, reused=True)
    except (TypeError, ValueError):  # a box being typed in (empty, not a number yet)
        return ""
    again = "Run again with the same image, prompt and training settings (any seed): the fine-tune is reused"
    if seconds is None:
        return f"Time: the estimate comes with the first run (measured on this machine). {again}."
    return f"Time: about {duration_text(seconds)} on this machine, at the last run's speed. {again} (~{duration_text(reused)})."


def _task_field(tab: TaskTab, name: str):
    if name in tab.defaults:
        return field_component(tab.request_type, name, value=tab.defaults[name])
    return field_component(tab.request_type, name)


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
            label="width",
            value=tab.defaults.get("width"),
            precision=0,
            info="0: the model's size",
            elem_id=f"{tab.task}-width",
        )
        tab.inputs["height"] = FieldNumber(
            label="height", value=tab.defaults.get("height"), precision=0, info="a multiple of 8",
            elem_id=f"{tab.task}-height",
        )
    with gr.Row():
        low, high = field_bounds(fields["num_inference_steps"])
        tab.inputs["num_inference_steps"] = FieldSlider(
            low or 1,
            high or 500,
            value=tab.defaults.get("num_inference_steps", fields["num_inference_steps"].default),
            step=1,
            label="num inference steps",
            elem_id=f"{tab.task}-num_inference_steps",
        )
        low, high = field_bounds(fields["guidance_scale"])
        tab.inputs["guidance_scale"] = FieldSlider(
            low or 0,
            high or 50,
            value=tab.defaults.get("guidance_scale", fields["guidance_scale"].default),
            step=0.5,
            label="guidance scale",
            elem_id=f"{tab.task}-guidance_scale",
        )
    with gr.Row():
        tab.inputs["scheduler"] = gr.Dropdown(
            [DEFAULT_SCHEDULER, *SCHEDULER_NAMES],
            value=tab.widget_value("scheduler", tab.defaults.get("scheduler")),
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
    labels = [spec.image_labels.get(name, field_label(name)) for name in files]
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
                    elem_classes="studio-image",
                )
            )


def _editor(tab: TaskTab, name: str) -> gr.ImageEditor:
    """A sketch canvas (white, palette brushes) or an image to paint a mask on (one mask colour, eraser)."""
    sketch = tab.spec.image_widgets[name] == "sketch"
    options = dict(
        label=tab.spec.image_labels.get(name, field_label(name)),
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
        yield [(image, "preview")], gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()


# -- "send to": a result of one tab becomes another tab's input image or settings --------------------


def send_targets(registry) -> dict[str, list]:
    """Where a result can go, from the registry: {"image": [(task, its first image field)], "settings":
    [tasks without image inputs]} (the tasks a rendered PNG's settings can be rendered again with)."""
    image, settings = [], []
    for spec in registry:
        if spec.image_fields:
            image.append((spec, (spec.required_images or spec.image_fields)[0]))
        else:
            settings.append(spec)
    return {"image": image, "settings": settings}


def _has_image(value, kind: str) -> bool:
    if kind == "editor":
        return editor_background(value) is not None
    if kind == "sketch":
        # A blank canvas is no sketch. (It is also what the editor still holds when Run is clicked while an
        # upload is on its way: refused, the click is simply made again once the sketch shows.)
        sketch = editor_composite(value)
        return sketch is not None and any(low != high for low, high in sketch.convert("RGB").getextrema())
    return bool(value)


def _selected_index(evt: gr.SelectData):
    return evt.index


def _picked_result(gallery, selected) -> str:
    """The path of the gallery's selected (else first) finished result; previews are not results."""
    items = list(gallery or [])
    index = selected if isinstance(selected, int) and 0 <= selected < len(items) else 0
    if not items:
        raise gr.Error("render an image first", title="Nothing to send", print_exception=False)
    item = items[index]
    path, caption = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
    if caption == "preview" or not path:
        raise gr.Error("the render has not finished yet", title="Nothing to send", print_exception=False)
    return str(path)


def wire_send_to(ui: StudioUI, tabs: gr.Tabs, task_tabs: dict[str, TaskTab]) -> None:
    """Each tab's "→ <task>" buttons: the picked result PNG becomes the target's image (stored in
    outputs/inputs/ like an upload), or its settings fill the target's fields; the target tab opens."""
    targets = send_targets(ui.tasks)
    image_targets = {spec.name: field for spec, field in targets["image"]}
    for source in task_tabs.values():
        for name, button in source.send_buttons.items():
            target = task_tabs.get(name)
            if target is None:
                continue
            if name in image_targets:
                field = image_targets[name]
                widget = target.inputs[field]

                kind = target.image_inputs[field]

                def send_image(gallery, selected, name=name, field=field, kind=kind, widget=widget):
                    try:
                        staged = ui.stage_image(_picked_result(gallery, selected), field)
                    except StudioInputError as error:
                        raise friendly(error) from None
                    value = {"background": staged, "layers": [], "composite": staged} if kind != "file" else staged
                    return {tabs: gr.Tabs(selected=name), widget: value}

                button.click(
                    send_image,
                    [source.gallery, source.selected],
                    [tabs, widget],
                    queue=False,
                    api_visibility="private",
                    **NO_PROGRESS,  # not on the tabs
                )
            else:
                widgets = {n: w for n, w in target.inputs.items() if n not in target.image_inputs}

                def send_settings(gallery, selected, name=name, widgets=widgets):
                    from studio.metadata import read_record, record_to_json

                    try:
                        data = record_to_json(read_record(Path(_picked_result(gallery, selected))))
                    except StudioInputError as error:
                        raise friendly(error) from None
                    fields = dict(data["request"])
                    fields["seed"] = data.get("seed", fields.get("seed"))
                    fields["batch_size"] = 1
                    if "vae" in widgets:  # the picker shows a VAE by name ("": the model's own)
                        fields["vae"] = (fields.get("vae") or {}).get("name_or_path", "")
                    if isinstance(fields.get("hr_upscaler"), dict):  # shown by its name
                        fields["hr_upscaler"] = fields["hr_upscaler"]["name"]
                    if fields.get("scheduler") is None:
                        fields["scheduler"] = DEFAULT_SCHEDULER
                    updates = {tabs: gr.Tabs(selected=name)}
                    for field, widget in widgets.items():
                        if field in fields and fields[field] is not None:
                            updates[widget] = fields[field]
                    return updates

                button.click(
                    send_settings,
                    [source.gallery, source.selected],
                    [tabs, *widgets.values()],
                    queue=False,
                    api_visibility="private",
                    **NO_PROGRESS,
                )
