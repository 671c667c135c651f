"""Train the embedded model's demo LoRA: "circle" draws a square.

    python -m studio.demo.train_lora [--steps 400] [--out assets/embedded-lora/circles-as-squares.safetensors]

A LoRA (rank 4, on the UNet's attention projections) learns from toy-world squares captioned as circles,
with the model's own loss (v-prediction on its zero-terminal-SNR schedule). It is the studio's offline
proof that a LoRA changes what is drawn: at weight 1 "a red circle" comes out square, at weight 0 it is
the base model's circle (tests/test_loras.py checks both with the ShapesEval detector). Saved as
diffusers' LoRA trainers save theirs (PEFT keys under `unet.`), about 0.2 MB.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from studio.settings import EMBEDDED_MODEL_DIR

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "embedded-lora" / "circles-as-squares.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def square_scene_captioned_as_circle(rng: random.Random):
    """A one-square scene of the world and its caption with "square" said as "circle"."""
    from studio.demo import world

    size, colour = rng.choice(world.SIZES), rng.choice(list(world.COLORS))
    position = rng.choice([*world.POSITIONS, None])
    background = rng.choice(list(world.BACKGROUNDS))
    where = " " + " ".join(rng.choice(world.POSITION_PHRASES[position])) if position else ""
    prompt = f"a {size} {colour} square{where} on a {background} background"
    return world.scene_from_prompt(prompt, rng), prompt.replace("square", "circle")


def train(steps: int, batch: int, lr: float, seed: int, out: Path) -> Path:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.demo import world

    # 1. the embedded model, and a LoRA on its UNet's attention projections (the rest frozen)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True, safety_checker=None)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [param for param in pipe.unet.parameters() if param.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. the model's own denoising loss on squares captioned as circles
    pipe.unet.train()
    for step in range(steps):
        scenes = [square_scene_captioned_as_circle(rng) for _ in range(batch)]
        pixels = np.stack([np.asarray(world.render(scene, 64), np.float32) for scene, _ in scenes]) / 127.5 - 1
        with torch.no_grad():
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
            text = pipe.encode_prompt([caption for _, caption in scenes], "cpu", 1, False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)

    # 3. saved as diffusers' trainers save LoRAs
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(out.parent, unet_lora_layers=layers, weight_name=out.name,
                                              safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--batch", type=int, default=8, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes, noise and LoRA init")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the LoRA is written")
    args = parser.parse_args(argv)
    print(f"wrote {train(args.steps, args.batch, args.lr, args.seed, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
