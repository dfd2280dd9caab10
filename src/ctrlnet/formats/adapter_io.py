"""T2I-Adapter weights: the diffusers layout and TencentARC's original single files, read and written.

- ``diffusers``: a folder with ``config.json`` (``_class_name: T2IAdapter``) and
  ``diffusion_pytorch_model.safetensors``, keys ``adapter.conv_in.*``, ``adapter.body.{i}.resnets.{j}.*``
  (TencentARC's SDXL adapters are published this way only);
- ``original``: one file, keys ``conv_in.*``, ``body.{k}.block{1,2}.*``, ``body.{k}.in_conv.*`` (full, SD1.x
  with an 8x pixel unshuffle or SDXL with 16x: input widths 64/192 vs 256/768) or ``body.{i}.in_conv``,
  ``body.{i}.body.{j}.*``, ``body.{i}.out_conv`` (light); an ``adapter.`` prefix is accepted.
  ComfyUI and A1111 read this layout; ComfyUI reads diffusers full/XL folders too, not light ones.

The original layouts have four levels ([c, 2c, 4c, 4c]; ComfyUI and TencentARC assume the same).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import diffusers
import torch
from diffusers import T2IAdapter

from .safe_load import CheckpointError, read_config_json, read_state_dict, write_model_folder, write_safetensors

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
CONFIG_KEYS = ("in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type")


def strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("adapter."): v for k, v in tensors.items()}


def is_adapter(keys) -> bool:
    keys = {k.removeprefix("adapter.") for k in keys}
    return ("conv_in.weight" in keys and "body.0.block1.weight" in keys) or "body.0.in_conv.weight" in keys \
        or "body.0.resnets.0.block1.weight" in keys


def is_diffusers_layout(keys) -> bool:
    return any(".resnets." in k for k in keys)


# ---------------------------------------------------------------- original -> diffusers

def original_to_diffusers(tensors: dict[str, torch.Tensor], where: str = "") -> tuple[dict, dict]:
    """(diffusers tensors, T2IAdapter config) of an original-layout adapter."""
    t = strip_prefix(tensors)
    at = f"{where}: " if where else ""
    if "body.0.in_conv.weight" in t:  # light: levels body.{i} with in_conv, body.{j} resnets, out_conv
        levels = sorted({int(m[1]) for k in t if (m := re.match(r"body\.(\d+)\.", k))})
        nrb = len({int(m[1]) for k in t if (m := re.match(r"body\.0\.body\.(\d+)\.", k))})
        out = {}
        for k, v in t.items():
            k2 = re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", k)
            out["adapter." + k2] = v
        channels = [int(t[f"body.{i}.out_conv.weight"].shape[0]) for i in levels[:-1]]
        cin = int(t["body.0.in_conv.weight"].shape[1])
        config = dict(in_channels=cin // 64, channels=channels, num_res_blocks=nrb, downscale_factor=8,
                      adapter_type="light_adapter")
        return out, config
    if "conv_in.weight" not in t:
        raise CheckpointError(f"{at}not a T2I-Adapter (no conv_in.weight or body.0.in_conv.weight)")
    blocks = sorted({int(m[1]) for k in t if (m := re.match(r"body\.(\d+)\.", k))})
    if len(blocks) % 4:
        raise CheckpointError(f"{at}{len(blocks)} adapter blocks: the original layout has 4 levels of equal depth")
    nrb = len(blocks) // 4
    out = {}
    for k, v in t.items():
        if m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k):
            out[f"adapter.body.{int(m[1]) // nrb}.in_conv.{m[2]}"] = v
        elif m := re.match(r"body\.(\d+)\.(block[12]\..*)", k):
            b = int(m[1])
            out[f"adapter.body.{b // nrb}.resnets.{b % nrb}.{m[2]}"] = v
        elif k.startswith("conv_in."):
            out["adapter." + k] = v
        else:
            raise CheckpointError(f"{at}unexpected key {k!r} in an original T2I-Adapter (a CoAdapter or style "
                                  "adapter? those are not spatial adapters)")
    cin = int(t["conv_in.weight"].shape[1])
    xl = cin in (256, 768)  # 16x unshuffle of 1 or 3 channels (ComfyUI's rule)
    factor = 16 if xl else 8
    channels = [int(t[f"body.{level * nrb}.block1.weight"].shape[0]) for level in range(4)]
    config = dict(in_channels=cin // factor ** 2, channels=channels, num_res_blocks=nrb, downscale_factor=factor,
                  adapter_type="full_adapter_xl" if xl else "full_adapter")
    return out, config


def diffusers_to_original(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """The original-layout tensors of a diffusers T2IAdapter."""
    c = adapter.config
    return renamed_to_original(adapter.state_dict(), c.num_res_blocks, c.adapter_type == "light_adapter")


def renamed_to_original(tensors: dict[str, torch.Tensor], nrb: int, light: bool = False) -> dict[str, torch.Tensor]:
    """Diffusers adapter names (``adapter.`` prefix optional) -> TencentARC's, ``nrb`` resnets per level."""
    out = {}
    for k, v in tensors.items():
        k = k.removeprefix("adapter.")
        if light:
            out[re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", k)] = v
        elif m := re.match(r"body\.(\d+)\.in_conv\.(.*)", k):
            out[f"body.{int(m[1]) * nrb}.in_conv.{m[2]}"] = v
        elif m := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)", k):
            out[f"body.{int(m[1]) * nrb + int(m[2])}.{m[3]}"] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- load / save

