"""Text-to-image on tensors: the shortest path through the loop in ``sampling`` (used by the
training monitor, the evals and the nano model's tests). ``Pipeline`` (``pipeline.controlled``)
is the full user-facing version with images, annotators, schedulers, img2img and inpainting."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..base import LockedBase
from ..models.controlnet import ControlNet
from .sampling import ActiveControl, decode, denoise, encode_text, sdxl_time_ids


@torch.no_grad()
def encode_prompts(base: LockedBase, prompts: list[str]) -> torch.Tensor:
    """(B, T, D) text embeddings; prompts longer than the tokenizer's context are truncated."""
    return encode_text(base, prompts)[0]


def initial_noise(shape: tuple[int, ...], b: int, seed: int) -> torch.Tensor:
    """(b, *shape): sample i's noise from its own generator seeded ``seed + i``, so a sample
    does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)])


@torch.no_grad()
def text_to_image(base: LockedBase, prompts: list[str], steps: int = 25, guidance: float = 2.5,
                  guidance_rescale: float = 0.7, seed: int = 0, height: int | None = None, width: int | None = None,
                  negative_prompt: str = "", scheduler=None, controlnets: Sequence[ControlNet] = (),
                  conditions: Sequence[torch.Tensor] = (), scales: Sequence[float] | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for ``prompts``; sample b's noise depends on (seed, b) only.

    ``controlnets[i]`` is driven by ``conditions[i]`` ((B, 3, H, W) in [0, 1]) at ``scales[i]``;
    each net's hint features are computed once, not per step.
    """
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
    cond, pooled = encode_text(base, prompts)
    uncond, uncond_pooled = encode_text(base, [negative_prompt] * b)
    cfg = guidance > 1
    text = torch.cat([uncond, cond]) if cfg else cond  # (2B or B, T, D)
    added = None
    if pooled is not None:  # SDXL
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]) if cfg else pooled,
                 "time_ids": sdxl_time_ids(text.shape[0], height, width).to(text.device, text.dtype)}
    # 2. Control: hint features once per generation.
    controls = [ActiveControl(net, net.embed_condition(c.to(net.device)), s)
                for net, c, s in zip(controlnets, conditions, scales)]
    # 3. Initial noise.
    latents = initial_noise((unet.config.in_channels, height // factor, width // factor), b, seed).to(unet.device)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    # 4. Denoising loop, 5. decode.
    latents = denoise(base, latents, text, scheduler, scheduler.timesteps, guidance, guidance_rescale, controls,
                      added)
    return decode(base, latents).numpy()
