"""Reading and writing weights: format detection, key maps, safe and strict loading."""

from .controlnet_io import detect_format, infer_config, inspect_checkpoint, load_controlnet, save_controlnet
from .keymap import build_keymap, diffusers_to_original_key
from .kinds import CONVERSIONS, KINDS, convert_control, detect_kind, inspect_control, kind_name, kind_of, load_control
from .safe_load import CheckpointError, read_state_dict, write_safetensors

__all__ = ["CheckpointError", "read_state_dict", "write_safetensors", "build_keymap", "diffusers_to_original_key",
           "detect_format", "infer_config", "load_controlnet", "save_controlnet", "inspect_checkpoint",
           "CONVERSIONS", "KINDS", "detect_kind", "kind_of", "kind_name", "load_control", "inspect_control",
           "convert_control"]
