"""Reading and writing weights: format detection, key maps, safe and strict loading."""

from .controlnet_io import (classify_base, detect_format, infer_config, inspect_checkpoint, known_base_unet_config,
                            known_controlnet_config, load_controlnet, save_controlnet)
from .keymap import build_keymap, diffusers_to_original_key
from .safe_load import CheckpointError, read_state_dict, write_safetensors

__all__ = ["CheckpointError", "read_state_dict", "write_safetensors", "build_keymap", "diffusers_to_original_key",
           "detect_format", "infer_config", "classify_base", "known_base_unet_config", "known_controlnet_config",
           "load_controlnet", "save_controlnet", "inspect_checkpoint"]
