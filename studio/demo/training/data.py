"""The training data: rendered scenes, tokens, layout labels, cached latents and the seeded batches drawn from them."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np

from studio.outputs import atomic_write_bytes

from .architecture import (
    IMAGE_SIZE,
    LATENT_CHANNELS,
    LATENT_SIZE,
    train_noise_scheduler,
)
from .folders import replace_dir, temp_folder
from .loop import Work, log, step_generator, step_rng


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getbuffer())


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
            save_npy(images_f, images)
            save_npy(sketches_f, sketches)
            atomic_write_bytes(captions_f, json.dumps([s.caption for s in scenes]).encode("utf-8"))
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
            save_npy(path, masks)
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


# --------------------------------------------------------------------------- text


def tokenizer_for(work: Work):
    from studio.demo import tokenizer as tok_mod

    folder = work.component("tokenizer")
    if not (folder / "vocab.json").exists():
        tmp = temp_folder(folder)
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


# --------------------------------------------------------------------------- latents


def cache_latents(vae, data: Data, work: Work) -> dict:
    """Encode every training image once (the UNet and ControlNet stages sample from these distributions)."""
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
    save_npy(folder / "mean.npy", means)
    save_npy(folder / "std.npy", stds)
    stats = {"latent_mean": round(mean, 4), "latent_std": round(std, 4), "scaling_factor": round(1 / std, 5)}
    atomic_write_bytes(folder / "info.json", json.dumps({"data": str(data.folder), **stats}, indent=2).encode("utf-8"))
    log(f"[vae] cached {data.n} latents in {time.monotonic() - t0:.0f}s: {stats}")
    return stats


def load_latents(work: Work, data: Data, vae) -> tuple[np.ndarray, np.ndarray]:
    folder = work.root / "latents"
    info_f = folder / "info.json"
    if not info_f.exists() or json.loads(info_f.read_text()).get("data") != str(data.folder):
        cache_latents(vae, data, work)
    return np.load(folder / "mean.npy"), np.load(folder / "std.npy")


# --------------------------------------------------------------------------- batches


def clip_batch(data: Data, rng: np.random.Generator, batch: int) -> np.ndarray:
    """Half random anchors, half one-word-different neighbours of them (hard negatives)."""
    neighbours = data.neighbours()
    anchors = rng.integers(0, data.n, batch // 2)
    partners = []
    for a in anchors:
        nb = neighbours[a]
        partners.append(nb[rng.integers(0, len(nb))] if len(nb) else rng.integers(0, data.n))
    return np.concatenate([anchors, np.asarray(partners, dtype=np.int64)])


class LatentBatcher:
    """The UNet and ControlNet stages' batches: noised latents, text states, targets and layout labels at a step."""

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
