"""The Models and settings tab: the model, device and memory options, applied through a fresh Studio; and what
the models folders hold (checkpoints, LoRAs, embeddings, VAEs), as `studio models` lists it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gradio as gr

from studio.requests import StudioInputError, quote
from studio.settings import ADD_ON_FOLDERS

from .runner import StudioUI, friendly
from .widgets import NO_PROGRESS

CONTENT_COLUMNS = ("type", "name", "architecture", "size", "hash", "reference")
AUTOMATIC_VAE = "Automatic"  # A1111's name for "the model's own VAE"


def vae_choices(settings) -> list[tuple[str, str]]:
    """(label, value) for the VAE dropdown: "Automatic" (the model's own: an empty value, the request's None)
    and each VAE the models folders hold, by the name a request takes (names only: a server takes no paths)."""
    from studio.add_on_files import looks_like_path
    from studio.models import list_local_models

    names = [
        entry["reference"]
        for entry in list_local_models(settings, add_ons=True)
        if entry["type"] == "vae" and not looks_like_path(entry["reference"])
    ]
    return [(AUTOMATIC_VAE, ""), *((name, name) for name in dict.fromkeys(names))]


def upscaler_choices(settings) -> list[str]:
    """The hires fix's upscalers: lanczos, nearest, latent, and the upscaler models in the models folders."""
    from studio.upscalers import BUILTIN_UPSCALERS, folder_upscalers

    return [*BUILTIN_UPSCALERS, *folder_upscalers(settings)]


def listed_on_open(ui: StudioUI, dropdown: gr.Dropdown, choices) -> gr.Dropdown:
    """`dropdown` lists `choices(settings)` each time it is opened. It starts with its built-in choices only: the
    page is served before torch loads (which telling files apart needs), and the folders may change meanwhile.
    A typed or API value that is not listed is the request's to check (names in the models folders only)."""

    def listed():
        return gr.Dropdown(choices=choices(ui.settings))

    dropdown.focus(listed, None, dropdown, queue=False, api_visibility="private", **NO_PROGRESS)
    return dropdown


def vae_dropdown(ui: StudioUI, task: str) -> gr.Dropdown:
    """A task tab's VAE picker (A1111's "SD VAE"): Automatic (the model's own) or a VAE of the models folders."""
    dropdown = gr.Dropdown(
        [(AUTOMATIC_VAE, "")],
        value="",
        label="VAE",
        info="Automatic: the model's own; or one from the models folders' VAE/ (--models-dir)",
        allow_custom_value=True,
        elem_id=f"{task}-vae",
    )
    return listed_on_open(ui, dropdown, vae_choices)


def upscaler_dropdown(ui: StudioUI, task: str, field) -> gr.Dropdown:
    """The hires fix's upscaler picker: lanczos, nearest, latent, or an upscaler model (ESRGAN/, RealESRGAN/)."""
    from studio.upscalers import BUILTIN_UPSCALERS

    dropdown = gr.Dropdown(
        list(BUILTIN_UPSCALERS),
        value=field.default.name,
        label="hr upscaler",
        info=field.description,
        allow_custom_value=True,
        elem_id=f"{task}-hr_upscaler",
    )
    return listed_on_open(ui, dropdown, upscaler_choices)


def models_folder_rows(settings) -> list[list[str]]:
    """One row per checkpoint, LoRA, embedding, VAE and upscaler the models folders hold; hashes only where
    already known (a listing never reads gigabytes: `studio models` or a first use hashes a file)."""
    from studio.models import list_local_models, size_text

    return [
        [entry["type"], entry["name"], entry["architecture"] or "-", size_text(entry["size"]), entry["hash"] or "-",
         entry["reference"]]
        for entry in list_local_models(settings, add_ons=True, hashes="cached")
    ]


def build_models_tab(ui: StudioUI, tab: gr.Tab):
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
                info="the models this server offers (the embedded one, and those in --models-dir)",
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
            with gr.Accordion("Add-on weights (local folders; nothing is downloaded)", open=False):
                add_on_boxes = [
                    gr.Textbox(
                        value=str(getattr(settings.add_ons, name) or ""),
                        label=label,
                        info=f"{flag} / {variable}",
                        elem_id=f"models-{name}",
                    )
                    for name, (variable, flag, label) in ADD_ON_FOLDERS.items()
                ]
            with gr.Row():
                apply = gr.Button("Apply", variant="primary")
                load = gr.Button("Load the model now")
                refresh = gr.Button("Refresh list")
        with gr.Column(scale=4):
            status = gr.Markdown(elem_classes="studio-status", elem_id="models-status")
    contents = gr.Dataframe(
        headers=list(CONTENT_COLUMNS),
        value=[],
        interactive=False,
        wrap=True,
        label="In the models folders (--models-dir): checkpoints, LoRAs (<lora:NAME:WEIGHT> in a prompt), "
        "embeddings (their NAME in a prompt), VAEs and the hires fix's upscalers",
        elem_id="models-contents",
    )

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

    def add_ons(folders):
        """The add-on folders as typed; a folder that does not exist is refused, naming it."""
        given = {}
        for (name, (_, _, label)), text in zip(ADD_ON_FOLDERS.items(), folders):
            folder = Path(text.strip()).expanduser() if text and text.strip() else None
            if folder is not None and not folder.is_dir():
                raise StudioInputError(f"{label} {str(folder)!r} is not a folder on this machine")
            given[name] = folder
        return replace(ui.settings.add_ons, **given)

    def apply_settings(model, device, dtype, attention, offload, slicing, tiling, *folders):
        try:
            from studio.devices import pick_device
            from studio.models import resolve_model_ref

            pick_device(device)  # clear errors now rather than at the next render
            if (model or "embedded") not in ui.offered_models():
                # Only what the list offers: any client can call this, and a path would change everyone's model
                # (and the answer would tell whether that path exists).
                raise StudioInputError(f"model {quote(model)} is not one this server offers; pick one from the list")
            resolve_model_ref(model or "embedded", ui.settings)
            ui.swap_settings(
                model=model or "embedded",
                device=device,
                dtype=dtype,
                attention=attention,
                offload=offload,
                attention_slicing=bool(slicing),
                vae_tiling=bool(tiling),
                add_ons=add_ons(folders),
            )
            ui.preload_error = None
        except Exception as error:
            raise friendly(error) from None
        return describe()

    def load_now(progress=gr.Progress()):
        progress(0, desc="loading the model")
        try:
            with ui.device_lock:
                ui.studio.models.get(None)
        except Exception as error:
            raise friendly(error) from None
        return describe()

    def refresh_list():
        return gr.Dropdown(choices=choices()), describe(), models_folder_rows(ui.settings)

    private = {"api_visibility": "private"}
    device_queue = {"concurrency_id": "device", "concurrency_limit": 1}
    applied = apply.click(
        apply_settings,
        [model, device, dtype, attention, offload, slicing, tiling, *add_on_boxes],
        status,
        **private,
        **device_queue,
    )
    load.click(load_now, None, status, **private, **device_queue)
    listed = [model, status, contents]
    refresh.click(refresh_list, None, listed, **private, queue=False)
    tab.select(refresh_list, None, listed, **private, queue=False, **NO_PROGRESS)  # when shown, not at page load
    return applied  # the task tabs follow the new model's recommendations after it (app.py)
