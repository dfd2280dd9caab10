"""What ``ctrlnet train`` can train (``network:`` in the config), each on the same locked base, data,
procedure, checkpoints and exact resume:

- ``controlnet``: the seed's full trainable copy of the encoder (default);
- ``control_lora``: the same net as low-rank deltas (``lora_rank``) on the base's frozen encoder
  weights, plus its own hint encoder, zero convolutions, biases and norms (Stability's layout;
  ``models.control_lora``). Saved as one Control-LoRA file ComfyUI / A1111 / Forge load;
- ``t2i_adapter``: a T2I-Adapter (``adapter_type``, default by the base: ``full_adapter`` or
  ``full_adapter_xl``), saved as a diffusers folder (diffusers and ComfyUI load it).

The functions here are the only places the trainer looks at the kind.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import T2IAdapter
from torch import nn

from ..formats import kind_name, load_control
from ..formats.adapter_io import save_adapter
from ..formats.control_lora_io import save_control_lora
from ..formats.controlnet_io import save_controlnet
from ..formats.safe_load import CheckpointError
from ..models.adapter import adapter_for_unet
from ..models.control_lora import ControlLoRA
from ..models.controlnet import ControlNet

NETWORKS = ("controlnet", "control_lora", "t2i_adapter")
FINAL_NAMES = {"controlnet": "controlnet", "control_lora": "control-lora.safetensors", "t2i_adapter": "t2i-adapter"}


def build_network(c, unet: nn.Module) -> nn.Module:
    """The network a config trains: new (from the base) or continued from ``c.controlnet``."""
    if c.controlnet:
        net = load_control(c.controlnet, unet=unet)
        if kind_name(net) != c.network:
            raise CheckpointError(f"controlnet: {c.controlnet} is a {kind_name(net)}, but network is {c.network}")
        return net
    if c.network == "control_lora":
        return ControlLoRA.from_unet(unet, rank=c.lora_rank, conditioning_channels=c.conditioning_channels,
                                     conditioning_embedding_out_channels=tuple(c.hint_channels))
    if c.network == "t2i_adapter":
        torch.manual_seed(c.seed)
        return adapter_for_unet(dict(unet.config), c.adapter_type or None, in_channels=c.conditioning_channels,
                                num_res_blocks=c.adapter_res_blocks)
    return ControlNet.from_unet(unet, conditioning_channels=c.conditioning_channels,
                                conditioning_embedding_out_channels=tuple(c.hint_channels))


def tied(net: nn.Module) -> set[str]:
    """Names of the parameters that are the base's (a Control-LoRA's frozen encoder weights)."""
    return net.tied if isinstance(net, ControlLoRA) else set()


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters training changes, in a fixed order (the base's, shared, are left out)."""
    skip = tied(net)
    return [p for n, p in net.named_parameters() if n not in skip]


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds for the network (never the base's)."""
    skip = tied(net)
    return {k: v for k, v in net.state_dict().items() if k not in skip}


def to_training(net: nn.Module, device) -> nn.Module:
    """The trainable tensors in fp32 on ``device``, requiring gradients; a Control-LoRA's tied base
    weights stay as they are (the base's own tensors, in its dtype: ``Module.to`` would convert
    the base's parameters in place)."""
    if isinstance(net, ControlLoRA):
        net.own_to(device, torch.float32)
        for p in trainable_parameters(net):
            p.requires_grad_(True)
        return net.train()
    return net.to(device, torch.float32).requires_grad_(True).train()


def ema_copy(net: nn.Module) -> nn.Module:
    """A frozen copy for the EMA weights; a Control-LoRA's copy shares the base's tensors, not copies them."""
    memo = {id(p): p for n, p in net.named_parameters() if n in tied(net)}
    ema = copy.deepcopy(net, memo)
    for p in trainable_parameters(ema):
        p.requires_grad_(False)
    return ema.eval()


def network_config(net: nn.Module) -> dict:
    """The architecture saved with a checkpoint."""
    if isinstance(net, T2IAdapter):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(net.config).items()
                if not k.startswith("_")}
    d = net.config.to_dict()
    if isinstance(net, ControlLoRA):
        d["lora_rank"] = net.rank
    return d


def control_signal(net: nn.Module, call: nn.Module, noisy: torch.Tensor, t, hidden: torch.Tensor,
                   condition: torch.Tensor, added: dict | None):
    """(residuals or None, adapter features or None): what the network ``net`` adds to the locked UNet,
    computed through ``call`` (``net`` itself, or its DistributedDataParallel wrapper)."""
    if isinstance(net, T2IAdapter):
        if net.config.in_channels == 1:
            condition = condition.mean(dim=1, keepdim=True)
        return None, call(condition)
    return call(noisy, t, hidden, condition=condition, added_cond_kwargs=added), None


def save_final(net: nn.Module, out_dir: Path) -> Path:
    """The trained network in the layout its kind's tools load; its path."""
    kind = kind_name(net)
    final = out_dir / FINAL_NAMES[kind]
    if kind == "control_lora":
        return save_control_lora(net, final)
    if kind == "t2i_adapter":
        return save_adapter(net, final, format="diffusers")
    try:
        return save_controlnet(net, final, format="diffusers")
    except CheckpointError:  # e.g. a pixel-space hint encoder: only ctrlnet's own format expresses it
        return save_controlnet(net, final, format="ctrlnet")
