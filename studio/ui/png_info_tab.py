"""The PNG info tab: the settings a PNG carries, and "Send to its tab" to render them again."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from studio.requests import StudioInputError

from .runner import StudioUI
from .task_tab import DEFAULT_SCHEDULER, TaskTab
from .widgets import NO_PROGRESS, uploaded_file


def build_png_info_tab(ui: StudioUI, tabs: gr.Tabs, task_tabs: dict[str, TaskTab]) -> None:
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
                    elem_classes="studio-image",
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
        task = ui.tasks.get(data["request"]["task"])
        return gr.Button(f"Send to {task.title}", interactive=True)

    event = image.change(
        png_info,
        image,
        [parameters, record_view, record_state],
        api_name="png_info",
        concurrency_id="info",
        concurrency_limit=4,
    )
    event.then(send_label, record_state, send, api_visibility="private", queue=False, **NO_PROGRESS)

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
    send.click(send_to, record_state, all_widgets, api_visibility="private", queue=False, **NO_PROGRESS)
