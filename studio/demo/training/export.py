"""From trained components to the exported diffusers folder (atomically), and from an export back to a work dir."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .architecture import IMAGE_SIZE, export_scheduler
from .folders import replace_dir, temp_folder
from .loop import Work, log


def save_text_encoder(text, folder: Path) -> None:
    """save_pretrained, with the weights under "text_model." as in every released SD checkpoint.

    transformers 5 saves CLIPTextModel without that prefix; older transformers and the
    single-file converters expect it, and transformers 5 loads both spellings.
    """
    from safetensors.torch import load_file, save_file

    tmp = temp_folder(folder)
    text.save_pretrained(tmp, safe_serialization=True)
    weights = tmp / "model.safetensors"
    state = load_file(str(weights))
    state = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous() for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    replace_dir(tmp, folder)


def export_clip(model, work: Work) -> None:
    """text_encoder (CLIPTextModel) and clip_image_encoder (CLIPVisionModelWithProjection + text projection)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text = CLIPTextModel(model.config.text_config)
    inner = getattr(text, "text_model", text)  # transformers 5 flattened CLIPTextModel
    inner.load_state_dict(model.text_model.state_dict())
    save_text_encoder(text, work.component("text_encoder"))

    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    folder = work.component("clip_image_encoder")
    tmp = temp_folder(folder)
    vision.save_pretrained(tmp, safe_serialization=True)
    save_file(
        {
            "text_projection.weight": model.text_projection.weight.detach().contiguous(),
            "logit_scale": model.logit_scale.detach().reshape(1).contiguous(),
        },
        str(tmp / "text_projection.safetensors"),
    )
    # Standard CLIP preprocessing for 64x64 inputs scaled to [-1, 1].
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resample": 3,
    }
    (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    replace_dir(tmp, folder)


def export(work: Work, out: Path, zero_terminal_snr: bool) -> bool:
    """Assemble <work>/components into a StableDiffusionPipeline folder at `out`, atomically."""
    comps = {name: work.component(name) for name in ("tokenizer", "text_encoder", "vae", "unet", "controlnet", "clip_image_encoder")}
    if not all(comps[name].exists() for name in ("tokenizer", "text_encoder", "vae", "unet")):
        log("export skipped: not every pipeline component is trained yet")
        return False
    from diffusers import __version__ as diffusers_version

    out = out.resolve()
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_folder(out)
    tmp.mkdir()
    for name, src in comps.items():
        if src.exists():
            shutil.copytree(src, tmp / name)
    if work.component("text_encoder_tuned").exists():
        # The pipeline gets the text encoder fine-tuned with the UNet; CLIP scores need the
        # contrastive tower that was trained against the image encoder, so it goes beside it.
        shutil.move(tmp / "text_encoder", tmp / "clip_image_encoder" / "text_encoder")
        shutil.copytree(work.component("text_encoder_tuned"), tmp / "text_encoder")
    export_scheduler(zero_terminal_snr).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {"state": work.state(), "exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
    unet_info = work.component("unet") / "training.json"
    if unet_info.exists():
        info["unet"] = json.loads(unet_info.read_text())
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    replace_dir(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log(f"exported {out} ({size / 1e6:.1f} MB of weights)")
    return True


def seed_from_export(work: Work, model_dir: Path) -> None:
    """Start a work dir from an exported model's tokenizer, contrastive CLIP and VAE (clip and vae marked done).

    Retraining the UNet (and ControlNet) then skips the first two stages; the export's
    training.json carries their original records.
    """
    model_dir = Path(model_dir)
    contrastive_text = model_dir / "clip_image_encoder" / "text_encoder"
    if not contrastive_text.exists():
        raise ValueError(f"{model_dir} has no clip_image_encoder/text_encoder: not an export of this script")
    for name, src in (("tokenizer", model_dir / "tokenizer"), ("vae", model_dir / "vae"), ("text_encoder", contrastive_text)):
        if not work.component(name).exists():
            shutil.copytree(src, work.component(name))
    if not work.component("clip_image_encoder").exists():
        shutil.copytree(model_dir / "clip_image_encoder", work.component("clip_image_encoder"), ignore=shutil.ignore_patterns("text_encoder"))
    records = json.loads((model_dir / "training.json").read_text(encoding="utf-8")).get("state", {})
    for stage in ("clip", "vae"):
        if not work.done(stage):
            info = {k: v for k, v in records.get(stage, {}).items() if k not in ("done", "time")}
            work.mark(stage, **{**info, "seeded_from": str(model_dir)})
    log(f"work dir {work.root} seeded with the tokenizer, CLIP and VAE of {model_dir}")
