"""Samplers by name, built from diffusers' schedulers with the base's own scheduler config
(so the noise schedule, prediction type, zero-terminal-SNR rescaling and timestep spacing of
the base carry over; only the integration method changes)."""

from __future__ import annotations

import diffusers

# name -> (diffusers class, extra config, A1111 name for the PNG parameters)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
}


def scheduler_key(name: str) -> str:
    """The ``SCHEDULERS`` key of a sampler name as users write it ("DPM++ 2M", "euler-a", ...); a
    ValueError listing the names when there is none."""
    key = name.lower().replace("-", "_").replace("+", "p").replace(" ", "_")
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, base_config):
    """A fresh scheduler ``name`` configured from ``base_config`` (the base's scheduler config)."""
    key = scheduler_key(name)
    cls_name, extra, _ = SCHEDULERS[key]
    config = {**dict(base_config), **extra}
    if key == "dpmpp_2m" and config.get("rescale_betas_zero_snr"):
        # zero terminal SNR makes the last sigma infinite; diffusers' DPM solver handles it by
        # ending on the final sigma 0 step with a first-order update
        config.setdefault("final_sigmas_type", "zero")
    return getattr(diffusers, cls_name).from_config(config)


def sampler_label(name: str) -> str:
    """The A1111 name of a sampler, for the PNG parameters."""
    return SCHEDULERS[scheduler_key(name)][2]
