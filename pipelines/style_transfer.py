"""Style transfer: restyle an image, keeping its layout.

Three methods (request.method; "auto" is described below):

- prompt: image-to-image (SDEdit) with `strength`: the image is noised part of the way and denoised
  towards the prompt, so the layout stays and the look follows the text.
- reference: training-free, works with any SD/SDXL UNet and needs no extra weights. The same
  image-to-image run, but every self-attention layer of the generation also attends to the keys and
  values of the reference image, noised to the current timestep and run through the UNet in the same
  batch ("reference-only", as in the A1111 ControlNet extension), with the generation's queries and
  keys AdaIN-normalised to the reference's statistics (StyleAligned's shared attention, Hertz et al.
  2023). `style_strength` scales the attention paid to the reference (a log-bias on its keys) and the
  AdaIN blend; 0 turns the sharing off.
- ip_adapter: an IP-Adapter whose weights are on this machine: the folder named by `--ip-adapter`
  (`Settings.add_ons.ip_adapter`) holding the adapter .safetensors and its image_encoder/, or else the
  one the model ships in its own `ip_adapter/` folder (the embedded model does: trained by
  `studio.demo.train_ip_adapter` to carry a reference's fill). Nothing is ever downloaded.
  `style_guidance` off puts the style image in both halves of classifier-free guidance, so that
  guidance amplifies only the prompt (the embedded model's adapter needs that: amplified, the fill's
  contrast shifts the colours).

"auto" with a reference image takes the model's own IP-Adapter when it ships one, else "reference".

The cached model is never changed: the reference method installs its attention processors on the
shared UNet only for the duration of the call, from a copy of the processors map that is restored in a
`finally`, and runs through a derived pipeline whose UNet is a thin per-call wrapper.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from studio.requests import BaseRequest, ImageInput, StudioInputError, image_field
from studio.tasks import Task

from .toolbox import (
    check_min_side,
    check_strength_steps,
    check_task,
    effective_steps,
    flatten,
    working_size,
)

if TYPE_CHECKING:
    from .common import TaskContext


class StyleTransferRequest(BaseRequest):
    task: Literal["style_transfer"] = "style_transfer"
    image: ImageInput = image_field(..., "The image to restyle.")
    reference_image: ImageInput = image_field(None, "An image whose style to take.")
    method: Literal["auto", "prompt", "reference", "ip_adapter"] = Field(
        "auto",
        description="How style is applied. auto: with a style image, the model's own IP-Adapter where it ships "
        "one (the embedded model does), else reference (shared attention); without one, prompt. "
        "ip_adapter needs the model's own or --ip-adapter FOLDER.",
    )
    strength: float = Field(0.6, ge=0.0, le=1.0, description="How far from the input image to go.")
    style_strength: float = Field(1.0, ge=0.0, le=2.0, description="How strongly the reference style is applied.")
    style_guidance: bool = Field(
        True,
        description="ip_adapter: classifier-free guidance also strengthens the style image (as diffusers does); "
        "off: guidance follows the prompt only, and style_strength alone weighs the image.",
    )

REFERENCE_NOISE_SEED = 0x5EED  # the reference's noise: fixed, so image i of a batch is the single render of seed i


# --------------------------------------------------------------------------- checks


def resolve_method(request: StyleTransferRequest, settings) -> str:
    if request.method != "auto":
        return request.method
    if request.reference_image is None:
        return "prompt"
    return "ip_adapter" if shipped_ip_adapter(settings, request.model) is not None else "reference"


def check_inputs(request: StyleTransferRequest, context: TaskContext) -> tuple[str, dict | None]:
    """Checks the schema cannot express; runs before any model is loaded. Returns the plan `run` follows:
    the method ("auto" resolved) and, for ip_adapter, where its weights are."""
    check_task(request, "style_transfer")
    method = resolve_method(request, context.settings)
    check_min_side(context.images.get("image"), "image")
    if method in ("reference", "ip_adapter") and request.reference_image is None:
        raise StudioInputError(f"method {request.method!r} needs a reference_image (the image whose style to take)")
    if method == "prompt" and request.reference_image is not None:
        context.warnings.append("reference_image is ignored by method 'prompt'")
    if method != "prompt":
        check_min_side(context.images.get("reference_image"), "reference_image", 32)
    check_strength_steps(request)
    if method == "prompt" and not request.prompt.strip():
        context.warnings.append("the prompt is empty: method 'prompt' restyles towards nothing in particular")
    if method == "reference" and request.style_strength == 0:
        context.warnings.append("style_strength is 0: the reference image is not used")
    # ip_adapter without weights, or with files missing: a clear error, before loading
    return method, ip_adapter_config(context.settings, request.model) if method == "ip_adapter" else None


# --------------------------------------------------------------------------- IP-Adapter (local weights only)


SHIPPED_IP_ADAPTER = "ip_adapter"  # a model folder's own IP-Adapter: this sub-folder, holding one .safetensors
SHIPPED_IMAGE_ENCODER = "clip_image_encoder"  # its image encoder, when the sub-folder has no image_encoder/


def shipped_ip_adapter(settings, model: str | None) -> dict | None:
    """The IP-Adapter a model's own folder ships (`ip_adapter/`), found without loading; None without one."""
    from studio.models import config_folder, resolve_model_ref

    try:
        folder = config_folder(resolve_model_ref(model, settings))
    except StudioInputError:
        return None  # reported when the task loads the model
    adapter = folder / SHIPPED_IP_ADAPTER if folder is not None else None
    if adapter is None or not adapter.is_dir():
        return None
    weights = sorted(adapter.glob("*.safetensors"))
    encoder = adapter / "image_encoder"
    if not (encoder / "config.json").is_file():
        encoder = folder / SHIPPED_IMAGE_ENCODER
    if len(weights) != 1 or not (encoder / "config.json").is_file():
        return None
    return {"folder": str(adapter), "subfolder": "", "weight_name": weights[0].name, "image_encoder_folder": str(encoder)}


