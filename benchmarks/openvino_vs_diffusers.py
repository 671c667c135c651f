"""OpenVINO (through optimum-intel) against plain diffusers on the CPU: the same SD1.5-architecture weights.

Not part of the studio: optimum-intel 2.2 pins older diffusers (0.39) and transformers (5.5) than the
studio's and needs torchvision, so it runs in a virtualenv of its own:

    python -m venv ov && ov/bin/pip install torch==2.13.0 'optimum-intel[openvino,diffusers]'
    ov/bin/optimum-cli export openvino --model MODEL_DIR --task text-to-image --weight-format fp32 OV_DIR
    ov/bin/python benchmarks/openvino_vs_diffusers.py MODEL_DIR OV_DIR [f32|bf16|default]

MODEL_DIR: e.g. the random SD1.5 that benchmarks/speed.py builds (`--model-dir`). Both pipelines get the
same prompt embeddings (that venv's transformers cannot read a text encoder saved by a newer one), so the
PSNR compares the UNet and VAE; runs alternate, median of 2.
"""

import math
import statistics
import sys
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from optimum.intel import OVStableDiffusionPipeline

PROMPT, SEED, STEPS = "a photo of an astronaut riding a horse", 1234, 3


def psnr(a, b) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def main() -> None:
    model_dir, ov_dir = sys.argv[1], sys.argv[2]
    precision = sys.argv[3] if len(sys.argv) > 3 else "f32"
    plain = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    ov_config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
    ov = OVStableDiffusionPipeline.from_pretrained(ov_dir, compile=True, ov_config=ov_config)
    ov.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond, uncond = plain.encode_prompt(PROMPT, "cpu", 1, True)
    for size in (256, 512):
        common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, width=size, height=size,
                      num_inference_steps=STEPS, guidance_scale=7.5)

        def run(pipe):
            return pipe(generator=torch.Generator("cpu").manual_seed(SEED), **common).images[0]

        reference = run(plain)
        started = time.perf_counter()
        image = run(ov)
        first = time.perf_counter() - started
        times = {"diffusers": [], "openvino": []}
        for _ in range(2):
            for name, pipe in (("diffusers", plain), ("openvino", ov)):
                started = time.perf_counter()
                run(pipe)
                times[name].append(time.perf_counter() - started)
        plain_s, ov_s = statistics.median(times["diffusers"]), statistics.median(times["openvino"])
        print(f"{precision}: {size}x{size}, {STEPS} steps: diffusers {plain_s:.2f} s, OpenVINO {ov_s:.2f} s, "
              f"ratio {ov_s / plain_s:.3f}, PSNR {psnr(reference, image):.1f} dB, OpenVINO's first call {first:.1f} s")


if __name__ == "__main__":
    main()
