"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453): a light network that turns a condition image into
one feature map per UNet level, added inside the locked UNet's down blocks. It does not see the
latents, the timestep or the prompt, so its features are computed once per generation (a
ControlNet runs at every step).

The network is diffusers' ``T2IAdapter`` (``full_adapter`` for SD1.x/2.x, ``full_adapter_xl`` for
SDXL, ``light_adapter``); this module builds one that fits a base and checks that a loaded one does.
How the UNet takes the features (diffusers ``down_intrablock_additional_residuals``): a cross-attention
down block adds feature l after its first (ResNet, transformer) pair; a plain down block adds it to its
output; a feature left over of the middle block's shape is added there.
"""

from __future__ import annotations

from typing import Any

from diffusers import T2IAdapter

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


def adapter_channels(unet_config: dict[str, Any], adapter_type: str) -> list[int]:
    """The adapter's per-level channels for a UNet: its block widths (SD), or SDXL's four levels
    (c0, c1, c2, c2: the XL adapter feeds block 0's output, block 1, block 2 and the middle)."""
    ch = list(unet_config["block_out_channels"])
    if adapter_type == "full_adapter_xl":
        c2 = ch[2] if len(ch) > 2 else ch[-1]
        return [ch[0], ch[1] if len(ch) > 1 else ch[0], c2, c2]
    return ch


def xl_layout(unet_config: dict[str, Any]) -> bool:
    """Whether a UNet takes the XL adapter's features: its first down block has no attention (SDXL, nano), so
    feature 0 is added to that block's output after its downsampler, at half the latent size; SD1.x/2.x
    (attention from the first block) take feature 0 at the latent size."""
    return unet_config["down_block_types"][0] == "DownBlock2D" and len(unet_config["down_block_types"]) > 1


def adapter_for_unet(unet_config: dict[str, Any], adapter_type: str | None = None, in_channels: int = 3,
                     num_res_blocks: int = 2) -> T2IAdapter:
    """A new (randomly initialised) T2I-Adapter wired for a base UNet: ``full_adapter_xl`` for an SDXL-like
    UNet (``xl_layout``), ``full_adapter`` otherwise, unless ``adapter_type`` says."""
    if adapter_type is None:
        adapter_type = "full_adapter_xl" if xl_layout(unet_config) else "full_adapter"
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"adapter_type {adapter_type!r}: use one of {', '.join(ADAPTER_TYPES)}")
    return T2IAdapter(in_channels=in_channels, channels=adapter_channels(unet_config, adapter_type),
                      num_res_blocks=num_res_blocks, downscale_factor=16 if adapter_type == "full_adapter_xl" else 8,
                      adapter_type=adapter_type)


def adapter_problems(adapter: T2IAdapter, unet_config: dict[str, Any]) -> list[str]:
    """Why an adapter does not fit a base UNet (empty when it fits)."""
    problems = []
    want = adapter_channels(unet_config, adapter.config.adapter_type)
    have = list(adapter.config.channels)
    if have[:2] != want[:2]:
        problems.append(f"adapter channels {have} vs the base's {want}")
    xl_base = xl_layout(unet_config)
    if xl_base != (adapter.config.adapter_type == "full_adapter_xl"):
        problems.append(f"a {adapter.config.adapter_type} for an {'SDXL-like' if xl_base else 'SD1.x/2.x-like'} "
                        "base (a base whose first down block has no attention, as SDXL, takes full_adapter_xl)")
    return problems
