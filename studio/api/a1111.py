"""AUTOMATIC1111's /sdapi/v1 API over the studio: the routes, their bodies, and the mapping onto studio requests.

Field names and defaults follow A1111's `modules/api/models.py` (StableDiffusionProcessingTxt2Img /
Img2Img plus the API's `sampler_index`, `send_images`, `save_images`, `alwayson_scripts`). What the
studio does not have (hires fix, face restoration, tiling, scripts, subseeds, ...) is accepted and
listed in `info`'s "warnings"; unknown fields likewise. Bad values are HTTP 422 naming the field.

Two deliberate differences: `width`/`height` left out mean the model's native size (512 for SD 1.x,
as A1111; the embedded model's own size otherwise), and a request naming no sampler keeps the
model's own scheduler (A1111 would use Euler).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field

from studio.metadata import PARAMETERS_KEY, a1111_parameters
from studio.requests import MAX_SEED, StudioInputError
from studio.schedulers import SCHEDULERS

from .common import (
    decode_base64,
    decode_image,
    encode_png,
    run_job,
)

log = logging.getLogger(__name__)

MAX_N_ITER = 100

# -- request bodies ----------------------------------------------------------------------------------


class Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI); unknown fields are kept and reported."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    image: str = ""


# Fields accepted for compatibility but not honoured; each is reported in `info` when set (non-default).
NOT_HONOURED = {
    "styles": "prompt styles do not exist in the studio",
    "subseed": "variation seeds are not supported",
    "subseed_strength": "variation seeds are not supported",
    "seed_resize_from_h": "seed resize is not supported",
    "seed_resize_from_w": "seed resize is not supported",
    "restore_faces": "face restoration is not available",
    "tiling": "tiling is not available",
    "eta": "eta is not supported",
    "s_min_uncond": "sampler parameters are not supported",
    "s_churn": "sampler parameters are not supported",
    "s_tmax": "sampler parameters are not supported",
    "s_tmin": "sampler parameters are not supported",
    "s_noise": "sampler parameters are not supported",
    "refiner_checkpoint": "refiners are not supported",
    "firstphase_width": "the hires fix starts at width x height",
    "firstphase_height": "the hires fix starts at width x height",
    "hr_resize_x": "the hires fix takes hr_scale",
    "hr_resize_y": "the hires fix takes hr_scale",
    "hr_checkpoint_name": "the hires fix uses the request's model",
    "hr_sampler_name": "the hires fix uses the request's sampler",
    "hr_scheduler": "the hires fix uses the request's sampler",
    "hr_prompt": "the hires fix uses the request's prompt",
    "hr_negative_prompt": "the hires fix uses the request's negative prompt",
    "script_name": "scripts are not supported",
    "script_args": "scripts are not supported",
    "alwayson_scripts": "scripts (ControlNet, ADetailer, ...) are not supported",
    "save_images": "images are not saved by the API (send_images returns them)",
    "inpainting_fill": "the studio fills masked areas its own way",
    "image_cfg_scale": "image CFG is not supported",
    "initial_noise_multiplier": "not supported",
    "latent_mask": "not supported",
    "include_init_images": "init images are not returned",
}
# Fields whose default A1111 value means "off"; others count as set when the client sent them.
_OFF = (None, False, 0, 0.0, -1, "", [], {})

# Studio request fields -> the A1111 field a client sent them as (for 422 messages).
STUDIO_TO_A1111 = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "hr_denoising_strength": "denoising_strength",
    "hr_steps": "hr_second_pass_steps",
    "scheduler": "sampler_name",
    "model": "override_settings.sd_model_checkpoint",
    "image": "init_images",
    "mask_image": "mask",
    "only_masked": "inpaint_full_res",
    "only_masked_padding": "inpaint_full_res_padding",
}


def rename_fields(message: str) -> str:
    """A StudioInputError message with the studio's field names replaced by the A1111 names sent."""
    return re.sub(
        r"(^|; )(\w+)(?=[:. ])",
        lambda m: m.group(1) + STUDIO_TO_A1111.get(m.group(2), m.group(2)),
        message,
    )


