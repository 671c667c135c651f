"""Smoke tests for the embedded model's training code (studio.demo.train, studio.demo.training / tokenizer).

Fast (well under 30 s on 2 CPU cores): stages run a few steps at most; the real
architectures are built, stepped a few times and exported through the same code
the training uses, then loaded back the way a real SD checkpoint is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from studio.demo import tokenizer as tok_mod  # noqa: E402
from studio.demo import train  # noqa: E402
from studio.demo.training import stages  # noqa: E402
from studio.demo.training.architecture import (  # noqa: E402
    LATENT_CHANNELS,
    LATENT_SIZE,
    TEXT_WIDTH,
    make_clip,
    make_controlnet,
    make_unet,
    make_vae,
    text_config,
    train_noise_scheduler,
)
from studio.demo.training.data import PLACE_COLUMNS, Data, layout_labels, tokenize  # noqa: E402
from studio.demo.training.export import export, export_clip, seed_from_export  # noqa: E402
from studio.demo.training.folders import save_component  # noqa: E402
from studio.demo.training.loop import SPECS, StageSpec, Stopper, Work, lr_at  # noqa: E402
from studio.demo.training.losses import (  # noqa: E402
    CrossAttentionMaps,
    diffusion_loss,
    layout_loss,
    make_layout_head,
    make_slot_head,
    slot_grounding_loss,
    slot_loss,
)

world = pytest.importorskip("studio.demo.world")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tok_mod.write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")
    return tok_mod.load_tokenizer(folder)


def test_tokenizer_files_and_round_trip(tokenizer):
    folder = tokenizer.name_or_path
    for name in tok_mod.FILES:
        assert (Path(folder) / name).exists(), name
    assert tokenizer.model_max_length == tok_mod.MAX_LENGTH
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    captions = [s.caption for s in world.training_scenes(100, 0)] + [s.caption for s in world.eval_scenes(20)]
    tok_mod.check_tokenizer(tokenizer, world.vocabulary(), captions)  # every world word is one token
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 5
    # unknown words still tokenize (into smaller pieces), and decode back
    ids = tokenizer("a zebra", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 and tokenizer.decode(ids) == "a zebra"
    assert tokenizer.unk_token_id not in ids


def test_lr_schedule_warms_up_then_decays():
    spec = StageSpec(steps=100, batch=1, lr=1e-3, warmup=10)
    lrs = [lr_at(s, spec) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[50] < lrs[10] and lrs[-1] == pytest.approx(1e-4, rel=0.05)


def test_unet_steps_reduce_loss_on_a_batch():
    torch.manual_seed(0)
    unet = make_unet().train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    sched = train_noise_scheduler(zero_terminal_snr=True)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
    emb = torch.randn(4, tok_mod.MAX_LENGTH, TEXT_WIDTH, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([100, 300, 600, 900])
    noisy, target = sched.add_noise(latents, noise, t), sched.get_velocity(latents, noise, t)
    snr = (sched.alphas_cumprod / (1 - sched.alphas_cumprod))[t]
    losses = []
    for _ in range(8):
        loss = diffusion_loss(unet(noisy, t, emb).sample, target, snr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses[-2:]) < 0.9 * losses[0], losses


def test_export_loads_as_stable_diffusion(tmp_path, tokenizer):
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    work = Work(tmp_path / "work")
    shutil.copytree(tokenizer.name_or_path, work.component("tokenizer"))
    export_clip(make_clip(tokenizer), work)
    save_component(make_vae(), work.component("vae"))
    unet = make_unet()
    save_component(unet, work.component("unet"))
    save_component(make_controlnet(unet), work.component("controlnet"))
    out = tmp_path / "embedded-model"
    assert export(work, out, zero_terminal_snr=True)
    assert export(work, out, zero_terminal_snr=True)  # a second export replaces the first in place
    assert not list(tmp_path.glob(".embedded-model*"))

    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert "controlnet" not in index and "clip_image_encoder" not in index
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4
    # Sampling starts from pure noise, as the UNet was trained (t = 999 has no image left in it).
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.alphas_cumprod[-1] < 1e-6
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    image = pipe("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    ControlNetModel.from_pretrained(str(out), subfolder="controlnet", local_files_only=True)
    CLIPVisionModelWithProjection.from_pretrained(str(out), subfolder="clip_image_encoder", local_files_only=True)
    assert (out / "clip_image_encoder" / "text_projection.safetensors").exists()
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    assert size_mb <= 40, size_mb


def test_layout_labels_name_the_layout_and_the_objects_in_order():
    labels = layout_labels(
        [
            "a red circle",
            "a blue square on the left",
            "a tiny green dot in the middle",
            "a red circle above a blue square",
            "a blue square above a red circle",
            "a red circle below a blue square",
        ]
    )
    positions, relations = world.POSITIONS, world.RELATIONS
    assert labels[:, 0].tolist() == [
        0,
        1 + positions.index("left"),
        1 + positions.index("center"),
        1 + len(positions) + relations.index("above"),
        1 + len(positions) + relations.index("above"),
        1 + len(positions) + relations.index("below"),
    ]
    red, blue, circle, square = (1 + list(world.COLORS).index("red"), 1 + list(world.COLORS).index("blue"),
                                 1 + world.SHAPES.index("circle"), 1 + world.SHAPES.index("square"))
    assert labels[0, 1:5].tolist() == [red, circle, 0, 0]  # no second object
    assert labels[3, 1:5].tolist() == [red, circle, blue, square]
    assert labels[4, 1:5].tolist() == [blue, square, red, circle]  # the order tells the subject

    def at(row, position):
        column = PLACE_COLUMNS + 2 * positions.index(position)
        return labels[row, column : column + 2].tolist()

    assert at(0, "left") == at(0, "center") == [0, 0]  # nothing placed
    assert at(1, "left") == [blue, square] and at(1, "right") == [0, 0]
    assert at(3, "top") == [red, circle] and at(3, "bottom") == [blue, square]
    # Both phrasings of one picture name the same object at each place.
    assert at(4, "top") == at(5, "top") == [blue, square] and at(4, "bottom") == at(5, "bottom") == [red, circle]


def test_layout_probe_moves_layout_and_order_into_the_end_of_text_states(tokenizer):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    config = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length)
    text = CLIPTextModel(config).train()
    head = make_layout_head()
    captions = [
        "a red circle on the left",
        "a red circle on the right",
        "a red circle above a blue square",
        "a blue square above a red circle",
    ]
    ids = tokenize(tokenizer, captions)
    labels = torch.from_numpy(layout_labels(captions))
    last_eos = ids.shape[1] - 1  # a padding (end-of-text) position, where the UNet mostly looks

    def gaps():
        """How far apart the last padding states of the left/right and of the swapped pairs are."""
        with torch.no_grad():
            hidden = text(ids)[0][:, last_eos]
        return (hidden[0] - hidden[1]).norm().item(), (hidden[2] - hidden[3]).norm().item()

    before = gaps()
    opt = torch.optim.AdamW([*text.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = layout_loss(head, text(ids)[0], ids, tokenizer.eos_token_id, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    after = gaps()
    assert after[0] > 1.5 * before[0] and after[1] > 1.5 * before[1], (before, after)


def test_slot_probe_gives_each_place_its_own_end_state(tokenizer):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    config = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length)
    text = CLIPTextModel(config).train()
    head = make_slot_head()
    captions = ["a red circle above a blue square", "a blue square above a red circle", "a red circle on the left", "a green triangle"]
    ids = tokenize(tokenizer, captions)
    labels = torch.from_numpy(layout_labels(captions))
    opt = torch.optim.AdamW([*text.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(120):
        loss = slot_loss(head, text(ids)[0], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    places, colors = len(world.POSITIONS), list(world.COLORS)
    with torch.no_grad():
        logits = head(text(ids)[0][:, -places:])
    which, color = logits[..., :places].argmax(-1), logits[..., places : places + 1 + len(colors)].argmax(-1)
    assert (which == torch.arange(places)).all()  # every slot knows its place, whatever the caption

    def color_at(row, place):
        index = color[row, world.POSITIONS.index(place)].item()
        return colors[index - 1] if index else None

    assert (color_at(0, "top"), color_at(0, "bottom")) == ("red", "blue")
    assert (color_at(1, "top"), color_at(1, "bottom")) == ("blue", "red")  # the order decides
    assert color_at(2, "left") == "red"


def test_slot_grounding_loss_asks_each_slot_to_look_at_its_object():
    places, tokens = len(world.POSITIONS), 16
    masks = torch.zeros(1, places, LATENT_SIZE, LATENT_SIZE)
    top = world.POSITIONS.index("top")
    masks[0, top, :4, 4:12] = 1  # an object at the top (rows 0-1, columns 2-5 at 8x8); no other place is named
    slot = tokens - places + top

    def attention(rows, columns):
        """8x8 attention maps where only the given pixels look at the top slot (and only at it)."""
        probs = torch.full((1, 8, 8, tokens), 1.0 / (tokens - 1))
        probs[..., slot] = 0
        probs[:, rows, columns, :] = 0
        probs[:, rows, columns, slot] = 1
        return probs.view(1, 64, tokens)

    on, off = attention(slice(0, 2), slice(2, 6)), attention(slice(5, 8), slice(2, 6))
    unused = torch.rand(1, 256, tokens)  # a 16x16 layer: not asked
    assert slot_grounding_loss([on, unused], masks) < 0.05
    assert slot_grounding_loss([off, unused], masks) > 0.9
    assert slot_grounding_loss([off], torch.zeros_like(masks)) == 0  # no place named, nothing asked


def test_cross_attention_maps_keep_the_output_and_record_every_layer():
    torch.manual_seed(0)
    unet = make_unet()
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
    emb = torch.randn(2, tok_mod.MAX_LENGTH, TEXT_WIDTH, generator=gen)
    t = torch.tensor([999, 500])
    with torch.no_grad():
        plain = unet(noisy, t, emb).sample
    maps: list = []
    CrossAttentionMaps.install(unet, maps)
    with torch.no_grad():
        assert torch.allclose(unet(noisy, t, emb).sample, plain, atol=1e-5)
    sides = sorted(int(m.shape[1] ** 0.5) for m in maps)
    assert sides == [8, 8, 8, 8, 16, 16, 16]  # down, mid and up blocks at 16x16 and 8x8
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps)  # each pixel's attention over the tokens


def test_slot_masks_cover_the_object_at_each_named_place(tmp_path):
    data = Data(tmp_path, 60, 0)
    masks = data.slot_masks()
    assert masks.shape == (60, len(world.POSITIONS), LATENT_SIZE, LATENT_SIZE)
    relations = 0
    for caption, caption_masks in zip(data.captions, masks):
        claims = world.parse_claims(caption)
        named = world.claimed_places(claims)
        assert [p for p, m in zip(world.POSITIONS, caption_masks) if m.any()] == [p for p in world.POSITIONS if p in named]
        if claims["relation"]:
            relations += 1
            ys, xs = np.mgrid[: LATENT_SIZE, : LATENT_SIZE]

            def centre(place, grid):
                m = caption_masks[world.POSITIONS.index(place)].astype(float)
                return (m * grid).sum() / m.sum()

            side = world.SUBJECT_SIDE[claims["relation"]["relation"]]
            grid = xs if side in ("left", "right") else ys
            first, second = ("left", "right") if side in ("left", "right") else ("top", "bottom")
            assert centre(first, grid) < centre(second, grid), caption
    assert relations >= 5


def test_seed_from_export_reuses_clip_and_vae(tmp_path):
    model = Path(__file__).resolve().parents[1] / "assets" / "embedded-model"
    if not (model / "clip_image_encoder" / "text_encoder").exists():
        pytest.skip("the embedded model is not in this checkout")
    work = Work(tmp_path / "work")
    seed_from_export(work, model)
    assert work.done("clip") and work.done("vae") and not work.done("unet")
    contrastive = (model / "clip_image_encoder" / "text_encoder" / "model.safetensors").read_bytes()
    assert (work.component("text_encoder") / "model.safetensors").read_bytes() == contrastive
    assert not (work.component("clip_image_encoder") / "text_encoder").exists()
    for name in ("tokenizer", "vae"):
        assert sorted(p.name for p in work.component(name).iterdir()) == sorted(p.name for p in (model / name).iterdir())
    with pytest.raises(ValueError, match="clip_image_encoder"):
        seed_from_export(Work(tmp_path / "other"), tmp_path)


class _StopAt(Stopper):
    """Stops the first time the loop asks at the given step (as a kill between steps would)."""

    def __init__(self, stop_at: int | None):
        super().__init__(None)
        self.calls, self.stop_at = 0, stop_at

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls == self.stop_at


def test_a_stopped_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(SPECS, "vae", StageSpec(steps=6, batch=4, lr=1e-3, warmup=2))
    monkeypatch.setattr(stages, "vae_eval", lambda vae, data, n=200: {"psnr": 0.0})  # the eval is not under test
    args = train.parse_args(["--train-size", "16"])

    def run(work_dir, stoppers):
        torch.manual_seed(args.seed)  # as `main` does: the same initial weights in every process
        work = Work(work_dir)
        data = Data(tmp_path / "data", 16, args.seed)
        results = [stages.stage_vae(args, work, data, stopper) for stopper in stoppers]
        return results, load_file(str(work.component("vae") / "diffusion_pytorch_model.safetensors"))

    straight_results, straight = run(tmp_path / "straight", [_StopAt(None)])
    resumed_results, resumed = run(tmp_path / "resumed", [_StopAt(4), _StopAt(None)])
    assert straight_results == [True] and resumed_results == [False, True]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_every_stage_runs_and_a_run_resumed_after_a_stage_ends_the_same(tmp_path, monkeypatch, tokenizer):
    """All four stages end to end through `main` (a few steps each), straight and stopped in the VAE stage.

    The resumed process skips the CLIP stage; each stage seeds its own initial weights, so the
    UNet and ControlNet still start (and end) as in the straight run.
    """
    from safetensors.torch import load_file

    tiny = StageSpec(steps=2, batch=4, lr=1e-3, warmup=1)
    for stage in SPECS:
        monkeypatch.setitem(SPECS, stage, tiny)
    monkeypatch.setattr(stages, "vae_eval", lambda vae, data, n=200: {"psnr": 0.0})  # the eval is not under test

    def run(folder, stop_at=None):
        monkeypatch.setattr(train, "Stopper", lambda minutes: _StopAt(stop_at))
        if not (folder / "work" / "components" / "tokenizer").exists():  # the same tokenizer in both runs
            shutil.copytree(tokenizer.name_or_path, folder / "work" / "components" / "tokenizer")
        threads = str(torch.get_num_threads())  # `main` sets torch's thread count
        argv = ["--work", str(folder / "work"), "--out", str(folder / "out"), "--train-size", "16", "--threads", threads,
                "--eval-prompts", "1", "--final-eval-prompts", "1"]
        return train.main(argv)

    def weights(folder):
        files = sorted((folder / "work" / "components").rglob("*.safetensors"))
        return {str(f.relative_to(folder)): load_file(str(f)) for f in files}

    assert run(tmp_path / "straight") == 0
    assert run(tmp_path / "resumed", stop_at=4) == train.PAUSED  # clip's 2 steps, then the VAE's second
    assert run(tmp_path / "resumed") == 0
    state = Work(tmp_path / "resumed" / "work").state()
    assert all(state[stage]["done"] and state[stage]["steps"] == 2 for stage in SPECS)
    assert (tmp_path / "resumed" / "out" / "controlnet").is_dir()
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and any("controlnet" in name for name in straight)
    for name in straight:
        assert all(torch.equal(straight[name][k], resumed[name][k]) for k in straight[name]), name
