"""Tiny SD1.5-like and SDXL-like pipelines built in code, saved as diffusers folders (no download).

Built the way diffusers' own tests build theirs: small UNet/VAE/CLIP configs with
random weights from a fixed seed, and a character-level CLIP tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?-'"


def write_char_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A CLIPTokenizer whose vocabulary is single characters (with and without </w>); no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!"] + [c for c in CHARS if c != "!"]
    vocab = {}
    for token in tokens + [t + "</w>" for t in tokens] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


def _text_encoder(vocab_size: int, hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(config).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ).eval()


def make_sd15_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline (32px latents, 2-layer CLIP); native size 64x64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    from transformers import CLIPTokenizer

    return unet, _vae(seed), _text_encoder(_VOCAB_SIZE, seed=seed), scheduler, StableDiffusionPipeline, CLIPTokenizer


_VOCAB_SIZE = 2 * len(CHARS) + 2


def save_sd15(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SD1.5-like diffusers folder; returns it."""
    unet, vae, text_encoder, scheduler, pipeline_class, tokenizer_class = make_sd15_pipeline(seed)
    write_char_tokenizer(folder / "tokenizer")
    tokenizer = tokenizer_class.from_pretrained(folder / "tokenizer")
    pipe = pipeline_class(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-like diffusers folder (two text encoders, added time ids); returns it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()
    write_char_tokenizer(folder / "tokenizer")
    write_char_tokenizer(folder / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(seed),
        text_encoder=_text_encoder(_VOCAB_SIZE, hidden=32, seed=seed),
        text_encoder_2=_text_encoder(_VOCAB_SIZE, hidden=32, projection=32, seed=seed + 1),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
