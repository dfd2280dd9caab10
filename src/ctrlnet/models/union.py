"""ControlNet Union: one ControlNet for several condition types (xinsir's controlnet-union-sdxl-1.0: 6
types; ProMax: 8), several (image, type) pairs at once through one trunk.

It is a ControlNet (same encoder copy, hint encoder and zero convolutions, diffusers'
``ControlNetUnionModel`` module names) plus:

- ``task_embedding`` (num_control_type, C): a learned vector per condition type;
- ``transformer_layes`` (sic, the checkpoints' name): a small transformer over one token per
  condition (its hint features' spatial mean + its type's vector);
- ``spatial_ch_projs``: a zero-initialised linear layer from a condition's output token to a
  per-channel offset ``alpha`` added to its hint features;
- ``control_type_proj`` + ``control_add_embedding``: the multi-hot vector of the types in use,
  sinusoid-embedded and added to the time embedding (as SDXL's size/crop ids).

The hint encoder runs once per condition per generation; the trunk runs once per step for all
pairs: ``conv_in(x) + sum_i (hint_i * w_i + alpha_i * w_i)`` enters the encoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from diffusers.models.controlnets.controlnet_union import ResidualAttentionBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from .controlnet import ControlNet, ControlNetConfig, zero_module

# Condition types by index. xinsir's union model cards (6 types; ProMax adds tile and repaint).
UNION_TYPES_6 = ("openpose", "depth", "hed", "canny", "normal", "segment")
UNION_TYPES_8 = UNION_TYPES_6 + ("tile", "repaint")
# The other names users (ComfyUI's SetUnionControlNetType, A1111) give the same slots.
UNION_ALIASES = {
    "pose": "openpose", "dwpose": "openpose", "scribble": "hed", "softedge": "hed", "pidi": "hed",
    "thick_line": "hed", "lineart": "canny", "mlsd": "canny", "thin_line": "canny", "edges": "canny",
    "seg": "segment", "segmentation": "segment", "inpaint": "repaint", "inpainting": "repaint",
    "outpaint": "repaint", "ted": "hed", "anime_lineart": "canny", "hard_edge": "canny", "soft_edge": "hed",
    "normal_map": "normal", "blur": "tile",
}


def union_type_names(num_control_type: int) -> tuple[str, ...]:
    if num_control_type == 6:
        return UNION_TYPES_6
    if num_control_type == 8:
        return UNION_TYPES_8
    return tuple(f"type{i}" for i in range(num_control_type))  # a custom union: indices only


def union_type_index(name: str | int, num_control_type: int, where: str = "control") -> int:
    """The slot of a condition type given by name (canny, depth, an alias such as lineart) or index."""
    names = union_type_names(num_control_type)
    if isinstance(name, int) or str(name).isdigit():
        i = int(name)
        if not 0 <= i < num_control_type:
            raise ValueError(f"{where}: type {i} is out of range for a {num_control_type}-type Union ControlNet")
        return i
    key = UNION_ALIASES.get(str(name).lower(), str(name).lower())
    if key not in names:
        raise ValueError(f"{where}: type {name!r} is not one of this {num_control_type}-type Union ControlNet's types: "
                         f"{', '.join(names)} (or an alias: {', '.join(sorted(UNION_ALIASES))}, or an index)")
    return names.index(key)


@dataclass
class UnionConfig(ControlNetConfig):
    """``ControlNetUnionModel``'s config: a ControlNet's plus the union parts (diffusers' names)."""

    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = 8
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    def __post_init__(self):
        super().__post_init__()
        if self.addition_time_embed_dim is None:
            raise ValueError("a Union ControlNet embeds its condition types with addition_time_embed_dim (SDXL: 256); "
                             "the base has none")
        if self.num_proj_channel != self.block_out_channels[0]:
            raise ValueError(f"num_proj_channel={self.num_proj_channel} must equal block_out_channels[0]="
                             f"{self.block_out_channels[0]} (alpha is added to the hint features)")

    @classmethod
    def from_controlnet_config(cls, config: ControlNetConfig, **union_fields) -> "UnionConfig":
        return cls(**dataclasses.asdict(config), **union_fields)


class ControlNetUnion(ControlNet):
    """A ControlNet taking several (condition, type) pairs; ``forward`` as ``ControlNet.forward`` with
    ``hint`` (B, n, C0, h, w) = one ``embed_condition`` per pair and ``control_types`` (n type indices).

    ``mix_batch``: xinsir's and diffusers' code run the token transformer with ``nn.MultiheadAttention``
    (sequence-first) on (B, n+1, C) tensors, so a token attends to the same-position tokens of the other
    images in the batch, never to the other tokens of its own image (the latents' token, last, affects
    nothing). When every image of the batch has the same conditions (the usual case, CFG halves
    included) that is each token attending to itself alone, which is what ctrlnet computes by default
    (as ComfyUI): an image then does not depend on its batch. True reproduces diffusers exactly also
    when the images of one batch have different conditions.
    """

    def __init__(self, config: UnionConfig | None = None, mix_batch: bool = False, **kwargs):
        config = config if config is not None else UnionConfig(**kwargs)
        super().__init__(config)
        c = config
        self.mix_batch = mix_batch
        time_embed_dim = c.block_out_channels[0] * 4
        self.task_embedding = nn.Parameter(c.num_trans_channel ** 0.5 * torch.randn(c.num_control_type,
                                                                                     c.num_trans_channel))
        self.transformer_layes = nn.ModuleList(
            [ResidualAttentionBlock(c.num_trans_channel, c.num_trans_head) for _ in range(c.num_trans_layer)])
        self.spatial_ch_projs = zero_module(nn.Linear(c.num_trans_channel, c.num_proj_channel))
        self.control_type_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        self.control_add_embedding = TimestepEmbedding(c.addition_time_embed_dim * c.num_control_type, time_embed_dim)

    @classmethod
    def from_unet(cls, unet: nn.Module, num_control_type: int = 6, load_weights_from_unet: bool = True,
                  **config_overrides) -> "ControlNetUnion":
        """A Union ControlNet whose encoder is a copy of ``unet``'s (union parts freshly initialised)."""
        plain = ControlNet.from_unet(unet, load_weights_from_unet=False, **config_overrides)
        ch0 = plain.config.block_out_channels[0]
        # the types' sinusoid width: the base's added-time width (SDXL: 256), or 256 for a base without one
        config = UnionConfig.from_controlnet_config(
            dataclasses.replace(plain.config, addition_time_embed_dim=plain.config.addition_time_embed_dim or 256),
            num_control_type=num_control_type, num_proj_channel=ch0, num_trans_channel=ch0)
        net = cls(config)
        if load_weights_from_unet:
            net.load_encoder_from_unet(unet)
        return net.to(dtype=next(unet.parameters()).dtype)

    def load_encoder_from_unet(self, unet: nn.Module) -> None:
        union_parts = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
        unet_sd = unet.state_dict()
        with torch.no_grad():
            for key, value in self.state_dict().items():
                if key.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
                                  + union_parts):
                    continue
                value.copy_(unet_sd[key])

    @property
    def type_names(self) -> tuple[str, ...]:
        return union_type_names(self.config.num_control_type)

    def type_index(self, name: str | int, where: str = "control") -> int:
        return union_type_index(name, self.config.num_control_type, where)

    def embed_conditions(self, conditions: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, n, C0, h, w): the hint features of n condition images, each (B, 3, H, W) in [0, 1]."""
        return torch.stack([self.embed_condition(c) for c in conditions], dim=1)

    def fuse(self, h: torch.Tensor, hint: torch.Tensor, control_types: Sequence[int],
             weights: Sequence[float] | None) -> torch.Tensor:
        """conv_in(x) (B, C0, h, w) plus the pairs' hint features, each with its alpha from the token
        transformer. ``weights`` (one per pair; diffusers applies its conditioning_scale here when
        several pairs are given) scale each pair's token, features and alpha."""
        n = hint.shape[1]
        weights = list(weights) if weights is not None else [1.0] * n
        tokens = hint.mean(dim=(3, 4)) + self.task_embedding[list(control_types)].to(hint.dtype)  # (B, n, C)
        tokens = tokens * hint.new_tensor(weights)[None, :, None]
        # (the latents' token of the original code is left out: it never reaches the conditions' tokens)
        b = tokens.shape[0]
        x = tokens if self.mix_batch else tokens.reshape(1, b * n, -1)  # sequence-first: (B, n) or (1, B*n)
        for layer in self.transformer_layes:
            x = layer(x)
        x = x.reshape(b, n, -1)
        alpha = self.spatial_ch_projs(x)[..., None, None]  # (B, n, C0, 1, 1)
        w = hint.new_tensor(weights)[None, :, None, None, None]
        return h + ((hint + alpha) * w).sum(dim=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                condition: torch.Tensor | Sequence[torch.Tensor] | None = None,
                conditioning_scale: float | Sequence[float] = 1.0, guess_mode: bool = False,
                hint: torch.Tensor | None = None, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                class_labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs=None, control_types: Sequence[int] = (0,),
                type_weights: Sequence[float] | None = None):
        """As ``ControlNet.forward``; ``condition`` a list of n images (or ``hint`` (B, n, C0, h, w)),
        ``control_types`` their n type indices, ``type_weights`` their n weights in the fusion."""
        if hint is None:
            if condition is None:
                raise ValueError("ControlNetUnion.forward needs `condition` (a list of images) or `hint`")
            hint = self.embed_conditions([condition] if torch.is_tensor(condition) else condition)
        control_types = list(control_types)
        if hint.ndim != 5 or hint.shape[1] != len(control_types):
            raise ValueError(f"hint of shape {tuple(hint.shape)} for {len(control_types)} control types: expected "
                             f"(B, {len(control_types)}, C, h, w)")
        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)
        emb = self._time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs, class_labels)
        multi_hot = torch.zeros(sample.shape[0], self.config.num_control_type, device=sample.device)
        multi_hot[:, control_types] = 1
        control = self.control_type_proj(multi_hot.flatten()).reshape(sample.shape[0], -1)  # (B, types * 256)
        emb = emb + self.control_add_embedding(control.to(emb.dtype))

        h = self.conv_in(sample)  # (B, C0, h, w)
        if hint.shape[-2:] != h.shape[-2:]:
            f = self.config.hint_downsample_factor
            raise ValueError(f"condition gives hint features of size {tuple(hint.shape[-2:])} but latents are "
                             f"{tuple(h.shape[-2:])}: the condition image must be {f}x the latent size")
        h = self.fuse(h, hint.to(h.dtype), control_types, type_weights)
        return self.encode(h, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs,
                           conditioning_scale, guess_mode)
