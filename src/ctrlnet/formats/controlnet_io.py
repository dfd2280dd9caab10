"""ControlNet weights in every common format, read and written, detected from keys.

Formats (``detect_format``):

- ``diffusers``: a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (``ControlNetModel``), or a single file with diffusers key names;
- ``original``: lllyasviel v1.1 ControlNet-only files, keys ``control_model.*`` (or without
  the prefix, as some community extracts are), ``.pth``/``.safetensors``, fp32 or fp16;
- ``original-full``: v1.0 files holding the whole SD + ControlNet model; the ControlNet is
  filtered out (``control_model.*``), also when nested under Lightning's ``state_dict``.

Loading is strict: every key is accounted for, shapes must match, and an error lists the
first missing / unexpected keys and shape mismatches (the original apps load with
``strict=False`` and silently drop keys).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..configs import classify_base, known_controlnet_config
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.union import ControlNetUnion, UnionConfig
from ..names import UnknownName, controlnet_path, is_nano, is_training_checkpoint
from .checkpoint import controlnet_from_checkpoint, read_checkpoint, unflat
from .keymap import build_keymap
from .safe_load import (CheckpointError, json_field, read_config_json, read_state_dict, write_model_folder,
                        write_safetensors)

PREFIX = "control_model."
# keys of a whole Stable Diffusion checkpoint (CompVis / SGM single file): UNet, VAE, text encoder(s)
BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
NOT_A_CONTROLNET = "ctrlnet inspect / convert and --control read ControlNets; give a base as --base (load_base)"
CONFIG_METADATA_KEY = "ctrlnet_config"  # our exports carry their exact config in safetensors metadata
CONFIG_CLASSES = {"ControlNetModel": ControlNetConfig, "ControlNetUnionModel": UnionConfig}
UNION_KEYS = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
# ---------------------------------------------------------------- detection

def detect_format(keys, where: str = "") -> str:
    """The ControlNet format of a state dict's keys; a CheckpointError (prefixed with ``where``, the
    file) for anything else, naming a base model or a UNet when the keys say it is one."""
    keys = list(keys)
    if any(k.startswith(PREFIX) for k in keys):
        return "original-full" if any(k.startswith("model.diffusion_model.") for k in keys) else "original"
    if any(k.startswith(("input_hint_block.", "zero_convs.")) for k in keys):
        return "original"  # community extract without the control_model. prefix
    if any(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.")) for k in keys):
        return "diffusers"
    at = f"{where}: " if where else ""
    if any(k.startswith(BASE_PREFIXES) for k in keys):
        raise CheckpointError(f"{at}a Stable Diffusion base model (single-file checkpoint: UNet, VAE and text "
                              f"encoder keys), not a ControlNet; {NOT_A_CONTROLNET}")
    if any(k.startswith("up_blocks.") for k in keys):  # a ControlNet is an encoder: it has no up blocks
        raise CheckpointError(f"{at}a diffusers UNet's weights (up_blocks.* keys), not a ControlNet; "
                              f"{NOT_A_CONTROLNET}")
    sample = ", ".join(keys[:5])
    raise CheckpointError(f"{at}not a ControlNet checkpoint: no control_model.*, input_hint_block.* or "
                          f"controlnet_cond_embedding.* keys (first keys: {sample})")


def resolve(spec: str | Path) -> Path:
    """The path of a ControlNet spec (a path, or a bundled name); CheckpointError for an unknown
    name, and for the bundled base's name (``nano``), which is no ControlNet."""
    if is_nano(spec):
        raise CheckpointError(f"{spec}: the bundled base model, not a ControlNet; {NOT_A_CONTROLNET}")
    try:
        return controlnet_path(spec)
    except UnknownName as e:
        raise CheckpointError(str(e)) from None


def refuse_base_folder(path: Path) -> None:
    """A clear error for a diffusers base pipeline folder (``model_index.json``) given as a ControlNet."""
    index = path / "model_index.json"
    if index.is_file():
        kind = json_field(index, "_class_name", "a diffusers pipeline")
        raise CheckpointError(f"{path}: a base model folder ({kind}: model_index.json), not a ControlNet; "
                              f"{NOT_A_CONTROLNET}")


