"""Does the embedded model put the right object first in "A above B"? Two measurements per model folder.

1. Reading the relation: rendered relation scenes are noised and denoised once under their
   caption and under the caption with the relation reversed ("A above B" -> "A below B"); a
   model that reads which object goes where has the lower loss with the true caption. Printed
   per noise level: the share of scenes where it does (0.5 is chance) and the mean losses.
2. Where ShapesEval's position category goes wrong: its held-out position prompts rendered as
   `studio eval` renders them (seed = index, 20 steps, CFG 5), absolute positions and relations
   counted apart; a relation that fails is "reversed", "wrong axis", "too close" or "missing"
   (the detector did not find both objects' shape and colour).

    python benchmarks/relation_binding.py assets/embedded-model [OTHER_MODEL ...] [--prompts 200]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import numpy as np
import torch

from studio import Settings, Studio
from studio.demo import shapes_eval, world
from studio.demo.training.architecture import train_noise_scheduler
from studio.demo.training.data import tokenize

REVERSED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TIMESTEPS = (999, 950, 850, 700, 500)


def relation_scenes(n: int, seed: int = 5) -> list[world.Scene]:
    """Relation scenes whose two objects differ in colour (so swapping them changes the picture)."""
    rng, scenes = random.Random(seed), []
    while len(scenes) < n:
        scene = world.sample_scene(rng, "relation")
        first, second = scene.claims["objects"]
        if first.get("color") and second.get("color") and first["color"] != second["color"]:
            scenes.append(scene)
    return scenes


def reversed_caption(scene: world.Scene) -> str:
    relation = scene.claims["relation"]["relation"]
    for phrase in sorted(world.RELATION_PHRASES[relation], key=len, reverse=True):
        words = " " + " ".join(phrase) + " "
        if words in f" {scene.caption} ":
            swapped = " " + " ".join(world.RELATION_PHRASES[REVERSED[relation]][0]) + " "
            return f" {scene.caption} ".replace(words, swapped, 1).strip()
    raise ValueError(f"no relation phrase found in {scene.caption!r}")


@torch.no_grad()
def reading(model: str, n: int = 64, repeats: int = 4) -> dict[int, tuple[float, float, float]]:
    """{t: (share of scenes with true-caption loss < reversed-caption loss, mean true loss, mean reversed loss)}."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    scenes = relation_scenes(n)
    pixels = np.stack([np.asarray(world.render(s, 64).convert("RGB")) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    true_states = pipe.text_encoder(tokenize(pipe.tokenizer, [s.caption for s in scenes]))[0]
    reversed_states = pipe.text_encoder(tokenize(pipe.tokenizer, [reversed_caption(s) for s in scenes]))[0]
    schedule = train_noise_scheduler(zero_terminal_snr=True)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for t in TIMESTEPS:
        steps = torch.full((n,), t)
        true_loss, reversed_loss = torch.zeros(n), torch.zeros(n)
        for _ in range(repeats):
            noise = torch.randn(latents.shape, generator=generator)
            noisy, target = schedule.add_noise(latents, noise, steps), schedule.get_velocity(latents, noise, steps)
            true_loss += (pipe.unet(noisy, steps, true_states).sample - target).pow(2).mean((1, 2, 3))
            reversed_loss += (pipe.unet(noisy, steps, reversed_states).sample - target).pow(2).mean((1, 2, 3))
        share = (true_loss < reversed_loss).float().mean().item()
        out[t] = (share, true_loss.mean().item() / repeats, reversed_loss.mean().item() / repeats)
    return out


def position_split(model: str, prompts: int) -> Counter:
    """Counts of ShapesEval's position prompts by kind and outcome."""
    studio = Studio(Settings(model=model))
    counts: Counter = Counter()
    for index, scene in enumerate(world.eval_scenes(prompts)):
        if "position" not in shapes_eval.asserted_categories(scene):
            continue
        image = studio.text_to_image(scene.caption, seed=index, num_inference_steps=20, guidance_scale=5.0).images[0]
        right = shapes_eval.score(image, scene)["position"]
        detections = shapes_eval.detect(image)
        relation = scene.claims["relation"]
        kind = "relation" if relation else "absolute"
        counts[kind, "prompts"] += 1
        counts[kind, "right"] += right
        if relation and not right:
            objects = scene.claims["objects"]
            chosen = next(shapes_eval._assignments(objects, detections, ("shape", "color")), None)
            if chosen is None:
                counts[kind, "missing"] += 1
                continue
            subject, obj = detections[chosen[relation["subject"]]], detections[chosen[relation["object"]]]
            main, across = world.relation_offsets((subject.cx, subject.cy), (obj.cx, obj.cy), relation["relation"])
            outcome = "wrong axis" if abs(across) > abs(main) else "reversed" if main < 0 else "too close"
            counts[kind, outcome] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="diffusers model folders")
    parser.add_argument("--prompts", type=int, default=200, help="held-out ShapesEval prompts (position ones are rendered)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for model in args.models:
        print(f"== {model}")
        print("  reading the relation (true caption beats the reversed one; 0.5 = chance):")
        for t, (share, true_loss, reversed_loss) in reading(model).items():
            print(f"    t={t:4d}: {share:.2f} of scenes  (loss {true_loss:.4f} true vs {reversed_loss:.4f} reversed)")
        counts = position_split(model, args.prompts)
        for kind in ("absolute", "relation"):
            outcomes = ", ".join(f"{k[1]} {v}" for k, v in sorted(counts.items()) if k[0] == kind and k[1] not in ("prompts", "right"))
            print(f"  {kind:8s}: {counts[kind, 'right']}/{counts[kind, 'prompts']} right" + (f" ({outcomes})" if outcomes else ""))
        total = counts["absolute", "prompts"] + counts["relation", "prompts"]
        print(f"  position: {(counts['absolute', 'right'] + counts['relation', 'right']) / max(total, 1):.3f}")


if __name__ == "__main__":
    main()
