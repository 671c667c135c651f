"""The embedded model's sizes, its networks (CLIP, VAE, UNet, ControlNet) and its noise schedules."""

from __future__ import annotations

IMAGE_SIZE = 64
LATENT_SIZE = 16  # f=4 VAE
LATENT_CHANNELS = 4
TEXT_WIDTH = 128


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


def make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tcfg = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length)
    cfg = CLIPConfig(text_config=tcfg.to_dict(), vision_config=vision_config().to_dict(), projection_dim=TEXT_WIDTH)
    return CLIPModel(cfg)


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


def export_scheduler(zero_terminal_snr: bool):
    """The sampler the exported pipeline ships with (and the training-time evaluations use)."""
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
