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


def hf_clip_state_dict(text_model) -> dict[str, torch.Tensor]:
    """CLIP text weights under the classic ``text_model.*`` names, whatever the transformers version."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in text_model.state_dict().items() if not k.endswith("position_ids")}


def sd15_single_file(base) -> dict[str, torch.Tensor]:
    """A tiny SD1.x-layout single-file checkpoint from a loaded tiny base."""
    unet_sd = base.unet.state_dict()
    keymap = build_keymap(unet_sd.keys(), base.unet.config.layers_per_block)
    sd = {"model.diffusion_model." + keymap[k]: v for k, v in unet_sd.items()}
    sd.update(vae_to_ldm(base.vae))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in hf_clip_state_dict(base.text_encoder).items()})
    sd["alphas_cumprod"] = torch.linspace(1, 0, 10)  # schedule buffers live in real files too
    return sd


def open_clip_from_hf(text_model, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) -> OpenCLIP names (SD2.x ``cond_stage_model.model.``, SDXL
    ``conditioner.embedders.1.model.``): fused in_proj, ln_1/ln_2, c_fc/c_proj, transposed projection."""
    sd = hf_clip_state_dict(text_model)
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    n_layers = text_model.config.num_hidden_layers
    for i in range(n_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
    return out


def single_file(base) -> dict[str, torch.Tensor]:
    """A tiny single-file checkpoint in the layout of the base's family (SD1.x, SD2.x, SDXL)."""
    if base.text_encoder_2 is not None:  # SDXL (SGM layout)
        sd = {k: v for k, v in sd15_single_file(base).items() if not k.startswith("cond_stage_model.")}
        sd.update({"conditioner.embedders.0.transformer." + k: v
                   for k, v in hf_clip_state_dict(base.text_encoder).items()})
        sd.update(open_clip_from_hf(base.text_encoder_2, "conditioner.embedders.1.model."))
        return sd
    if base.unet.config.use_linear_projection:  # SD2.x: OpenCLIP text encoder
        sd = {k: v for k, v in sd15_single_file(base).items() if not k.startswith("cond_stage_model.")}
        sd.update(open_clip_from_hf(base.text_encoder, "cond_stage_model.model."))
        return sd
    return sd15_single_file(base)
