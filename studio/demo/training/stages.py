"""The four training stages: each builds its models, one training step and its evaluations, and hands them to run_stage."""

from __future__ import annotations

import json
import math
import time

import numpy as np

from studio.outputs import atomic_write_bytes

from .architecture import IMAGE_SIZE, make_clip, make_controlnet, make_unet, make_vae
from .data import (
    Data,
    LatentBatcher,
    cache_latents,
    clip_batch,
    images_to_tensor,
    load_latents,
    sketches_to_tensor,
    tokenize,
)
from .evaluation import (
    build_pipeline,
    evaluate_model,
    pipeline_text_encoder,
    shapes_eval_scores,
)
from .export import export, export_clip
from .folders import save_component
from .loop import (
    StageRun,
    Stopper,
    Work,
    optimiser_step,
    run_stage,
    step_generator,
    step_rng,
)
from .losses import (
    EMA,
    CrossAttentionMaps,
    clip_loss,
    diffusion_loss,
    layout_loss,
    make_layout_head,
    make_slot_head,
    slot_grounding_loss,
    slot_loss,
    vae_loss,
)

EVAL_EVERY = 500  # steps between the CLIP and VAE stages' evaluations
VAE_CROP = 32  # the VAE trains on crops of this side


# --------------------------------------------------------------------------- stage 1: CLIP


def clip_eval(model, tokenizer, data: Data, n: int = 200) -> dict:
    """Image->text retrieval on held-out scenes, among all their captions and among hard negatives."""
    import torch

    scenes = data.eval_scenes(n)
    images = np.stack([np.asarray(data.world.render(s, IMAGE_SIZE).convert("RGB")) for s in scenes])
    captions = [s.caption for s in scenes]
    model.eval()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images_to_tensor(images))
        txt = model.get_text_features(input_ids=tokenize(tokenizer, captions, "longest"))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    model.train()
    best = sim.argmax(1).numpy()
    top1 = float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))
    return {"retrieval_top1": round(top1, 4)}