# -- samplers ----------------------------------------------------------------------------------------

# A1111 aliases (modules/sd_samplers_kdiffusion.py) besides the names it shows.
_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_lms": "lms",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2_a",
    "k_dpmpp_2m": "dpm++_2m",
    "k_dpmpp_sde": "dpm++_sde",
    "k_dpmpp_2m_sde": "dpm++_2m_sde",
    "plms": "pndm",
}
SCHEDULER_TYPES = ("Automatic", "Uniform", "Karras")


def sampler_to_studio(name: str | None, scheduler: str | None, field: str) -> str | None:
    """An A1111 sampler (+ scheduler type, A1111 1.9+) as a studio scheduler name; None: the model's own."""
    if name is None or not str(name).strip():
        return None
    key = str(name).strip().lower()
    if scheduler and str(scheduler).strip().lower() == "karras" and not key.endswith(" karras"):
        key += " karras"
    by_a1111 = {choice.a1111_name.lower(): studio for studio, choice in SCHEDULERS.items()}
    found = by_a1111.get(key) or _ALIASES.get(key) or (key if key in SCHEDULERS else None)
    if found is None and key.endswith(" karras"):
        found = by_a1111.get(key.removesuffix(" karras"))
    if found is None:
        names = ", ".join(choice.a1111_name for choice in SCHEDULERS.values())
        raise StudioInputError(f"{field}: unknown sampler {name!r}; choose one of: {names}")
    return found


def samplers_list() -> list[dict]:
    aliases: dict[str, list[str]] = {}
    for alias, studio in _ALIASES.items():
        aliases.setdefault(studio, []).append(alias)
    return [
        {"name": choice.a1111_name, "aliases": [studio, *aliases.get(studio, [])], "options": {}}
        for studio, choice in SCHEDULERS.items()
    ]


# -- models ------------------------------------------------------------------------------------------


def model_name(reference: str) -> str:
    if reference == "embedded" or "/" not in reference and "\\" not in reference:
        return reference
    path = Path(reference)
    return path.stem if path.suffix else path.name if path.is_absolute() or path.exists() else reference


def listed_models(ui) -> dict[str, str]:
    """name -> reference, for every model the server lists (the Models tab's choices)."""
    return {model_name(ref): ref for ref in sorted(ui.offered_models())}


def resolve_model(ui, value, field: str) -> str:
    """A listed model's reference from a name, title ("name [hash]") or reference; anything else is refused."""
    if not isinstance(value, str) or not value.strip():
        raise StudioInputError(f"{field}: must be the name of a model this server lists (GET /sdapi/v1/sd-models)")
    models = listed_models(ui)
    text = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", value.strip())
    if text in models:
        return models[text]
    if text in models.values():
        return text
    shown = value if len(value) <= 80 else value[:80] + "…"
    raise StudioInputError(
        f"{field}: {shown!r} is not a model this server lists; choose one of: {', '.join(models)}"
    )


# -- building studio requests ------------------------------------------------------------------------


def _warnings_for(body: Txt2ImgBody) -> list[str]:
    warnings = [f"unknown field {name!r} ignored" for name in sorted(body.model_extra or {})]
    for name in sorted(body.model_fields_set):
        if name in NOT_HONOURED and getattr(body, name) not in _OFF:
            warnings.append(f"{name} ignored: {NOT_HONOURED[name]}")
    return warnings


