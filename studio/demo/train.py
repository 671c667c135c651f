"""Train the embedded demo model from scratch on the toy world, resumably.

One command runs every stage in order and can be killed (even `kill -9`) and
re-run at any moment; it carries on from the last checkpoint:

    python -m studio.demo.train --out assets/embedded-model --work .train --minutes 170

Stages (each one's result is kept under ``<work>/components/``):

1. ``clip``: a CLIP dual encoder (``CLIPTextModel`` + a small ViT image tower)
   trained contrastively on rendered image/caption pairs (symmetric InfoNCE,
   learned temperature), with one-word-different captions as hard negatives.
2. ``vae``: an ``AutoencoderKL`` with f=4 (64x64x3 <-> 16x16x4); at the end the
   latents of the whole training set are cached and ``scaling_factor`` is set
   to 1/std of those latents.
3. ``unet``: a ``UNet2DConditionModel`` latent diffusion model conditioned on
   the CLIP text encoder's last hidden states, the text encoder fine-tuned with
   it (contrastive training leaves "left" and "right" nearly the same vector) and
   a linear probe that must read from its end-of-text states the layout word, the
   objects in order and which object is at each place (`layout_labels`);
   a zero-terminal-SNR noise schedule (without it the noise, not the words,
   decides where shapes go), v-prediction, min-SNR-5-style loss weighting
   (floored at 1 on noisy steps), warm-up + cosine LR, EMA weights,
   10% caption dropout for classifier-free guidance; optionally (``--slot-loss``,
   ``--slot-grounding``) the last text states become one slot per place, which the UNet's
   8x8 cross-attention is taught to read (`slot_loss`).  Every few minutes it draws
   held-out prompts and scores them with ShapesEval, and exports the folder.
4. ``controlnet``: a ``ControlNetModel`` (initialised from the UNet) trained on
   (sketch, caption) -> image with the UNet and text encoder frozen.

The export is a standard diffusers StableDiffusionPipeline folder (plus
``controlnet/`` and ``clip_image_encoder/`` with its contrastive text tower),
written beside the target and swapped in atomically so readers never see a
half-written model.

Everything is seeded; a stage's initial weights are a function of (seed, stage), its
batches and noise of (seed, stage, step), so a resumed run continues exactly as an
uninterrupted one would.
Exit status: 0 when the requested stages are done, 3 when the time limit (or a
signal) stopped the run early; run the same command again to continue.

This module is the command (its options and the order of the stages); the parts are in
`studio.demo.training`: the networks (architecture), the data and batches (data), the
losses, the one training loop every stage runs (loop), the stages themselves (stages),
the export and the evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# These import torch only inside their functions, so that `main` can set OMP_WAIT_POLICY first.
from studio.demo.training.data import Data, tokenizer_for
from studio.demo.training.evaluation import measure_speed
from studio.demo.training.export import export, seed_from_export
from studio.demo.training.loop import PAUSED, STAGES, Stopper, Work, fmt_secs, log
from studio.demo.training.stages import (
    stage_clip,
    stage_controlnet,
    stage_unet,
    stage_vae,
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="studio train-demo", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", type=Path, default=Path("assets/embedded-model"), help="exported diffusers folder")
    p.add_argument("--work", type=Path, default=Path(".train"), help="checkpoints, caches and logs")
    p.add_argument("--stage", choices=(*STAGES, "all", "export", "speed"), default="all")
    p.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-size", type=int, default=40_000, help="number of pre-rendered training scenes")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--eval-minutes", type=float, default=12.0, help="ShapesEval + export period in the UNet stage")
    p.add_argument("--eval-prompts", type=int, default=50)
    p.add_argument("--final-eval-prompts", type=int, default=200)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--text-lr-scale", type=float, default=0.5, help="text encoder lr / UNet lr in the UNet stage")
    p.add_argument("--unet-steps", type=int, default=None, help="override the UNet stage length")
    p.add_argument("--unet-lr", type=float, default=None, help="override the UNet stage's peak learning rate")
    p.add_argument(
        "--finetune-from",
        type=Path,
        default=None,
        help="start the UNet and ControlNet stages from this export's unet, text_encoder and controlnet",
    )
    p.add_argument(
        "--layout-loss", type=float, default=0.5, help="weight of the layout probe on the text encoder's end-of-text states"
    )
    p.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rescale the noise schedule so that t = 999 is pure noise (training and the exported scheduler)",
    )
    p.add_argument(
        "--slot-loss", type=float, default=0.0, help="weight of the probe that makes the last text states one slot per place"
    )
    p.add_argument(
        "--slot-grounding", type=float, default=0.0, help="weight of the loss that puts each place slot's cross-attention on its object"
    )
    p.add_argument(
        "--cross-attention-lr-scale", type=float, default=1.0, help="the UNet's cross-attention lr / the rest of the UNet's lr"
    )
    p.add_argument("--layout-oversample", type=float, default=2.0, help="sampling weight of captions that assert a layout")
    p.add_argument("--controlnet-steps", type=int, default=None, help="override the ControlNet stage length")
    p.add_argument("--controlnet-lr", type=float, default=None, help="override the ControlNet stage's peak learning rate")
    p.add_argument("--redo", action="store_true", help="run the given stage again even if marked done")
    p.add_argument(
        "--seed-from",
        type=Path,
        default=None,
        help="an exported model whose tokenizer, CLIP and VAE start the work dir (skips those stages)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # With other processes on the same cores, OpenMP's default busy-waiting makes a
    # 2-thread step up to 10x slower; passive waiting costs nothing when the cores are free.
    # (Only effective if torch has not been imported yet.)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Work(args.work)
    if args.stage == "speed":
        print(json.dumps(measure_speed(args.out)))
        return 0
    if args.stage == "export":
        return 0 if export(work, args.out, args.zero_terminal_snr) else 1
    stopper = Stopper(args.minutes)
    if args.seed_from is not None:
        seed_from_export(work, args.seed_from)
    tokenizer = tokenizer_for(work)
    data = Data(work.root, args.train_size, args.seed)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if work.done(stage) and not (args.redo and args.stage == stage):
            log(f"[{stage}] already done ({work.state()[stage]})")
            continue
        if args.redo and work.ckpt(stage).exists() and work.done(stage):
            work.ckpt(stage).unlink()
        t0 = time.monotonic()
        if stage == "clip":
            ok = stage_clip(args, work, data, tokenizer, stopper)
        elif stage == "vae":
            ok = stage_vae(args, work, data, stopper)
        elif stage == "unet":
            ok = stage_unet(args, work, data, tokenizer, stopper)
        else:
            ok = stage_controlnet(args, work, data, tokenizer, stopper)
        log(f"[{stage}] {'finished' if ok else 'paused'} after {fmt_secs(time.monotonic() - t0)} this run")
        if not ok:
            log("stopped early; run the same command again to resume")
            return PAUSED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
