"""Time every task of the studio on an SD1.5-architecture model with random weights, on a CUDA GPU in fp16.

The GPU counterpart of benchmarks/tasks_cpu.py (same model build, same requests through `Studio`), at
512x512 with 25 steps, and Imagic at its real defaults: 500 embedding steps, then 1000 fine-tune steps,
for a LoRA and for the full UNet (fine-tuned in float32, ~14 GB for SD1.5), each followed by a second edit
with another eta that reuses the cached training (the time per edit).

    python benchmarks/tasks_gpu.py [--size 512] [--steps 25] [--imagic-embedding-steps 500] ...

Needs CUDA; `--allow-cpu` runs the same script on the CPU in float32 (a dry run of the code, with small
settings, e.g. `--allow-cpu --model path/to/tiny-model --size 64 --steps 2 --imagic-embedding-steps 2
--imagic-finetune-steps 2`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tasks_cpu import benchmark, describe_model, print_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per task (median shown)")
    parser.add_argument("--imagic-embedding-steps", type=int, default=500)
    parser.add_argument("--imagic-finetune-steps", type=int, default=1000)
    parser.add_argument("--no-imagic-full", dest="imagic_full", action="store_false",
                        help="skip the full-UNet fine-tune (time the LoRA only)")
    parser.add_argument("--model-dir", type=Path, default=None, help="keep the built model here (reused if present)")
    parser.add_argument("--model", default=None, help="time this model reference instead of a random SD1.5")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU in float32 when there is no GPU")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device, dtype = "cuda", "float16"
        hardware = f"{torch.cuda.get_device_name(0)}, CUDA float16"
    elif args.allow_cpu:
        device, dtype = "cpu", "float32"
        hardware = "CPU float32 (dry run: no GPU)"
    else:
        sys.exit("no CUDA GPU found; this benchmark is for a GPU machine (benchmarks/tasks_cpu.py is the CPU one, "
                 "or pass --allow-cpu for a dry run)")
    rows, loaded = benchmark(args, device=device, dtype=dtype)
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    print_table(
        f"{describe_model(args)}, {hardware}, {args.size}x{args.size}, {args.steps} steps, CFG 7, "
        f"median of {args.repeats}; model load {loaded:.1f} s (not included){peak}",
        rows,
    )


if __name__ == "__main__":
    main()