def _overrides(ui, body: Txt2ImgBody, warnings: list[str]) -> dict:
    """The fields an override_settings sets (model, vae); other settings are checked or reported."""
    fields = {"model": None}
    for key, value in (body.override_settings or {}).items():
        if key == "sd_model_checkpoint":
            ref = resolve_model(ui, value, "override_settings.sd_model_checkpoint")
            fields["model"] = None if ref == ui.settings.model else ref
        elif key == "sd_vae":
            if value not in (None, "", "Automatic", "None"):
                fields["vae"] = value  # a name in the models folders' VAE/ (the request refuses others)
        elif key == "CLIP_stop_at_last_layers":
            if value not in (None, 1):
                warnings.append(f"override_settings.CLIP_stop_at_last_layers {value!r} ignored: clip skip is not supported")
        else:
            warnings.append(f"override_settings.{key} ignored")
    return fields


def common_fields(ui, body: Txt2ImgBody, warnings: list[str]) -> tuple[dict, int]:
    """The studio fields every iteration shares, and the first seed."""
    if not 1 <= body.n_iter <= MAX_N_ITER:
        raise StudioInputError(f"n_iter: must be between 1 and {MAX_N_ITER}, got {body.n_iter!r}")
    sampler = body.sampler_name if body.sampler_name else None
    field = "sampler_name"
    if sampler is None and "sampler_index" in body.model_fields_set:
        sampler, field = body.sampler_index, "sampler_index"
    scheduler_type = body.scheduler if body.scheduler in SCHEDULER_TYPES else None
    if body.scheduler and body.scheduler not in SCHEDULER_TYPES:
        warnings.append(f"scheduler {body.scheduler!r} ignored: the studio knows {', '.join(SCHEDULER_TYPES)}")
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "scheduler": sampler_to_studio(sampler, scheduler_type, field),
        "batch_size": body.batch_size,
        **_overrides(ui, body, warnings),
    }
    for name in ("width", "height"):
        if name in body.model_fields_set:
            fields[name] = getattr(body, name)
    if body.seed == -1:
        first_seed = secrets.randbelow(2**32)
    else:
        first_seed = body.seed
    return fields, first_seed


def hires_fields(body: Txt2ImgBody, warnings: list[str], settings=None) -> dict:
    """The studio's hires fix fields from A1111's `enable_hr`, `hr_scale`, `hr_second_pass_steps`,
    `denoising_strength` (0.7 when unset, as A1111's UI) and `hr_upscaler` (A1111's default: latent; an upscaler
    model of the models folders by its name, or A1111's "R-ESRGAN 4x+" for RealESRGAN_x4plus)."""
    if not body.enable_hr:
        return {}
    from studio.upscalers import A1111_NAMES, folder_upscalers

    upscaler = (body.hr_upscaler or "Latent").strip()
    models = folder_upscalers(settings) if settings is not None else {}
    if upscaler.lower().startswith("latent"):
        name = "latent"
    elif upscaler.lower() in ("lanczos", "nearest"):
        name = upscaler.lower()
    elif A1111_NAMES.get(upscaler.lower(), upscaler) in models:
        name = A1111_NAMES.get(upscaler.lower(), upscaler)
    else:
        name = "lanczos"
        warnings.append(f"hr_upscaler {upscaler!r} is not in the models folders (ESRGAN/, RealESRGAN/): Lanczos was used")
    return {
        "hr_scale": body.hr_scale,
        "hr_steps": body.hr_second_pass_steps,
        "hr_denoising_strength": 0.7 if body.denoising_strength is None else body.denoising_strength,
        "hr_upscaler": name,
    }


def iterations(ui, task: str, fields: dict, first_seed: int, n_iter: int) -> list:
    """One studio request per iteration: seeds continue across iterations (seed, seed+1, ... as A1111)."""
    requests = []
    for index in range(n_iter):
        seed = first_seed + index * fields["batch_size"]
        if 0 <= first_seed and seed > MAX_SEED:
            seed %= MAX_SEED + 1
        try:
            requests.append(ui.tasks.make_request(task, **fields, seed=seed))
        except StudioInputError as error:
            raise StudioInputError(rename_fields(str(error))) from None
    return requests


def a1111_mask(image):
    """A1111's binary mask: an RGBA mask's alpha where it is not opaque, else its grey levels."""
    if image.mode == "RGBA" and image.getchannel("A").getextrema() != (255, 255):
        return image.getchannel("A").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


