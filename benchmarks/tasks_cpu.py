"""Time every task of the studio on an SD1.5-architecture model with random weights, on the CPU.

The model is built from the studio's shipped config (studio/configs/sd15, CLIP tokenizer from
studio/configs/clip_tokenizer): full size (860M-parameter UNet, 123M text encoder, 84M VAE), random
weights, plus a random ControlNet (ControlNetModel.from_unet) in the folder's controlnet/ so that
sketch_to_image runs its ControlNet path. No download. Every task goes through `Studio`, as a user's
request would; a task whose module is missing is skipped with a note, and a task that fails is reported
rather than stopping the run. Random weights make the pictures meaningless: only the times count.

Imagic is timed in full (stage 1 + stage 2 + sampling, with few training steps: the real defaults of
500 + 1000 steps would take hours on a CPU) and then per edit (a second eta: the trained state is cached,
so only sampling runs); seconds per training step are printed, and the time at the default step counts
is extrapolated from them.

    python benchmarks/tasks_cpu.py [--size 256] [--steps 8] [--threads N] [--model-dir DIR]

`--model-dir` keeps the built model folder (built once, reused on later runs).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/tasks_cpu.py` from a checkout
    sys.path.insert(0, str(REPO))

PROMPT = "a large red circle on the left on a white background"
TASKS = ("text_to_image", "sketch_to_image", "inpaint", "style_transfer", "imagic")
DEFAULT_EMBEDDING_STEPS, DEFAULT_FINETUNE_STEPS = 500, 1000  # ImagicRequest's defaults


def build_random_sd15(folder: Path, controlnet: bool = True) -> Path:
    """An SD1.5-architecture pipeline with random weights (fp16 on disk), saved as a diffusers folder."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from studio.single_file import shipped_config

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    with shipped_config("sd15") as config:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        pipe = StableDiffusionPipeline(
            unet=unet,
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tmp = folder.with_name(folder.name + ".partial")
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    if controlnet:
        ControlNetModel.from_unet(unet).to(torch.float16).save_pretrained(tmp / "controlnet", safe_serialization=True)
    tmp.rename(folder)
    return folder


def inputs(size: int) -> dict:
    """A rendered toy-world scene, its sketch, an inpainting mask and a style reference, at size x size."""
    from PIL import Image

    from studio.demo import world

    scene = world.scene_from_prompt(PROMPT, random.Random(0))
    striped = world.scene_from_prompt("a large blue striped square on the right on a gray background", random.Random(1))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, size // 4, size - size // 16, 3 * size // 4))
    return {
        "image": world.render(scene, size),
        "sketch": world.render_sketch(scene, size),
        "mask": mask,
        "reference": world.render(striped, size),
    }


class Timer:
    """A Progress that notes when each step of each stage ends."""

    def __init__(self):
        from studio.progress import Progress

        self.progress = Progress(on_update=self._update)
        self.marks: dict[str, list[float]] = {}
        self.started = time.perf_counter()

    def _update(self, stage, step, total, preview):
        self.marks.setdefault(stage, []).append(time.perf_counter())

    def seconds_per_step(self, stage: str) -> float | None:
        """Mean seconds per step of a stage, from its second step on (the first pays for warm-up)."""
        marks = self.marks.get(stage, [])
        if len(marks) < 3:
            return None
        return (marks[-1] - marks[1]) / (len(marks) - 2)


@dataclass
class Row:
    task: str
    variant: str
    seconds: float | None  # median wall time of the request, None when skipped or failed
    runs: list = field(default_factory=list)
    note: str = ""


def time_request(call, repeats: int) -> tuple[list[float], Timer]:
    runs, timer = [], None
    for _ in range(repeats):
        timer = Timer()
        started = time.perf_counter()
        call(timer.progress)
        runs.append(time.perf_counter() - started)
    return runs, timer


def available(task: str) -> bool:
    from studio.tasks import default_registry

    return task in default_registry()


def run_benchmark(studio, size: int, steps: int, repeats: int, imagic_steps: tuple[int, int], imagic_full: bool) -> list[Row]:
    """Time every task through `studio`; returns one row per (task, variant)."""
    from studio_pipelines.imagic import imagic_cache

    images = inputs(size)
    common = dict(width=size, height=size, num_inference_steps=steps, seed=1234)
    plans = {
        "text_to_image": [("prompt", lambda p: studio.text_to_image(PROMPT, progress=p, **common))],
        "sketch_to_image": [
            ("auto (ControlNet in the model folder)", lambda p: studio.sketch_to_image(PROMPT, images["sketch"], progress=p, **common)),
        ],
        "inpaint": [
            ("mask, 4-channel UNet", lambda p: studio.inpaint(PROMPT, images["image"], images["mask"], progress=p, **common)),
        ],
        "style_transfer": [
            ("prompt, strength 0.6", lambda p: studio.style_transfer(PROMPT, images["image"], method="prompt", progress=p, **common)),
            (
                "reference, strength 0.6",
                lambda p: studio.style_transfer(
                    PROMPT, images["image"], reference_image=images["reference"], progress=p, **common
                ),
            ),
        ],
    }
    # Warm-up outside the timings: first-call imports, lazy modules, allocator.
    studio.text_to_image(PROMPT, **dict(common, num_inference_steps=1))
    rows = []
    for task in TASKS:
        if not available(task):
            rows.append(Row(task, "-", None, note=f"skipped: pipelines/{task}.py is not there"))
            continue
        if task == "imagic":
            variants = [("LoRA rank 4", True)] + ([("full UNet", False)] if imagic_full else [])
            for name, use_lora in variants:
                rows += time_imagic(studio, images["image"], common, imagic_steps, use_lora, name, imagic_cache)
            continue
        for variant, call in plans[task]:
            try:
                runs, timer = time_request(call, repeats)
                note = ""
                per_step = timer.seconds_per_step("sampling")
                if per_step:
                    note = f"{per_step:.2f} s/sampling step"
                rows.append(Row(task, variant, statistics.median(runs), runs, note))
            except Exception as error:  # noqa: BLE001 - report it and carry on with the other tasks
                rows.append(Row(task, variant, None, note=f"failed: {type(error).__name__}: {str(error)[:80]}"))
            print_row(rows[-1])
    return rows


def time_imagic(studio, image, common, imagic_steps, use_lora, name, imagic_cache) -> list[Row]:
    embedding_steps, finetune_steps = imagic_steps
    fields = dict(common, embedding_steps=embedding_steps, finetune_steps=finetune_steps, use_lora=use_lora)
    rows = []
    try:
        imagic_cache(studio.models.get(None)).clear()
        runs, timer = time_request(lambda p: studio.imagic("a large blue circle", image, eta=0.7, progress=p, **fields), 1)
        embed = timer.seconds_per_step("imagic: embedding")
        tune = timer.seconds_per_step("imagic: fine-tune")
        sample = timer.seconds_per_step("sampling")
        parts = [f"{embedding_steps}+{finetune_steps} training steps"]
        if embed:
            parts.append(f"{embed:.2f} s/embedding step")
        if tune:
            parts.append(f"{tune:.2f} s/fine-tune step")
        row = Row("imagic", f"{name}: train + edit", runs[0], runs, ", ".join(parts))
        rows.append(row)
        print_row(row)
        if embed and tune and sample and (embedding_steps, finetune_steps) != (DEFAULT_EMBEDDING_STEPS, DEFAULT_FINETUNE_STEPS):
            estimate = DEFAULT_EMBEDDING_STEPS * embed + DEFAULT_FINETUNE_STEPS * tune + common["num_inference_steps"] * sample
            row = Row("imagic", f"{name}: train + edit, default steps", estimate, [], "extrapolated from s/step (500 + 1000)")
            rows.append(row)
            print_row(row)
        edits, timer = time_request(lambda p: studio.imagic("a large blue circle", image, eta=1.0, progress=p, **fields), 1)
        assert set(timer.marks) == {"sampling"}, f"the second eta trained again: {sorted(timer.marks)}"
        row = Row("imagic", f"{name}: per edit (cached, new eta)", edits[0], edits, "no training: the trained state is cached")
    except Exception as error:  # noqa: BLE001 - reported in the table
        row = Row("imagic", name, None, note=f"failed: {type(error).__name__}: {str(error)[:80]}")
    rows.append(row)
    print_row(row)
    return rows


def print_row(row: Row) -> None:
    seconds = f"{row.seconds:9.2f}" if row.seconds is not None else "        -"
    print(f"  {row.task:<16} {row.variant:<44} {seconds} s  {row.note}", flush=True)


def print_table(title: str, rows: list[Row]) -> None:
    print()
    print(title)
    print(f"| {'task':<16} | {'variant':<44} | {'seconds':>9} | note")
    print(f"|{'-' * 18}|{'-' * 46}|{'-' * 11}|{'-' * 40}")
    for row in rows:
        seconds = f"{row.seconds:9.2f}" if row.seconds is not None else "        -"
        print(f"| {row.task:<16} | {row.variant:<44} | {seconds} | {row.note}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per request")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per task (median shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--imagic-embedding-steps", type=int, default=4)
    parser.add_argument("--imagic-finetune-steps", type=int, default=4)
    parser.add_argument("--imagic-full", action="store_true", help="also time a full-UNet fine-tune (~14 GB of RAM)")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built model here (reused if present)")
    parser.add_argument("--model", default=None, help="time this model reference instead of a random SD1.5")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, loaded = benchmark(args, device="cpu", dtype="float32")
    print_table(
        f"{describe_model(args)}, CPU float32, {args.size}x{args.size}, {args.steps} steps, CFG 7, "
        f"torch threads {torch.get_num_threads()}; model load {loaded:.1f} s (not included)",
        rows,
    )


def describe_model(args) -> str:
    return f"model {args.model}" if args.model else "SD1.5 architecture (full size, random weights)"


def benchmark(args, device: str, dtype: str) -> tuple[list[Row], float]:
    """Build (or find) the model, load it through a Studio, time every task; (rows, load seconds)."""
    from studio import Settings, Studio

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = args.model_dir or Path(tmp) / "sd15-random"
            started = time.perf_counter()
            print("building a random-weight SD1.5-architecture model (+ ControlNet) ...", flush=True)
            build_random_sd15(Path(folder))
            print(f"built/found in {time.perf_counter() - started:.1f} s", flush=True)
        studio = Studio(Settings(model=str(folder), device=device, dtype=dtype))
        started = time.perf_counter()
        studio.models.get(None)
        loaded = time.perf_counter() - started
        print(f"loaded in {loaded:.1f} s; timing ...", flush=True)
        rows = run_benchmark(
            studio, args.size, args.steps, args.repeats,
            (args.imagic_embedding_steps, args.imagic_finetune_steps), args.imagic_full,
        )
    return rows, loaded


if __name__ == "__main__":
    main()
