"""Text-to-image with a locked base: the denoising loop written out (diffusers' schedulers).

With no ControlNets this is the base alone; ControlNets add their residuals to the locked UNet
at every step (their hint features computed once).
Supports epsilon and v-prediction bases and classifier-free guidance with
``guidance_rescale`` (Lin et al. 2023, arXiv 2305.08891, section 3.4), which
zero-terminal-SNR models such as the nano base need.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..base import BaseModel
from ..models.control import controlled_unet_forward, sum_residuals
from ..models.controlnet import ControlNet


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Match the guided prediction's per-sample std to the conditional one's, mixed by ``guidance_rescale``."""
    if guidance_rescale <= 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, T) ids padded to the tokenizer's context; longer prompts are truncated."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(base: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (B, T, D), pooled (B, P) or None).

    SD1.x/2.x: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden
    states concatenated (768 + 1280 = 2048) and the second encoder's projected pooled output.
    """
    if base.text_encoder_2 is None:
        ids = tokenize(base.tokenizer, prompts).to(base.text_encoder.device)
        return base.text_encoder(ids)[0], None
    hidden, pooled = [], None
    for tok, enc in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        out = enc(tokenize(tok, prompts).to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P)
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """SDXL micro-conditioning (original size, crop top-left, target size): uncropped, same size."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.float32)


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """(B, T, D) text embeddings; prompts longer than the tokenizer's context are truncated."""
    return encode_text(base, prompts)[0]


@torch.no_grad()
def text_to_image(base: BaseModel, prompts: list[str], steps: int = 25, guidance: float = 2.5,
                  guidance_rescale: float = 0.7, seed: int = 0, height: int | None = None, width: int | None = None,
                  negative_prompt: str = "", scheduler=None, controlnets: Sequence[ControlNet] = (),
                  conditions: Sequence[torch.Tensor] = (), scales: Sequence[float] | None = None) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for ``prompts``; sample b's noise depends on (seed, b) only.

    ``controlnets[i]`` is driven by ``conditions[i]`` ((B, 3, H, W) in [0, 1]) at ``scales[i]``;
    each net's hint features are computed once, not per step.
    """
    unet, vae = base.unet, base.vae
    factor = base.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    scheduler = scheduler or base.scheduler
    b = len(prompts)
    if len(conditions) != len(controlnets):
        raise ValueError(f"{len(controlnets)} ControlNets but {len(conditions)} conditions")
    scales = list(scales) if scales is not None else [1.0] * len(controlnets)
    # 1. Prompts: conditional and unconditional embeddings, batched together for CFG.
    cond, pooled = encode_text(base, prompts)
    uncond, uncond_pooled = encode_text(base, [negative_prompt] * b)
    cfg = guidance > 1
    text = torch.cat([uncond, cond]) if cfg else cond  # (2B or B, T, D)
    added = None
    if pooled is not None:  # SDXL
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]) if cfg else pooled,
                 "time_ids": sdxl_time_ids(text.shape[0], height, width).to(text.device, text.dtype)}
    # 2. Control: hint features once per generation, doubled for CFG.
    hints = []
    for net, c in zip(controlnets, conditions):
        hint = net.embed_condition(c.to(net.device))
        hints.append(torch.cat([hint, hint]) if cfg else hint)
    # 3. Initial noise, per sample from its own generator: reproducible whatever the batch.
    shape = (unet.config.in_channels, height // factor, width // factor)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)])
    latents = latents.to(unet.device, unet.dtype)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    # 4. Denoising loop.
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        residuals = sum_residuals([net(model_in.to(net.dtype), t, text.to(net.dtype), hint=h, conditioning_scale=s,
                                       added_cond_kwargs=added)
                                   for net, h, s in zip(controlnets, hints, scales) if s != 0])
        pred = controlled_unet_forward(unet, model_in, t, text, residuals, added_cond_kwargs=added)
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    # 5. Decode.
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()
