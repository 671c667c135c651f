"""Friendly sampler names onto diffusers schedulers (and the names A1111 writes in metadata)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import diffusers

from .requests import SCHEDULER_NAMES


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str  # diffusers scheduler class
    a1111_name: str  # "Sampler:" as A1111 writes it, so metadata readers recognise it
    options: dict = field(default_factory=dict)  # config overrides, e.g. Karras sigmas


SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", "Heun"),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "lms_karras": SchedulerChoice("LMSDiscreteScheduler", "LMS Karras", {"use_karras_sigmas": True}),
    "dpm++_2m": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpm++_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpm++_2m_sde": SchedulerChoice(
        "DPMSolverMultistepScheduler", "DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++"}
    ),
    "dpm++_2m_sde_karras": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE Karras",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpm++_sde": SchedulerChoice("DPMSolverSinglestepScheduler", "DPM++ SDE"),
    "dpm++_sde_karras": SchedulerChoice("DPMSolverSinglestepScheduler", "DPM++ SDE Karras", {"use_karras_sigmas": True}),
    "dpm2": SchedulerChoice("KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_a": SchedulerChoice("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "ddpm": SchedulerChoice("DDPMScheduler", "DDPM"),
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
    "deis": SchedulerChoice("DEISMultistepScheduler", "DEIS"),
    "lcm": SchedulerChoice("LCMScheduler", "LCM"),
    "tcd": SchedulerChoice("TCDScheduler", "TCD"),
}
assert set(SCHEDULERS) == set(SCHEDULER_NAMES), "requests.SCHEDULER_NAMES and SCHEDULERS must agree"


def supports_zero_terminal_snr(name: str) -> bool:
    """Whether the named sampler can follow a noise schedule rescaled to zero terminal SNR."""
    scheduler_class = getattr(diffusers, SCHEDULERS[name].class_name)
    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


def make_scheduler(name: str, base_config):
    """A new scheduler of the named kind, built from the model's own scheduler config.

    A model trained with a zero-terminal-SNR schedule (t = 999 is pure noise) is refused by
    samplers that would silently fall back to the ordinary schedule and draw with the wrong one.
    """
    choice = SCHEDULERS[name]
    if base_config.get("rescale_betas_zero_snr") and not supports_zero_terminal_snr(name):
        usable = ", ".join(n for n in SCHEDULERS if supports_zero_terminal_snr(n))
        raise ValueError(
            f"scheduler {name!r} cannot sample this model: it was trained with a zero-terminal-SNR noise "
            f"schedule, which {choice.class_name} does not implement; use one of: {usable}"
        )
    scheduler_class = getattr(diffusers, choice.class_name)
    return scheduler_class.from_config(base_config, **choice.options)


def a1111_sampler_name(name: str | None, scheduler) -> str:
    """The "Sampler:" text of the A1111 parameters block."""
    if name is not None:
        return SCHEDULERS[name].a1111_name
    for choice in SCHEDULERS.values():
        if choice.class_name == type(scheduler).__name__ and not choice.options:
            return choice.a1111_name
    return type(scheduler).__name__
