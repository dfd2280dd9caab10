"""The network only: ControlNet and how it is applied to a locked UNet. No I/O here."""

from .control import ControlledUNet, ControlUnit, controlled_unet_forward, is_zero_scale, lock, sum_residuals
from .controlnet import SOFT_SCALE_BASE, ControlNet, ControlNetConfig, HintEncoder, zero_module

__all__ = ["ControlNet", "ControlNetConfig", "HintEncoder", "zero_module", "SOFT_SCALE_BASE",
           "ControlledUNet", "ControlUnit", "controlled_unet_forward", "is_zero_scale", "lock", "sum_residuals"]
