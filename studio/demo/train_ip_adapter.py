"""Train the embedded model's IP-Adapter: style by a reference image (its fill) on a kept layout.

    python -m studio.demo.train_ip_adapter [--steps 3500] [--batch 32] [--work .train-ip] [--out assets/embedded-model/ip_adapter]

An IP-Adapter (Ye et al. 2023: the reference's CLIP image embedding projected to 4 tokens, read by a
second key/value pair in every cross-attention layer; the UNet, text and image encoders frozen) learns
from toy-world triples: a target scene whose objects all wear one fill, and a reference of another
shape and colour with that fill, on the same background. Because the reference shares only its fill
(and background) with the target, the adapter learns to carry the fill and nothing else, which is what
style by reference asks: the image to restyle keeps its objects through image-to-image. Half of each
batch is the usual denoising loss (timesteps below MAX_TIMESTEP, the noise image-to-image starts from
at the strengths style transfer uses); the other half is what image-to-image does at its first steps:
the *solid* source scene noised to EDIT_TIMESTEPS, and the loss on the predicted clean latent against
the restyled target, so that keeping the source's colour and shape while changing its fill is what is
trained. Scenes whose captions are held out for evaluation are never trained on.

Saved in the IP-Adapter .safetensors layout (`image_proj.*`, `ip_adapter.<n>.to_k_ip/to_v_ip`), so
diffusers' `load_ip_adapter` reads it; the model's `clip_image_encoder/` is its image encoder.
Checkpoints every CHECKPOINT_EVERY steps: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

from studio.settings import EMBEDDED_MODEL_DIR

DEFAULT_OUT = Path(EMBEDDED_MODEL_DIR) / "ip_adapter"
WEIGHT_NAME = "ip-adapter.safetensors"
FILLS = ("solid", "outline", "striped", "dotted")
MAX_TIMESTEP = 800  # train on t < 800: image-to-image at strength <= 0.8 starts below it
EDIT_TIMESTEPS = (300, 700)  # the edit half: where image-to-image at strength 0.3-0.7 starts
CAPTION_RATE = 0.5  # half the samples have the target's caption without its fill word, half an empty prompt
# Samples without the style image (a zero embedding, what diffusers passes for classifier-free guidance's
# unconditional half) target the solid scene: no style image means the world's fill when none is said.
IMAGE_DROP_RATE = 0.15
CHECKPOINT_EVERY = 250


def triple(rng: random.Random):
    """(target scene, reference scene, prompt): every target object in the reference's fill."""
    from studio.demo import world
    from studio.demo.edit_eval import _background, _one_object, _scene, caption

    while True:
        background = _background(rng)
        fill = rng.choice(FILLS)
        if rng.random() < 0.75:
            obj = _one_object(rng, background, fill=fill)
            target = _scene(background, [obj], caption(obj, background, fill=fill))
        else:  # a scene of two or three objects, all restyled
            scene = world.sample_scene(rng, rng.choice(("two", "counting", "relation")))
            claims = {**scene.claims, "objects": [{**o, "fill": fill} for o in scene.claims["objects"]]}
            objects = tuple(replace(o, fill=fill) for o in scene.objects)
            target = world.Scene(scene.background, objects, "", scene.kind, claims)
            background = scene.background
        if world.is_held_out(target.claims):
            continue
        first = target.objects[0]
        reference_obj = _one_object(rng, background, fill=fill, exclude=(first.shape, first.color))
        reference = _scene(background, [reference_obj], "")
        prompt = ""
        if target.caption and rng.random() < CAPTION_RATE:
            prompt = caption(replace(target.objects[0], fill="solid"), background)
        return target, reference, prompt


