"""Control-LoRA files (Stability AI's ``control-lora``; what ComfyUI, A1111 and Forge load).

One ``.safetensors`` file in the original (LDM / cldm) key names, no prefix:

- ``<module>.up`` (out, r[, 1, 1]) and ``<module>.down`` (r, in[, kh, kw]) for every Conv2d and Linear
  weight of the encoder copy (``input_blocks.1.0.in_layers.2.up``: no ``.weight`` in the name);
- full tensors for the encoder's 1-D tensors (biases, norms) and for the parts the base lacks
  (``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``);
- ``lora_controlnet``: an empty tensor marking the file (loaders detect the kind by it).

The net's architecture is the base's (a Control-LoRA has no config of its own), so loading needs the
base UNet: its weights are shared, not copied (``models.control_lora``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..models.control_lora import ControlLoRA
from ..models.controlnet import ControlNetConfig
from .keymap import build_keymap
from .safe_load import CheckpointError, read_state_dict, write_safetensors

MARKER = "lora_controlnet"
LORA_SUFFIXES = (".up", ".down")


def is_control_lora(keys) -> bool:
    return MARKER in set(keys)


def hint_channels(tensors: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, hint encoder widths) read off ``input_hint_block.*``."""
    idx = sorted({int(m[1]) for k in tensors if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k))})
    if not idx:
        raise CheckpointError("a Control-LoRA without input_hint_block.* weights")
    w = [tensors[f"input_hint_block.{i}.weight"] for i in idx]
    return int(w[0].shape[1]), (int(w[0].shape[0]),) + tuple(int(x.shape[0]) for x in w[2:-1:2])


def lora_summary(tensors: dict[str, torch.Tensor]) -> dict:
    """Ranks and counts of a Control-LoRA state dict (LDM names)."""
    ups = {k[:-3]: v for k, v in tensors.items() if k.endswith(".up")}
    ranks = sorted({int(v.shape[1]) for v in ups.values()})
    return {"rank": max(ranks) if ranks else 0, "ranks": ranks, "lora_layers": len(ups)}


def _keymaps(net: ControlLoRA) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers name: original name}, its inverse) for the net's plain (non-LoRA) parameter names."""
    names = [k for k in net.state_dict() if not k.endswith(LORA_SUFFIXES)]
    c = net.config
    keymap = build_keymap(names, c.layers_per_block, len(c.conditioning_embedding_out_channels) * 2 - 2)
    return keymap, {o: d for d, o in keymap.items()}


def _set(net: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = net.get_submodule(module_name) if module_name else net
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_control_lora(path: str | Path, unet: nn.Module, dtype: torch.dtype | None = None) -> ControlLoRA:
    """A Control-LoRA on ``unet`` (a diffusers ``UNet2DConditionModel``, the locked base): built on
    the meta device, every weight the file lacks made the base's own tensor, the file's tensors set."""
    path = Path(path)
    tensors, _ = read_state_dict(path)
    if not is_control_lora(tensors):
        raise CheckpointError(f"{path}: not a Control-LoRA (no {MARKER!r} key)")
    tensors = {k: v for k, v in tensors.items() if k != MARKER}
    dtype = dtype or unet.dtype
    cond_ch, hint_widths = hint_channels(tensors)
    try:
        config = ControlNetConfig.from_unet_config(dict(unet.config), conditioning_channels=cond_ch,
                                                   conditioning_embedding_out_channels=hint_widths)
    except ValueError as e:
        raise CheckpointError(f"{path}: the base's UNet cannot carry a Control-LoRA: {e}") from None
    with torch.device("meta"):
        net = ControlLoRA(config)
    keymap, inverse = _keymaps(net)
    unknown = [k for k in tensors if k.removesuffix(".up").removesuffix(".down") + ".weight" not in inverse
               and k not in inverse]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys fit no layer of a ControlNet for this base "
                              f"({', '.join(unknown[:5])}): a Control-LoRA made for another base (SD1.5 vs SDXL)?")
    for key, up in tensors.items():
        if not key.endswith(".up"):
            continue
        down = tensors.get(key[:-3] + ".down")
        if down is None:
            raise CheckpointError(f"{path}: {key} has no matching .down")
        module = inverse[key[:-3] + ".weight"].removesuffix(".weight")
        try:
            net.set_lora(module, int(up.shape[1]), up.to(dtype), down.to(dtype))
        except ValueError as e:
            raise CheckpointError(f"{path}: {key[:-3]}: {e} (a Control-LoRA for another base?)") from None
    own = set()
    for key, value in tensors.items():
        if key.endswith(LORA_SUFFIXES):
            continue
        name = inverse[key]
        expected = net.get_parameter(name).shape
        if value.shape != expected:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, this base wants {tuple(expected)}")
        _set(net, name, value.to(dtype))
        own.add(name)
    lora_names = {n for n, _ in net.named_parameters() if n.endswith(LORA_SUFFIXES)}
    missing = [n for n, p in net.named_parameters() if p.is_meta and n not in own and n not in lora_names]
    base_params = dict(unet.named_parameters())
    not_in_base = [n for n in missing if n not in base_params]
    if not_in_base:
        raise CheckpointError(f"{path}: no weights for {', '.join(not_in_base[:5])} (neither in the file nor the base)")
    try:
        net.tie_to(unet, set(missing))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if next(unet.parameters()).dtype != dtype:
        raise CheckpointError(f"{path}: load it in the base's dtype ({unet.dtype}), not {dtype}: the base's "
                              "weights are shared, not copied")
    return net.eval().requires_grad_(False)


def control_lora_state_dict(net: ControlLoRA) -> dict[str, torch.Tensor]:
    """The file's tensors (original names, ``.up``/``.down`` pairs, the marker) of a Control-LoRA."""
    keymap, _ = _keymaps(net)
    out = {}
    for name, value in net.own_state_dict().items():
        if name.endswith(LORA_SUFFIXES):
            module, _, part = name.rpartition(".")
            out[keymap[module + ".weight"].removesuffix(".weight") + "." + part] = value
        else:
            out[keymap[name]] = value
    out[MARKER] = torch.tensor([])
    return out


def save_control_lora(net: ControlLoRA, out: str | Path, half: bool = False) -> Path:
    """Write ``net`` as one Control-LoRA ``.safetensors`` file (ComfyUI / A1111 / Forge load it)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: a Control-LoRA file must end in .safetensors")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in control_lora_state_dict(net).items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() and v.numel() else v for k, v in tensors.items()}
    meta = {"format": "pt", "ctrlnet_kind": "control_lora", "ctrlnet_rank": str(net.rank),
            "ctrlnet_hint": json.dumps(list(net.config.conditioning_embedding_out_channels))}
    write_safetensors(tensors, out, meta)
    return out