def ip_adapter_config(settings, model: str | None) -> dict:
    """Where the IP-Adapter's weights are: the user's folder (Settings.add_ons), else the model's own."""
    folder = settings.add_ons.ip_adapter
    if folder is None:
        shipped = shipped_ip_adapter(settings, model)
        if shipped is not None:
            return shipped
        raise StudioInputError(
            "method 'ip_adapter' needs IP-Adapter weights on this machine, and none are configured: start the "
            "studio with --ip-adapter FOLDER (or STUDIO_IP_ADAPTER), a local folder holding the adapter "
            ".safetensors and its image_encoder/ (the studio never downloads); or use method 'reference', "
            "which needs no extra weights"
        )
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StudioInputError(f"IP-Adapter folder {str(folder)!r} (--ip-adapter) does not exist")
    weight_name = settings.add_ons.ip_adapter_weights
    if weight_name is None:
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) != 1:
            raise StudioInputError(
                f"IP-Adapter folder {str(folder)!r} holds {len(candidates)} .safetensors files; "
                "name the one to use with Settings.add_ons.ip_adapter_weights"
            )
        weight_name = candidates[0].name
    if not (folder / weight_name).is_file():
        raise StudioInputError(f"IP-Adapter weights {str(folder / weight_name)!r} do not exist")
    encoder_path = folder / "image_encoder"
    if not (encoder_path / "config.json").is_file():
        raise StudioInputError(
            f"IP-Adapter image encoder {str(encoder_path)!r} is missing (a CLIPVisionModelWithProjection folder)"
        )
    return {"folder": str(folder), "subfolder": "", "weight_name": weight_name, "image_encoder_folder": str(encoder_path)}


class ip_adapter_loaded:
    """Context manager: the adapter loaded into a derived pipeline; the shared UNet put back exactly on exit."""

    def __init__(self, pipe, config: dict, scale: float):
        self.pipe, self.config, self.scale = pipe, config, scale

    def __enter__(self):
        from transformers import CLIPImageProcessor

        unet = self.pipe.unet
        self.saved = (dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.get("encoder_hid_dim_type"))
        preprocessor = Path(self.config["image_encoder_folder"]) / "preprocessor_config.json"
        if preprocessor.is_file():  # the encoder's own resize and normalisation (else diffusers' CLIP defaults)
            self.pipe.feature_extractor = CLIPImageProcessor.from_pretrained(preprocessor.parent)
        self.pipe.load_ip_adapter(
            self.config["folder"],
            subfolder=self.config["subfolder"],
            weight_name=self.config["weight_name"],
            image_encoder_folder=self.config["image_encoder_folder"],
            local_files_only=True,
        )
        self.pipe.set_ip_adapter_scale(self.scale)
        return self.pipe

    def __exit__(self, *exc):
        unet = self.pipe.unet
        processors, hid_proj, hid_type = self.saved
        try:
            self.pipe.unload_ip_adapter()
        finally:
            unet.encoder_hid_proj = hid_proj
            unet.register_to_config(encoder_hid_dim_type=hid_type)
            unet.set_attn_processor(dict(processors))
        return False


# --------------------------------------------------------------------------- the task


def run(request: StyleTransferRequest, context: TaskContext, seeds: list[int], plan=None) -> list:
    """Restyle the input image `len(seeds)` times; returns PIL images in seed order."""
    from .common import (
        check_standard_unet,
        decode_latents,
        for_sampling,
        fresh_scheduler,
        image_to_image_class,
        sampling_kwargs,
        to_pil,
        warn_if_truncated,
    )

    method, adapter = plan or check_inputs(request, context)

    # 1. load the model (cached) and derive its image-to-image pipeline with a fresh sampler
    loaded = context.models.get(request.model)
    check_standard_unet(loaded, "style_transfer")
    pipeline_class = image_to_image_class(loaded.pipe)
    scheduler = fresh_scheduler(loaded, request.scheduler, request.prediction_type)

    # 2. the input image (and reference) at the working size
    image = flatten(context.images["image"])
    width, height = working_size(loaded.pipe, request, image)
    image = image.resize((width, height), resample=3)  # bicubic
    warn_if_truncated(loaded.pipe, request.prompt, context)
    warn_if_truncated(loaded.pipe, request.negative_prompt, context, "negative_prompt")

    steps = effective_steps(request.num_inference_steps, request.strength)
    call = dict(
        prompt=request.prompt,
        image=image,
        strength=request.strength,
        callback_on_step_end=context.progress.diffusers_callback("sampling", steps),
        **sampling_kwargs(request, seeds),
    )
    context.progress.raise_if_cancelled()

    # 3. sample, by the chosen method
    if method == "reference" and request.style_strength > 0:
        output = _run_reference(request, context, loaded, pipeline_class, scheduler, call)
    elif method == "ip_adapter":
        if request.method == "auto":
            context.progress.note("style taken from the reference image by the model's own IP-Adapter")
        pipe = context.models.derive(loaded, pipeline_class, scheduler=scheduler)
        pipe = for_sampling(context, loaded, pipe, request)  # prompt syntax, LoRAs, step cache: this call only
        reference = flatten(context.images["reference_image"])
        with ip_adapter_loaded(pipe, adapter, request.style_strength):
            embeds = style_image_embeds(pipe, reference, request.guidance_scale > 1, request.style_guidance)
            output = pipe(ip_adapter_image_embeds=embeds, **call)
    else:
        pipe = context.models.derive(loaded, pipeline_class, scheduler=scheduler)
        pipe = for_sampling(context, loaded, pipe, request)
        output = pipe(**call)
    context.progress.raise_if_cancelled()

    # 4. decode with the shared VAE, refusing non-finite pixels
    return to_pil(decode_latents(loaded.pipe, output.images, context.progress))


def style_image_embeds(pipe, reference, guided: bool, style_guidance: bool) -> list:
    """The style image's embedding as the pipeline takes it precomputed ([unconditional, conditional] under
    guidance). Unguided style (style_guidance off): the image in both halves, so that guidance amplifies
    only what the prompt asks; with an empty prompt that is the image at style_strength, unamplified."""
    import torch
    from diffusers.models.embeddings import ImageProjection

    # IP-Adapter Plus and its kin read the encoder's hidden states, the plain adapter its pooled embedding
    hidden_states = not isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
    embeds, unconditional = pipe.encode_image(reference, pipe.unet.device, 1, hidden_states)
    if not guided:
        return [embeds[None]]
    return [torch.cat([(unconditional if style_guidance else embeds)[None], embeds[None]])]


def _run_reference(request, context, loaded, pipeline_class, scheduler, call):
    """Sample with the reference lending its keys/values to every self-attention layer (the shared UNet's
    processors are restored on exit)."""
    from PIL import ImageOps

    from .attention import reference_unet, shared_attention
    from .common import encode_image, for_sampling

    base = loaded.pipe
    width, height = call["image"].size
    reference = ImageOps.fit(flatten(context.images["reference_image"]), (width, height), method=3)
    wrapper = reference_unet(base, encode_image(base, reference), request.style_strength, REFERENCE_NOISE_SEED)
    pipe = context.models.derive(loaded, pipeline_class, unet=wrapper, scheduler=scheduler)
    pipe = for_sampling(context, loaded, pipe, request)  # into the base UNet the wrapper runs
    with shared_attention(base.unet, wrapper.state):
        return pipe(**call)


TASK = Task(
    name="style_transfer",
    request_type=StyleTransferRequest,
    prepare=check_inputs,
    run=run,
    title="Style",
    command="style",
    summary="restyle an image by a prompt or a reference image (--image)",
    prompt_label="prompt (the style, in words)",
    main_fields=("method", "strength", "style_strength"),
    image_labels={"image": "image: to restyle", "reference_image": "style image (optional)"},
)