def initial_adapter(unet, generator):
    """An IP-Adapter state dict: a random image projection, and image keys/values copied from the text ones."""
    import torch

    dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * dim, dim, generator=generator) * dim**-0.5 * 0.1,
        "proj.bias": torch.zeros(4 * dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            ip_adapter[f"{key_id}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
            ip_adapter[f"{key_id}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def adapter_state(unet) -> dict:
    """The installed adapter's weights, flattened in the IP-Adapter .safetensors layout."""
    flat = {}
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    for key, value in projection.state_dict().items():
        flat["image_proj." + key.replace("image_embeds", "proj")] = value.detach().clone().contiguous()
    key_id = 1
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            flat[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight.detach().clone().contiguous()
            flat[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight.detach().clone().contiguous()
            key_id += 2
    return flat


def adapter_parameters(unet) -> list:
    params = list(unet.encoder_hid_proj.parameters())
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            params += list(processor.parameters())
    return params


def train(steps: int, batch: int, lr: float, seed: int, work: Path, out: Path) -> Path:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from studio.demo import world
    from studio.outputs import atomic_write_bytes

    # 1. the embedded model and its image encoder, frozen; the adapter installed on the UNet
    torch.manual_seed(seed)
    model = Path(EMBEDDED_MODEL_DIR)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    encoder = CLIPVisionModelWithProjection.from_pretrained(model / "clip_image_encoder").eval().requires_grad_(False)
    processor = CLIPImageProcessor.from_pretrained(model / "clip_image_encoder")
    unet = pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet._load_ip_adapter_weights([initial_adapter(unet, torch.Generator().manual_seed(seed))])
    params = adapter_parameters(unet)
    for param in params:
        param.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. resume from the last checkpoint, if any
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for param, value in zip(params, state["params"]):
            param.data.copy_(value)
        optimiser.load_state_dict(state["optimiser"])
        start = state["step"]
        print(f"resumed at step {start}", flush=True)

    # 3. the model's own loss (v-prediction) on targets, the reference's embedding as the image prompt
    unet.train()
    text_cache: dict[str, torch.Tensor] = {}
    losses = []
    for step in range(start, steps):
        rng = random.Random(f"{seed}:{step}")
        triples = [triple(rng) for _ in range(batch)]
        keep = [rng.random() >= IMAGE_DROP_RATE for _ in triples]
        solid = [replace(t, objects=tuple(replace(o, fill="solid") for o in t.objects)) for t, _, _ in triples]
        targets = [t if kept else plain for (t, _, _), plain, kept in zip(triples, solid, keep)]
        edits = batch // 2  # the first half starts from the solid source, as image-to-image does
        scenes = targets + solid[:edits]
        images = np.stack([np.asarray(world.render(scene, 64).convert("RGB"), np.float32) for scene in scenes]) / 127.5 - 1
        references = [world.render(r, 64).convert("RGB") for _, r, _ in triples]
        with torch.no_grad():
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
            encoded = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
            latents, source_latents = encoded[:batch], encoded[batch:]
            for _, _, prompt in triples:
                if prompt not in text_cache:
                    text_cache[prompt] = pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]
            text = torch.stack([text_cache[p] for _, _, p in triples])
            embeds = encoder(processor(references, return_tensors="pt").pixel_values).image_embeds
            kept = torch.tensor(keep, dtype=embeds.dtype)[:, None]
            embeds = (embeds * kept)[:, None, :]  # (batch, 1 image, dim), as the pipeline passes it
        noise = torch.randn_like(latents)
        timesteps = torch.cat([torch.randint(*EDIT_TIMESTEPS, (edits,)), torch.randint(0, MAX_TIMESTEP, (batch - edits,))])
        starts = torch.cat([source_latents, latents[edits:]])
        noisy = noise_scheduler.add_noise(starts, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample
        # edit half: the clean latent the prediction implies (v-prediction) is the restyled target
        alpha = noise_scheduler.alphas_cumprod[timesteps[:edits]].sqrt()[:, None, None, None]
        sigma = (1 - noise_scheduler.alphas_cumprod[timesteps[:edits]]).sqrt()[:, None, None, None]
        predicted_clean = alpha * noisy[:edits] - sigma * prediction[:edits]
        edit_loss = torch.nn.functional.mse_loss(predicted_clean, latents[:edits])
        velocity = noise_scheduler.get_velocity(latents[edits:], noise[edits:], timesteps[edits:])
        loss = edit_loss + torch.nn.functional.mse_loss(prediction[edits:], velocity)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}", flush=True)
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            torch.save({"params": [p.detach() for p in params], "optimiser": optimiser.state_dict(), "step": step + 1}, work / "checkpoint.tmp")
            (work / "checkpoint.tmp").replace(checkpoint)
            atomic_write_bytes(work / WEIGHT_NAME, save(adapter_state(unet)))

    # 4. the last step's adapter (this run's, or a finished earlier run's), in the IP-Adapter layout
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHT_NAME, (work / WEIGHT_NAME).read_bytes())
    load_file(str(out / WEIGHT_NAME))  # reads back
    return out / WEIGHT_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=3500, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="triples per step")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes, noise and adapter init")
    parser.add_argument("--work", type=Path, default=Path(".train-ip"), help="checkpoints (resumed from)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the folder the adapter is written to")
    args = parser.parse_args(argv)
    print(f"wrote {train(args.steps, args.batch, args.lr, args.seed, args.work, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
