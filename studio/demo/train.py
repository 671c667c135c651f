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

Everything is seeded; batches and noise are functions of (seed, stage, step),
so a resumed run continues exactly as an uninterrupted one would.
Exit status: 0 when the requested stages are done, 3 when the time limit (or a
signal) stopped the run early; run the same command again to continue.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 64
LATENT_SIZE = 16  # f=4 VAE
LATENT_CHANNELS = 4
TEXT_WIDTH = 128
VAE_CROP = 32  # the VAE trains on crops of this side
STAGES = ("clip", "vae", "unet", "controlnet")
PAUSED = 3  # exit status when stopped early; run again to resume


# --------------------------------------------------------------------------- architecture


def text_config(vocab_size: int, bos: int, eos: int, max_length: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=384,
        projection_dim=TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_act="quick_gelu",
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Narrow at full resolution: on 2 CPU cores the 64x64 convolutions dominate the
        # cost of training and of caching 40k latents; flat shapes need little width.
        # Few groups: GroupNorm removes each group's per-image mean, so with one or two
        # channels per group the decoder cannot carry a flat colour (colours drift).
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set to 1/std of the training latents at the end of the VAE stage
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    # Cross-attention at both 16x16 and 8x8 so words can steer *where* things go;
    # two levels keep a 20-step, CFG image well under a second on 2 CPU cores.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=4,  # (number of heads, diffusers' legacy naming)
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,  # >= 8 channels per group, so per-image means (colours) survive the norms
    )


def make_controlnet(unet):
    from diffusers import ControlNetModel

    # Three conditioning-embedding widths = two stride-2 convs: 64x64 sketch -> 16x16.
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