def stage_clip(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch

    run = StageRun.start("clip", args, work, stopper)
    model = make_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=run.spec.lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    model.train()

    def train_step(step: int, lr: float) -> tuple[float, str]:
        idx = clip_batch(data, step_rng(args.seed, "clip", step), run.spec.batch)
        caps = [data.captions[i] for i in idx]
        loss = clip_loss(model, images_to_tensor(data.images[idx]), tokenize(tokenizer, caps, "longest"), caps)
        optimiser_step(loss, lr, (model.parameters(), opt, 1.0))
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item(), f" T {1 / model.logit_scale.exp().item():.3f}"

    def finish() -> dict:
        export_clip(model, work)
        metrics = clip_eval(model, tokenizer, data)
        run.record(run.spec.steps, metrics)
        return metrics

    return run_stage(
        run,
        {"model": model, "opt": opt},
        train_step,
        finish,
        evaluate=lambda step: clip_eval(model, tokenizer, data),
        eval_every=EVAL_EVERY,
    )


# --------------------------------------------------------------------------- stage 2: VAE


def vae_eval(vae, data: Data, n: int = 200) -> dict:
    """PSNR of held-out images through the VAE, and ShapesEval of the reconstructions."""
    import torch
    from studio_pipelines.common import to_pil

    scenes = data.eval_scenes(n)
    images = np.stack([np.asarray(data.world.render(s, IMAGE_SIZE).convert("RGB")) for s in scenes])
    vae.eval()
    with torch.no_grad():
        x = images_to_tensor(images)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train()
    mse = ((rec - x) / 2).pow(2).mean().item()
    out = {"psnr": round(10 * math.log10(1 / max(mse, 1e-10)), 2)}
    shapes = shapes_eval_scores(to_pil((rec + 1) / 2), scenes)
    if shapes:
        out["shapes_eval_recon"] = shapes
    return out


def stage_vae(args, work: Work, data: Data, stopper: Stopper) -> bool:
    import torch

    run = StageRun.start("vae", args, work, stopper)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=run.spec.lr, weight_decay=0.0)
    vae.train()

    def train_step(step: int, lr: float) -> tuple[float, str]:
        rng = step_rng(args.seed, "vae", step)
        idx = rng.integers(0, data.n, run.spec.batch)
        # The VAE is fully convolutional: train on 32x32 crops (4x cheaper), aligned to the latent grid.
        ys, xs = rng.integers(0, (IMAGE_SIZE - VAE_CROP) // 4 + 1, (2, run.spec.batch)) * 4
        crops = np.stack([data.images[i, y : y + VAE_CROP, x : x + VAE_CROP] for i, y, x in zip(idx, ys, xs)])
        loss, _ = vae_loss(vae, images_to_tensor(crops), step_generator(args.seed, "vae", step))
        optimiser_step(loss, lr, (vae.parameters(), opt, 1.0))
        return loss.item(), ""

    def finish() -> dict:
        # Cache the latent distribution of every training image, and set scaling_factor = 1/std.
        stats = cache_latents(vae, data, work)
        vae.register_to_config(scaling_factor=stats["scaling_factor"])
        save_component(vae, work.component("vae"))
        return {**stats, **vae_eval(vae, data)}

    return run_stage(
        run,
        {"model": vae, "opt": opt},
        train_step,
        finish,
        evaluate=lambda step: vae_eval(vae, data, 100),
        eval_every=EVAL_EVERY,
    )


# --------------------------------------------------------------------------- stage 3: UNet


def load_frozen(work: Work):
    """The pipeline's text encoder and the VAE from the work dir, frozen."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(str(pipeline_text_encoder(work))).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(work.component("vae"))).eval().requires_grad_(False)
    return text, vae


def stage_unet(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    run = StageRun.start("unet", args, work, stopper)
    spec = run.spec
    _, vae = load_frozen(work)
    means, stds = load_latents(work, data, vae)
    # The contrastive text encoder barely tells "left" from "right" (a matching caption
    # needs little position), so it is fine-tuned with the UNet, with its own optimiser and EMA.
    if args.finetune_from:
        unet = UNet2DConditionModel.from_pretrained(str(args.finetune_from / "unet"))
        text = CLIPTextModel.from_pretrained(str(args.finetune_from / "text_encoder"))
    else:
        unet = make_unet()
        text = CLIPTextModel.from_pretrained(str(work.component("text_encoder")))
    text.requires_grad_(True).train()
    ema, text_ema = EMA(unet, args.ema_decay), EMA(text, args.ema_decay)
    layout_head, slot_head = make_layout_head(), make_slot_head()
    cross_attention = [p for name, p in unet.named_parameters() if ".attn2." in name]
    rest = [p for name, p in unet.named_parameters() if ".attn2." not in name]
    opt = torch.optim.AdamW(
        [{"params": rest}, {"params": cross_attention, "lr_scale": args.cross_attention_lr_scale}], lr=spec.lr, weight_decay=0.01
    )
    text_params = [*text.parameters(), *layout_head.parameters(), *slot_head.parameters()]
    text_opt = torch.optim.AdamW(text_params, lr=spec.lr * args.text_lr_scale, weight_decay=0.01)
    attention_maps: list = []
    if args.slot_loss or args.slot_grounding:
        longest = max(map(len, tokenizer(data.captions).input_ids))
        if longest > tokenizer.model_max_length - len(data.world.POSITIONS):
            raise ValueError(f"captions of up to {longest} tokens leave no room for the place slots")
    if args.slot_grounding:
        slot_masks = data.slot_masks()
        CrossAttentionMaps.install(unet, attention_maps)
    unet.train()
    batcher = LatentBatcher(args, data, tokenizer, text, means, stds, vae.config.scaling_factor, "unet")

    def train_step(step: int, lr: float) -> tuple[float, str]:
        idx, noisy, t, emb, target, snr, ids, labels = batcher(step, spec.batch)
        attention_maps.clear()
        pred = unet(noisy, t, emb).sample
        loss = diffusion_loss(pred, target, snr)
        probe = layout_loss(layout_head, emb, ids, tokenizer.eos_token_id, labels)
        total, extra = loss + args.layout_loss * probe, f" layout-probe {probe.item():.3f}"
        if args.slot_loss:
            slots = slot_loss(slot_head, emb, labels)
            total, extra = total + args.slot_loss * slots, f"{extra} slots {slots.item():.3f}"
        if args.slot_grounding:
            masks = torch.from_numpy(slot_masks[idx] / 255.0).float()
            masks[labels[:, 0] == 0] = 0  # captions dropped for CFG name no place
            grounding = slot_grounding_loss(attention_maps, masks)
            total, extra = total + args.slot_grounding * grounding, f"{extra} grounding {grounding.item():.3f}"
        optimiser_step(total, lr, (unet.parameters(), opt, 1.0), (text_params, text_opt, args.text_lr_scale))
        ema.update(unet, step)
        text_ema.update(text, step)
        return loss.item(), extra

    def save_and_evaluate(step: int, n: int) -> dict:
        """Save the EMA UNet and text encoder into the work dir, and ShapesEval them on n held-out prompts."""
        save_component(ema.model, work.component("unet"))
        save_component(text_ema.model, work.component("text_encoder_tuned"))
        progress = json.dumps({"step": step, "of": spec.steps})
        atomic_write_bytes(work.component("unet") / "training.json", progress.encode("utf-8"))
        pipe = build_pipeline(work, ema.model, tokenizer, args.zero_terminal_snr, text=text_ema.model)
        res = evaluate_model(pipe, data, n, args.seed, args.guidance)
        res.update(step=step, guidance=args.guidance, time=time.strftime("%H:%M:%S"))
        return res

    def evaluate(step: int) -> dict:
        res = save_and_evaluate(step, args.eval_prompts)
        export(work, args.out, args.zero_terminal_snr)
        return res

    def finish() -> dict:
        res = save_and_evaluate(spec.steps, args.final_eval_prompts)
        run.record(spec.steps, res)
        return {"shapes_eval": res}

    parts = {
        "model": unet,
        "ema": ema.model,
        "opt": opt,
        "text": text,
        "text_ema": text_ema.model,
        "text_opt": text_opt,
        "layout_head": layout_head,
        "slot_head": slot_head,
    }
    done = run_stage(run, parts, train_step, finish, evaluate=evaluate, eval_minutes=args.eval_minutes)
    if done:
        export(work, args.out, args.zero_terminal_snr)
    return done


# --------------------------------------------------------------------------- stage 4: ControlNet


def stage_controlnet(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    run = StageRun.start("controlnet", args, work, stopper)
    text, vae = load_frozen(work)
    means, stds = load_latents(work, data, vae)
    unet = UNet2DConditionModel.from_pretrained(str(work.component("unet"))).eval().requires_grad_(False)
    if args.finetune_from:
        controlnet = ControlNetModel.from_pretrained(str(args.finetune_from / "controlnet"))
    else:
        controlnet = make_controlnet(unet)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=run.spec.lr, weight_decay=0.01)
    controlnet.train()
    batcher = LatentBatcher(args, data, tokenizer, text, means, stds, vae.config.scaling_factor, "controlnet")

    def train_step(step: int, lr: float) -> tuple[float, str]:
        idx, noisy, t, emb, target, snr, _, _ = batcher(step, run.spec.batch)
        cond = sketches_to_tensor(data.sketches[idx])
        down, mid = controlnet(noisy, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = diffusion_loss(pred, target, snr)
        optimiser_step(loss, lr, (controlnet.parameters(), opt, 1.0))
        return loss.item(), ""

    def finish() -> dict:
        controlnet.eval()
        save_component(controlnet, work.component("controlnet"))
        pipe = build_pipeline(work, unet, tokenizer, args.zero_terminal_snr, controlnet=controlnet)
        res = evaluate_model(pipe, data, args.eval_prompts, args.seed, args.guidance, controlled=True)
        run.record(run.spec.steps, res)
        return {"shapes_eval_with_sketch": res}

    done = run_stage(run, {"model": controlnet, "opt": opt}, train_step, finish)
    if done:
        export(work, args.out, args.zero_terminal_snr)
    return done
