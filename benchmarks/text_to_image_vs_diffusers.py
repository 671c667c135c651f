"""Time the studio's text-to-image against a plain diffusers StableDiffusionPipeline, side by side.

Same weights (an SD1.5-architecture model with random weights, built from the studio's shipped
config: no download), same scheduler, steps, size and seed. Runs alternate so both see the same
machine load; the ratio of medians is printed, and the pixels of both are compared.

    python benchmarks/text_to_image_vs_diffusers.py [--size 256] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tasks_cpu import build_random_sd15  # (benchmarks/ is on sys.path when a script here runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from studio import Settings, Studio

    prompt, seed, guidance = "a photo of an astronaut riding a horse", 1234, 7.5
    with tempfile.TemporaryDirectory() as tmp:
        print("building a random-weight SD1.5-architecture model ...", flush=True)
        folder = build_random_sd15(Path(tmp) / "sd15-random", controlnet=False)

        plain = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, torch_dtype=torch.float32  # as the studio on CPU
        )
        plain.set_progress_bar_config(disable=True)
        studio = Studio(Settings(model=str(folder)))

        def run_plain():
            return plain(
                prompt,
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]

        def run_studio():
            return studio.text_to_image(
                prompt, width=args.size, height=args.size, num_inference_steps=args.steps, guidance_scale=guidance, seed=seed
            ).images[0]

        # Warm-up (and the studio's model load) outside the timings.
        plain_image, studio_image = run_plain(), run_studio()
        times = {"diffusers": [], "studio": []}
        for _ in range(args.repeats):
            for name, run in (("diffusers", run_plain), ("studio", run_studio)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)

    difference = np.abs(np.asarray(plain_image, np.int16) - np.asarray(studio_image, np.int16)).max()
    plain_median, studio_median = statistics.median(times["diffusers"]), statistics.median(times["studio"])
    print(f"SD1.5 architecture, random weights, {args.size}x{args.size}, {args.steps} steps, euler, CFG {guidance}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"plain diffusers: median {plain_median:.2f} s  runs {[round(t, 2) for t in times['diffusers']]}")
    print(f"studio:          median {studio_median:.2f} s  runs {[round(t, 2) for t in times['studio']]}")
    print(f"ratio studio/diffusers: {studio_median / plain_median:.3f}")
    print(f"max pixel difference between the two images: {difference}")


if __name__ == "__main__":
    main()