def original_controlnet_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-format ControlNet tensors without the ``control_model.`` prefix; a v1.0 full
    model's other parts (UNet, VAE, CLIP, schedule buffers) are left out."""
    if any(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return dict(sd)


# ---------------------------------------------------------------- config inference

def infer_config(original: dict[str, torch.Tensor]) -> ControlNetConfig:
    """The architecture of an original-format ControlNet, read off its keys and shapes.

    Attention head counts and GroupNorm groups leave no trace in the weights: when the
    layout matches a known base (SD1.5, SD2.x, SDXL) its full config is used; otherwise
    the SD conventions (8 heads with conv projections, 64-channel heads with linear ones,
    32 groups) are assumed. ctrlnet's own exports carry their exact config instead.
    """
    try:
        ch0, in_ch = original["input_blocks.0.0.weight"].shape[:2]
    except KeyError:
        raise CheckpointError("not an original-format ControlNet: no input_blocks.0.0.weight") from None
    hint_idx = sorted({int(m[1]) for k in original if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})
    if not hint_idx or hint_idx[0] != 0:
        raise CheckpointError("no input_hint_block.0.weight: not a ControlNet (or a T2I-Adapter / other model)")
    hint_w = [original[f"input_hint_block.{i}.weight"] for i in hint_idx]
    cond_ch = hint_w[0].shape[1]
    hint_channels = (hint_w[0].shape[0],) + tuple(w.shape[0] for w in hint_w[2:-1:2])

    blocks = sorted({int(m[1]) for k in original if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    ops = sorted({int(m[1]) for k in original if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k))})
    L = ops[0] - 1 if ops else blocks[-1]
    n_levels = len(ops) + 1
    channels, types, depth = [], [], []
    for b in range(n_levels):
        first = 1 + b * (L + 1)
        channels.append(original[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        tb = {int(m[1]) for k in original
              if (m := re.match(rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.", k))}
        types.append("CrossAttnDownBlock2D" if tb else "DownBlock2D")
        depth.append(len(tb) if tb else 1)
    proj = next((v for k, v in original.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((v for k, v in original.items() if k.endswith("attn2.to_k.weight")), None)
    use_linear = proj is not None and proj.ndim == 2
    mid_attn = any(k.startswith("middle_block.1.transformer_blocks.") for k in original)
    d = dict(
        in_channels=int(in_ch), conditioning_channels=int(cond_ch), block_out_channels=tuple(int(c) for c in channels),
        layers_per_block=int(L), down_block_types=tuple(types),
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else tuple(depth),
        cross_attention_dim=int(to_k.shape[1]) if to_k is not None else 1280,
        use_linear_projection=use_linear,
        attention_head_dim=tuple(max(1, int(c) // 64) for c in channels) if use_linear else 8,
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D",
        conditioning_embedding_out_channels=tuple(int(c) for c in hint_channels),
    )
    if "label_emb.0.0.weight" in original:  # SDXL: pooled text embeds + 6 size/crop ids
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=int(original["label_emb.0.0.weight"].shape[1]))
    config = ControlNetConfig(**d)
    base = classify_base(config)
    if base != "custom":
        config = known_controlnet_config(base, conditioning_channels=config.conditioning_channels,
                                         conditioning_embedding_out_channels=config.conditioning_embedding_out_channels)
    return config


def infer_config_from_diffusers_keys(tensors: dict[str, torch.Tensor]) -> ControlNetConfig:
    """``infer_config`` for a single file with diffusers key names and no config.json (a Union
    ControlNet's union parts read off their shapes too)."""
    union = {k: v for k, v in tensors.items() if k.startswith(UNION_KEYS)}
    tensors = {k: v for k, v in tensors.items() if k not in union}
    L = len({k.split(".")[3] for k in tensors if k.startswith("down_blocks.0.resnets.")})
    n_hint = len({k.split(".")[2] for k in tensors if k.startswith("controlnet_cond_embedding.blocks.")})
    keymap = build_keymap(tensors.keys(), L, n_hint)
    config = infer_config({keymap[k]: v for k, v in tensors.items()})
    if not union:
        return config
    types, width = union["task_embedding"].shape
    layers = {k.split(".")[1] for k in union if k.startswith("transformer_layes.")}
    type_width = int(union["control_add_embedding.linear_1.weight"].shape[1]) // int(types)  # SDXL: 256
    return UnionConfig.from_controlnet_config(
        dataclasses.replace(config, addition_time_embed_dim=config.addition_time_embed_dim or type_width),
        num_control_type=int(types), num_trans_channel=int(width), num_trans_layer=len(layers),
        num_proj_channel=int(union["spatial_ch_projs.weight"].shape[0]),
        num_trans_head=8 if width % 8 == 0 else 1)  # heads leave no trace in the weights; xinsir's: 8


# ---------------------------------------------------------------- strict loading

def load_strict(net: ControlNet, tensors: dict[str, torch.Tensor], source: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {title}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"{source}: weights do not fit this ControlNet architecture ({net_summary(net)}); "
                              + "; ".join(parts) + ". Check that the checkpoint matches the base model, "
                              "or pass the right config.")
    dtypes = [v.dtype for v in tensors.values() if v.is_floating_point()]
    net.to(max(set(dtypes), key=dtypes.count))  # keep the file's precision; callers cast with dtype=
    own = net.state_dict()
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k].to(v.dtype))


def net_summary(net: ControlNet) -> str:
    c = net.config
    return (f"base={classify_base(c)}, channels={list(c.block_out_channels)}, "
            f"cross_attention_dim={c.cross_attention_dim}")


def _config_from_metadata(metadata: dict[str, str]) -> ControlNetConfig | None:
    if CONFIG_METADATA_KEY in metadata:
        raw = json.loads(metadata[CONFIG_METADATA_KEY])
        return CONFIG_CLASSES.get(raw.get("_class_name", "ControlNetModel"), ControlNetConfig).from_dict(raw)
    return None


def _read_diffusers_config(path: Path) -> ControlNetConfig:
    raw = read_config_json(path, "ControlNet")
    cls = raw.get("_class_name", "ControlNetModel")
    if cls not in CONFIG_CLASSES:
        raise CheckpointError(f"{path}: _class_name is {cls!r}; ctrlnet reads {', '.join(CONFIG_CLASSES)} folders "
                              "here (T2I-Adapter folders: ctrlnet.formats.load_control)")
    try:
        return CONFIG_CLASSES[cls].from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unsupported ControlNet config: {e}") from None


def net_class(config: ControlNetConfig) -> type[ControlNet]:
    return ControlNetUnion if isinstance(config, UnionConfig) else ControlNet


def _build(config: ControlNetConfig, path: Path) -> ControlNet:
    try:
        return net_class(config)(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: the architecture read off this file cannot be built ({e}); pass its "
                              "config explicitly (load_controlnet(path, config=...))") from None


def load_controlnet(path: str | Path, config: ControlNetConfig | dict | None = None,
                    dtype: torch.dtype | None = None) -> ControlNet:
    """A ControlNet from any supported format (see module docstring), detected automatically.

    ``path`` may also name a bundled ControlNet (``nano-canny``, ``nano-segmentation``) or a
    ``ctrlnet train`` checkpoint folder (``run/checkpoints/step-000500``: its EMA weights if any).
    The net comes back in the file's precision unless ``dtype`` is given. ``config``
    overrides what is read or inferred (needed only for custom architectures saved
    by other tools, whose head counts the weights cannot tell).
    """
    path = resolve(path)
    if isinstance(config, dict):
        config = ControlNetConfig.from_dict(config)
    if is_training_checkpoint(path):  # a `ctrlnet train` checkpoint (step-N)
        net = controlnet_from_checkpoint(path)
        return net.to(dtype) if dtype else net
    if path.is_dir():
        refuse_base_folder(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: a diffusers ControlNet folder needs config.json")
        weights = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weights ({' or '.join(DIFFUSERS_WEIGHTS)}) next to config.json")
        tensors, _ = read_state_dict(weights)
        if detect_format(tensors, str(weights)) != "diffusers":
            raise CheckpointError(f"{weights}: expected diffusers key names in a diffusers folder")
        net = _build(config or _read_diffusers_config(cfg_path), weights)
        load_strict(net, tensors, str(weights))
        return net.to(dtype) if dtype else net

    tensors, metadata = read_state_dict(path)
    fmt = detect_format(tensors, str(path))
    config = config or _config_from_metadata(metadata)
    if fmt == "diffusers":
        sibling = path.parent / "config.json"
        if config is None and sibling.is_file():
            config = _read_diffusers_config(sibling)
        if config is None:
            config = infer_config_from_diffusers_keys(tensors)
        net = _build(config, path)
        load_strict(net, tensors, str(path))
    else:
        original = original_controlnet_tensors(tensors)
        if isinstance(config, UnionConfig):
            raise CheckpointError(f"{path}: a Union ControlNet config with original-format keys; Union ControlNets "
                                  "exist in the diffusers layout only")
        net = _build(config or infer_config(original), path)
        keymap = build_keymap(net.state_dict().keys(), net.config.layers_per_block,
                              len(net.config.conditioning_embedding_out_channels) * 2 - 2)
        inverse = {o: d for d, o in keymap.items()}
        own = net.state_dict()
        converted = {}
        for k, v in original.items():
            if k in inverse:
                target = own[inverse[k]]
                # SD2.x files from some tools store 1x1-conv projections where diffusers uses linear (or back).
                if k.endswith((".proj_in.weight", ".proj_out.weight")) and v.ndim != target.ndim \
                        and v.numel() == target.numel():
                    v = v.reshape(target.shape)
                converted[inverse[k]] = v
            else:
                converted["control_model." + k] = v  # reported as unexpected under its file name
        load_strict(net, converted, str(path))
    return net.to(dtype) if dtype else net


# ---------------------------------------------------------------- writing

def class_name(config: ControlNetConfig) -> str:
    return "ControlNetUnionModel" if isinstance(config, UnionConfig) else "ControlNetModel"


def diffusers_config_dict(config: ControlNetConfig) -> dict[str, Any]:
    d = config.to_dict()
    if d.pop("conditioning_downsample_factor") is not None:
        raise CheckpointError(
            f"this ControlNet's hint encoder downsamples by {config.hint_downsample_factor}, which the diffusers and "
            "original formats cannot express; save it with ctrlnet's own format (save_controlnet(..., "
            "format='ctrlnet'))")
    if isinstance(config, UnionConfig) and d["mid_block_type"] == "UNetMidBlock2DCrossAttn":
        del d["mid_block_type"]  # ControlNetUnionModel always has it and takes no such argument
    return {"_class_name": class_name(config), "_diffusers_version": diffusers.__version__, **d}


def save_controlnet(net: ControlNet, out: str | Path, format: str = "diffusers", half: bool = False) -> Path:
    """Write ``net`` as a diffusers folder, an original-format file, or ctrlnet's own folder.

    - ``diffusers``: ``out/config.json`` + ``out/diffusion_pytorch_model.safetensors``;
    - ``original``: one file of ``control_model.*`` tensors with the exact original names
      and shapes (``.safetensors``, or ``.pth`` as a plain tensor dict that loads with
      ``weights_only=True``);
    - ``ctrlnet``: the diffusers layout with every config field kept, for architectures
      diffusers cannot express (e.g. a pixel-space hint encoder).
    """
    out = Path(out)
    tensors = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    if format in ("diffusers", "ctrlnet"):
        config = diffusers_config_dict(net.config) if format == "diffusers" else \
            {"_class_name": class_name(net.config), **net.config.to_dict()}
        return write_model_folder(out, tensors, config)
    if format == "single":  # one .safetensors file, diffusers key names, the exact config in its metadata
        diffusers_config_dict(net.config)  # same representability check
        if out.suffix != ".safetensors":
            raise CheckpointError(f"{out}: a single-file ControlNet must end in .safetensors")
        meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps({"_class_name": class_name(net.config),
                                                                **net.config.to_dict()})}
        write_safetensors(tensors, out, meta)
        return out
    if format == "original":
        if isinstance(net.config, UnionConfig):
            raise CheckpointError(f"{out}: Union ControlNets exist in the diffusers layout only (a folder, or one "
                                  "file with --to single); there is no original layout to write")
        diffusers_config_dict(net.config)  # same representability check
        c = net.config
        keymap = build_keymap(tensors.keys(), c.layers_per_block, len(c.conditioning_embedding_out_channels) * 2 - 2)
        original = {PREFIX + keymap[k]: v for k, v in tensors.items()}
        if out.suffix == ".safetensors":
            write_safetensors(original, out, {"format": "pt", CONFIG_METADATA_KEY: json.dumps(c.to_dict())})
        elif out.suffix in (".pth", ".pt", ".ckpt"):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            torch.save(original, tmp)
            tmp.replace(out)
        else:
            raise CheckpointError(f"{out}: original-format output must end in .safetensors or .pth")
        return out
    raise ValueError(f"unknown format {format!r}: expected diffusers, single, original or ctrlnet")


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """What a ControlNet file or folder holds: format, base, parameters, dtype, residuals.

    Reads the config (folder, metadata) or infers it from the shapes; builds no model. A bundled
    name (``nano-canny``) is resolved as in ``load_controlnet``; a base model (single file or
    diffusers folder) is a CheckpointError saying so.
    """
    path = resolve(path)
    if is_training_checkpoint(path):  # a `ctrlnet train` checkpoint: the weights it would load
        fmt = "ctrlnet-train-checkpoint"
        tensors, state = read_checkpoint(path)
        config = ControlNetConfig.from_dict(state["controlnet_config"])
        control = unflat("ema", tensors) or unflat("controlnet", tensors)
    elif path.is_dir():
        refuse_base_folder(path)
        fmt = "diffusers"
        weights = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (config.json + weights)")
        tensors, _ = read_state_dict(weights)
        config = _read_diffusers_config(path / "config.json")
        control = tensors
    else:
        tensors, metadata = read_state_dict(path)
        fmt = detect_format(tensors, str(path))
        config = _config_from_metadata(metadata)
        if fmt == "diffusers":
            control = tensors
            config = config or infer_config_from_diffusers_keys(tensors)
        else:
            control = original_controlnet_tensors(tensors)
            config = config or infer_config(control)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in control.values()})
    return {
        "path": str(path), "format": fmt, "base": classify_base(config),
        "parameters": sum(v.numel() for v in control.values()), "tensors": len(control),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "residuals": config.num_residuals,
        "conditioning_channels": config.conditioning_channels,
        "cross_attention_dim": config.cross_attention_dim,
        "block_out_channels": list(config.block_out_channels),
        "global_pool_conditions": config.global_pool_conditions,
    }