def _build(config: dict, where: str) -> T2IAdapter:
    try:
        return T2IAdapter(**{k: config[k] for k in CONFIG_KEYS if k in config})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build a T2I-Adapter from config {config}: {e}") from None


def _load_into(adapter: T2IAdapter, tensors: dict[str, torch.Tensor], where: str) -> T2IAdapter:
    own = adapter.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    bad = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{where}: weights do not fit the T2I-Adapter ({adapter.config.adapter_type}, channels "
                              f"{list(adapter.config.channels)}): missing {missing[:3]}, unexpected {unexpected[:3]}, "
                              f"shape mismatch {bad[:3]}")
    dtypes = [v.dtype for v in tensors.values() if v.is_floating_point()]
    adapter.to(max(set(dtypes), key=dtypes.count))
    adapter.load_state_dict(tensors)
    return adapter


def read_adapter_config(path: Path) -> dict:
    return read_config_json(path, "T2I-Adapter")


def load_adapter(path: str | Path, dtype: torch.dtype | None = None) -> tuple[T2IAdapter, str]:
    """(adapter, its format: diffusers | original) from a diffusers folder or an original/diffusers file."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a diffusers T2I-Adapter folder needs config.json and weights")
        tensors, _ = read_state_dict(weights)
        adapter = _load_into(_build(read_adapter_config(path / "config.json"), str(path)), tensors, str(weights))
        fmt = "diffusers"
    else:
        tensors, metadata = read_state_dict(path)
        if is_diffusers_layout(tensors):
            config = json.loads(metadata["ctrlnet_config"]) if "ctrlnet_config" in metadata else None
            sibling = path.parent / "config.json"
            if config is None and sibling.is_file():
                config = read_adapter_config(sibling)
            if config is None:  # infer through the original layout, which carries the shapes
                nrb = len({m[1] for k in tensors if (m := re.search(r"body\.0\.resnets\.(\d+)\.", k))}) or 2
                light = any(re.search(r"body\.0\.out_conv\.", k) for k in tensors)
                _, config = original_to_diffusers(renamed_to_original(tensors, nrb, light), str(path))
            adapter = _load_into(_build(config, str(path)), {("adapter." + k.removeprefix("adapter.")): v
                                                               for k, v in tensors.items()}, str(path))
            fmt = "diffusers"
        else:
            converted, config = original_to_diffusers(tensors, str(path))
            adapter = _load_into(_build(config, str(path)), converted, str(path))
            fmt = "original"
    adapter = adapter.eval().requires_grad_(False)
    return (adapter.to(dtype) if dtype else adapter), fmt


def save_adapter(adapter: T2IAdapter, out: str | Path, format: str = "diffusers", half: bool = False) -> Path:
    """``diffusers``: a folder (config.json + weights); ``original``: one TencentARC-layout file."""
    out = Path(out)
    if format == "diffusers":
        tensors = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
    elif format == "original":
        if out.suffix != ".safetensors":
            raise CheckpointError(f"{out}: an original-layout T2I-Adapter is written as .safetensors")
        if len(adapter.config.channels) != (3 if adapter.config.adapter_type == "light_adapter" else 4):
            raise CheckpointError(f"{out}: the original layout has 4 levels; this adapter has channels "
                                  f"{list(adapter.config.channels)} (keep it in the diffusers layout)")
        tensors = {k: v.detach().cpu() for k, v in diffusers_to_original(adapter).items()}
    else:
        raise ValueError(f"unknown T2I-Adapter format {format!r}: expected diffusers or original")
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    config = {"_class_name": "T2IAdapter", "_diffusers_version": diffusers.__version__,
              **{k: list(v) if isinstance(v := adapter.config[k], tuple) else v for k in CONFIG_KEYS}}
    if format == "original":
        write_safetensors(tensors, out, {"format": "pt", "ctrlnet_kind": "t2i_adapter"})
        return out
    return write_model_folder(out, tensors, config)
