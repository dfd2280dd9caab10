"""Control-LoRA: a ControlNet stored as low-rank deltas on the locked base's encoder weights
(Stability AI's ``control-lora`` rank 128/256 files; ComfyUI's ``ControlLora``).

A layer of the encoder copy computes with ``W = W_base + up @ down`` (up (out, r), down (r, in*kh*kw),
no alpha: ComfyUI's ``ControlLoraOps``), where ``W_base`` is the base UNet's own tensor, shared, not
copied. Parameters the file stores in full (hint encoder, zero convolutions, and whatever else it
carries: norms, biases, embeddings) are the net's own; every other encoder parameter is the base's.
So the net costs ``rank * (in + out)`` per LoRA layer instead of ``in * out``.

Merged weights: during a generation (``with net.merged():``) each LoRA layer's ``W_base + up @ down`` is
computed once and kept, so a step costs what a plain ControlNet's does; outside it (training) each layer
either forms the sum at each call or computes ``W x + up (down x)``, whichever costs less for the
input's number of positions (``factorized_is_cheaper``: the deep, small levels factorized), and only
the deltas are held.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .controlnet import ControlNet, ControlNetConfig

ENCODER_PREFIXES = ("conv_in.", "time_embedding.", "add_embedding.", "class_embedding.", "down_blocks.", "mid_block.")
OWN_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


class LoRAMixin:
    """W = weight + up @ down for a Conv2d or Linear whose ``weight`` is the base's (frozen, shared)."""

    up: nn.Parameter
    down: nn.Parameter
    _merged: torch.Tensor | None

    def init_lora(self, rank: int, up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> None:
        w = self.weight
        up_shape = (w.shape[0], rank) + (1,) * (w.ndim - 2)
        down_shape = (rank,) + tuple(w.shape[1:])
        if up is None:  # a new delta: 0 (up = 0), trainable from the first step (down random, as LoRA)
            up = torch.zeros(up_shape, dtype=w.dtype, device=w.device)
            down = torch.empty(down_shape, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
        if up.numel() != math.prod(up_shape) or down.numel() != math.prod(down_shape):
            raise ValueError(f"LoRA up {tuple(up.shape)} / down {tuple(down.shape)} do not fit a weight of shape "
                             f"{tuple(w.shape)} with rank {rank}")
        self.up = nn.Parameter(up.reshape(up_shape).to(w.dtype))
        self.down = nn.Parameter(down.reshape(down_shape).to(w.dtype))
        self._merged = None

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def delta(self) -> torch.Tensor:
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.weight.shape)

    def merged_weight(self) -> torch.Tensor:
        if self._merged is not None:
            return self._merged
        return self.weight + self.delta().to(self.weight.dtype)

    def factorized_is_cheaper(self, rows: int) -> bool:
        """Without merged weights (training): whether ``x -> layer(x) + up(down(x))`` (extra work ~ rows *
        r * (in + out)) costs less than forming ``W + up @ down`` (~ out * r * in) for ``rows`` output
        positions. Few positions (deep levels, small batches): factorized; many: merged."""
        if self._merged is not None:  # a generation: merged once (the base's weights may be packed away now)
            return False
        fan_in, out = self.down[0].numel(), self.up.shape[0]  # the net's own tensors: W's fan-in and outputs
        return rows * (fan_in + out) < out * fan_in


class LoRAConv2d(LoRAMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base's weight may be in another dtype than the net's own tensors (a bf16 base, fp32 training)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        rows = x.numel() // x.shape[-3] // (self.stride[0] * self.stride[1])
        if self.groups == 1 and self.padding_mode == "zeros" and self.factorized_is_cheaper(rows):
            # W x + up (down x): down is a conv of W's shape with r outputs, up a 1x1 conv
            h = F.conv2d(x, self.down.to(x.dtype), None, self.stride, self.padding, self.dilation)
            return self._conv_forward(x, self.weight.to(x.dtype), bias) + F.conv2d(h, self.up.to(x.dtype))
        return self._conv_forward(x, self.merged_weight().to(x.dtype), bias)


class LoRALinear(LoRAMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.factorized_is_cheaper(x.numel() // x.shape[-1]):
            return F.linear(x, self.weight.to(x.dtype), bias) + F.linear(F.linear(x, self.down.to(x.dtype)),
                                                                           self.up.to(x.dtype))
        return F.linear(x, self.merged_weight().to(x.dtype), bias)


def with_lora(layer: nn.Conv2d | nn.Linear, rank: int, up=None, down=None) -> LoRAConv2d | LoRALinear:
    """A LoRA layer computing like ``layer`` (its weight and bias objects kept, not copied) plus a delta."""
    if isinstance(layer, nn.Conv2d):
        new = LoRAConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    elif isinstance(layer, nn.Linear):
        new = LoRALinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    else:
        raise TypeError(f"LoRA applies to Conv2d and Linear layers, not {type(layer).__name__}")
    new.weight = layer.weight
    new.bias = layer.bias
    new.init_lora(rank, up, down)
    return new


def lora_targets(net: ControlNet) -> list[str]:
    """The encoder-copy layers a new Control-LoRA puts deltas on: every Conv2d and Linear of the
    copied encoder (conv_in, time/added embeddings, down and middle blocks)."""
    return [name for name, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (name + ".").startswith(ENCODER_PREFIXES)
            and not isinstance(m, LoRAMixin)]


class ControlLoRA(ControlNet):
    """A ControlNet whose encoder copy is the base's weights plus low-rank deltas (see the module doc).

    Build with ``ControlLoRA.from_unet(unet, rank)`` (new, for training) or ``formats`` (a file). The
    base's tensors are tied by object: ``tied`` lists the parameter names that belong to the base.
    """

    def __init__(self, config: ControlNetConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.tied: set[str] = set()

    @classmethod
    def from_unet(cls, unet: nn.Module, rank: int = 128, **controlnet_kwargs) -> "ControlLoRA":
        """A new Control-LoRA on ``unet`` laid out as Stability's: a delta of rank min(rank, in, out) on
        every Conv2d and Linear weight of the encoder copy (tied to the base's), the encoder's 1-D tensors
        (biases, norms) its own copies, the hint encoder and zero convolutions new. Deltas start at 0
        (up = 0) and the zero convolutions at 0: it starts as "no control", like a ControlNet."""
        plain = ControlNet.from_unet(unet, **controlnet_kwargs)  # the encoder copied, hint/zero convs new
        net = cls(plain.config)
        net.load_state_dict(plain.state_dict())
        net.to(dtype=plain.dtype)
        del plain
        for name in lora_targets(net):
            w = net.get_submodule(name).weight
            net.set_lora(name, min(rank, w.shape[0], w.shape[1]))
        net.tie_to(unet, {f"{name}.weight" for name, _ in net.lora_layers()})
        return net

    def set_lora(self, name: str, rank: int, up: torch.Tensor | None = None, down: torch.Tensor | None = None):
        parent_name, _, child = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, child, with_lora(getattr(parent, child), rank, up, down))

    def tie_to(self, unet: nn.Module, names: set[str]) -> None:
        """Make the parameters ``names`` the base UNet's own tensors (shared, frozen)."""
        unet_params = dict(unet.named_parameters())
        for name in sorted(names):
            if name not in unet_params:
                raise KeyError(f"the base UNet has no {name!r} for this Control-LoRA")
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name)
            base = unet_params[name]
            if base.shape != getattr(module, attr).shape:
                raise ValueError(f"{name}: the base's {tuple(base.shape)} vs the Control-LoRA's "
                                 f"{tuple(getattr(module, attr).shape)} (a Control-LoRA for another base)")
            setattr(module, attr, base)
            self.tied.add(name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the net's own tensors (the base's, shared, may differ)."""
        return self.controlnet_mid_block.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.controlnet_mid_block.weight.device

    def own_to(self, device=None, dtype: torch.dtype | None = None, memory_format=None) -> "ControlLoRA":
        """``Module.to`` for the net's own tensors only: ``to`` would convert the base's shared parameters
        in place (the same Parameter objects), changing the base."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in self.tied:
                    continue
                kw = {"memory_format": memory_format} if memory_format is not None and p.ndim == 4 else {}
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else None, **kw)
        return self

    def tied_to(self, unet: nn.Module) -> bool:
        """Whether the base tensors this net uses are ``unet``'s own."""
        params = dict(self.named_parameters())
        unet_params = {id(p) for p in unet.parameters()}
        return all(id(params[n]) in unet_params for n in self.tied)

    def lora_layers(self) -> Iterator[tuple[str, LoRAMixin]]:
        return ((n, m) for n, m in self.named_modules() if isinstance(m, LoRAMixin))

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """What a Control-LoRA file holds: every parameter and buffer except the base's (``tied``)."""
        return {k: v for k, v in self.state_dict().items() if k not in self.tied}

    @property
    def rank(self) -> int:
        ranks = {m.rank for _, m in self.lora_layers()}
        return max(ranks) if ranks else 0

    @contextlib.contextmanager
    def merged(self):
        """Within: each LoRA layer computes with ``W_base + up @ down`` formed once (a generation)."""
        layers = [m for _, m in self.lora_layers()]
        try:
            with torch.no_grad():
                for m in layers:
                    m._merged = m.weight + m.delta().to(m.weight.dtype)
            yield self
        finally:
            for m in layers:
                m._merged = None

    def to_controlnet(self) -> ControlNet:
        """A plain ControlNet with the merged weights (a full copy: for export)."""
        plain = ControlNet(self.config)
        sd = {}
        for k, v in self.state_dict().items():
            if k.endswith((".up", ".down")):
                continue
            sd[k] = v
        with torch.no_grad():
            for name, m in self.lora_layers():
                sd[f"{name}.weight"] = m.weight + m.delta().to(m.weight.dtype)
        plain.load_state_dict(sd)
        return plain.to(self.dtype)
