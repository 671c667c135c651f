"""Evaluating what the stages train: the pipeline assembled from the work dir, ShapesEval, CLIP scores and speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .architecture import IMAGE_SIZE, export_scheduler
from .data import Data, images_to_tensor, tokenize
from .loop import Work


def shapes_eval_scores(images, scenes) -> dict | None:
    """ShapesEval's scores of `images` drawn for `scenes`, rounded; None where ShapesEval cannot be imported."""
    try:
        from studio.demo import shapes_eval as se
    except ImportError:
        return None
    res = se.evaluate(images, scenes)
    return {k: round(float(v), 3) for k, v in res.items()}


def pipeline_text_encoder(work: Work) -> Path:
    """The text encoder the UNet is conditioned on: the one fine-tuned with it, else the contrastive one."""
    tuned = work.component("text_encoder_tuned")
    return tuned if tuned.exists() else work.component("text_encoder")


def build_pipeline(work: Work, unet, tokenizer, zero_terminal_snr: bool, controlnet=None, text=None):
    """The pipeline the export will be, from the given UNet (and ControlNet) and the work dir's VAE and text encoder."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(str(work.component("vae"))).eval()
    if text is None:
        text = CLIPTextModel.from_pretrained(str(pipeline_text_encoder(work))).eval()
    common = {
        "vae": vae,
        "text_encoder": text,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": export_scheduler(zero_terminal_snr),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if controlnet is not None:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
    else:
        pipe = StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, scenes, seed: int, guidance: float, steps: int = 20, batch: int = 25, sketches=None):
    """One image per scene caption (and sketch), image i seeded with seed + i."""
    import torch

    images = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        kwargs = {}
        if sketches is not None:
            kwargs["image"] = sketches[i : i + batch]
        with torch.no_grad():
            out = pipe(
                [s.caption for s in chunk],
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                **kwargs,
            )
        images += out.images
    return images


def evaluate_model(pipe, data: Data, n: int, seed: int, guidance: float, controlled: bool = False) -> dict:
    """ShapesEval of the pipeline on the first n held-out scenes (with their sketches when `controlled`)."""
    scenes = data.eval_scenes(max(n, 1))[:n]
    sketches = [data.world.render_sketch(s, IMAGE_SIZE).convert("RGB") for s in scenes] if controlled else None
    t0 = time.monotonic()
    images = generate(pipe, scenes, seed, guidance, sketches=sketches)
    res = shapes_eval_scores(images, scenes) or {}
    res["n"] = n
    res["gen_s"] = round(time.monotonic() - t0, 1)
    return res


def clip_scores(model_dir: str | Path, images, prompts: list[str]) -> list[float]:
    """Cosine similarity (x100, as in CLIPScore) of each image with its prompt, using the embedded CLIP."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model_dir = Path(model_dir)
    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    contrastive = model_dir / "clip_image_encoder" / "text_encoder"
    text = CLIPTextModel.from_pretrained(str(contrastive if contrastive.is_dir() else model_dir / "text_encoder")).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(str(model_dir / "clip_image_encoder")).eval()
    proj = load_file(str(model_dir / "clip_image_encoder" / "text_projection.safetensors"))["text_projection.weight"]
    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for im in images])
    with torch.no_grad():
        img = vision(pixel_values=images_to_tensor(arr)).image_embeds
        pooled = text(input_ids=tokenize(tok, list(prompts))).pooler_output
        txt = pooled @ proj.t()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    return [float(100 * max(0.0, s)) for s in (img * txt).sum(-1)]


def measure_speed(model_dir: Path, steps: int = 20, repeats: int = 5) -> dict:
    """Seconds per 64x64 image at `steps` steps (CFG on) through StableDiffusionPipeline."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle"
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": round(times[len(times) // 2], 3), "min_s": round(times[0], 3), "threads": torch.get_num_threads()}
