"""Test-only writers of single-file (CompVis LDM) checkpoints from tiny diffusers models."""

import re

import torch

from ctrlnet.formats.keymap import build_keymap


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> ``first_stage_model.*`` keys (inverse of diffusers' converter)."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        o = k
        o = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", o)
        o = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", o)
        o = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}", o)
        o = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", o)
        o = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", o)
        o = o.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0" in o:
            o = o.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            o = o.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM attention projections are 1x1 convs
        out["first_stage_model." + o] = v
    return out


def sd15_single_file(base) -> dict[str, torch.Tensor]:
    """A tiny SD1.x-layout single-file checkpoint from a loaded tiny base."""
    unet_sd = base.unet.state_dict()
    keymap = build_keymap(unet_sd.keys(), base.unet.config.layers_per_block)
    sd = {"model.diffusion_model." + keymap[k]: v for k, v in unet_sd.items()}
    sd.update(vae_to_ldm(base.vae))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in base.text_encoder.state_dict().items()})
    sd["alphas_cumprod"] = torch.linspace(1, 0, 10)  # schedule buffers live in real files too
    return sd
