"""The studio's GPU path against plain diffusers, and every task, on a CUDA GPU in fp16 (random weights).

    python benchmarks/tasks_gpu.py                 # SD1.5 at 512², SDXL at 1024², 25 steps, batch 1 and 8
    python benchmarks/tasks_gpu.py --dry-run       # the same code on the CPU with tiny models (the test suite runs it)

Part 1, per architecture, size and batch: plain diffusers (its defaults: SDPA) beside the studio with each
speed-up added in turn: channels_last, fused QKV projections, torch.compile (mode max-autotune-no-cudagraphs),
step caching (cache_interval 3). Each row: median seconds per call, per image, and the ratio to plain diffusers,
measured alternately in one run. The studio's GPU defaults come from these rows.
Part 2 (`--tasks`): every task through `Studio`, Imagic at its real defaults (500 embedding + 1000 fine-tune
steps) then a second edit reusing the cached training: benchmarks/tasks_cpu.py's table, on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PROMPT, SEED = "a photo of an astronaut riding a horse", 1234
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024}


def build_model(architecture: str, folder: Path, dry_run: bool) -> Path:
    """A random-weight model folder: full-size from the shipped configs, or the tests' tiny one for a dry run."""
    if (folder / "model_index.json").is_file():
        return folder
    if dry_run:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_models import save_sd15, save_sdxl

        return (save_sd15 if architecture == "sd15" else save_sdxl)(folder)
    if architecture == "sd15":
        from tasks_cpu import build_random_sd15

        return build_random_sd15(folder, controlnet=False)
    return build_random_sdxl(folder)


def build_random_sdxl(folder: Path) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from studio.single_file import shipped_config

    torch.manual_seed(0)
    with shipped_config("sdxl") as config:
        pipe = StableDiffusionXLPipeline(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2")),
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"),
            scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"),
        )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(run, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compare(args, architecture: str, folder: Path, device: str, dtype: torch.dtype) -> None:
    from diffusers import DiffusionPipeline

    from studio import Settings, Studio

    plain = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).to(device)
    plain.set_progress_bar_config(disable=True)
    studio = Studio(Settings(model=str(folder), device=device, dtype="float32" if device == "cpu" else "float16"))
    unet = studio.models.get(None).pipe.unet
    speedups = [  # cumulative: (row name, change to the studio's UNet, request fields)
        ("studio (defaults)", None, {}),
        ("+ channels_last", lambda: unet.to(memory_format=torch.channels_last), {}),
        ("+ fused QKV", unet.fuse_qkv_projections, {}),
        ("+ torch.compile", lambda: unet.compile(**args.compile_options), {}),
        ("+ step cache (interval 3)", None, {"cache_interval": 3}),
    ]
    for size in args.sizes or [NATIVE_SIZE[architecture]]:
        for batch in args.batches:
            common = dict(width=size, height=size, num_inference_steps=args.steps, guidance_scale=7.0)

            def run_plain():
                generator = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
                plain(PROMPT, num_images_per_prompt=batch, generator=generator, **common)

            run_plain()
            baseline = median_seconds(run_plain, args.repeats, device)
            print(f"\n{architecture}, {size}x{size}, {args.steps} steps, batch {batch}, {describe(device)}")
            print(f"  {'plain diffusers':28s} {baseline:7.3f} s/call  {baseline / batch:7.3f} s/image")
            fields = {}
            for name, change, extra in speedups:
                if change is not None:
                    change()
                fields.update(extra)

                def run_studio():
                    studio.text_to_image(PROMPT, seed=SEED, batch_size=batch, **common, **fields)

                started = time.perf_counter()
                run_studio()  # warm-up (and the compile)
                first = time.perf_counter() - started
                seconds = median_seconds(run_studio, args.repeats, device)
                print(f"  {name:28s} {seconds:7.3f} s/call  {seconds / batch:7.3f} s/image  "
                      f"ratio to diffusers {seconds / baseline:.3f}  (first call {first:.1f} s)", flush=True)
            unet.unfuse_qkv_projections()
            unet._compiled_call_impl = None
            unet.to(memory_format=torch.contiguous_format)
    del plain, studio
    if device == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.empty_cache()


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, CUDA fp16"
    return "CPU float32 (dry run: tiny model)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (checks the code, no figures)")
    parser.add_argument("--architectures", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default: each model's own)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="images per call")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (median shown)")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built models here (reused if present)")
    parser.add_argument("--tasks", action="store_true", help="also time every task and Imagic (benchmarks/tasks_cpu.py)")
    args = parser.parse_args(argv)

    if args.dry_run:
        device, dtype = "cpu", torch.float32
        args.sizes, args.batches, args.steps, args.repeats = [64], [2], 2, 1
        args.compile_options = {"backend": "eager"}  # dynamo's tracing without inductor's minutes of codegen
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.float16
        args.compile_options = {"mode": "max-autotune-no-cudagraphs"}
    else:
        sys.exit("no CUDA GPU found; this benchmark is for a GPU machine (--dry-run checks it on the CPU)")

    model_dir = args.model_dir or Path(tempfile.mkdtemp())
    for architecture in args.architectures.split(","):
        folder = build_model(architecture, model_dir / f"{architecture}-random{'-tiny' if args.dry_run else ''}",
                             args.dry_run)
        compare(args, architecture, folder, device, dtype)

    if args.tasks:
        from tasks_cpu import benchmark, describe_model, print_table

        size = (args.sizes or [512])[0]
        task_args = argparse.Namespace(
            size=size, steps=args.steps, repeats=args.repeats, threads=None,
            model=str(model_dir / "sd15-random-tiny") if args.dry_run else None,
            model_dir=model_dir / "sd15-random-controlnet", imagic_embedding_steps=2 if args.dry_run else 500,
            imagic_finetune_steps=2 if args.dry_run else 1000, imagic_full=not args.dry_run,
        )
        rows, loaded = benchmark(task_args, device=device, dtype="float32" if device == "cpu" else "float16")
        print_table(f"{describe_model(task_args)}, {describe(device)}, {size}x{size}, {args.steps} steps, "
                    f"median of {args.repeats}; model load {loaded:.1f} s (not included)", rows)


if __name__ == "__main__":
    main()
