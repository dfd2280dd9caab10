"""Tiny random Stable-Diffusion-family models built from configs, seeded.

Used by the tests (one per family: sd15-like, sd21-like with linear projections and
v-prediction, sdxl-like with added text/time embeddings and two text encoders) and by the
demo until the trained nano model lands. The tokenizer is a real CLIP BPE tokenizer with a
byte-level vocabulary and no merges (every word is spelled out), so it needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..base import quiet_libraries

FAMILIES = ("sd15", "sd21", "sdxl")
MAX_LENGTH = 16  # tokenizer/text-encoder context of the tiny models


def tiny_unet_config(family: str = "sd15") -> dict:
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
                  norm_num_groups=4, cross_attention_dim=12)
    if family == "sd15":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    if family == "sd21":
        return dict(common, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                    use_linear_projection=True)
    if family == "sdxl":
        return dict(common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    use_linear_projection=True, transformer_layers_per_block=(1, 2),
                    addition_embed_type="text_time", addition_time_embed_dim=4,
                    projection_class_embeddings_input_dim=6 * 4 + 8, cross_attention_dim=12 + 8)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_unet(family: str = "sd15", seed: int = 0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(family))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(folder: str | Path, max_length: int = MAX_LENGTH) -> Path:
    """A CLIP tokenizer folder with the 256 byte symbols (+ '</w>' forms), no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def write_tiny_base(folder: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Save a tiny random base in the diffusers pipeline layout and return its folder."""

    quiet_libraries()
    folder = Path(folder)
    unet = tiny_unet(family, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    te_cfg = dict(hidden_size=12, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                  max_position_embeddings=MAX_LENGTH, vocab_size=514, projection_dim=8,
                  bos_token_id=512, eos_token_id=513, pad_token_id=513)
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_byte_tokenizer(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    sched_args = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(te_cfg, hidden_size=8, intermediate_size=16)))
        te2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
        write_byte_tokenizer(folder / "tokenizer_2")
        index.update(_class_name="StableDiffusionXLPipeline",
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "EulerDiscreteScheduler"])
        scheduler = EulerDiscreteScheduler(**{k: v for k, v in sched_args.items()
                                              if k not in ("clip_sample", "set_alpha_to_one")})
    else:
        index["scheduler"] = ["diffusers", "DDIMScheduler"]
        scheduler = DDIMScheduler(prediction_type="v_prediction" if family == "sd21" else "epsilon", **sched_args)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
