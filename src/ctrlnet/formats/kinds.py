"""Every kind of control network, told apart by its keys, loaded, inspected and converted.

Kinds, the keys that tell them, their layouts:

- ``controlnet``: keys ``controlnet_cond_embedding.*`` / ``control_model.*`` / ``input_hint_block.*``;
  a diffusers folder, a single file, the original layout;
- ``union``: ``task_embedding`` (+ ``control_add_embedding.*``), 6 or 8 types by its rows; a diffusers
  folder, a single file;
- ``control_lora``: ``lora_controlnet``; Stability's single file (original names, ``.up``/``.down``);
- ``t2i_adapter``: ``conv_in`` + ``body.0.block1`` / ``body.0.in_conv`` / ``adapter.body.0.resnets``; a
  diffusers folder, TencentARC's original file.

A Control-LoRA has no architecture of its own: loading it needs the base UNet (``unet=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import T2IAdapter
from torch import nn

from ..models.control_lora import ControlLoRA
from ..models.controlnet import ControlNet
from ..models.union import ControlNetUnion, UnionConfig, union_type_names
from ..names import is_training_checkpoint
from .adapter_io import CONFIG_KEYS as ADAPTER_CONFIG_KEYS
from .adapter_io import is_adapter, load_adapter, save_adapter
from .checkpoint import read_checkpoint, unflat
from .control_lora_io import (MARKER, hint_channels, load_control_lora, lora_summary,
                              save_control_lora)
from .controlnet_io import (UNION_KEYS, _config_from_metadata, _read_diffusers_config, infer_config_from_diffusers_keys,
                            inspect_checkpoint, load_controlnet, resolve, save_controlnet)
from .safe_load import CheckpointError, json_field, read_state_dict

KINDS = ("controlnet", "union", "control_lora", "t2i_adapter")
FOLDER_CLASSES = {"ControlNetModel": "controlnet", "ControlNetUnionModel": "union", "T2IAdapter": "t2i_adapter"}
Control = ControlNet | T2IAdapter  # what load_control returns (ControlNetUnion, ControlLoRA are ControlNets)


def detect_kind(keys) -> str:
    """The kind of a state dict by its keys (see the module table); ``controlnet`` when none of the others."""
    keys = set(keys)
    if MARKER in keys:
        return "control_lora"
    if "task_embedding" in keys or any(k.startswith(UNION_KEYS[1:]) for k in keys):
        return "union"
    if is_adapter(keys):
        return "t2i_adapter"
    return "controlnet"


def kind_of(path: str | Path) -> str:
    """The kind of a file or folder (a bundled name or training checkpoint is a ControlNet)."""
    path = resolve(path)
    if is_training_checkpoint(path):  # `ctrlnet train` checkpoint: its config says (older ones: controlnet)
        return json_field(path / "state.json", "network", "controlnet")
    if path.is_dir():
        return FOLDER_CLASSES.get(json_field(path / "config.json", "_class_name", "ControlNetModel"), "controlnet")
    tensors, metadata = read_state_dict(path)
    return metadata.get("ctrlnet_kind") or detect_kind(tensors)


def kind_name(net: Any) -> str:
    """The kind of a loaded control network."""
    if isinstance(net, T2IAdapter):
        return "t2i_adapter"
    if isinstance(net, ControlLoRA):
        return "control_lora"
    if isinstance(net, ControlNetUnion):
        return "union"
    return "controlnet"


def load_control(path: str | Path, unet: nn.Module | None = None, dtype: torch.dtype | None = None) -> Control:
    """Any kind of control network from any of its layouts. ``unet``: the base UNet, needed by a
    Control-LoRA (whose net is built from it, sharing its weights)."""
    path = resolve(path)
    kind = kind_of(path)
    if is_training_checkpoint(path) and kind != "controlnet":
        net = network_from_checkpoint(path, kind, unet)
        return net.to(dtype) if dtype and kind == "t2i_adapter" else net
    if kind == "t2i_adapter":
        return load_adapter(path, dtype)[0]
    if kind == "control_lora":
        if unet is None:
            raise CheckpointError(f"{path}: a Control-LoRA is deltas on a base's weights; load it with its base "
                                  "(--base, or load_control(path, unet=base.unet))")
        return load_control_lora(path, unet, dtype)
    return load_controlnet(path, dtype=dtype)


def network_from_checkpoint(path: Path, kind: str, unet: nn.Module | None) -> Control:
    """A Control-LoRA or T2I-Adapter from a ``ctrlnet train`` checkpoint folder (its EMA weights when
    the run kept them, as the final file would hold)."""
    tensors, state = read_checkpoint(path)
    weights = unflat("ema", tensors) or unflat("controlnet", tensors)
    config = state["controlnet_config"]
    if kind == "t2i_adapter":
        adapter = T2IAdapter(**{k: config[k] for k in ADAPTER_CONFIG_KEYS})
        adapter.load_state_dict(weights)
        return adapter.eval().requires_grad_(False)
    if unet is None:
        raise CheckpointError(f"{path}: a Control-LoRA checkpoint is deltas on a base's weights; load it with its "
                              "base (load_control(path, unet=base.unet))")
    net = ControlLoRA.from_unet(unet, rank=config["lora_rank"], conditioning_channels=config["conditioning_channels"],
                                conditioning_embedding_out_channels=tuple(
                                    config["conditioning_embedding_out_channels"]))
    missing = net.load_state_dict(weights, strict=False)
    absent = [k for k in missing.missing_keys if k not in net.tied]
    if absent or missing.unexpected_keys:
        raise CheckpointError(f"{path}: its Control-LoRA does not fit this base (missing {absent[:3]}, unexpected "
                              f"{missing.unexpected_keys[:3]})")
    return net.eval().requires_grad_(False)


def inspect_control(path: str | Path) -> dict[str, Any]:
    """``inspect_checkpoint`` for every kind: the kind first, then what that kind has (Union: its
    types; Control-LoRA: its ranks; T2I-Adapter: its type, channels and input channels)."""
    path = resolve(path)
    kind = kind_of(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    if is_training_checkpoint(path) and kind != "controlnet":
        tensors, state = read_checkpoint(path)
        weights = unflat("ema", tensors) or unflat("controlnet", tensors)
        return {"kind": kind, "path": str(path), "format": "ctrlnet-train-checkpoint", "step": state.get("step"),
                "parameters": sum(v.numel() for v in weights.values()), "config": state["controlnet_config"]}
    if kind in ("controlnet", "union"):
        info = {"kind": kind, **inspect_checkpoint(path), "file_bytes": size}
        if kind == "union":
            if path.is_dir():
                config = _read_diffusers_config(path / "config.json")
            else:
                tensors, metadata = read_state_dict(path)
                config = _config_from_metadata(metadata) or infer_config_from_diffusers_keys(tensors)
            if isinstance(config, UnionConfig):
                info.update(num_control_type=config.num_control_type,
                            types=list(union_type_names(config.num_control_type)),
                            variant={6: "union (6 types)", 8: "union ProMax (8 types)"}.get(config.num_control_type,
                                                                                        "custom"))
        return info
    if kind == "t2i_adapter":
        adapter, fmt = load_adapter(path)
        c = adapter.config
        base = "sdxl" if c.adapter_type == "full_adapter_xl" else (
            "sd15" if list(c.channels)[:1] == [320] else "custom")
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in adapter.parameters()})
        return {"kind": kind, "path": str(path), "format": fmt, "base": base, "adapter_type": c.adapter_type,
                "in_channels": c.in_channels, "channels": list(c.channels), "num_res_blocks": c.num_res_blocks,
                "downscale_factor": c.downscale_factor, "parameters": sum(p.numel() for p in adapter.parameters()),
                "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "file_bytes": size}
    tensors, _ = read_state_dict(path)
    cond_ch, widths = hint_channels(tensors)
    base = "sdxl" if "label_emb.0.0.weight" in tensors or "label_emb.0.0.up" in tensors else (
        "sd15" if "input_blocks.11.0.in_layers.0.weight" in tensors else "custom")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for k, v in tensors.items() if k != MARKER})
    return {"kind": kind, "path": str(path), "format": "control-lora", "base": base, **lora_summary(tensors),
            "conditioning_channels": cond_ch, "hint_channels": list(widths),
            "parameters": sum(v.numel() for k, v in tensors.items() if k != MARKER), "tensors": len(tensors) - 1,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "file_bytes": size}


CONVERSIONS = {
    "controlnet": ("diffusers", "single", "original"),
    "union": ("diffusers", "single"),
    "control_lora": ("control-lora", "diffusers", "single", "original"),
    "t2i_adapter": ("diffusers", "original"),
}


def convert_control(src: str | Path, out: str | Path, to: str, half: bool = False,
                    unet: nn.Module | None = None) -> tuple[str, Path]:
    """Write ``src`` in layout ``to`` (``CONVERSIONS`` per kind); (kind, written path). A Control-LoRA
    becomes a full ControlNet (its deltas merged into the base's weights, ``unet`` needed) with ``to``
    = diffusers | single | original, or is rewritten as itself with ``control-lora``."""
    kind = kind_of(src)
    if to not in CONVERSIONS[kind]:
        raise CheckpointError(f"{src}: a {kind} converts to {' | '.join(CONVERSIONS[kind])}, not {to!r}")
    net = load_control(src, unet=unet)
    if kind == "t2i_adapter":
        return kind, save_adapter(net, out, format=to, half=half)
    if kind == "control_lora":
        if to == "control-lora":
            return kind, save_control_lora(net, out, half=half)
        net = net.to_controlnet()
    return kind, save_controlnet(net, out, format=to, half=half)
