"""OpenVINO on the CPU (opt-in: `--backend openvino`): the UNet and the VAE decoder run in OpenVINO.

On this project's 2-core CPU, OpenVINO's CPU plugin runs the SD 1.5 UNet and VAE decoder about twice as fast as
PyTorch at fp32 with the same weights (`benchmarks/speed.py`, section `openvino`). Each component is converted
once per model (`openvino.convert_model` traces the PyTorch module: about half a minute per component for
SD 1.5) and saved under the cache folder, keyed by the weights' hash, so later loads read it back in seconds.

The model's VAE decodes through OpenVINO from the first call on. The UNet's forward is shadowed for one
sampling call at a time. The OpenVINO copy holds the base weights as they were converted, so each call checks that PyTorch would
compute the same thing, and otherwise runs PyTorch: a LoRA or other adapter in the UNet, ControlNet
residuals, attention processors other than the default (style by reference), other conditioning (SDXL's
added embeddings), a latent size the traced graph does not cover, or another dtype or device. Step caching
(asked for by the request) and fine-tuned copies (Imagic) never reach it: they run PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import torch

from .toolbox import PipelineWrapper

log = logging.getLogger(__name__)

STATE_KEY = "openvino"  # LoadedModel.task_state entry holding a model's compiled components
DEFAULT_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")  # what the UNet has when nothing changed it
UNET_EXTRAS = (  # UNet forward arguments the converted graph does not take: any of them set runs PyTorch
    "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs", "added_cond_kwargs",
    "down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


def with_openvino(pipe, loaded, settings):
    """`pipe`, or `pipe` whose call runs the loaded model's UNet and VAE decoder in OpenVINO when the settings
    ask for it and the model can (fp32 on the CPU; a UNet without added conditioning)."""
    if settings.backend != "openvino":
        return pipe
    unet = getattr(pipe, "unet", None)
    if loaded.device.type != "cpu" or loaded.dtype != torch.float32:
        log.warning("the OpenVINO backend runs fp32 on the CPU; this model runs %s on %s: PyTorch used",
                    loaded.dtype, loaded.device)
        return pipe
    if unet is not loaded.pipe.unet or getattr(unet.config, "addition_embed_type", None):
        return pipe  # a copy (fine-tuned) or SDXL's added conditioning: PyTorch
    return OpenVinoPipeline(pipe, models=compiled_models(loaded, settings))


class OpenVinoPipeline(PipelineWrapper):
    """A pipeline whose call runs its UNet and VAE decoder through OpenVINO wherever that computes the same."""

    def __call__(self, *args, **kwargs):
        unet = self._pipe.unet
        if _unet_changed(unet):
            return self._pipe(*args, **kwargs)
        self._models.prepare()  # converts (traces) the plain modules, so before their methods are shadowed
        # An instance attribute shadows the UNet's forward for this call only (deleted after it), so the module
        # keeps its class, config and weights for everything else (LoRAs, Imagic's fine-tuning).
        unet.forward = self._models.unet_forward(unet.forward)
        try:
            return self._pipe(*args, **kwargs)
        finally:
            del unet.forward


def _unet_changed(unet) -> bool:
    """True when the UNet no longer computes what was converted (a LoRA, custom attention processors)."""
    if getattr(unet, "peft_config", None) or "forward" in vars(unet):
        return True
    return any(type(p).__name__ not in DEFAULT_PROCESSORS for p in unet.attn_processors.values())


class CompiledModels:
    """One model's UNet and VAE decoder compiled for OpenVINO's CPU plugin, converted on first use."""

    def __init__(self, loaded, settings):
        import openvino

        self._loaded = loaded
        self._core = openvino.Core()
        folder = settings.compiled_cache
        self._folder = None
        if folder is not None:
            identity = f"{loaded.model_hash}-{'ema' if settings.use_ema else 'trained'}-{openvino.__version__}"
            # Not OpenVINO's CACHE_DIR as well: its compiled blobs hold a third copy of the weights (3.4 GB for
            # SD 1.5), to save the 4 s that compiling the read-back model takes.
            self._folder = Path(folder) / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self._config = {"INFERENCE_PRECISION_HINT": "f32"}  # the same numbers as PyTorch, not bf16
        if settings.threads:
            self._config["INFERENCE_NUM_THREADS"] = settings.threads
        self._lock = threading.Lock()
        self._compiled: dict[str, object] = {}
        pipe = loaded.pipe
        # The traced UNet graph takes latents whose sides divide by this (its upsampling sizes are fixed then).
        self.latent_multiple = 2 ** (len(pipe.unet.config.down_block_types) - 1)

    def unet_forward(self, torch_forward):
        def forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **extras):
            if args or any(_is_set(extras.get(name)) for name in UNET_EXTRAS) or not self._fits(sample):
                return torch_forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **extras)
            timesteps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
            output = self._infer("unet", sample, timesteps, encoder_hidden_states)
            if not return_dict:
                return (output,)
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)

        return forward

    def vae_decode(self, vae, torch_decode):
        def decode(latents, return_dict=True, generator=None):
            if vae.use_tiling or vae.use_slicing or latents.dtype != torch.float32 or latents.device.type != "cpu":
                return torch_decode(latents, return_dict=return_dict, generator=generator)
            output = self._infer("vae_decoder", latents)
            if not return_dict:
                return (output,)
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=output)

        return decode

    def _fits(self, sample: torch.Tensor) -> bool:
        height, width = sample.shape[-2:]
        return (sample.dtype == torch.float32 and sample.device.type == "cpu"
                and height % self.latent_multiple == 0 and width % self.latent_multiple == 0)

    def prepare(self) -> None:
        """Convert (or read back) and compile both components, once; from then on the model's VAE decodes
        through OpenVINO (the tasks decode after sampling; the VAE is never trained, and a request's own VAE
        is another module)."""
        with self._lock:
            for component in ("unet", "vae_decoder"):
                if component not in self._compiled:
                    model = self._read(component) or self._convert(component)
                    self._compiled[component] = self._core.compile_model(model, "CPU", self._config)
            vae = self._loaded.pipe.vae
            if "decode" not in vars(vae):
                vae.decode = self.vae_decode(vae, vae.decode)

    def _infer(self, component: str, *inputs: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled[component]
        request = compiled.create_infer_request()  # one per call: calls may come from several threads
        result = request.infer([tensor.detach().contiguous().numpy() for tensor in inputs], share_inputs=True)
        return torch.from_numpy(result[0].copy())

    def _read(self, component: str):
        path = self._folder / f"{component}.xml" if self._folder else None
        return self._core.read_model(path) if path is not None and path.is_file() else None

    def _convert(self, component: str):
        import openvino

        started = time.perf_counter()
        log.info("converting the %s to OpenVINO (once per model; saved for later runs)", component.replace("_", " "))
        module, example, inputs = _traceable(self._loaded.pipe, component)
        with torch.no_grad():
            model = openvino.convert_model(module, example_input=example, input=inputs)
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True)
            partial = self._folder / f"{component}.partial.xml"
            openvino.save_model(model, partial, compress_to_fp16=False)
            partial.with_suffix(".bin").replace(self._folder / f"{component}.bin")  # weights first, then the
            partial.replace(self._folder / f"{component}.xml")  # graph: a reader never sees half a pair
        log.info("converted the %s in %.1f s", component.replace("_", " "), time.perf_counter() - started)
        return model


def compiled_models(loaded, settings) -> CompiledModels:
    """The loaded model's OpenVINO components (kept with the model, freed with it)."""
    models = loaded.task_state.get(STATE_KEY)
    if models is None:
        models = loaded.task_state[STATE_KEY] = CompiledModels(loaded, settings)
    return models


def _is_set(value) -> bool:
    return value is not None and not (isinstance(value, dict) and not value)


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def _traceable(pipe, component: str):
    """(module, example inputs, input names and shapes with free batch and size) for convert_model."""
    side = 2 ** len(pipe.unet.config.down_block_types)  # a small latent every down block can halve
    if component == "unet":
        config = pipe.unet.config
        example = (torch.randn(2, config.in_channels, side, side), torch.tensor([500.0, 500.0]),
                   torch.randn(2, 77, config.cross_attention_dim))
        inputs = [("sample", [-1, config.in_channels, -1, -1]), ("timestep", [-1]),
                  ("encoder_hidden_states", [-1, -1, config.cross_attention_dim])]
        return _UNetGraph(pipe.unet), example, inputs
    channels = pipe.vae.config.latent_channels
    return _DecoderGraph(pipe.vae), (torch.randn(1, channels, side, side),), [("latents", [-1, channels, -1, -1])]
