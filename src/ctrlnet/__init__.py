"""ctrlnet: ControlNet for pretrained text-to-image diffusion models.

    from ctrlnet import ControlNet, load_base, load_controlnet, save_controlnet
    base = load_base("path/to/stable-diffusion")          # locked: no grads, eval mode
    net = ControlNet.from_unet(base.unet)                  # trainable copy of the encoder
    down, mid = net(latents, t, text_embeddings, condition)
"""

from .base import LockedBase, load_base
from .formats import CheckpointError, inspect_checkpoint, load_controlnet, save_controlnet
from .models import ControlledUNet, ControlNet, ControlNetConfig, ControlUnit, lock, sum_residuals, zero_module
from .pipeline import Control, Pipeline, Region
from .version import __version__

__all__ = ["ControlNet", "ControlNetConfig", "ControlledUNet", "ControlUnit", "zero_module", "lock", "sum_residuals",
           "load_base", "LockedBase", "load_controlnet", "save_controlnet", "inspect_checkpoint", "CheckpointError",
           "Pipeline", "Control", "Region", "__version__"]
