"""Single-file checkpoint loading: format and architecture detection, offline loading, pickle refusal.

The checkpoints are built here, tiny, in the original CompVis/SGM key layout (tiny diffusers models
converted back by the helpers below), and loaded against tiny variants of the shipped config folders,
so the whole path (detection, shipped tokenizer files, diffusers' conversion, a denoising run) is
exercised without any download and without instantiating a full-size model.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio.settings import CONFIGS_DIR
from studio.single_file import (
    PickleRefusedError,
    SingleFileError,
    UnknownArchitectureError,
    detect_architecture,
    detect_file_format,
    load_single_file_pipeline,
    read_safetensors_header,
    shipped_config,
)

ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: HF offline mode, and any connection attempt is refused and fails the test afterwards
    (recorded, because library code may swallow the exception)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call's keyword arguments; none may unpickle freely (checked afterwards, because
    callers such as diffusers' load_state_dict catch any exception raised inside)."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        if kwargs.get("weights_only") is not True:
            raise RuntimeError(f"torch.load called without weights_only=True: {kwargs}")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    yield calls
    assert all(call.get("weights_only") is True for call in calls), calls


# --------------------------------------------------------------------------------------------------
# Tiny models and their conversion to the original single-file layout
# --------------------------------------------------------------------------------------------------

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
}


def tiny_clip(hidden: int, act: str, projection: int | None = None) -> dict:
    # Full 49408-token vocabulary so the shipped tokenizer's ids fit; everything else tiny.
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": act,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": projection or hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def tiny_unet(cross_attention_dim: int, *, sdxl: bool = False, projection_dim: int = 0) -> dict:
    config = {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_attention_dim,
    }
    if sdxl:  # SDXL's shape: no attention at the top level, text_time added conditioning
        config.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + projection_dim,
        )
    else:  # SD 1.x/2.x's shape: attention at the top levels, none at the bottom
        config.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=8,
        )
    return config


TINY = {
    "sd15": {"unet": tiny_unet(32), "vae": TINY_VAE, "text_encoder": tiny_clip(32, "quick_gelu")},
    "sd21": {"unet": tiny_unet(32), "vae": TINY_VAE, "text_encoder": tiny_clip(32, "gelu")},
    "sd2_base": {"unet": tiny_unet(32), "vae": TINY_VAE, "text_encoder": tiny_clip(32, "gelu")},
    # The two SDXL text encoders need different widths: diffusers tells them apart by width.
    "sdxl": {
        "unet": tiny_unet(32 + 48, sdxl=True, projection_dim=48),
        "vae": dict(TINY_VAE, scaling_factor=0.13025),
        "text_encoder": tiny_clip(32, "quick_gelu"),
        "text_encoder_2": tiny_clip(48, "gelu", projection=48),
    },
    # The refiner: OpenCLIP bigG alone, and 5 time ids (aesthetic score instead of the target size).
    "sdxl_refiner": {
        "unet": dict(tiny_unet(48, sdxl=True), projection_class_embeddings_input_dim=8 * 5 + 48),
        "vae": dict(TINY_VAE, scaling_factor=0.13025),
        "text_encoder_2": tiny_clip(48, "gelu", projection=48),
    },
}


@pytest.fixture
def tiny_configs(tmp_path):
    """A copy of studio/configs with tiny unet/vae/text encoder configs (tokenizers, schedulers as shipped)."""
    root = tmp_path / "configs"
    for architecture, components in TINY.items():
        shutil.copytree(CONFIGS_DIR / architecture, root / architecture)
        for name, config in components.items():
            (root / architecture / name / "config.json").write_text(json.dumps(config))
    return root


def build_tiny_models(architecture: str, configs: Path) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = configs / architecture
    torch.manual_seed(0)
    models = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
    }
    if (folder / "text_encoder").is_dir():
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    if (folder / "text_encoder_2").is_dir():
        config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
        models["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return models


def to_single_file(architecture: str, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The original single-file state dict of the tiny models (the inverse of diffusers' conversion)."""
    checkpoint = {}
    checkpoint.update(_prefixed("model.diffusion_model.", _unet_to_ldm(models["unet"])))
    checkpoint.update(_prefixed("first_stage_model.", _vae_to_ldm(models["vae"])))
    clip = _clip_state_dict(models["text_encoder"]) if "text_encoder" in models else None
    bigg = _clip_to_open_clip(_clip_state_dict(models["text_encoder_2"])) if "text_encoder_2" in models else None
    if architecture == "sd15":
        checkpoint.update(_prefixed("cond_stage_model.transformer.", clip))
    elif architecture in ("sd21", "sd2_base"):
        checkpoint.update(_prefixed("cond_stage_model.model.", _clip_to_open_clip(clip)))
    elif architecture == "sdxl":
        checkpoint.update(_prefixed("conditioner.embedders.0.transformer.", clip))
        checkpoint.update(_prefixed("conditioner.embedders.1.model.", bigg))
    else:  # the refiner's only text encoder is its first embedder
        checkpoint.update(_prefixed("conditioner.embedders.0.model.", bigg))
    return {k: v.detach().clone().contiguous() for k, v in checkpoint.items()}


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _rename(state: dict, renames: list[tuple[str, str]]) -> dict:
    """Rename keys by the first matching (diffusers prefix, original prefix) pair; others keep their name."""
    out = {}
    for key, value in state.items():
        for new, old in renames:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        out[key] = value
    return out


UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _unet_to_ldm(unet) -> dict:
    config, per_level = unet.config, unet.config.layers_per_block + 1
    renames = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
    ]
    resnets = [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    for i, up_type in enumerate(config.up_block_types):
        for j in range(config.layers_per_block):
            resnets.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per_level * i + j + 1}.0."))
            renames.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per_level * i + j + 1}.1."))
        renames.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per_level * (i + 1)}.0.op."))
        for j in range(per_level):
            resnets.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per_level * i + j}.0."))
            renames.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per_level * i + j}.1."))
        upsampler_slot = 2 if "CrossAttn" in up_type else 1  # after the attention, when there is one
        last = per_level * i + per_level - 1
        renames.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{upsampler_slot}."))
    out = {}
    for key, value in unet.state_dict().items():
        resnet = next((p for p in resnets if key.startswith(p[0])), None)
        if resnet:
            inner = key[len(resnet[0]) :]
            for new, old in UNET_RESNET:
                inner = inner.replace(new, old)
            out[resnet[1] + inner] = value
        else:
            out.update(_rename({key: value}, renames))
    return out


def _vae_to_ldm(vae) -> dict:
    levels = len(vae.config.block_out_channels)
    renames = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        renames += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        renames.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for i in range(levels):
        renames.append((f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."))
        renames.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        renames.append((f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."))
        renames.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."))
    attention = [
        ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."),
    ]
    out = {}
    for key, value in _rename(vae.state_dict(), renames).items():
        key = key.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in key:
            head, inner = key.split(".mid.attn_1.")
            inner = next((old + inner[len(new) :] for new, old in attention if inner.startswith(new)), inner)
            key = f"{head}.mid.attn_1.{inner}"
            if value.ndim == 2:  # the original uses 1x1 convolutions where diffusers has linear layers
                value = value[:, :, None, None]
        out[key] = value
    return out


def _clip_state_dict(model) -> dict:
    """transformers' CLIP keys with the `text_model.` level (newer transformers drop it on CLIPTextModel)."""
    state = model.state_dict()
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }


def _clip_to_open_clip(clip: dict) -> dict:
    hidden = clip["text_model.embeddings.token_embedding.weight"].shape[1]
    out = {
        "token_embedding.weight": clip["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": clip["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": clip["text_model.final_layer_norm.weight"],
        "ln_final.bias": clip["text_model.final_layer_norm.bias"],
        # OpenCLIP multiplies by text_projection; SD 2 ignores it but real files carry it.
        "text_projection": clip["text_projection.weight"].T if "text_projection.weight" in clip else torch.eye(hidden),
    }
    layers = sorted({int(k.split(".")[3]) for k in clip if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([clip[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = clip[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = clip[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = clip[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = clip[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = clip[src + f"mlp.fc2.{kind}"]
    return out


def write_tiny_checkpoint(architecture: str, configs: Path, path: Path, *, pickle: bool = False):
    models = build_tiny_models(architecture, configs)
    checkpoint = to_single_file(architecture, models)
    if pickle:
        torch.save({"state_dict": checkpoint, "global_step": 1}, path)  # a Lightning-style .ckpt
    else:
        save_file(checkpoint, str(path))
    return models


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module):
    expected = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def run_tiny(pipe):
    result = pipe("a photo of an astronaut riding a horse", num_inference_steps=2, height=32, width=32,
                  generator=torch.Generator().manual_seed(0))
    image = result.images[0]
    assert image.size == (32, 32)
    return image


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def test_detect_file_format_by_content_not_name(tmp_path):
    tensors = {"a": torch.zeros(2, 2)}
    for name in ("model.safetensors", "model.ckpt", "model.png"):
        save_file(tensors, str(tmp_path / name))
        assert detect_file_format(tmp_path / name) == "safetensors"
    for name in ("zip.ckpt", "zip.bin", "zip.png", "zip.safetensors"):
        torch.save(tensors, tmp_path / name)
        assert detect_file_format(tmp_path / name) == "pickle"
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert (tmp_path / "legacy.pt").read_bytes()[:1] == b"\x80"
    assert detect_file_format(tmp_path / "legacy.pt") == "pickle"
    not_models = {"empty.bin": b"", "text.safetensors": b"hello world, not a model", "gguf.bin": b"GGUF\x03\0\0\0"}
    for name, data in not_models.items():
        (tmp_path / name).write_bytes(data)
        assert detect_file_format(tmp_path / name) == "unknown"


def test_detect_file_format_safetensors_header_starting_with_0x80(tmp_path):
    # A header length such as 0x80 begins with the pickle PROTO byte; content must still win.
    path = tmp_path / "odd.bin"
    header = json.dumps({"__metadata__": {"pad": "x" * 90}}).encode()  # 119 bytes, padded to 128
    header += b" " * (0x80 - len(header))
    path.write_bytes((0x80).to_bytes(8, "little") + header)
    assert detect_file_format(path) == "safetensors"


# --------------------------------------------------------------------------------------------------
# Architecture detection
# --------------------------------------------------------------------------------------------------

U = "model.diffusion_model."


def fake_shapes(context_dim: int, text_encoder: dict[str, tuple], in_channels: int = 4) -> dict:
    shapes = {
        U + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, context_dim),
        U + "out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    }
    shapes.update(text_encoder)
    return shapes


SD15_TE = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
SD2_TE = {"cond_stage_model.model.token_embedding.weight": (49408, 1024)}
SDXL_TE = {
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    U + "label_emb.0.0.weight": (1280, 2816),
}
REFINER_TE = {"conditioner.embedders.0.model.token_embedding.weight": (49408, 1280)}


@pytest.mark.parametrize(
    "shapes, expected",
    [
        (fake_shapes(768, SD15_TE), "sd15"),
        (fake_shapes(1024, SD2_TE), "sd21"),
        (fake_shapes(2048, SDXL_TE), "sdxl"),
        (fake_shapes(1280, REFINER_TE), "sdxl_refiner"),
        (fake_shapes(768, {}), "sd15"),  # UNet only: the context width decides
        (fake_shapes(1024, {}), "sd21"),
        (fake_shapes(2048, {}), "sdxl"),
    ],
)
def test_detect_architecture(shapes, expected):
    assert detect_architecture(shapes.keys(), shapes) == expected


def test_an_inpainting_single_file_loads_and_inpaints(tmp_path, tiny_configs):
    """Issue 17: 9-channel (inpainting) single files were refused; they load, and the inpaint task uses them."""
    from PIL import Image

    from studio import Settings, Studio

    unet_config = tiny_configs / "sd15" / "unet" / "config.json"
    four_channels = unet_config.read_text()
    unet_config.write_text(json.dumps({**json.loads(four_channels), "in_channels": 9}))
    path = tmp_path / "tiny-inpainting.safetensors"
    models = write_tiny_checkpoint("sd15", tiny_configs, path)
    unet_config.write_text(four_channels)  # the shipped config says 4: the file's shapes decide
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert pipe.unet.config.in_channels == 9
    assert_same_weights(pipe.unet, models["unet"])

    studio = Studio(Settings(model=str(path), configs_dir=tiny_configs))
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = studio.inpaint("a red square", image, mask, seed=1, num_inference_steps=2, mask_blur=0)
    out = result.images[0]
    assert out.getpixel((2, 2)) == image.getpixel((2, 2)) and out.getpixel((61, 61)) == image.getpixel((61, 61))
    with pytest.raises(Exception, match="9-channel UNet"):
        studio.style_transfer("striped", image, seed=1, num_inference_steps=2)
    with pytest.raises(Exception, match="text_to_image needs a text-to-image model"):
        studio.text_to_image("a red square", seed=1, num_inference_steps=2)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (fake_shapes(768, SD15_TE, in_channels=8), "8 input channels"),
        (fake_shapes(1024, SD15_TE), "mixed checkpoint"),
        (fake_shapes(96, {}), "cross-attention width 96"),
        ({"lora_unet_down_blocks_0.alpha": ()}, "lora_unet_down_blocks_0.alpha"),
        ({U + "double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "model.diffusion_model"),
    ],
)
def test_detect_architecture_refuses_unknown(shapes, message):
    with pytest.raises(UnknownArchitectureError, match=message) as caught:
        detect_architecture(shapes.keys(), shapes)
    assert isinstance(caught.value, ValueError)


def test_read_safetensors_header_reads_no_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({U + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, str(path), metadata={"k": "v"})

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("tensor data was read")

    import safetensors

    monkeypatch.setattr(safetensors.safe_open, "get_tensor", no_tensor_reads, raising=False)
    monkeypatch.setattr("safetensors.torch.load_file", no_tensor_reads)
    shapes, metadata = read_safetensors_header(path)
    assert shapes == {U + "input_blocks.0.0.weight": (8, 4, 3, 3)} and metadata == {"k": "v"}


# --------------------------------------------------------------------------------------------------
# Shipped configs and tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "architecture, subfolder, pad",
    [
        ("sd15", "tokenizer", "<|endoftext|>"),
        ("sd21", "tokenizer", "!"),  # SD 2's OpenCLIP tokenizer pads with "!" (id 0)
        ("sd2_base", "tokenizer", "!"),
        ("sdxl", "tokenizer", "<|endoftext|>"),
        ("sdxl", "tokenizer_2", "!"),
        ("sdxl_refiner", "tokenizer_2", "!"),
    ],
)
def test_shipped_tokenizers(architecture, subfolder, pad):
    from transformers import CLIPTokenizer

    with shipped_config(architecture) as folder:
        tokenizer = CLIPTokenizer.from_pretrained(folder / subfolder, local_files_only=True)
    assert not folder.exists()  # the assembled folder is temporary
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == ASTRONAUT_IDS
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
    assert tokenizer.pad_token == pad
    padded = tokenizer("a", padding="max_length").input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.convert_tokens_to_ids(pad)


def test_shipped_configs_match_official_model_sizes():
    """Parameter counts of the official models (meta device: no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    official_unet = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}
    for architecture, expected in official_unet.items():
        folder = CONFIGS_DIR / architecture
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        assert sum(p.numel() for p in unet.parameters()) == expected, architecture
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863, architecture
    scaling = {a: AutoencoderKL.load_config(CONFIGS_DIR / a / "vae").get("scaling_factor", 0.18215)
               for a in official_unet}
    assert scaling == {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025}


def test_shipped_model_indexes_have_no_safety_checker():
    for index_path in CONFIGS_DIR.glob("*/model_index.json"):
        index = json.loads(index_path.read_text())
        assert index.get("safety_checker", [None, None]) == [None, None], index_path
        assert index.get("feature_extractor", [None, None]) == [None, None], index_path
        assert index.get("requires_safety_checker", False) is False, index_path


# --------------------------------------------------------------------------------------------------
# Loading tiny checkpoints end to end
# --------------------------------------------------------------------------------------------------


def test_load_sd15_safetensors_offline(tmp_path, tiny_configs, torch_load_calls):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    path = tmp_path / "tiny-sd15.safetensors"
    models = write_tiny_checkpoint("sd15", tiny_configs, path)
    shapes, _ = read_safetensors_header(path)
    assert detect_file_format(path) == "safetensors" and detect_architecture(shapes, shapes) == "sd15"

    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)

    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, PNDMScheduler)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), models[name])
    assert pipe.tokenizer("a photo of an astronaut riding a horse").input_ids == ASTRONAUT_IDS
    run_tiny(pipe)
    assert torch_load_calls == []


def test_load_sdxl_safetensors_offline(tmp_path, tiny_configs):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    path = tmp_path / "tiny-sdxl.safetensors"
    models = write_tiny_checkpoint("sdxl", tiny_configs, path)

    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)

    assert type(pipe) is StableDiffusionXLPipeline
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), models[name])
    assert pipe.tokenizer_2.pad_token == "!"
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("an astronaut", do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (1, 77, 32 + 48) and pooled.shape == (1, 48)  # both encoders, concatenated


def test_load_sdxl_refiner_as_img2img(tmp_path, tiny_configs):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    path = tmp_path / "tiny-refiner.safetensors"
    models = write_tiny_checkpoint("sdxl_refiner", tiny_configs, path)
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert type(pipe) is StableDiffusionXLImg2ImgPipeline
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True
    for name in ("unet", "vae", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), models[name])


def test_load_sd2_picks_config_by_prediction_type(tmp_path, tiny_configs, caplog):
    path = tmp_path / "tiny-sd2.safetensors"
    models = write_tiny_checkpoint("sd21", tiny_configs, path)

    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # SD 2.1 768: the default
    assert "does not say" in caplog.text and "--prediction-type epsilon" in caplog.text  # the guess, and why
    assert pipe.tokenizer.pad_token == "!"
    assert_same_weights(pipe.text_encoder, models["text_encoder"])

    base = load_single_file_pipeline(
        path, torch_dtype=torch.float32, prediction_type="epsilon", configs_dir=tiny_configs
    )
    assert base.scheduler.config.prediction_type == "epsilon"
    assert type(base.scheduler).__name__ == "PNDMScheduler"  # the 2.1-base config's scheduler


def test_prediction_type_override_and_modelspec_hint(tmp_path, tiny_configs):
    path = tmp_path / "tiny.safetensors"
    write_tiny_checkpoint("sd15", tiny_configs, path)
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, prediction_type="v_prediction",
                                     configs_dir=tiny_configs)
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    from safetensors.torch import load_file

    save_file(load_file(str(path)), str(path), metadata={"modelspec.prediction_type": "v"})
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    with pytest.raises(SingleFileError, match="'v-pred'"):
        load_single_file_pipeline(path, torch_dtype=torch.float32, prediction_type="v-pred")


def test_safetensors_under_another_name_loads(tmp_path, tiny_configs, torch_load_calls):
    from diffusers import StableDiffusionXLPipeline

    path = tmp_path / "tiny-sdxl.bin"  # diffusers and torch.load would pick the pickle reader by this name
    models = write_tiny_checkpoint("sdxl", tiny_configs, path)
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert type(pipe) is StableDiffusionXLPipeline and pipe.config.force_zeros_for_empty_prompt is True
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), models[name])
    assert torch_load_calls == []


def test_weights_only_ckpt_loads_when_opted_in(tmp_path, tiny_configs, torch_load_calls):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "tiny-sd15.ckpt"
    models = write_tiny_checkpoint("sd15", tiny_configs, path, pickle=True)

    with pytest.raises(PickleRefusedError, match="allow-pickle"):
        load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert torch_load_calls == []  # refused before anything was unpickled

    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, allow_pickle=True, configs_dir=tiny_configs)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipe, name), models[name])
    assert len(torch_load_calls) == 1  # exactly one read, weights_only=True (checked by the spy)


def test_missing_and_unknown_files_are_refused(tmp_path):
    with pytest.raises(SingleFileError, match="not found"):
        load_single_file_pipeline(tmp_path / "nope.safetensors", torch_dtype=torch.float32)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(SingleFileError, match="junk.safetensors"):
        load_single_file_pipeline(junk, torch_dtype=torch.float32)
    damaged = tmp_path / "damaged.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    damaged.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)
    with pytest.raises(SingleFileError, match="damaged.safetensors"):
        load_single_file_pipeline(damaged, torch_dtype=torch.float32)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0.alpha": torch.ones(())}, str(lora))
    with pytest.raises(UnknownArchitectureError, match="lora.safetensors"):
        load_single_file_pipeline(lora, torch_dtype=torch.float32)


def test_legacy_clip_key_names_load(tmp_path, tiny_configs):
    """Old SD 1.x files name CLIP keys without `text_model.` (saved with transformers < 4.10)."""
    path = tmp_path / "old-keys.safetensors"
    models = build_tiny_models("sd15", tiny_configs)
    prefix = "cond_stage_model.transformer.text_model."
    checkpoint = {
        (k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k): v
        for k, v in to_single_file("sd15", models).items()
    }
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in checkpoint
    save_file(checkpoint, str(path))
    pipe = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert_same_weights(pipe.text_encoder, models["text_encoder"])


def test_checkpoint_without_vae_is_refused_by_name(tmp_path, tiny_configs):
    path = tmp_path / "no-vae.safetensors"
    models = build_tiny_models("sd15", tiny_configs)
    checkpoint = to_single_file("sd15", models)
    save_file({k: v for k, v in checkpoint.items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(SingleFileError, match="no-vae.safetensors.*no VAE weights"):
        load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)


# --------------------------------------------------------------------------------------------------
# Malicious pickles
# --------------------------------------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): the file appearing would prove code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_payload_is_live_when_unpickled_freely(tmp_path):
    """Control: the payload below really runs code under plain unpickling, so the refusals are meaningful."""
    marker = tmp_path / "pwned"
    torch.save({"x": _CreatesFileWhenUnpickled(marker)}, tmp_path / "evil.ckpt")
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # our own file, in tmp_path: safe to run here
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.png", "evil.bin", "evil.safetensors", "evil.pt"])
@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_pickle_never_runs(tmp_path, name, allow_pickle, legacy_format, torch_load_calls):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    payload = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                              "x": _CreatesFileWhenUnpickled(marker)}}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy_format)
    assert not marker.exists()
    assert detect_file_format(path) == "pickle"

    with pytest.raises(PickleRefusedError) as caught:
        load_single_file_pipeline(path, torch_dtype=torch.float32, allow_pickle=allow_pickle)

    message = str(caught.value)
    assert str(path) in message
    if allow_pickle:
        assert "weights_only" in message
    else:
        assert "--allow-pickle" in message and "allow_pickle=True" in message
    assert "weights_only=False" not in message  # torch's own message advises it; ours must not
    assert isinstance(caught.value, ValueError)
    assert not marker.exists()
    assert len(torch_load_calls) == (1 if allow_pickle else 0)


def test_environment_cannot_disable_weights_only(tmp_path, monkeypatch):
    # torch honours TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only when weights_only is not passed explicitly.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _CreatesFileWhenUnpickled(marker)}}, path)
    with pytest.raises(PickleRefusedError):
        load_single_file_pipeline(path, torch_dtype=torch.float32, allow_pickle=True)
    assert not marker.exists()


def _with_ema(checkpoint: dict, shift: float) -> dict:
    """The checkpoint plus LDM's EMA copy of its UNet (flattened key names), each weight moved by `shift`."""
    ema = {
        "model_ema." + "".join(key.split(".")[1:]): value + shift
        for key, value in checkpoint.items()
        if key.startswith("model.diffusion_model.")
    }
    return {**checkpoint, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def test_ema_weights_are_used_only_when_asked(tmp_path, tiny_configs):
    models = build_tiny_models("sd15", tiny_configs)
    path = tmp_path / "with-ema.safetensors"
    save_file(_with_ema(to_single_file("sd15", models), 0.25), str(path))

    trained = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs)
    assert_same_weights(trained.unet, models["unet"])  # the EMA copy is not read by default
    ema = load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs, use_ema=True)
    for (name, loaded), original in zip(ema.unet.state_dict().items(), models["unet"].state_dict().values()):
        assert torch.allclose(loaded, original + 0.25), name
    assert_same_weights(ema.vae, models["vae"])  # only the UNet has an EMA copy


def test_ema_asked_of_a_file_without_it_is_refused(tmp_path, tiny_configs):
    path = tmp_path / "no-ema.safetensors"
    write_tiny_checkpoint("sd15", tiny_configs, path)
    with pytest.raises(SingleFileError, match="no EMA weights"):
        load_single_file_pipeline(path, torch_dtype=torch.float32, configs_dir=tiny_configs, use_ema=True)


def test_the_ema_flag_reaches_the_loader(tmp_path, tiny_configs):
    from studio.cli import build_parser
    from studio.flags import settings_from_args
    from studio.models import ModelManager

    models = build_tiny_models("sd15", tiny_configs)
    path = tmp_path / "with-ema.safetensors"
    save_file(_with_ema(to_single_file("sd15", models), 0.5), str(path))
    args = build_parser().parse_args(["generate", "x", "--model", str(path), "--ema"])
    settings = settings_from_args(args, configs_dir=tiny_configs, hash_cache=None)
    assert settings.use_ema
    unet = ModelManager(settings).get(None).pipe.unet
    original = models["unet"].conv_in.weight
    assert torch.allclose(unet.conv_in.weight, original + 0.5)