def img2img_task(ui, body: Img2ImgBody, fields: dict, warnings: list[str]) -> str:
    """Put the images into `fields`; returns the studio task: style_transfer (prompt), or inpaint with a mask."""
    if not body.init_images:
        raise StudioInputError("init_images: at least one base64 image is required")
    if len(body.init_images) > 1:
        warnings.append(f"init_images: {len(body.init_images) - 1} image(s) after the first ignored")
    max_pixels = ui.settings.max_image_pixels
    image = decode_image(body.init_images[0], "init_images[0]", max_pixels)
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        image = image.convert("RGB")
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if body.resize_mode not in (0, 1, 2, 3):
        raise StudioInputError(f"resize_mode: must be 0, 1, 2 or 3, got {body.resize_mode!r}")
    size = (fields.get("width"), fields.get("height"))
    if body.mask:
        mask = a1111_mask(decode_image(body.mask, "mask", max_pixels))
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if body.resize_mode != 0:
            warnings.append("resize_mode: only 0 (just resize) applies when inpainting")
        fields.update(
            image=image.convert("RGB"),
            mask_image=mask.convert("RGB"),
            strength=strength,
            mask_blur=body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y),
        )
        if "inpaint_full_res" in body.model_fields_set:
            fields["only_masked"] = bool(body.inpaint_full_res)
        if "inpaint_full_res_padding" in body.model_fields_set:
            fields["only_masked_padding"] = body.inpaint_full_res_padding
        return "inpaint"
    if body.resize_mode == 1 and all(size):
        image = ImageOps.fit(image, size, method=3)  # crop and resize
    elif body.resize_mode == 2 and all(size):
        image = ImageOps.pad(image.convert("RGB"), size, method=3, color=image.convert("RGB").getpixel((0, 0)))
        warnings.append("resize_mode 2 (resize and fill): the border is filled with a flat colour")
    elif body.resize_mode == 3:
        warnings.append("resize_mode 3 (latent upscale) is done as 0 (just resize)")
    fields.update(image=image, strength=strength, method="prompt")
    return "style_transfer"


# -- answers -----------------------------------------------------------------------------------------