def make_scheduler(zero_terminal_snr: bool):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def train_noise_scheduler(zero_terminal_snr: bool):
    """The training noise schedule; `zero_terminal_snr` makes t = 999 pure noise, as sampling starts.

    Without it t = 999 keeps 7% of the image, and the model learns to read the layout from
    that leftover instead of from the words; at sampling time the noise then decides where
    things go (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


@dataclass
class StageSpec:
    steps: int
    batch: int
    lr: float
    warmup: int


SPECS = {
    "clip": StageSpec(steps=1200, batch=64, lr=5e-4, warmup=100),
    "vae": StageSpec(steps=4000, batch=32, lr=1e-3, warmup=100),
    "unet": StageSpec(steps=6000, batch=32, lr=5e-4, warmup=300),
    "controlnet": StageSpec(steps=1000, batch=32, lr=2e-4, warmup=100),
}


def stage_spec(stage: str, steps: int | None = None, lr: float | None = None) -> StageSpec:
    """SPECS[stage] with the command line's step count and peak learning rate, where given."""
    spec = SPECS[stage]
    if not (steps or lr):
        return spec
    steps = steps or spec.steps
    return StageSpec(steps, spec.batch, lr or spec.lr, min(spec.warmup, steps // 5 + 1))


# --------------------------------------------------------------------------- small utilities


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def lr_at(step: int, spec: StageSpec, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor` x peak at the last step."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = min(1.0, (step - spec.warmup) / max(1, spec.steps - spec.warmup))
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage), step])


def step_generator(seed: int, stage: str, step: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + STAGES.index(stage) * 10_000_019 + step) % 2**63)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_np_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Put folder `tmp` at `target`, replacing what is there without a moment of absence where possible."""
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now holds the old folder
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def save_component(model, folder: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, folder)


class Stopper:
    """Wall-clock limit plus SIGTERM/SIGINT: the loops ask `should_stop()` between steps."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner)
                pass

    def _handle(self, signum, frame):
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        log(f"signal {signum}: saving a checkpoint and stopping")

    def should_stop(self) -> bool:
        return self.signalled or (self.deadline is not None and time.monotonic() >= self.deadline)


class Every:
    def __init__(self, minutes: float):
        self.period = 60 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last >= self.period:
            self.last = time.monotonic()
            return True
        return False


class Progress:
    def __init__(self, stage: str, start: int, total: int, every: int = 25):
        self.stage, self.start, self.total, self.every = stage, start, total, every
        self.t0 = time.monotonic()
        self.losses: list[float] = []

    def update(self, step: int, loss: float, lr: float, extra: str = "") -> None:
        self.losses.append(loss)
        done = step + 1 - self.start
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            dt = (time.monotonic() - self.t0) / max(done, 1)
            mean = sum(self.losses) / len(self.losses)
            self.losses = []
            log(
                f"[{self.stage}] step {step + 1}/{self.total} loss {mean:.4f} lr {lr:.2e} "
                f"{dt:.2f} s/it ETA {fmt_secs(dt * (self.total - step - 1))}{extra}"
            )


# --------------------------------------------------------------------------- data


class Data:
    """The pre-rendered training set (uint8 arrays, cached in the work dir) and held-out scenes."""

    def __init__(self, work: Path, n: int, seed: int):
        from studio.demo import world

        self.world = world
        folder = work / "data" / f"train-{n}-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        images_f, sketches_f, captions_f = folder / "images.npy", folder / "sketches.npy", folder / "captions.json"
        if not (images_f.exists() and sketches_f.exists() and captions_f.exists()):
            t0 = time.monotonic()
            log(f"rendering {n} training scenes (seed {seed}) ...")
            scenes = world.training_scenes(n, seed)
            images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            sketches = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            for i, scene in enumerate(scenes):
                images[i] = np.asarray(world.render(scene, IMAGE_SIZE).convert("RGB"))
                sketches[i] = np.asarray(world.render_sketch(scene, IMAGE_SIZE).convert("L"))
                if (i + 1) % 10000 == 0:
                    log(f"  rendered {i + 1}/{n}")
            atomic_np_save(images_f, images)
            atomic_np_save(sketches_f, sketches)
            atomic_write_text(captions_f, json.dumps([s.caption for s in scenes]))
            log(f"rendered in {time.monotonic() - t0:.0f}s -> {folder}")
        self.folder = folder
        self.images = np.load(images_f)
        self.sketches = np.load(sketches_f)
        self.captions: list[str] = json.loads(captions_f.read_text(encoding="utf-8"))
        self.n = len(self.captions)
        self._neighbours = None

    def neighbours(self) -> list[np.ndarray]:
        """For each training item, the items whose caption differs in exactly one word (hard negatives)."""
        if self._neighbours is None:
            groups: dict[tuple, list[int]] = {}
            for i, cap in enumerate(self.captions):
                words = cap.lower().split()
                for j in range(len(words)):
                    groups.setdefault(tuple(words[:j] + ["\0"] + words[j + 1 :]), []).append(i)
            by_caption: dict[str, set] = {}
            for members in groups.values():
                caps = {self.captions[m] for m in members}
                if len(caps) < 2:
                    continue
                for m in members:
                    by_caption.setdefault(self.captions[m], set()).update(members)
            out = []
            for i, cap in enumerate(self.captions):
                cand = by_caption.get(cap, ())
                out.append(np.fromiter((m for m in cand if self.captions[m] != cap), dtype=np.int64))
            self._neighbours = out
        return self._neighbours

    def eval_scenes(self, n: int):
        return self.world.eval_scenes(n)

    def slot_masks(self) -> np.ndarray:
        """For `slot_grounding_loss`: (n, len(POSITIONS), LATENT_SIZE, LATENT_SIZE) uint8, per place the
        share of each latent pixel covered by the object the caption puts there (x255), zero where
        it puts none. Rendered from the scenes once and cached beside the images."""
        path = self.folder / "slot_masks.npy"
        if not path.exists():
            n, seed = (int(part) for part in self.folder.name.split("-")[1:])
            scenes = self.world.training_scenes(n, seed)
            if [scene.caption for scene in scenes] != self.captions:
                raise RuntimeError(f"{self.folder}: the cached captions are not those of training_scenes({n}, {seed})")
            masks = np.zeros((n, len(self.world.POSITIONS), LATENT_SIZE, LATENT_SIZE), np.uint8)
            pool = IMAGE_SIZE // LATENT_SIZE
            for i, scene in enumerate(scenes):
                object_masks = self.world.render_masks(scene, IMAGE_SIZE)
                for place, j in self.world.claimed_places(scene.claims).items():
                    coverage = object_masks[j].reshape(LATENT_SIZE, pool, LATENT_SIZE, pool).mean(axis=(1, 3))
                    masks[i, self.world.POSITIONS.index(place)] = np.round(coverage * 255)
            atomic_np_save(path, masks)
        return np.load(path)


def images_to_tensor(batch_u8: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch_u8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def sketches_to_tensor(batch_u8: np.ndarray):
    """uint8 NHW grey sketches -> float N3HW in [0, 1] (what the ControlNet pipeline feeds)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch_u8)).float() / 255.0
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------- state and checkpoints


class Work:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_f = root / "state.json"

    def state(self) -> dict:
        if self.state_f.exists():
            return json.loads(self.state_f.read_text(encoding="utf-8"))
        return {}

    def mark(self, stage: str, **info) -> None:
        state = self.state()
        state[stage] = {"done": True, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_text(self.state_f, json.dumps(state, indent=2) + "\n")

    def done(self, stage: str) -> bool:
        return bool(self.state().get(stage, {}).get("done"))

    def ckpt(self, stage: str) -> Path:
        return self.root / stage / "checkpoint.pt"

    def component(self, name: str) -> Path:
        return self.root / "components" / name

    def history(self, stage: str) -> Path:
        return self.root / stage / "evals.jsonl"

    def append_history(self, stage: str, record: dict) -> None:
        f = self.history(stage)
        f.parent.mkdir(parents=True, exist_ok=True)
        with open(f, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def seed_from_export(work: Work, model_dir: Path) -> None:
    """Start a work dir from an exported model's tokenizer, contrastive CLIP and VAE (clip and vae marked done).

    Retraining the UNet (and ControlNet) then skips the first two stages; the export's
    training.json carries their original records.
    """
    model_dir = Path(model_dir)
    contrastive_text = model_dir / "clip_image_encoder" / "text_encoder"
    if not contrastive_text.exists():
        raise ValueError(f"{model_dir} has no clip_image_encoder/text_encoder: not an export of this script")
    for name, src in (("tokenizer", model_dir / "tokenizer"), ("vae", model_dir / "vae"), ("text_encoder", contrastive_text)):
        if not work.component(name).exists():
            shutil.copytree(src, work.component(name))
    if not work.component("clip_image_encoder").exists():
        shutil.copytree(model_dir / "clip_image_encoder", work.component("clip_image_encoder"), ignore=shutil.ignore_patterns("text_encoder"))
    records = json.loads((model_dir / "training.json").read_text(encoding="utf-8")).get("state", {})
    for stage in ("clip", "vae"):
        if not work.done(stage):
            info = {k: v for k, v in records.get(stage, {}).items() if k not in ("done", "time")}
            work.mark(stage, **{**info, "seeded_from": str(model_dir)})
    log(f"work dir {work.root} seeded with the tokenizer, CLIP and VAE of {model_dir}")


def load_ckpt(path: Path):
    import torch

    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn file cannot happen with atomic saves, but never die on one
        log(f"could not read {path} ({exc}); starting the stage over")
        return None


class Checkpoint:
    """A stage's resumable state: named parts (anything with state_dict/load_state_dict) and the step."""

    def __init__(self, work: Work, stage: str, **parts):
        self.path, self.stage, self.parts = work.ckpt(stage), stage, parts

    def resume(self) -> int:
        """Load every part from the checkpoint, if there is one; the step to continue from."""
        ck = load_ckpt(self.path)
        if not ck:
            return 0
        for name, part in self.parts.items():
            part.load_state_dict(ck[name])
        log(f"[{self.stage}] resuming at step {ck['step']}")
        return ck["step"]

    def save(self, step: int) -> None:
        atomic_torch_save({**{name: part.state_dict() for name, part in self.parts.items()}, "step": step}, self.path)


def optimiser_step(loss, lr: float, *trained: tuple) -> None:
    """Backward, then for each (parameters, optimiser, lr scale): clip the gradient to norm 1, step at lr x scale
    (x a parameter group's own "lr_scale", where it has one)."""
    import torch

    for _, opt, _ in trained:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for params, opt, scale in trained:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * scale * group.get("lr_scale", 1.0)
        opt.step()


def tokenizer_for(work: Work):
    from studio.demo import tokenizer as tok_mod

    folder = work.component("tokenizer")
    if not (folder / "vocab.json").exists():
        tmp = folder.with_name(".tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok_mod.write_tokenizer(tmp)
        replace_dir(tmp, folder)
    return tok_mod.load_tokenizer(folder)


def tokenize(tokenizer, captions: list[str], padding: str = "max_length"):
    """Token ids as the pipeline makes them (padded to model_max_length with <|endoftext|>).

    padding="longest" is for the CLIP stage, which only reads the pooled (first EOS) output;
    the causal mask makes that output identical whatever the padding.
    """
    return tokenizer(
        captions, padding=padding, max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# --------------------------------------------------------------------------- stage 1: CLIP


def make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tcfg = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length)
    cfg = CLIPConfig(text_config=tcfg.to_dict(), vision_config=vision_config().to_dict(), projection_dim=TEXT_WIDTH)
    return CLIPModel(cfg)


def clip_batch(data: Data, rng: np.random.Generator, batch: int) -> np.ndarray:
    """Half random anchors, half one-word-different neighbours of them (hard negatives)."""
    neighbours = data.neighbours()
    anchors = rng.integers(0, data.n, batch // 2)
    partners = []
    for a in anchors:
        nb = neighbours[a]
        partners.append(nb[rng.integers(0, len(nb))] if len(nb) else rng.integers(0, data.n))
    return np.concatenate([anchors, np.asarray(partners, dtype=np.int64)])


def clip_loss(model, pixel_values, input_ids, captions: list[str]):
    import torch
    import torch.nn.functional as F

    out = model(input_ids=input_ids, pixel_values=pixel_values, return_dict=True)
    logits = out.logits_per_image  # [B, B], already scaled by exp(logit_scale)
    same = np.asarray(captions)[:, None] == np.asarray(captions)[None, :]
    target = torch.from_numpy(same.astype(np.float32))
    target = target / target.sum(1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True)))
    return loss


def clip_eval(model, tokenizer, data: Data, n: int = 200) -> dict:
    """Image->text retrieval on held-out scenes, among all their captions and among hard negatives."""
    import torch

    scenes = data.eval_scenes(n)
    images = np.stack([np.asarray(data.world.render(s, IMAGE_SIZE).convert("RGB")) for s in scenes])
    captions = [s.caption for s in scenes]
    model.eval()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=images_to_tensor(images))
        txt = model.get_text_features(input_ids=tokenize(tokenizer, captions, "longest"))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        sim = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).t()
    model.train()
    best = sim.argmax(1).numpy()
    top1 = float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))
    return {"retrieval_top1": round(top1, 4)}


def stage_clip(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch

    spec = SPECS["clip"]
    model = make_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    ckpt = Checkpoint(work, "clip", model=model, opt=opt)
    start = ckpt.resume()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[clip] CLIPModel {n_params / 1e6:.2f}M params; {spec.steps} steps of {spec.batch}")
    model.train()
    ckpt_timer, prog = Every(args.ckpt_minutes), Progress("clip", start, spec.steps, every=25)

    for step in range(start, spec.steps):
        if stopper.should_stop():
            ckpt.save(step)
            return False
        rng = step_rng(args.seed, "clip", step)
        idx = clip_batch(data, rng, spec.batch)
        caps = [data.captions[i] for i in idx]
        lr = lr_at(step, spec)
        loss = clip_loss(model, images_to_tensor(data.images[idx]), tokenize(tokenizer, caps, "longest"), caps)
        optimiser_step(loss, lr, (model.parameters(), opt, 1.0))
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        prog.update(step, loss.item(), lr, f" T {1 / model.logit_scale.exp().item():.3f}")
        if (step + 1) % 500 == 0 or step + 1 == spec.steps:
            metrics = clip_eval(model, tokenizer, data)
            log(f"[clip] eval step {step + 1}: {metrics}")
            work.append_history("clip", {"step": step + 1, **metrics})
        if ckpt_timer.due():
            ckpt.save(step + 1)
    ckpt.save(spec.steps)
    export_clip(model, work)
    metrics = clip_eval(model, tokenizer, data)
    work.mark("clip", steps=spec.steps, **metrics)
    log(f"[clip] done: {metrics}")
    return True


def save_text_encoder(text, folder: Path) -> None:
    """save_pretrained, with the weights under "text_model." as in every released SD checkpoint.

    transformers 5 saves CLIPTextModel without that prefix; older transformers and the
    single-file converters expect it, and transformers 5 loads both spellings.
    """
    from safetensors.torch import load_file, save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    text.save_pretrained(tmp, safe_serialization=True)
    weights = tmp / "model.safetensors"
    state = load_file(str(weights))
    state = {k if k.startswith("text_model.") else "text_model." + k: v.contiguous() for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    replace_dir(tmp, folder)


def export_clip(model, work: Work) -> None:
    """text_encoder (CLIPTextModel) and clip_image_encoder (CLIPVisionModelWithProjection + text projection)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text = CLIPTextModel(model.config.text_config)
    inner = getattr(text, "text_model", text)  # transformers 5 flattened CLIPTextModel
    inner.load_state_dict(model.text_model.state_dict())
    save_text_encoder(text, work.component("text_encoder"))

    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    folder = work.component("clip_image_encoder")
    tmp = folder.with_name(".clip_image_encoder.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vision.save_pretrained(tmp, safe_serialization=True)
    save_file(
        {
            "text_projection.weight": model.text_projection.weight.detach().contiguous(),
            "logit_scale": model.logit_scale.detach().reshape(1).contiguous(),
        },
        str(tmp / "text_projection.safetensors"),
    )
    # Standard CLIP preprocessing for 64x64 inputs scaled to [-1, 1].
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "resample": 3,
    }
    (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    replace_dir(tmp, folder)


# --------------------------------------------------------------------------- CLIP score helper


def clip_scores(model_dir: str | Path, images, prompts: list[str]) -> list[float]:
    """Cosine similarity (x100, as in CLIPScore) of each image with its prompt, using the embedded CLIP."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model_dir = Path(model_dir)
    tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    contrastive = model_dir / "clip_image_encoder" / "text_encoder"
    text = CLIPTextModel.from_pretrained(str(contrastive if contrastive.is_dir() else model_dir / "text_encoder")).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(str(model_dir / "clip_image_encoder")).eval()
    proj = load_file(str(model_dir / "clip_image_encoder" / "text_projection.safetensors"))["text_projection.weight"]
    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for im in images])
    with torch.no_grad():
        img = vision(pixel_values=images_to_tensor(arr)).image_embeds
        pooled = text(input_ids=tokenize(tok, list(prompts))).pooler_output
        txt = pooled @ proj.t()
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
    return [float(100 * max(0.0, s)) for s in (img * txt).sum(-1)]


# --------------------------------------------------------------------------- stage 2: VAE


def vae_loss(vae, x, gen, kl_weight: float = 1e-6):
    import torch
    import torch.nn.functional as F

    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    kl = posterior.kl().mean() / (x.shape[1] * x.shape[2] * x.shape[3])
    return l1 + mse + kl_weight * kl * 1000, mse


def vae_eval(vae, data: Data, n: int = 200) -> dict:
    import torch

    scenes = data.eval_scenes(n)
    images = np.stack([np.asarray(data.world.render(s, IMAGE_SIZE).convert("RGB")) for s in scenes])
    vae.eval()
    with torch.no_grad():
        x = images_to_tensor(images)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    vae.train()
    mse = ((rec - x) / 2).pow(2).mean().item()
    out = {"psnr": round(10 * math.log10(1 / max(mse, 1e-10)), 2)}
    recs = to_pil((rec + 1) / 2)
    shapes = shapes_eval(recs, scenes)
    if shapes:
        out["shapes_eval_recon"] = shapes
    return out


def stage_vae(args, work: Work, data: Data, stopper: Stopper) -> bool:
    import torch

    spec = SPECS["vae"]
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    ckpt = Checkpoint(work, "vae", model=vae, opt=opt)
    start = ckpt.resume()
    log(f"[vae] AutoencoderKL {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params; {spec.steps} steps of {spec.batch}")
    vae.train()
    ckpt_timer, prog = Every(args.ckpt_minutes), Progress("vae", start, spec.steps, every=25)

    for step in range(start, spec.steps):
        if stopper.should_stop():
            ckpt.save(step)
            return False
        rng = step_rng(args.seed, "vae", step)
        idx = rng.integers(0, data.n, spec.batch)
        lr = lr_at(step, spec)
        # The VAE is fully convolutional: train on 32x32 crops (4x cheaper), aligned to the latent grid.
        ys, xs = rng.integers(0, (IMAGE_SIZE - VAE_CROP) // 4 + 1, (2, spec.batch)) * 4
        crops = np.stack([data.images[i, y : y + VAE_CROP, x : x + VAE_CROP] for i, y, x in zip(idx, ys, xs)])
        loss, mse = vae_loss(vae, images_to_tensor(crops), step_generator(args.seed, "vae", step))
        optimiser_step(loss, lr, (vae.parameters(), opt, 1.0))
        prog.update(step, loss.item(), lr)
        if (step + 1) % 500 == 0:
            metrics = vae_eval(vae, data, 100)
            log(f"[vae] eval step {step + 1}: {metrics}")
            work.append_history("vae", {"step": step + 1, **metrics})
        if ckpt_timer.due():
            ckpt.save(step + 1)
    ckpt.save(spec.steps)
    # Cache the latent distribution of every training image, and set scaling_factor = 1/std.
    stats = cache_latents(vae, data, work)
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    save_component(vae, work.component("vae"))
    metrics = vae_eval(vae, data)
    work.mark("vae", steps=spec.steps, **stats, **metrics)
    log(f"[vae] done: {stats} {metrics}")
    return True


def cache_latents(vae, data: Data, work: Work) -> dict:
    import torch

    t0 = time.monotonic()
    means = np.empty((data.n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), np.float16)
    stds = np.empty_like(means)
    vae.eval()
    gen = torch.Generator().manual_seed(0)
    sq, s, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, data.n, 256):
            post = vae.encode(images_to_tensor(data.images[i : i + 256])).latent_dist
            means[i : i + 256] = post.mean.numpy()
            stds[i : i + 256] = post.std.numpy()
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
            s += z.sum().item()
            sq += z.pow(2).sum().item()
            count += z.numel()
    vae.train()
    mean = s / count
    std = math.sqrt(sq / count - mean**2)
    folder = work.root / "latents"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_np_save(folder / "mean.npy", means)
    atomic_np_save(folder / "std.npy", stds)
    stats = {"latent_mean": round(mean, 4), "latent_std": round(std, 4), "scaling_factor": round(1 / std, 5)}
    atomic_write_text(folder / "info.json", json.dumps({"data": str(data.folder), **stats}, indent=2))
    log(f"[vae] cached {data.n} latents in {time.monotonic() - t0:.0f}s: {stats}")
    return stats


def load_latents(work: Work, data: Data, vae) -> tuple[np.ndarray, np.ndarray]:
    folder = work.root / "latents"
    info_f = folder / "info.json"
    if not info_f.exists() or json.loads(info_f.read_text()).get("data") != str(data.folder):
        cache_latents(vae, data, work)
    return np.load(folder / "mean.npy"), np.load(folder / "std.npy")


# --------------------------------------------------------------------------- evaluation with the real pipeline


def to_pil(x):
    """float NCHW in [0, 1] -> list of PIL images."""
    from PIL import Image

    arr = (x.detach().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def shapes_eval(images, scenes) -> dict | None:
    try:
        from studio.demo import shapes_eval as se
    except ImportError:
        return None
    res = se.evaluate(images, scenes)
    return {k: round(float(v), 3) for k, v in res.items()}


def pipeline_text_encoder(work: Work) -> Path:
    """The text encoder the UNet is conditioned on: the one fine-tuned with it, else the contrastive one."""
    tuned = work.component("text_encoder_tuned")
    return tuned if tuned.exists() else work.component("text_encoder")


def build_pipeline(work: Work, unet, tokenizer, zero_terminal_snr: bool, controlnet=None, text=None):
    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(str(work.component("vae"))).eval()
    if text is None:
        text = CLIPTextModel.from_pretrained(str(pipeline_text_encoder(work))).eval()
    common = dict(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(zero_terminal_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if controlnet is not None:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
    else:
        pipe = StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, scenes, seed: int, guidance: float, steps: int = 20, batch: int = 25, sketches=None):
    import torch

    images = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        kwargs = {}
        if sketches is not None:
            kwargs["image"] = sketches[i : i + batch]
        with torch.no_grad():
            out = pipe(
                [s.caption for s in chunk],
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                **kwargs,
            )
        images += out.images
    return images


def evaluate_model(pipe, data: Data, n: int, seed: int, guidance: float, controlled: bool = False) -> dict:
    scenes = data.eval_scenes(max(n, 1))[:n]
    sketches = [data.world.render_sketch(s, IMAGE_SIZE).convert("RGB") for s in scenes] if controlled else None
    t0 = time.monotonic()
    images = generate(pipe, scenes, seed, guidance, sketches=sketches)
    res = shapes_eval(images, scenes) or {}
    res["n"] = n
    res["gen_s"] = round(time.monotonic() - t0, 1)
    return res


# --------------------------------------------------------------------------- export


PIPELINE_COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


def export(work: Work, out: Path, zero_terminal_snr: bool) -> bool:
    """Assemble <work>/components into a StableDiffusionPipeline folder at `out`, atomically."""
    comps = {name: work.component(name) for name in ("tokenizer", "text_encoder", "vae", "unet", "controlnet", "clip_image_encoder")}
    if not all(comps[name].exists() for name in ("tokenizer", "text_encoder", "vae", "unet")):
        log("export skipped: not every pipeline component is trained yet")
        return False
    from diffusers import __version__ as diffusers_version

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.mkdir()
    for name, src in comps.items():
        if src.exists():
            shutil.copytree(src, tmp / name)
    if work.component("text_encoder_tuned").exists():
        # The pipeline gets the text encoder fine-tuned with the UNet; CLIP scores need the
        # contrastive tower that was trained against the image encoder, so it goes beside it.
        shutil.move(tmp / "text_encoder", tmp / "clip_image_encoder" / "text_encoder")
        shutil.copytree(work.component("text_encoder_tuned"), tmp / "text_encoder")
    make_scheduler(zero_terminal_snr).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info = {"state": work.state(), "exported": time.strftime("%Y-%m-%dT%H:%M:%S")}
    unet_info = work.component("unet") / "training.json"
    if unet_info.exists():
        info["unet"] = json.loads(unet_info.read_text())
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    replace_dir(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log(f"exported {out} ({size / 1e6:.1f} MB of weights)")
    return True


# --------------------------------------------------------------------------- stage 3: UNet


class EMA:
    def __init__(self, model, decay: float = 0.999):
        import copy

        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    def update(self, model, step: int) -> None:
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.model.parameters(), model.parameters()):
                e.lerp_(p.detach(), 1 - d)


def diffusion_loss(model_out, target, snr, gamma: float = 5.0):
    """v-prediction MSE, weighted w = min(snr + 1, gamma + 1) / (snr + 1).

    In x0 terms the weight is min(snr + 1, gamma + 1): min-SNR's cap on the nearly clean
    timesteps, but never below 1 at the noisy ones, where the layout is decided. Plain
    min-SNR for v-prediction (min(snr, gamma) / (snr + 1), as in diffusers' scripts) weighs
    t ~ 999 by snr ~ 0.005, and the model then ignored "left" and "right".
    """
    import torch

    w = torch.clamp(snr + 1, max=gamma + 1) / (snr + 1)
    per = (model_out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return (per * w).mean()


PLACE_COLUMNS = 5  # `layout_labels`' first column of the (colour, shape) pairs at each place


def probe_classes() -> tuple[int, ...]:
    """Classes of each column of `layout_labels`."""
    from studio.demo import world

    colors, shapes = 1 + len(world.COLORS), 1 + len(world.SHAPES)
    layout = 1 + len(world.POSITIONS) + len(world.RELATIONS)
    return (layout, colors, shapes, colors, shapes) + (colors, shapes) * len(world.POSITIONS)


def layout_labels(captions: list[str]) -> np.ndarray:
    """Per caption, what the layout probe must read from its end-of-text states; 0 means "none".

    Columns: the layout (0 none, then each of world.POSITIONS, then each of world.RELATIONS);
    colour and shape (1 + index in world.COLORS / world.SHAPES) of the first and of the
    second object named; then for each of world.POSITIONS, the colour and shape of the
    object there: "a blue square above a yellow triangle" puts the square at the top and the
    triangle at the bottom, "a yellow triangle below a blue square" too. The UNet reads the
    text through linear keys and values, so this is the form it can use: what is on the left,
    not "the subject, and a relation that says where the subject goes".
    """
    from studio.demo import world

    colors, shapes = list(world.COLORS), list(world.SHAPES)
    labels = np.zeros((len(captions), len(probe_classes())), np.int64)

    def describe(i, column, obj):
        labels[i, column] = 1 + colors.index(obj["color"]) if obj.get("color") else 0
        labels[i, column + 1] = 1 + shapes.index(obj["shape"]) if obj.get("shape") else 0

    for i, caption in enumerate(captions):
        claims = world.parse_claims(caption)
        objects, relation = claims["objects"], claims["relation"]
        if relation:
            labels[i, 0] = 1 + len(world.POSITIONS) + world.RELATIONS.index(relation["relation"])
        elif objects[0].get("position"):
            labels[i, 0] = 1 + world.POSITIONS.index(objects[0]["position"])
        for j, obj in enumerate(objects[:2]):
            describe(i, 1 + 2 * j, obj)
        for position, j in world.claimed_places(claims).items():
            describe(i, PLACE_COLUMNS + 2 * world.POSITIONS.index(position), objects[j])
    return labels


def make_layout_head():
    """The linear probe of `layout_loss`: text width -> the logits of every `layout_labels` column."""
    import torch

    return torch.nn.Linear(TEXT_WIDTH, sum(probe_classes()))


def layout_loss(head, hidden, input_ids, eos_id: int, labels):
    """Cross-entropy of a linear probe reading the caption's layout and objects, in order, from the end-of-text states.

    The UNet's cross-attention puts most of its weight on the end-of-text (padding) states
    and almost none on the position word itself, and contrastive CLIP training leaves
    position out of those states; this pushes it in, where the UNet already looks, with the
    objects in order and the object at each place (a bag of words cannot say which object
    of a relation goes where).
    """
    import torch

    after_eos = torch.cumsum(input_ids == eos_id, dim=1) > 0
    pooled = (hidden * after_eos[..., None]).sum(1) / after_eos.sum(1, keepdim=True)
    logits = head(pooled).split(probe_classes(), dim=1)
    losses = [torch.nn.functional.cross_entropy(column, labels[:, k]) for k, column in enumerate(logits)]
    return torch.stack(losses).mean()


def make_slot_head():
    """The linear probe of `slot_loss`: a slot's state -> which place it is, and its object's colour and shape."""
    import torch

    from studio.demo import world

    return torch.nn.Linear(TEXT_WIDTH, len(world.POSITIONS) + 1 + len(world.COLORS) + 1 + len(world.SHAPES))


def slot_loss(head, hidden, labels):
    """Cross-entropy of a probe reading, from the last len(POSITIONS) text states, one place each.

    The causal text encoder cannot tell "blue square" in "a blue square above a yellow
    triangle" that it goes on top, and the UNet's cross-attention, which mixes token values,
    then bound relations by a coin flip (x0 at t = 999 was the same for "A above B" and
    "A below B"). The padding states at the end have read the whole caption: here each one
    becomes the slot of one place (left, right, top, bottom, center) that names which place it
    is, so the UNet can find it by a fixed key, and which object is there (its value). Only
    slots whose place holds an object are asked for it: asking the others for "nothing" taught
    the UNet, which reads the slots, to draw nothing for "a red circle and a blue square".
    labels: `layout_labels`; from PLACE_COLUMNS on, the colour and shape at each place.
    """
    import torch
    import torch.nn.functional as F

    from studio.demo import world

    places = len(world.POSITIONS)
    logits = head(hidden[:, -places:]).flatten(0, 1)  # (batch x places, classes)
    place, color, shape = logits.split((places, 1 + len(world.COLORS), 1 + len(world.SHAPES)), dim=-1)
    loss = F.cross_entropy(place, torch.arange(places).repeat(len(hidden)))
    color_there = labels[:, PLACE_COLUMNS::2].flatten()
    shape_there = labels[:, PLACE_COLUMNS + 1 :: 2].flatten()
    held = color_there > 0
    if held.any():
        loss = loss + F.cross_entropy(color[held], color_there[held])
        loss = loss + F.cross_entropy(shape[held], shape_there[held])
    return loss / 3


class CrossAttentionMaps:
    """Cross-attention that also keeps its attention probabilities (mean over heads) in `maps`.

    For `slot_grounding_loss` (training only); self-attention goes through diffusers' default
    processor unchanged.
    """

    def __init__(self, maps: list):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.maps, self.self_attention = maps, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        import torch

        if encoder_hidden_states is None:
            return self.self_attention(attn, hidden_states, attention_mask=attention_mask)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.maps.append(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))

    @classmethod
    def install(cls, unet, maps: list) -> None:
        """Route every cross-attention layer of `unet` through one recorder appending to `maps`."""
        unet.set_attn_processor(
            {
                name: cls(maps) if name.endswith("attn2.processor") else processor
                for name, processor in unet.attn_processors.items()
            }
        )


def slot_grounding_loss(maps: list, masks):
    """TokenCompose's token loss on the place slots: each slot's attention should fall on its object.

    For the 8x8 cross-attention layers (at 16x16 the down path knows too little of where it is
    when the input is pure noise: a linear probe reads x, y from it with R^2 0.17, from the
    8x8 features with 0.8), the share of a slot's attention inside the mask of the object at
    its place; the loss is the mean of (1 - share)^2 over the slots that hold an object.
    maps: (batch, pixels, tokens) per layer; masks: (batch, places, LATENT_SIZE, LATENT_SIZE) in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    held = masks.flatten(2).sum(-1) > 0
    losses = []
    for probs in maps:
        side = math.isqrt(probs.shape[1])
        if side != LATENT_SIZE // 2 or not held.any():
            continue
        place_masks = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (batch, places, pixels)
        attention = probs[:, :, -masks.shape[1] :].transpose(1, 2)  # (batch, places, pixels)
        share = (attention * place_masks).sum(-1) / attention.sum(-1).clamp_min(1e-8)
        losses.append((1 - share[held]).pow(2).mean())
    return torch.stack(losses).mean() if losses else torch.zeros(())


class LatentBatcher:
    def __init__(self, args, data: Data, tokenizer, text_encoder, means, stds, scaling: float, stage: str):
        self.args, self.data, self.tok, self.text = args, data, tokenizer, text_encoder
        self.means, self.stds, self.scaling, self.stage = means, stds, scaling, stage
        self.sched = train_noise_scheduler(args.zero_terminal_snr)
        ac = self.sched.alphas_cumprod
        self.snr = ac / (1 - ac)
        self.labels = layout_labels(data.captions)
        self.weights = None
        if args.layout_oversample != 1.0:
            w = np.where(self.labels[:, 0] > 0, args.layout_oversample, 1.0)
            self.weights = w / w.sum()

    def __call__(self, step: int, batch: int):
        import torch

        rng = step_rng(self.args.seed, self.stage, step)
        gen = step_generator(self.args.seed, self.stage, step)
        if self.weights is None:
            idx = rng.integers(0, self.data.n, batch)
        else:
            idx = rng.choice(self.data.n, batch, p=self.weights)
        mean = torch.from_numpy(self.means[idx].astype(np.float32))
        std = torch.from_numpy(self.stds[idx].astype(np.float32))
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        captions = [self.data.captions[i] for i in idx]
        drop = rng.random(batch) < self.args.cfg_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop)]
        ids = tokenize(self.tok, captions)
        with torch.set_grad_enabled(self.text.training):  # the UNet stage may fine-tune the text encoder
            emb = self.text(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = self.sched.add_noise(latents, noise, t)
        target = self.sched.get_velocity(latents, noise, t)
        labels = torch.from_numpy(np.where(drop[:, None], 0, self.labels[idx]))
        return idx, noisy, t, emb, target, self.snr[t], ids, labels


def load_frozen(work: Work):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(str(pipeline_text_encoder(work))).eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(work.component("vae"))).eval().requires_grad_(False)
    return text, vae


def stage_unet(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    spec = stage_spec("unet", args.unet_steps, args.unet_lr)
    _, vae = load_frozen(work)
    means, stds = load_latents(work, data, vae)
    # The contrastive text encoder barely tells "left" from "right" (a matching caption
    # needs little position), so it is fine-tuned with the UNet, with its own optimiser and EMA.
    if args.finetune_from:
        unet = UNet2DConditionModel.from_pretrained(str(args.finetune_from / "unet"))
        text = CLIPTextModel.from_pretrained(str(args.finetune_from / "text_encoder"))
    else:
        unet = make_unet()
        text = CLIPTextModel.from_pretrained(str(work.component("text_encoder")))
    text.requires_grad_(True).train()
    ema, text_ema = EMA(unet, args.ema_decay), EMA(text, args.ema_decay)
    layout_head, slot_head = make_layout_head(), make_slot_head()
    cross_attention = [p for name, p in unet.named_parameters() if ".attn2." in name]
    rest = [p for name, p in unet.named_parameters() if ".attn2." not in name]
    opt = torch.optim.AdamW(
        [{"params": rest}, {"params": cross_attention, "lr_scale": args.cross_attention_lr_scale}], lr=spec.lr, weight_decay=0.01
    )
    text_params = [*text.parameters(), *layout_head.parameters(), *slot_head.parameters()]
    text_opt = torch.optim.AdamW(text_params, lr=spec.lr * args.text_lr_scale, weight_decay=0.01)
    ckpt = Checkpoint(
        work, "unet", model=unet, ema=ema.model, opt=opt, text=text, text_ema=text_ema.model, text_opt=text_opt,
        layout_head=layout_head, slot_head=slot_head,
    )
    attention_maps: list = []
    if args.slot_loss or args.slot_grounding:
        longest = max(map(len, tokenizer(data.captions).input_ids))
        if longest > tokenizer.model_max_length - len(data.world.POSITIONS):
            raise ValueError(f"captions of up to {longest} tokens leave no room for the place slots")
    if args.slot_grounding:
        slot_masks = data.slot_masks()
        CrossAttentionMaps.install(unet, attention_maps)
    start = ckpt.resume()
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"[unet] UNet2DConditionModel {n_params / 1e6:.2f}M params; {spec.steps} steps of {spec.batch}")
    unet.train()
    batcher = LatentBatcher(args, data, tokenizer, text, means, stds, vae.config.scaling_factor, "unet")
    ckpt_timer, eval_timer = Every(args.ckpt_minutes), Every(args.eval_minutes)
    prog = Progress("unet", start, spec.steps, every=25)

    def evaluate_and_export(step, n):
        save_component(ema.model, work.component("unet"))
        save_component(text_ema.model, work.component("text_encoder_tuned"))
        atomic_write_text(work.component("unet") / "training.json", json.dumps({"step": step, "of": spec.steps}))
        pipe = build_pipeline(work, ema.model, tokenizer, args.zero_terminal_snr, text=text_ema.model)
        res = evaluate_model(pipe, data, n, args.seed, args.guidance)
        res.update(step=step, guidance=args.guidance, time=time.strftime("%H:%M:%S"))
        log(f"[unet] ShapesEval step {step} (EMA, {n} held-out prompts, cfg {args.guidance}): {res}")
        work.append_history("unet", res)
        export(work, args.out, args.zero_terminal_snr)
        return res

    for step in range(start, spec.steps):
        if stopper.should_stop():
            ckpt.save(step)
            return False
        lr = lr_at(step, spec)
        idx, noisy, t, emb, target, snr, ids, labels = batcher(step, spec.batch)
        attention_maps.clear()
        pred = unet(noisy, t, emb).sample
        loss = diffusion_loss(pred, target, snr)
        probe = layout_loss(layout_head, emb, ids, tokenizer.eos_token_id, labels)
        total, extra = loss + args.layout_loss * probe, f" layout-probe {probe.item():.3f}"
        if args.slot_loss:
            slots = slot_loss(slot_head, emb, labels)
            total, extra = total + args.slot_loss * slots, f"{extra} slots {slots.item():.3f}"
        if args.slot_grounding:
            masks = torch.from_numpy(slot_masks[idx] / 255.0).float()
            masks[labels[:, 0] == 0] = 0  # captions dropped for CFG name no place
            grounding = slot_grounding_loss(attention_maps, masks)
            total, extra = total + args.slot_grounding * grounding, f"{extra} grounding {grounding.item():.3f}"
        optimiser_step(total, lr, (unet.parameters(), opt, 1.0), (text_params, text_opt, args.text_lr_scale))
        ema.update(unet, step)
        text_ema.update(text, step)
        prog.update(step, loss.item(), lr, extra)
        if ckpt_timer.due():
            ckpt.save(step + 1)
        if eval_timer.due() and step + 1 >= min(spec.warmup, spec.steps):
            ckpt.save(step + 1)
            evaluate_and_export(step + 1, args.eval_prompts)
            eval_timer.last = time.monotonic()
    ckpt.save(spec.steps)
    res = evaluate_and_export(spec.steps, args.final_eval_prompts)
    work.mark("unet", steps=spec.steps, shapes_eval=res)
    log(f"[unet] done: {res}")
    return True


# --------------------------------------------------------------------------- stage 4: ControlNet


def stage_controlnet(args, work: Work, data: Data, tokenizer, stopper: Stopper) -> bool:
    import torch
    from diffusers import UNet2DConditionModel

    spec = stage_spec("controlnet", args.controlnet_steps, args.controlnet_lr)
    text, vae = load_frozen(work)
    means, stds = load_latents(work, data, vae)
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(str(work.component("unet"))).eval().requires_grad_(False)
    if args.finetune_from:
        controlnet = ControlNetModel.from_pretrained(str(args.finetune_from / "controlnet"))
    else:
        controlnet = make_controlnet(unet)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=spec.lr, weight_decay=0.01)
    ckpt = Checkpoint(work, "controlnet", model=controlnet, opt=opt)
    start = ckpt.resume()
    log(f"[controlnet] ControlNetModel {sum(p.numel() for p in controlnet.parameters()) / 1e6:.2f}M params; {spec.steps} steps of {spec.batch}")
    controlnet.train()
    batcher = LatentBatcher(args, data, tokenizer, text, means, stds, vae.config.scaling_factor, "controlnet")
    ckpt_timer, prog = Every(args.ckpt_minutes), Progress("controlnet", start, spec.steps, every=25)

    for step in range(start, spec.steps):
        if stopper.should_stop():
            ckpt.save(step)
            return False
        lr = lr_at(step, spec)
        idx, noisy, t, emb, target, snr, _, _ = batcher(step, spec.batch)
        cond = sketches_to_tensor(data.sketches[idx])
        down, mid = controlnet(noisy, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
        pred = unet(noisy, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = diffusion_loss(pred, target, snr)
        optimiser_step(loss, lr, (controlnet.parameters(), opt, 1.0))
        prog.update(step, loss.item(), lr)
        if ckpt_timer.due():
            ckpt.save(step + 1)
    ckpt.save(spec.steps)
    controlnet.eval()
    save_component(controlnet, work.component("controlnet"))
    pipe = build_pipeline(work, unet, tokenizer, args.zero_terminal_snr, controlnet=controlnet)
    res = evaluate_model(pipe, data, args.eval_prompts, args.seed, args.guidance, controlled=True)
    work.append_history("controlnet", {"step": spec.steps, **res})
    work.mark("controlnet", steps=spec.steps, shapes_eval_with_sketch=res)
    export(work, args.out, args.zero_terminal_snr)
    log(f"[controlnet] done: ShapesEval with sketches {res}")
    return True


# --------------------------------------------------------------------------- measurement


def measure_speed(model_dir: Path, steps: int = 20, repeats: int = 5) -> dict:
    """Seconds per 64x64 image at `steps` steps (CFG on) through StableDiffusionPipeline."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle"
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": round(times[len(times) // 2], 3), "min_s": round(times[0], 3), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- entry point


def parse_args(argv):
    p = argparse.ArgumentParser(prog="studio train-demo", description=__doc__.split("\n\n")[0])
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
