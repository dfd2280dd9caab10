"""Text-to-image on tensors: the shortest path through the loop in ``sampling`` (used by the
training monitor, the evals and the nano model's tests). ``Pipeline`` (``pipeline.controlled``)
is the full user-facing version with images, annotators, schedulers, img2img and inpainting."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import T2IAdapter

from ..base import LockedBase
from ..models.controlnet import ControlNet
from .ranges import check_args, check_seed
from .sampling import ActiveAdapter, ActiveControl, decode, default_guidance, denoise, initial_noise
from .text import guidance_text


@torch.no_grad()
def text_to_image(base: LockedBase, prompts: list[str], steps: int = 25, guidance: float | None = None,
                  guidance_rescale: float | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
                  negative_prompt: str = "", scheduler=None, controlnets: Sequence[ControlNet] = (),
                  conditions: Sequence[torch.Tensor] = (), scales: Sequence[float] | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for ``prompts``; sample b's noise depends on (seed, b) only.

    ``controlnets[i]`` (a ControlNet of any kind, or a T2I-Adapter) is driven by ``conditions[i]``
    ((B, 3, H, W) in [0, 1]) at ``scales[i]``;
    each net's hint features are computed once, not per step. ``guidance``/``guidance_rescale``
    default to the base's own (``sampling.default_guidance``). Numbers are checked against
    ``ranges.RANGES`` as ``Pipeline``'s are; ``seed`` must be given (no -1: nothing here would
    report the seed drawn).
    """
    default, default_rescale = default_guidance(base)
    guidance = guidance if guidance is not None else default
    guidance_rescale = guidance_rescale if guidance_rescale is not None else default_rescale
    check_args(steps=steps, guidance=guidance, guidance_rescale=guidance_rescale, width=width, height=height)
    check_seed(seed, len(prompts), random=False)
    unet = base.unet
    factor = base.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    scheduler = scheduler or base.scheduler
    b = len(prompts)
    if len(conditions) != len(controlnets):
        raise ValueError(f"{len(controlnets)} ControlNets but {len(conditions)} conditions")
    scales = list(scales) if scales is not None else [1.0] * len(controlnets)
    # 1. Prompts: [uncond; cond] batched together for CFG.
    text, added = guidance_text(base, prompts, negative_prompt, guidance > 1, height, width)  # (2B or B, T, D)
    # 2. Control: hint features once per generation.
    controls, adapters = [], []
    for net, c, s in zip(controlnets, conditions, scales):
        if isinstance(net, T2IAdapter):  # features once per generation, beside the ControlNets' residuals
            c = c.mean(dim=1, keepdim=True) if net.config.in_channels == 1 else c
            adapters.append(ActiveAdapter([f * s for f in net(c.to(net.device, net.dtype))]))
        else:
            controls.append(ActiveControl(net, net.embed_condition(c.to(net.device)), s))
    # 3. Initial noise.
    latents = initial_noise((unet.config.in_channels, height // factor, width // factor), b, seed).to(unet.device)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    # 4. Denoising loop, 5. decode.
    latents = denoise(base, latents, text, scheduler, scheduler.timesteps, guidance, guidance_rescale, controls,
                      added, adapters=adapters)
    return decode(base, latents).numpy()
