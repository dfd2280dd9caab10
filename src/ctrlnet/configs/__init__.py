"""The configs that ship with ctrlnet, and what they tell.

- ``sd15/``, ``sd21/``, ``sdxl/``: diffusers-layout configs (UNet, VAE, text encoders, scheduler)
  of the known bases: a single-file checkpoint is built from them, offline.
- ``train/``: ``ctrlnet train`` configs by name (``nano-canny`` -> ``train/nano-canny.yaml``).
- ``accelerate/``: launch configs for several GPUs or nodes.

Base classification lives here, beside the configs it compares with: a UNet (or ControlNet) is
``sd15`` / ``sd21`` / ``sdxl`` when its weight layout equals that base's, else ``custom``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.controlnet import ControlNetConfig

CONFIGS_DIR = Path(__file__).resolve().parent
TRAIN_CONFIGS_DIR = CONFIGS_DIR / "train"
KNOWN_BASES = ("sd15", "sd21", "sdxl")
# Structural fields: equal values mean the same weight layout.
STRUCTURAL = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
              "use_linear_projection", "transformer_layers_per_block", "addition_embed_type", "mid_block_type")


def known_base_unet_config(name: str) -> dict[str, Any]:
    """The shipped diffusers UNet config of a known base (sd15, sd21, sdxl)."""
    return json.loads((CONFIGS_DIR / name / "unet" / "config.json").read_text())


def known_controlnet_config(name: str, **overrides) -> ControlNetConfig:
    return ControlNetConfig.from_unet_config(known_base_unet_config(name), **overrides)


def _layout(config: ControlNetConfig) -> dict[str, Any]:
    d = {f: list(v) if isinstance(v := getattr(config, f), (tuple, list)) else v for f in STRUCTURAL}
    if isinstance(d["transformer_layers_per_block"], int):  # 1 and (1, 1, 1, 1) are the same layout
        d["transformer_layers_per_block"] = [d["transformer_layers_per_block"]] * len(config.down_block_types)
    return d


def classify_base(config: ControlNetConfig) -> str:
    """sd15 / sd21 / sdxl when the weight layout equals that base's, else custom."""
    layout = _layout(config)
    for name in KNOWN_BASES:
        if _layout(known_controlnet_config(name)) == layout:
            return name
    return "custom"


def classify_unet(unet_config: dict) -> str:
    """The base family of a diffusers UNet config (its ControlNet's layout), or custom."""
    try:
        return classify_base(ControlNetConfig.from_unet_config(unet_config))
    except ValueError:
        return "custom"


def shipped_train_configs() -> dict[str, Path]:
    """The training configs that ship with ctrlnet, by name (``nano-canny`` -> .../nano-canny.yaml)."""
    return {p.stem: p for p in sorted(TRAIN_CONFIGS_DIR.glob("*.yaml"))}
