"""Applying ControlNets to a locked base UNet.

The base is frozen completely (encoder and decoder: no base weight gets a gradient, unlike
the original ``sd_locked=True`` which still computed ~511M decoder gradients) and kept in
eval mode. Residuals of several ControlNets are summed, each with its own scale (paper;
A1111; diffusers' MultiControlNet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .controlnet import ControlNet

Residuals = tuple[tuple[torch.Tensor, ...], torch.Tensor]


def lock(module: nn.Module) -> nn.Module:
    """Freeze ``module``: no gradients, eval mode (dropout off, norms fixed)."""
    module.requires_grad_(False)
    module.eval()
    return module


def sum_residuals(residuals: Sequence[Residuals]) -> Residuals | None:
    """Element-wise sum of several ControlNets' (down_residuals, mid_residual)."""
    residuals = [r for r in residuals if r is not None]
    if not residuals:
        return None
    down, mid = residuals[0]
    for other_down, other_mid in residuals[1:]:
        if len(other_down) != len(down):
            raise ValueError(f"cannot sum ControlNets with {len(down)} and {len(other_down)} residuals")
        down = tuple(a + b for a, b in zip(down, other_down))
        mid = mid + other_mid
    return down, mid


def is_zero_scale(scale: float | Sequence[float]) -> bool:
    """The one rule for skipping a net: its scale is 0 for every residual (it is then not run at all)."""
    return all(s == 0 for s in scale) if isinstance(scale, (list, tuple)) else scale == 0


@dataclass
class ControlUnit:
    """One ControlNet with its condition and how strongly it acts; ``soft`` selects the soft scales
    0.825**(n-1-i) (guess mode / "my prompt is more important")."""

    net: ControlNet
    condition: torch.Tensor  # (B, 3, H, W) in [0, 1]
    scale: float | Sequence[float] = 1.0
    soft: bool = False

    def residuals(self, sample, timestep, encoder_hidden_states, **kwargs) -> Residuals:
        return self.net(sample, timestep, encoder_hidden_states, condition=self.condition,
                        conditioning_scale=self.scale, guess_mode=self.soft, **kwargs)


class ControlledUNet(nn.Module):
    """A locked base UNet plus trainable ControlNets: ``unet(x) + sum of residuals``.

    Calling ``train()`` on this module trains the ControlNets only; the base stays in eval.
    """

    def __init__(self, unet: nn.Module, controlnets: Sequence[ControlNet] = ()):
        super().__init__()
        self.unet = lock(unet)
        self.controlnets = nn.ModuleList(controlnets)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unet.eval()
        return self

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                conditions: Sequence[torch.Tensor | None] = (), scales: Sequence[float | Sequence[float]] | None = None,
                soft: Sequence[bool] | None = None, added_cond_kwargs: dict | None = None,
                **unet_kwargs) -> torch.Tensor:
        """conditions[i] drives controlnets[i]; a None condition or zero scale skips that net."""
        if len(conditions) != len(self.controlnets):
            raise ValueError(f"{len(self.controlnets)} ControlNets but {len(conditions)} conditions")
        scales = list(scales) if scales is not None else [1.0] * len(conditions)
        soft = list(soft) if soft is not None else [False] * len(conditions)
        units = [ControlUnit(net, c, s, g) for net, c, s, g in zip(self.controlnets, conditions, scales, soft)
                 if c is not None and not is_zero_scale(s)]
        residuals = sum_residuals([u.residuals(sample, timestep, encoder_hidden_states,
                                               added_cond_kwargs=added_cond_kwargs) for u in units])
        return controlled_unet_forward(self.unet, sample, timestep, encoder_hidden_states, residuals,
                                       added_cond_kwargs=added_cond_kwargs, **unet_kwargs)


def controlled_unet_forward(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                            residuals: Residuals | None, added_cond_kwargs: dict | None = None,
                            intrablock: Sequence[torch.Tensor] | None = None, **unet_kwargs) -> torch.Tensor:
    """The base UNet's prediction with control residuals added to its skip connections.

    diffusers' UNet adds ``mid_block_additional_residual`` to the middle-block output and
    ``down_block_additional_residuals[i]`` to skip tensor i before the decoder concatenates
    it, the same as the original ``h = cat([h, hs.pop() + control.pop()])``.
    ``intrablock``: T2I-Adapter features, added inside the down blocks (after each block's first
    layer, diffusers' ``down_intrablock_additional_residuals``; the UNet pops them, so a new list).
    """
    if intrablock is not None:
        unet_kwargs["down_intrablock_additional_residuals"] = [f.to(sample.dtype) for f in intrablock]
    if residuals is None:
        return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                    return_dict=False, **unet_kwargs)[0]
    down, mid = residuals
    dtype = sample.dtype
    return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                down_block_additional_residuals=[d.to(dtype) for d in down],
                mid_block_additional_residual=mid.to(dtype), return_dict=False, **unet_kwargs)[0]