def render(gate, task: str, requests: list, body: Txt2ImgBody, warnings: list[str]) -> dict:
    """Run the iterations on the device (the shared gate) and answer as A1111 does."""
    started = time.perf_counter()
    with gate.job(job_count=len(requests), name=task) as job:
        results = gate.run_iterations(job, requests)
        interrupted, skipped = job.interrupted, job.skipped
    images, infotexts, seeds = [], [], []
    for result in results:
        warnings.extend(w for w in result.warnings if w not in warnings)
        for index, image in enumerate(result.images):
            record = result.records[index]
            infotexts.append(a1111_parameters(record, image.width, image.height))
            seeds.append(record.seed)
            if body.send_images:
                images.append(encode_png(result.png(index)))
    first = results[0] if results else None
    record = first.records[0] if first else None
    width, height = first.images[0].size if first else (body.width, body.height)
    prompts = [r.request.prompt for r in results for _ in r.images]
    info = {
        "prompt": body.prompt,
        "all_prompts": prompts,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(prompts),
        "seed": seeds[0] if seeds else requests[0].seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": record.sampler if record else None,
        "cfg_scale": body.cfg_scale,
        "steps": body.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": record.model_name if record else None,
        "sd_model_hash": record.model_hash if record else None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": getattr(first.request, "strength", body.denoising_strength) if first else None,
        "extra_generation_params": {"Task": task} if task != "text_to_image" else {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job.timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"studio {record.environment.get('studio', '')}" if record else "studio",
        "interrupted": interrupted,
        "skipped": skipped,
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 3),
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def parse_infotext(text: str) -> dict:
    """A1111's parameters text as a dict: Prompt, Negative prompt, then each `Key: value` of the last line."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or re.search(r"\bSteps: \d", lines[-1]) else ""
    if last:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key.strip()] = value
    return result


# -- the routes --------------------------------------------------------------------------------------


def build_a1111_app(ui, gate, dependencies=()) -> FastAPI:
    """The /sdapi/v1 routes, as an app to mount at /sdapi/v1 (its docs at /sdapi/v1/docs)."""
    app = FastAPI(
        title="Studio: AUTOMATIC1111-compatible API",
        description="AUTOMATIC1111's /sdapi/v1 routes over the studio. Unknown and unsupported fields are "
        "accepted and listed in `info`'s warnings.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        dependencies=list(dependencies),
    )

    def guarded(work):
        """Run `work` (sync, maybe long) in a thread; studio errors become JSON answers."""

        return run_job(work, rename_fields)

    @app.post("/txt2img", summary="text to image (A1111)")
    async def txt2img(body: Txt2ImgBody):
        def work():
            warnings = _warnings_for(body)
            fields, first_seed = common_fields(ui, body, warnings)
            fields.update(hires_fields(body, warnings, ui.settings))  # txt2img's denoising_strength is the hires fix's
            requests = iterations(ui, "text_to_image", fields, first_seed, body.n_iter)
            return render(gate, "text_to_image", requests, body, warnings)

        return await guarded(work)

    @app.post("/img2img", summary="image to image, or inpainting with a mask (A1111)")
    async def img2img(body: Img2ImgBody):
        def work():
            warnings = _warnings_for(body)
            fields, first_seed = common_fields(ui, body, warnings)
            task = img2img_task(ui, body, fields, warnings)
            requests = iterations(ui, task, fields, first_seed, body.n_iter)
            return render(gate, task, requests, body, warnings)

        return await guarded(work)

    @app.post("/png-info", summary="the generation parameters a PNG carries")
    async def png_info(body: PngInfoBody):
        def work():
            from studio.images import check_image_header

            data = decode_base64(body.image, "image")
            image = check_image_header(data, max_pixels=ui.settings.max_image_pixels, name="image")
            try:
                items = {key: value for key, value in image.info.items() if isinstance(value, str)}
            finally:
                image.close()
            text = items.pop(PARAMETERS_KEY, "")
            return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

        return await guarded(work)

    @app.get("/progress", summary="the running API job: progress, ETA, live preview")
    async def progress(skip_current_image: bool = False):
        job = gate.current
        idle = {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
            "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
        }
        if job is None:
            busy = gate.busy_with_other_work()
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": {**idle, "job": "busy (a web UI job)" if busy else ""},
                "current_image": None,
                "textinfo": "The device is busy with a web UI job" if busy else None,
            }
        fraction = job.fraction()
        elapsed = time.monotonic() - job.started
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        current = None
        if not skip_current_image:
            job.want_preview = True
            preview = job.preview
            if preview is not None:
                current = await run_in_threadpool(encode_png, preview)
        state = {
            **idle,
            "skipped": job.skipped,
            "interrupted": job.interrupted,
            "job": job.name,
            "job_count": job.job_count,
            "job_timestamp": job.timestamp,
            "job_no": job.job_no,
            "sampling_step": job.step,
            "sampling_steps": job.total,
        }
        text = f"{job.stage.replace('_', ' ')} {job.step}/{job.total}" if job.total else job.stage
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": current, "textinfo": text}

    @app.post("/interrupt", summary="stop the running API job after its current step")
    async def interrupt():
        return {"interrupted": gate.interrupt()}

    @app.post("/skip", summary="skip the current iteration (n_iter) of the running API job")
    async def skip():
        return {"skipped": gate.skip()}

    def current_title() -> str:
        models = listed_models(ui)
        default = ui.settings.model
        return next((name for name, ref in models.items() if ref == default), model_name(default))

    @app.get("/sd-models", summary="the models this server lists")
    async def sd_models():
        def known_sha256(reference: str) -> str | None:
            """A checkpoint file's hash once the studio has computed it (loading it does), as A1111 shows it."""
            from studio.models import cached_sha256

            path = Path(reference)
            try:
                return cached_sha256(path, ui.settings.hash_cache) if path.is_file() else None
            except OSError:
                return None

        def work():
            listed = []
            for name, reference in listed_models(ui).items():
                sha256 = known_sha256(reference)
                listed.append({"title": name, "model_name": name, "hash": sha256 and sha256[:10], "sha256": sha256,
                               "filename": name, "config": None})
            return listed

        return await run_in_threadpool(work)

    @app.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        return None

    @app.get("/options", summary="the settings A1111 clients read")
    async def get_options():
        title = await run_in_threadpool(current_title)
        return {
            "sd_model_checkpoint": title,
            "sd_checkpoint_hash": None,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "outdir_samples": "",
        }

    @app.post("/options", summary="switch the default model (sd_model_checkpoint); other settings are ignored")
    async def set_options(options: dict[str, Any]):
        def work():
            ignored = [key for key in options if key not in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers")]
            if "sd_model_checkpoint" in options:
                ref = resolve_model(ui, options["sd_model_checkpoint"], "sd_model_checkpoint")
                if ref != ui.settings.model:
                    ui.swap_settings(model=ref)  # waits for the device: the running job finishes first
            if ignored:
                log.info("options ignored: %s", ", ".join(ignored))

        return await guarded(work)

    @app.get("/cmd-flags")
    async def cmd_flags():
        return {"api": True}

    @app.get("/samplers")
    async def samplers():
        return samplers_list()

    @app.get("/schedulers")
    async def schedulers():
        return [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        ]

    @app.get("/upscalers", summary="the hires fix's upscalers: Lanczos, Nearest and the models folders' ESRGAN models")
    async def upscalers():
        entries = await run_in_threadpool(add_ons, "upscaler")
        found = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                 for name in ("Lanczos", "Nearest")]
        for entry in entries:  # by the name hr_upscaler takes; the scale from the file's shapes (pickles: 4)
            scale = entry["architecture"].removeprefix("esrgan-x")
            found.append({"name": entry["reference"], "model_name": "ESRGAN", "model_path": None, "model_url": None,
                          "scale": int(scale) if scale.isdigit() else 4})
        return found

    @app.get("/latent-upscale-modes")
    async def latent_upscale_modes():
        return []

    def add_ons(kind: str) -> list[dict]:
        """The models folders' LoRAs, embeddings, VAEs or upscalers, by the names requests take."""
        from studio.models import list_local_models

        return [entry for entry in list_local_models(ui.settings, add_ons=True) if entry["type"] == kind]

    @app.get("/sd-vae", summary="the VAEs in the models folders (override_settings.sd_vae takes these names)")
    async def sd_vae():
        entries = await run_in_threadpool(add_ons, "vae")
        return [{"model_name": entry["reference"], "filename": entry["name"]} for entry in entries]

    @app.get("/loras", summary="the LoRAs in the models folders (<lora:NAME:WEIGHT> in the prompt)")
    async def loras():
        entries = await run_in_threadpool(add_ons, "lora")
        return [{"name": entry["reference"], "alias": entry["reference"], "path": entry["name"], "metadata": {}}
                for entry in entries]

    @app.get("/embeddings", summary="the textual-inversion embeddings in the models folders (their word in a prompt)")
    async def embeddings():
        entries = await run_in_threadpool(add_ons, "embedding")
        loaded = {entry["reference"]: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                       "shape": None, "vectors": None} for entry in entries}
        return {"loaded": loaded, "skipped": {}}

    @app.get("/hypernetworks")
    async def hypernetworks():
        return []

    @app.get("/face-restorers")
    async def face_restorers():
        return []

    @app.get("/prompt-styles")
    async def prompt_styles():
        return []

    @app.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/memory")
    async def memory():
        return {}

    return app
