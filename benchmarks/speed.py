"""Every speed and memory figure of issue 20, each beside its baseline from the same run.

    python benchmarks/speed.py                       # everything (about 15-25 minutes on 2 CPU cores)
    python benchmarks/speed.py --only embedded,loading --sizes 256 --steps 4 --repeats 3

Sections (`--only`):
  cpu        the studio's text to image vs plain diffusers (SD1.5 architecture, random weights, same sampler,
             steps, size and seed; runs alternate so both see the same machine load), for each candidate speed-up
             (threads, channels_last, torch.compile, fused QKV), with the output's PSNR against diffusers'
  openvino   the same comparison for `--backend openvino`: the ratio, PSNR, the first image (converting the
             model) and a new Studio's first image (reading the saved conversion); the embedded model too
  threads    1 vs 2 torch threads on the SD1.5 architecture, on a quiet machine and with another process
             busy on every core (the shared-machine case)
  embedded   the embedded model: one 64x64 image at 20 steps (warm), images per second at batch 8, eager and
             compiled, and where the time of one UNet call goes (torch.profiler)
  loading    a full-size SD 1.5 fp16 single file: peak RSS and time loading it in float32 (diffusers'
             from_single_file vs the studio's loader, each in its own process), first load vs cached hash
  cache      step caching (cache_interval): speed-up on the SD1.5 architecture at 256², and ShapesEval of the
             embedded model with and without it (--shapes-prompts prompts)
  ui         seconds from `python app.py` to the page answering
Imagic's time per edit is measured by benchmarks/tasks_cpu.py and the GPU figures by benchmarks/tasks_gpu.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
PROMPT, SEED, GUIDANCE = "a photo of an astronaut riding a horse", 1234, 7.5


def psnr(a, b) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if error == 0 else 10 * math.log10(255**2 / error)


def alternate(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Each callable `repeats` times, interleaved so that every one sees the same machine load."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


@contextmanager
def busy_cores(count: int):
    """`count` processes spinning on the CPU (another user's work on a shared machine)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def random_sd15(model_dir: Path | None) -> Path:
    from tasks_cpu import build_random_sd15

    folder = (model_dir or Path(tempfile.mkdtemp())) / "sd15-random"
    if not (folder / "model_index.json").is_file():
        print("building a random-weight SD1.5-architecture model ...", flush=True)
        build_random_sd15(folder, controlnet=False)
    return folder


# -- cpu: the studio vs plain diffusers ----------------------------------------------------------------


def plain_sd15(folder: Path):
    """Plain diffusers on the same weights, in float32: the baseline."""
    import torch
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                    torch_dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    return plain


def text_to_image_runs(plain, studio, size: int, steps: int):
    """(plain diffusers' image, the studio's image): one prompt, sampler, size, step count, CFG and seed."""
    import torch

    def run_plain():
        return plain(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]

    def run_studio():
        return studio.text_to_image(PROMPT, width=size, height=size, num_inference_steps=steps,
                                    guidance_scale=GUIDANCE, seed=SEED).images[0]

    return run_plain, run_studio


def section_cpu(args) -> None:
    import torch

    from studio import Settings, Studio

    folder = random_sd15(args.model_dir)
    plain = plain_sd15(folder)
    studio = Studio(Settings(model=str(folder)))
    unet = studio.models.get(None).pipe.unet
    candidates = {
        "studio (defaults)": lambda: None,
        "+ channels_last": lambda: unet.to(memory_format=torch.channels_last),
        "+ fused QKV": unet.fuse_qkv_projections,
        "+ torch.compile": lambda: unet.compile(dynamic=False),
    }
    for size in args.sizes:
        run_plain, run_studio = text_to_image_runs(plain, studio, size, args.steps)
        reference = run_plain()
        print(f"\nSD1.5 architecture, random weights, {size}x{size}, {args.steps} steps, CFG {GUIDANCE}, "
              f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
        for name, apply in candidates.items():  # cumulative: each adds to the ones above
            apply()
            started = time.perf_counter()
            image = run_studio()  # warm-up (and the compile, where there is one)
            first = time.perf_counter() - started
            times = alternate({"diffusers": run_plain, "studio": run_studio}, args.repeats)
            ratio = statistics.median(times["studio"]) / statistics.median(times["diffusers"])
            print(f"  {name:20s} studio {statistics.median(times['studio']):6.2f} s  diffusers "
                  f"{statistics.median(times['diffusers']):6.2f} s  ratio studio/diffusers {ratio:.3f}  "
                  f"PSNR {psnr(image, reference):.1f} dB  first image {first:.1f} s", flush=True)
        unet.unfuse_qkv_projections()
        unet._compiled_call_impl = None  # back to eager for the next size's "defaults" row
        unet.to(memory_format=torch.contiguous_format)


# -- openvino: the studio's OpenVINO backend vs plain diffusers ------------------------------------------------


def section_openvino(args) -> None:
    from studio import Settings, Studio

    folder = random_sd15(args.model_dir)
    plain = plain_sd15(folder)
    conversions = Path(tempfile.mkdtemp())  # a fresh conversion cache: the first image converts

    def studio_with_openvino():
        return Studio(Settings(model=str(folder), backend="openvino", compiled_cache=conversions))

    studio = studio_with_openvino()
    for size in args.sizes:
        run_plain, run_studio = text_to_image_runs(plain, studio, size, args.steps)
        reference = run_plain()
        started = time.perf_counter()
        image = run_studio()  # the first image of the run converts the UNet and VAE decoder (once per model)
        first = time.perf_counter() - started
        times = alternate({"diffusers": run_plain, "studio": run_studio}, args.repeats)
        ratio = statistics.median(times["studio"]) / statistics.median(times["diffusers"])
        print(f"\nSD1.5 architecture, {size}x{size}, {args.steps} steps: studio --backend openvino "
              f"{statistics.median(times['studio']):.2f} s  diffusers {statistics.median(times['diffusers']):.2f} s  "
              f"ratio studio/diffusers {ratio:.3f}  PSNR {psnr(image, reference):.1f} dB  first image {first:.1f} s",
              flush=True)
    studio = plain = None  # each SD1.5 copy holds 4.3 GB, its OpenVINO conversion 3.6 GB more
    gc.collect()
    started = time.perf_counter()
    _, run_new_studio = text_to_image_runs(None, studio_with_openvino(), args.sizes[-1], args.steps)
    run_new_studio()  # a new process's first image: the saved conversion is read back
    print(f"  first image with the conversion saved (a new Studio, {args.sizes[-1]}², model load included): "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    gc.collect()
    embedded = {backend: Studio(Settings(backend=backend, compiled_cache=conversions)) for backend in ("torch", "openvino")}

    def one(backend):
        return lambda: embedded[backend].text_to_image(PROMPT, num_inference_steps=20, seed=SEED, cache_interval=1)

    one("torch")(), one("openvino")()
    times = alternate({"torch": one("torch"), "openvino": one("openvino")}, max(args.repeats, 5))
    print(f"  embedded model 64x64, 20 steps, uncached: torch {statistics.median(times['torch']):.3f} s, "
          f"openvino {statistics.median(times['openvino']):.3f} s", flush=True)
    shutil.rmtree(conversions)  # 3.5 GB for the SD1.5 model


# -- threads: 1 vs 2, quiet and under load ------------------------------------------------------------------


def section_threads(args) -> None:
    import torch

    from studio import Settings, Studio

    folder = random_sd15(args.model_dir)
    studio = Studio(Settings(model=str(folder)))
    size = args.sizes[0]

    def run():
        studio.text_to_image(PROMPT, width=size, height=size, num_inference_steps=args.steps, seed=SEED)

    run()
    print(f"\nthreads: SD1.5 architecture, {size}x{size}, {args.steps} steps, median of {args.repeats}, "
          f"{os.cpu_count()} cores")
    for load in (0, os.cpu_count() or 1):
        with busy_cores(load):
            results = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results[threads] = statistics.median(alternate({"run": run}, args.repeats)["run"])
        label = "quiet machine" if load == 0 else f"{load} other processes busy"
        print(f"  {label:28s} 1 thread {results[1]:6.2f} s   2 threads {results[2]:6.2f} s   "
              f"ratio 2/1 {results[2] / results[1]:.2f}", flush=True)


# -- embedded: the toy model's latency and throughput -----------------------------------------------------


def section_embedded(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from studio import Settings, Studio

    studio = Studio(Settings())

    def timed(**fields):
        def one():
            studio.text_to_image("a red circle on the left", seed=SEED, num_inference_steps=20, **fields)

        def eight():
            studio.text_to_image("a red circle on the left", seed=SEED, num_inference_steps=20, batch_size=8, **fields)

        one(), eight()
        times = alternate({"one": one, "eight": eight}, args.repeats * 3)
        return statistics.median(times["one"]), 8 / statistics.median(times["eight"])

    print(f"\nembedded model, 64x64, 20 steps, torch threads {torch.get_num_threads()}, median of {args.repeats * 3}")
    rows = {
        "uncached": timed(cache_interval=1),
        "defaults (studio.json: cache_interval 2)": timed(),
    }
    started = time.perf_counter()
    studio.models.get(None).pipe.unet.compile(dynamic=False)
    timed(cache_interval=1)
    print(f"  torch.compile of the UNet (both shapes, eager to compiled): {time.perf_counter() - started:.1f} s")
    rows["uncached, torch.compile"] = timed(cache_interval=1)
    for label, (one, per_second) in rows.items():
        print(f"  {label:42s} one image {one:.3f} s   batch 8: {per_second:.1f} images/s", flush=True)
    studio.models.get(None).pipe.unet._compiled_call_impl = None

    pipe = studio.models.get(None).pipe
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(20):
            pipe.unet(sample, torch.tensor(500), encoder_hidden_states=text)
    print("  where one UNet call's time goes (20 calls, batch 2 as with CFG):")
    for line in trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=8).splitlines():
        print("    " + line)


# -- loading: peak RSS of a full-size single file ----------------------------------------------------------

LOAD_SCRIPT = """
import json, sys, time
import torch


def peak_rss() -> int:
    # This process's peak resident set: VmHWM, which (unlike ru_maxrss) is not inherited from the parent at exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


started = time.perf_counter()
if sys.argv[1] == "diffusers":
    from diffusers import StableDiffusionPipeline
    from studio.settings import CONFIGS_DIR
    pipe = StableDiffusionPipeline.from_single_file(sys.argv[2], config=str(CONFIGS_DIR / "sd15"),
        local_files_only=True, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    hashing = None
else:
    from studio import Settings, Studio
    from studio.models import resolve_model_ref, weights_hash
    settings = Settings(model=sys.argv[2])
    hashed = time.perf_counter()
    weights_hash(resolve_model_ref(None, settings), settings.hash_cache)  # what loading does too
    hashing = time.perf_counter() - hashed
    pipe = Studio(settings).models.get(None).pipe
seconds = time.perf_counter() - started
weights = sum(p.numel() * p.element_size() for name in ("unet", "vae", "text_encoder")
              for p in getattr(pipe, name).parameters())
print(json.dumps({"seconds": seconds, "hashing": hashing, "peak": peak_rss(),
                  "weights": weights}))
"""


def build_sd15_single_file(path: Path) -> None:
    """A full-size SD 1.5 checkpoint in the original key layout, fp16, random weights (as downloaded files are)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from safetensors.torch import save_file
    from test_single_file import build_tiny_models, to_single_file

    from studio.settings import CONFIGS_DIR

    models = build_tiny_models("sd15", CONFIGS_DIR)  # the shipped (full-size) configs
    for model in models.values():
        model.to(torch.float16)
    save_file(to_single_file("sd15", models), str(path))


def section_loading(args) -> None:
    folder = args.model_dir or Path(tempfile.mkdtemp())
    path = folder / "sd15-random-fp16.safetensors"
    if not path.is_file():
        print("building a full-size SD 1.5 fp16 single file ...", flush=True)
        build_sd15_single_file(path)
    cache = Path(tempfile.mkdtemp())  # a fresh hash cache: the first studio load hashes, the second does not
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache)}
    print(f"\nloading {path.name} ({path.stat().st_size / 1e9:.2f} GB on disk) in float32 on the CPU, one process each")
    for loader in ("diffusers", "studio", "studio"):
        done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, loader, str(path)], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        name = {"diffusers": "diffusers from_single_file"}.get(loader, "studio")
        hashing = "" if figures["hashing"] is None else f" (of which hashing {figures['hashing']:.2f} s)"
        print(f"  {name:28s} {figures['seconds']:5.1f} s{hashing}   peak RSS {figures['peak'] / 1e9:5.2f} GB = "
              f"{figures['peak'] / figures['weights']:.2f}x the {figures['weights'] / 1e9:.2f} GB of fp32 weights",
              flush=True)


# -- cache: step caching ----------------------------------------------------------------------------------


def section_cache(args) -> None:
    from studio import Settings, Studio

    folder = random_sd15(args.model_dir)
    studio = Studio(Settings(model=str(folder)))
    steps = max(args.steps, 10)  # step caching needs steps to skip

    def run(interval):
        return lambda: studio.text_to_image(PROMPT, width=256, height=256, num_inference_steps=steps, seed=SEED,
                                            cache_interval=interval)

    run(None)()
    times = alternate({"off": run(None), "2": run(2), "3": run(3)}, args.repeats)
    off = statistics.median(times["off"])
    print(f"\nstep caching, SD1.5 architecture, 256x256, {steps} steps, median of {args.repeats}: off {off:.2f} s")
    for interval in ("2", "3"):
        median = statistics.median(times[interval])
        print(f"  cache_interval {interval}: {median:.2f} s, {off / median:.2f}x faster", flush=True)
    print(f"ShapesEval of the embedded model, {args.shapes_prompts} held-out prompts, 20 steps:")
    for interval in (1, 2, 3):
        command = [sys.executable, "-m", "studio.cli", "eval", "--prompts", str(args.shapes_prompts),
                   "--sheet", str(Path(tempfile.gettempdir()) / "speed_shapes.png")]
        command += ["--cache-interval", str(interval)]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        overall = next(line.split()[-1] for line in done.stdout.splitlines() if line.strip().startswith("overall"))
        print(f"  cache_interval {interval if interval > 1 else 'off':>3}: overall {overall}  ({time.perf_counter() - started:.0f} s)",
              flush=True)


# -- ui: cold start -------------------------------------------------------------------------------------


def section_ui(args) -> None:
    from studio.server import free_port

    print("\nUI cold start: `python app.py` until the page answers (the model loads behind it)")
    for attempt in range(args.repeats):
        port = free_port()
        started = time.perf_counter()
        app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            print(f"  run {attempt + 1}: page after {time.perf_counter() - started:.2f} s", flush=True)
        finally:
            app.kill()
            app.wait()


SECTIONS = {"cpu": section_cpu, "openvino": section_openvino, "threads": section_threads, "embedded": section_embedded,
            "loading": section_loading, "cache": section_cache, "ui": section_ui}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides for the cpu section")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (cpu, threads; cache uses at least 10)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median shown)")
    parser.add_argument("--shapes-prompts", type=int, default=200, help="ShapesEval prompts for the cache section")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built models here (reused if present)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model_dir:
        args.model_dir.mkdir(parents=True, exist_ok=True)
    from studio.console import quiet_libraries

    quiet_libraries()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    for name in args.only.split(","):
        SECTIONS[name.strip()](args)


if __name__ == "__main__":
    main()
