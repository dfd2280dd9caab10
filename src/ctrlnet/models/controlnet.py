"""ControlNet: a trainable copy of a pretrained UNet's encoder, joined to the locked UNet
through zero-initialised 1x1 convolutions (Zhang et al. 2023, arXiv 2302.05543).

Built up from the smallest part: ``zero_module`` -> ``HintEncoder`` -> ``ControlNetConfig``
-> ``ControlNet``. Module names follow diffusers' ``ControlNetModel`` one to one, so the
diffusers format is a plain save and the original (lllyasviel) format is a key map
(``ctrlnet.formats.keymap``). The layers themselves (ResNet blocks, transformers, time
embeddings) are diffusers' building blocks, so a copy of a UNet's encoder is the same code
as the UNet it came from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UNetMidBlock2DCrossAttn, get_down_block

# Guess mode / A1111 "My prompt is more important": residual i of n is scaled by
# 0.825 ** (n - 1 - i), from 0.0994 (shallowest of 13) to 1.0 (middle block).
# Source: lllyasviel/ControlNet gradio apps, `model.control_scales`.
SOFT_SCALE_BASE = 0.825


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to 0: the zero convolution of the paper.

    With y = w x + b and w = b = 0 the output is 0 whatever x is, yet dy/dw = x and
    dy/db = 1 are not, so the first optimizer step moves the layer off zero.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class HintEncoder(nn.Module):
    """The condition encoder (original ``input_hint_block``, diffusers
    ``controlnet_cond_embedding``): 3x3 convs with SiLU between them, pairs of
    (same-width conv, widening conv), ending in a zero-initialised conv to the UNet width.

    (B, 3, H, W) -> (B, C0, H / f, W / f), where f = ``downsample_factor`` must match the
    base's latent downsampling (8 for an SD VAE, 1 for a pixel-space base). The widening
    convs of the last log2(f) pairs have stride 2, so the default (16, 32, 96, 256) with
    f = 8 is exactly the released ControlNet (the paper's text differs; the code is the
    standard).
    """

    def __init__(self, out_channels: int, in_channels: int = 3,
                 channels: Sequence[int] = (16, 32, 96, 256), downsample_factor: int = 8):
        super().__init__()
        n_pairs = len(channels) - 1
        n_strided = int(math.log2(downsample_factor))
        if 2 ** n_strided != downsample_factor or n_strided > n_pairs:
            raise ValueError(
                f"conditioning_downsample_factor={downsample_factor} must be a power of two no "
                f"larger than 2**{n_pairs} (one stride-2 conv per channel step of {tuple(channels)})")
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(n_pairs):
            stride = 2 if i >= n_pairs - n_strided else 1
            self.blocks.append(nn.Conv2d(channels[i], channels[i], kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(channels[i], channels[i + 1], kernel_size=3, padding=1, stride=stride))
        self.conv_out = zero_module(nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(condition))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


@dataclass
class ControlNetConfig:
    """Architecture of a ControlNet. Field names and meanings are those of diffusers'
    ``ControlNetModel`` config (so ``config.json`` interoperates), defaults are SD1.5's.

    ``conditioning_downsample_factor`` is ctrlnet's own: None means 2**(len(channels)-1),
    the only value diffusers and the original code can represent.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical naming: for SD UNets `attention_head_dim` holds the number of heads.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    conditioning_downsample_factor: int | None = None

    # UNet config keys that change the encoder in ways this implementation does not build.
    UNSUPPORTED_UNET_KEYS = {
        "encoder_hid_dim_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
        "time_embedding_type": "positional", "conv_in_kernel": 3, "dual_cross_attention": False,
        "attention_type": "default", "class_embeddings_concat": False,
    }

    def __post_init__(self):
        for name in ("down_block_types", "block_out_channels", "conditioning_embedding_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("only_cross_attention", "transformer_layers_per_block",
                     "attention_head_dim", "num_attention_heads"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        if len(self.block_out_channels) != len(self.down_block_types):
            raise ValueError(f"block_out_channels {self.block_out_channels} and down_block_types "
                             f"{self.down_block_types} must have the same length")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"layers_per_block must be one int, got {self.layers_per_block!r}")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not supported "
                             "(only None and 'text_time' as in SDXL)")
        if self.class_embed_type not in (None, "timestep", "projection", "identity"):
            raise ValueError(f"class_embed_type={self.class_embed_type!r} is not supported")

    @property
    def hint_downsample_factor(self) -> int:
        if self.conditioning_downsample_factor is not None:
            return self.conditioning_downsample_factor
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_residuals(self) -> int:
        """Residuals for the UNet's skip connections, the middle one included (13 for SD1.5)."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1) + 1

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> "ControlNetConfig":
        known = set(cls.field_names())
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if strict and unknown:
            raise ValueError(f"unknown ControlNet config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_unet_config(cls, unet_config: dict[str, Any], **overrides) -> "ControlNetConfig":
        """The encoder part of a diffusers ``UNet2DConditionModel`` config."""
        unet_config = dict(unet_config)
        for key, ok in cls.UNSUPPORTED_UNET_KEYS.items():
            if unet_config.get(key, ok) != ok:
                raise ValueError(f"UNet config {key}={unet_config[key]!r} is not supported by ctrlnet's "
                                 f"ControlNet (expected {ok!r})")
        d = {k: v for k, v in unet_config.items() if k in cls.field_names()}
        d.setdefault("mid_block_type", "UNetMidBlock2DCrossAttn")
        # Fields absent from an old UNet config take diffusers' UNet defaults, not ours.
        d.setdefault("cross_attention_dim", 1280)
        d.update(overrides)
        return cls.from_dict(d)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class ControlNet(nn.Module):
    """Trainable encoder copy + hint encoder + zero convolutions.

    ``forward`` returns ``(down_residuals, mid_residual)``: one tensor per skip connection
    of the base UNet (13 for SD1.5: 320@64 x3, 320@32, 640@32 x2, 640@16, 1280@16 x2,
    1280@8 x3 at 512px) and one for the middle block; all exactly zero at initialisation.
    """

    def __init__(self, config: ControlNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = ControlNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ControlNetConfig or keyword fields, not both")
        self.config = c = config
        n = len(c.down_block_types)
        heads = _per_block(c.num_attention_heads or c.attention_head_dim, n)
        head_dims = _per_block(c.attention_head_dim, n)
        cross_only = _per_block(c.only_cross_attention, n)
        transformer_layers = _per_block(c.transformer_layers_per_block, n)
        ch0 = c.block_out_channels[0]
        time_embed_dim = ch0 * 4

        # input_blocks.0: conv_in (B, in, h, w) -> (B, ch0, h, w)
        self.conv_in = nn.Conv2d(c.in_channels, ch0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch0, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, time_embed_dim, act_fn=c.act_fn)

        self.class_embedding = None
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, time_embed_dim)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(ch0, time_embed_dim)
        elif c.class_embed_type == "identity":
            self.class_embedding = nn.Identity(time_embed_dim, time_embed_dim)
        elif c.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)

        if c.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)

        self.controlnet_cond_embedding = HintEncoder(
            ch0, c.conditioning_channels, c.conditioning_embedding_out_channels, c.hint_downsample_factor)

        # zero_convs: one per encoder output (conv_in, each layer, each downsampler).
        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_module(nn.Conv2d(ch0, ch0, 1))])
        out_ch = ch0
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            is_last = i == n - 1
            self.down_blocks.append(get_down_block(
                block_type, num_layers=c.layers_per_block, transformer_layers_per_block=transformer_layers[i],
                in_channels=in_ch, out_channels=out_ch, temb_channels=time_embed_dim,
                add_downsample=not is_last, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                resnet_groups=c.norm_num_groups, cross_attention_dim=c.cross_attention_dim,
                num_attention_heads=heads[i],
                attention_head_dim=head_dims[i] if head_dims[i] is not None else out_ch,
                downsample_padding=c.downsample_padding, use_linear_projection=c.use_linear_projection,
                only_cross_attention=cross_only[i], upcast_attention=c.upcast_attention,
                resnet_time_scale_shift=c.resnet_time_scale_shift))
            for _ in range(c.layers_per_block + (0 if is_last else 1)):
                self.controlnet_down_blocks.append(zero_module(nn.Conv2d(out_ch, out_ch, 1)))

        mid_ch = c.block_out_channels[-1]
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=transformer_layers[-1], in_channels=mid_ch,
                temb_channels=time_embed_dim, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                output_scale_factor=c.mid_block_scale_factor, resnet_time_scale_shift=c.resnet_time_scale_shift,
                cross_attention_dim=c.cross_attention_dim, num_attention_heads=heads[-1],
                resnet_groups=c.norm_num_groups, use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention)
        elif c.mid_block_type == "UNetMidBlock2D":
            self.mid_block = UNetMidBlock2D(
                in_channels=mid_ch, temb_channels=time_embed_dim, num_layers=0, resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn, output_scale_factor=c.mid_block_scale_factor,
                resnet_groups=c.norm_num_groups, resnet_time_scale_shift=c.resnet_time_scale_shift,
                add_attention=False)
        else:
            raise ValueError(f"mid_block_type={c.mid_block_type!r} is not supported")
        # middle_block_out
        self.controlnet_mid_block = zero_module(nn.Conv2d(mid_ch, mid_ch, 1))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(cls, unet: nn.Module, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                  conditioning_downsample_factor: int | None = None,
                  load_weights_from_unet: bool = True, **config_overrides) -> "ControlNet":
        """A ControlNet whose encoder is a copy of ``unet``'s (a diffusers
        ``UNet2DConditionModel``), weights included, as ``tool_add_control.py`` does.

        ``conditioning_downsample_factor`` defaults to the base's latent factor when the base
        is in pixel space (``in_channels == 3`` -> 1), else 8 (the SD VAE).
        """
        unet_config = dict(unet.config)
        if conditioning_downsample_factor is None and unet_config.get("in_channels") == 3:
            conditioning_downsample_factor = 1
        if conditioning_downsample_factor == 2 ** (len(conditioning_embedding_out_channels) - 1):
            conditioning_downsample_factor = None  # the default: keep the config diffusers-compatible
        config = ControlNetConfig.from_unet_config(
            unet_config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_downsample_factor=conditioning_downsample_factor, **config_overrides)
        net = cls(config)
        if load_weights_from_unet:
            net.load_encoder_from_unet(unet)
        return net.to(dtype=next(unet.parameters()).dtype)

    def load_encoder_from_unet(self, unet: nn.Module) -> None:
        """Copy every encoder weight (conv_in, embeddings, down and mid blocks) from ``unet``."""
        unet_sd = unet.state_dict()
        own = self.state_dict()
        copied = 0
        for key, value in own.items():
            if key.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")):
                continue
            if key not in unet_sd:
                raise KeyError(f"UNet has no weight {key!r} to copy into the ControlNet")
            if unet_sd[key].shape != value.shape:
                raise ValueError(f"shape mismatch for {key}: UNet {tuple(unet_sd[key].shape)} vs "
                                 f"ControlNet {tuple(value.shape)}")
            value.copy_(unet_sd[key])
            copied += 1
        assert copied > 0

    # ------------------------------------------------------------------ helpers

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each ResNet/transformer block in backward instead of storing activations."""
        def checkpoint(module, *args):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
                m._gradient_checkpointing_func = checkpoint

    def residual_scales(self, conditioning_scale: float | Sequence[float] = 1.0,
                        soft: bool = False) -> list[float]:
        """One multiplier per residual (down residuals, then the middle one).

        ``soft`` gives guess mode / "prompt is more important": scale * 0.825**(n-1-i).
        """
        n = self.config.num_residuals
        if isinstance(conditioning_scale, (int, float)):
            scales = [float(conditioning_scale)] * n
        else:
            scales = [float(s) for s in conditioning_scale]
            if len(scales) != n:
                raise ValueError(f"conditioning_scale has {len(scales)} values; this ControlNet has "
                                 f"{n} residuals (give one float or {n})")
        if soft:
            scales = [s * SOFT_SCALE_BASE ** (n - 1 - i) for i, s in enumerate(scales)]
        return scales

    def embed_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """Hint features (B, C0, h, w) from a condition image (B, 3, H, W) in [0, 1].
        Independent of the timestep, so a sampler computes them once per generation."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            condition = torch.flip(condition, dims=[1])
        return self.controlnet_cond_embedding(condition.to(self.dtype))

    def _time_embedding(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, class_labels):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32 if isinstance(timestep, float) else torch.long,
                                    device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))  # (B, 4*ch0)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this ControlNet needs class_labels (its base has a class embedding)")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL ControlNet needs added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}")
            text_embeds = added_cond_kwargs["text_embeds"]  # (B, pooled_dim)
            time_ids = added_cond_kwargs["time_ids"]  # (B, 6): size, crop, target size
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    # ------------------------------------------------------------------ forward

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                condition: torch.Tensor | None = None, conditioning_scale: float | Sequence[float] = 1.0,
                guess_mode: bool = False, hint: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                class_labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None,
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """sample (B, in, h, w) noisy latents; encoder_hidden_states (B, T, D); condition
        (B, 3, H, W) in [0, 1] with H = h * factor, or ``hint`` = ``embed_condition(condition)``.

        Returns (down_residuals, mid_residual), each already multiplied by its scale;
        ``guess_mode`` applies the soft scales 0.825**(n-1-i). Shuffle-style models
        (``global_pool_conditions``) average every residual over H and W.
        """
        if hint is None:
            if condition is None:
                raise ValueError("ControlNet.forward needs `condition` or precomputed `hint`")
            hint = self.embed_condition(condition)
        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)
        emb = self._time_embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs, class_labels)

        # The hint is ADDED once, right after conv_in (original cldm.py: h = conv_in(x) + hint).
        h = self.conv_in(sample)  # (B, ch0, h, w)
        if hint.shape[-2:] != h.shape[-2:]:
            f = self.config.hint_downsample_factor
            raise ValueError(f"condition gives hint features of size {tuple(hint.shape[-2:])} but latents are "
                             f"{tuple(h.shape[-2:])}: the condition image must be {f}x the latent size")
        h = h + hint.to(h.dtype)
        return self.encode(h, emb, encoder_hidden_states, attention_mask, cross_attention_kwargs,
                           conditioning_scale, guess_mode)

    def encode(self, h: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, attention_mask,
               cross_attention_kwargs, conditioning_scale: float | Sequence[float] = 1.0,
               guess_mode: bool = False) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The trunk from conv_in(x) + hint (B, C0, h, w): encoder, middle block, zero convolutions,
        scales (shared by every ControlNet kind)."""
        features = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states,
                               attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs)
            else:
                h, res = block(hidden_states=h, temb=emb)
            features.extend(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states,
                               attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs)
        else:
            h = self.mid_block(h, emb)

        scales = self.residual_scales(conditioning_scale, soft=guess_mode)
        down = [zc(f) * s for zc, f, s in zip(self.controlnet_down_blocks, features, scales)]
        mid = self.controlnet_mid_block(h) * scales[-1]
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid
