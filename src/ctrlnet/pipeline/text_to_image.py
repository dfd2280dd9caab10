"""Text-to-image with a locked base: the denoising loop written out (diffusers' schedulers).

This is the base path (no control); the ControlNet pipeline builds on the same pieces.
Supports epsilon and v-prediction bases and classifier-free guidance with
``guidance_rescale`` (Lin et al. 2023, arXiv 2305.08891, section 3.4), which
zero-terminal-SNR models such as the nano base need.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import BaseModel


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Match the guided prediction's per-sample std to the conditional one's, mixed by ``guidance_rescale``."""
    if guidance_rescale <= 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """(B, T, D) text embeddings; prompts longer than the tokenizer's context are truncated."""
    tok = base.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return base.text_encoder(ids.to(base.text_encoder.device))[0]


@torch.no_grad()
def text_to_image(base: BaseModel, prompts: list[str], steps: int = 25, guidance: float = 2.5,
                  guidance_rescale: float = 0.7, seed: int = 0, height: int | None = None, width: int | None = None,
                  negative_prompt: str = "", scheduler=None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for ``prompts``; sample b's noise depends on (seed, b) only."""
    if base.text_encoder_2 is not None:
        raise NotImplementedError("SDXL text-to-image arrives with the generation pipeline (issue 6)")
    unet, vae = base.unet, base.vae
    factor = base.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    scheduler = scheduler or base.scheduler
    b = len(prompts)
    # 1. Prompts: conditional and unconditional embeddings, batched together for CFG.
    cond = encode_prompts(base, prompts)
    uncond = encode_prompts(base, [negative_prompt] * b)
    text = torch.cat([uncond, cond]) if guidance > 1 else cond  # (2B or B, T, D)
    # 2. Initial noise, per sample from its own generator: reproducible whatever the batch.
    shape = (unet.config.in_channels, height // factor, width // factor)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)])
    latents = latents.to(unet.device, unet.dtype)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    # 3. Denoising loop.
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if guidance > 1 else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in, t, text, return_dict=False)[0]
        if guidance > 1:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    # 4. Decode.
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
