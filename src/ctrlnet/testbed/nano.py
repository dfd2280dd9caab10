"""The nano Stable Diffusion: configs, a word-level CLIP tokenizer for ShapesWorld, and the
resumable trainer (VAE first, then text encoder + UNet) that made the bundled weights.

    python -m ctrlnet.testbed.nano vae --data DATA --run RUN --minutes 20
    python -m ctrlnet.testbed.nano sd  --data DATA --run RUN --minutes 90
    python -m ctrlnet.testbed.nano export --run RUN --out src/ctrlnet/testbed/nano-sd

Recipe (chosen by measurement, REFERENCE.md section 9): zero-terminal-SNR betas with
v-prediction and trailing timesteps (Lin et al. 2023, arXiv 2305.08891), min-SNR-5 loss
weighting (Hang et al. 2023, arXiv 2303.09556), EMA weights, 10% empty captions for
classifier-free guidance, latents scaled to unit variance. Sample with guidance ~2-3 and
guidance_rescale 0.7.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..formats.safe_load import write_safetensors
from ..formats.checkpoint import (flat, load_optimizer, optimizer_tensors, rng_state, save_state,
                                   set_rng_state, unflat)
from .shapes import PALETTE, SHAPES
from .tiny import bytes_to_unicode

MAX_LENGTH = 32  # tokens: the longest ShapesWorld caption is about 20
IMAGE_SIZE = 128
WORDS = sorted({w for name in PALETTE for w in name.split()} | set(SHAPES) |
               {"a", "an", "and", "on", "with", "background", ","})

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=16, sample_size=IMAGE_SIZE,
                  mid_block_add_attention=False)  # fully convolutional: trains on crops exactly
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                   max_position_embeddings=MAX_LENGTH, projection_dim=128)
UNET_CONFIG = dict(sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128),
                   layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=0)


# ---------------------------------------------------------------- tokenizer

def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP does it (lowest-rank pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and (parts[j], parts[j + 1]) == (a, b):
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def write_word_tokenizer(folder: str | Path) -> Path:
    """A CLIP BPE tokenizer whose merges spell every ShapesWorld word as one token.

    Byte symbols (and their '</w>' forms) keep any other text encodable, letter by letter.
    Merges are added until BPE (lowest rank first) turns every word into one token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for _ in range(20):
        ranks = {m: i for i, m in enumerate(merges)}
        pending = [p for p in (_bpe(w, ranks) for w in WORDS) if len(p) > 1]
        if not pending:
            break
        for parts in pending:  # join what BPE left, left to right, with new (higher-rank) merges
            while len(parts) > 1:
                if (parts[0], parts[1]) not in ranks:
                    ranks[(parts[0], parts[1])] = len(merges)
                    merges.append((parts[0], parts[1]))
                parts = [parts[0] + parts[1]] + parts[2:]
    else:
        raise AssertionError("word merges did not converge")
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def load_tokenizer(folder):
    from ..base import load_tokenizer as load
    return load(folder)


# ---------------------------------------------------------------- data

def load_images(data: str | Path, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """All ShapesWorld targets as uint8 (N, 3, H, W) and their captions."""
    import cv2
    data = Path(data)
    records = [json.loads(l) for l in (data / "metadata.jsonl").read_text().splitlines()][:limit]
    images = np.stack([cv2.cvtColor(cv2.imread(str(data / r["file_name"])), cv2.COLOR_BGR2RGB) for r in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [r["text"] for r in records]


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]


# ---------------------------------------------------------------- checkpoints

class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **record):
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


# ---------------------------------------------------------------- stage 1: VAE

def train_vae(data: Path, run: Path, minutes: float, batch: int = 16, crop: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0, save_every: int = 100, max_steps: int | None = None,
              limit: int | None = None) -> None:
    """Reconstruction (L1 + L2) + tiny KL on random crops; resumes from run/vae/ if present."""
    from diffusers import AutoencoderKL
    out = run / "vae"
    out.mkdir(parents=True, exist_ok=True)
    log = Log(run / "vae.log.jsonl")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=True)
    step, elapsed = 0, 0.0
    if (out / "state.json").is_file():
        state = json.loads((out / "state.json").read_text())
        from safetensors.torch import load_file
        tensors = load_file(out / "state.safetensors")
        vae.load_state_dict(unflat("vae", tensors))
        load_optimizer(opt, "opt", tensors, state["optimizer"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed VAE at step {step}")
    images, _ = load_images(data, limit)
    start = time.time() - elapsed
    while time.time() - start < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.randint(0, len(images), (batch,))
        y, x = np.random.randint(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8
        target = to_unit(images[idx, :, y:y + crop, x:x + crop])
        posterior = vae.encode(target).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, target) + F.mse_loss(recon, target)
        kl = posterior.kl().mean() / (crop * crop * 3)
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            psnr = 10 * math.log10(4.0 / F.mse_loss(recon, target).item())
            log(stage="vae", step=step, loss=round(loss.item(), 5), psnr=round(psnr, 2),
                minutes=round((time.time() - start) / 60, 2))
        if step % save_every == 0:
            _save_vae(out, vae, opt, step, time.time() - start, seed, limit)
    _save_vae(out, vae, opt, step, time.time() - start, seed, limit)


def _save_vae(out, vae, opt, step, elapsed, seed, limit):
    opt_t, opt_s = optimizer_tensors(opt, "opt")
    save_state(out, {**flat("vae", vae.state_dict()), **opt_t},
               {"step": step, "elapsed": elapsed, "optimizer": opt_s, "rng": rng_state(), "config": VAE_CONFIG,
                "seed": seed, "limit": limit})


DECODER_STAGES = ("decoder", "decoder2")  # decoder fine-tuning passes, applied in this order


def load_trained_vae(run: Path, before: str | None = None):
    """The trained VAE with the decoder of the last decoder pass that has run (only passes before
    ``before`` when given: the starting point of that pass)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(unflat("vae", load_file(run / "vae" / "state.safetensors")))
    for name in DECODER_STAGES:
        if name == before:
            break
        if (run / name / "state.json").is_file():
            vae.load_state_dict(unflat("vae", load_file(run / name / "state.safetensors")))
    return vae.eval().requires_grad_(False)


def train_decoder(data: Path, run: Path, minutes: float, batch: int = 16, crop: int = 64, lr: float = 5e-4,
                  seed: int = 0, save_every: int = 100, limit: int | None = None,
                  max_steps: int | None = None, name: str = "decoder") -> None:
    """Fine-tune the VAE decoder only, on posterior means, with cosine LR decay over ``minutes``.

    The encoder is frozen, so latents (and a UNet trained on them) stay valid. ``crop`` 128 trains
    on whole images: GroupNorm statistics then match inference exactly (64 px crops leave a colour
    bias at 128 px). ``name`` is the pass (DECODER_STAGES); each starts from the previous one.
    Resumes from run/<name>/ if present.
    """
    from safetensors.torch import load_file
    if name not in DECODER_STAGES:
        raise ValueError(f"decoder pass name must be one of {DECODER_STAGES}, got {name!r}")
    out = run / name
    out.mkdir(parents=True, exist_ok=True)
    log = Log(run / f"{name}.log.jsonl")
    torch.manual_seed(seed)
    np.random.seed(seed)
    vae = load_trained_vae(run, before=name)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder_params, lr=lr, weight_decay=0.0, fused=True)
    step, elapsed = 0, 0.0
    if (out / "state.json").is_file():
        state = json.loads((out / "state.json").read_text())
        tensors = load_file(out / "state.safetensors")
        vae.load_state_dict(unflat("vae", tensors))
        load_optimizer(opt, "opt", tensors, state["optimizer"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed {name} at step {step}")
    images, _ = load_images(data, limit)
    start = time.time() - elapsed
    budget = minutes * 60
    while time.time() - start < budget and (max_steps is None or step < max_steps):
        for group in opt.param_groups:  # cosine decay over the wall-time budget
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - start) / budget)))
        idx = torch.randint(0, len(images), (batch,))
        y, x = np.random.randint(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8
        target = to_unit(images[idx, :, y:y + crop, x:x + crop])
        with torch.no_grad():
            z = vae.encode(target).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, target) + F.mse_loss(recon, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            psnr = 10 * math.log10(4.0 / F.mse_loss(recon, target).item())
            log(stage=name, step=step, loss=round(loss.item(), 5), psnr=round(psnr, 2),
                lr=opt.param_groups[0]["lr"], minutes=round((time.time() - start) / 60, 2))
        if step % save_every == 0 or time.time() - start >= budget or step == max_steps:
            opt_t, opt_s = optimizer_tensors(opt, "opt")
            save_state(out, {**flat("vae", vae.state_dict()), **opt_t},
                       {"step": step, "elapsed": time.time() - start, "optimizer": opt_s, "rng": rng_state(),
                        "seed": seed, "limit": limit, "batch": batch, "crop": crop, "lr": lr})


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Posterior means (N, 4, 16, 16), unscaled."""
    return torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


# ---------------------------------------------------------------- stage 2: text encoder + UNet

def train_sd(data: Path, run: Path, minutes: float, batch: int = 64, lr: float = 1e-3, ema_decay: float = 0.998,
             empty_prompt: float = 0.1, min_snr: float = 5.0, warmup: int = 200, seed: int = 0,
             save_every: int = 200, max_steps: int | None = None, limit: int | None = None) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    out = run / "sd"
    out.mkdir(parents=True, exist_ok=True)
    log = Log(run / "sd.log.jsonl")
    tok_dir = run / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        write_word_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)

    latents_path = run / "latents.safetensors"
    if not latents_path.is_file():  # cache: one VAE pass over the data set, ever
        images, captions = load_images(data, limit)
        latents = encode_latents(load_trained_vae(run), images)
        scale = 1.0 / latents.std().item()
        ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        write_safetensors({"latents": latents, "ids": ids}, latents_path, {"scaling_factor": str(scale)})
    from safetensors import safe_open
    with safe_open(str(latents_path), "pt") as f:
        scale = float(f.metadata()["scaling_factor"])
        latents, ids = f.get_tensor("latents") * scale, f.get_tensor("ids")
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    step, elapsed = 0, 0.0
    if (out / "state.json").is_file():
        from safetensors.torch import load_file
        state = json.loads((out / "state.json").read_text())
        tensors = load_file(out / "state.safetensors")
        unet.load_state_dict(unflat("unet", tensors))
        text_encoder.load_state_dict(unflat("text", tensors))
        ema_unet.load_state_dict(unflat("ema_unet", tensors))
        ema_text.load_state_dict(unflat("ema_text", tensors))
        load_optimizer(opt, "opt", tensors, state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed SD at step {step}")
    unet.train()
    text_encoder.train()
    start = time.time() - elapsed
    window = []
    while time.time() - start < minutes * 60 and (max_steps is None or step < max_steps):
        t0 = time.time()
        idx = torch.randint(0, len(latents), (batch,))
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(batch) < empty_prompt
        tokens[drop] = empty_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        xt = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        text = text_encoder(tokens)[0]  # (B, T, 128)
        pred = unet(xt, t, text).sample
        # min-SNR-gamma weighting for v-prediction: min(snr, gamma) / (snr + 1)
        weight = torch.clamp(snr[t], max=min_snr) / (snr[t] + 1)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        step += 1
        window.append(time.time() - t0)
        if step % 20 == 0:
            log(stage="sd", step=step, loss=round(loss.item(), 5), img_per_s=round(batch * len(window) / sum(window), 1),
                minutes=round((time.time() - start) / 60, 2), lr=sched.get_last_lr()[0])
            window = []
        if step % save_every == 0:
            _save_sd(out, unet, text_encoder, ema_unet, ema_text, opt, sched, step, time.time() - start, scale,
                     seed, limit)
    _save_sd(out, unet, text_encoder, ema_unet, ema_text, opt, sched, step, time.time() - start, scale, seed, limit)


def _save_sd(out, unet, text, ema_unet, ema_text, opt, sched, step, elapsed, scale, seed, limit):
    opt_t, opt_s = optimizer_tensors(opt, "opt")
    tensors = {**flat("unet", unet.state_dict()), **flat("text", text.state_dict()),
               **flat("ema_unet", ema_unet.state_dict()), **flat("ema_text", ema_text.state_dict()), **opt_t}
    save_state(out, tensors, {"step": step, "elapsed": elapsed, "optimizer": opt_s, "seed": seed, "limit": limit,
                              "lr_scheduler": sched.state_dict(), "rng": rng_state(), "scaling_factor": scale})


# ---------------------------------------------------------------- export

def export(run: Path, out: Path) -> Path:
    """The diffusers pipeline folder of the EMA weights: what ships in the repository."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel
    from ..base import quiet_libraries
    quiet_libraries()
    state = json.loads((run / "sd" / "state.json").read_text())
    tensors = load_file(run / "sd" / "state.safetensors")
    tokenizer = load_tokenizer(run / "tokenizer")
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(unflat("ema_unet", tensors))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    text_encoder.load_state_dict(unflat("ema_text", tensors))
    vae = load_trained_vae(run)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_word_tokenizer(out / "tokenizer")
    DDIMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2))
    vae_state = json.loads((run / "vae" / "state.json").read_text())
    decoder_cmds, decoder_info = [], {}
    for name in DECODER_STAGES:
        path = run / name / "state.json"
        if not path.is_file():
            continue
        st = json.loads(path.read_text())
        extra = "".join(f" --{k} {st[k]}" for k in ("batch", "crop", "lr") if k in st)
        decoder_cmds.append(f"python -m ctrlnet.testbed.nano decoder --name {name} --data data/shapes-train --run RUN "
                            f"--seed {st.get('seed', 0)} --minutes {math.floor(st['elapsed'] / 60)}"
                            + _limit_arg(st) + extra)
        decoder_info[name] = {"steps": st["step"], "minutes": round(st["elapsed"] / 60, 1)}
    (out / "TRAINING.json").write_text(json.dumps({
        "commands": [
            "ctrlnet data shapes --n 50000 --out data/shapes-train --seed 0",
            f"python -m ctrlnet.testbed.nano vae --data data/shapes-train --run RUN --seed {vae_state.get('seed', 0)} "
            f"--minutes {math.floor(vae_state['elapsed'] / 60)}" + _limit_arg(vae_state),
            f"python -m ctrlnet.testbed.nano sd --data data/shapes-train --run RUN --seed {state.get('seed', 0)} "
            f"--minutes {math.floor(state['elapsed'] / 60)}" + _limit_arg(state),
            *decoder_cmds,
            "python -m ctrlnet.testbed.nano export --run RUN --out src/ctrlnet/testbed/nano-sd"],
        "note": "stages stop on wall time (--minutes is the budget; each overshoots it by at most one step): "
                "rerunning reproduces the recipe, not these bytes; the step counts are exact",
        "machine": "2 vCPU (AMD EPYC), torch 2.13.0 CPU, fp32",
        "vae": {"steps": vae_state["step"], "minutes": round(vae_state["elapsed"] / 60, 1)},
        **decoder_info,
        "sd": {"steps": state["step"], "minutes": round(state["elapsed"] / 60, 1),
               "scaling_factor": state["scaling_factor"]}}, indent=2) + "\n")
    return out


def _limit_arg(state: dict) -> str:
    return f" --limit {state['limit']}" if state.get("limit") else ""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ctrlnet.testbed.nano", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("vae", "decoder", "sd"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True, type=Path, help="ShapesWorld folder (ctrlnet data shapes)")
        p.add_argument("--run", required=True, type=Path, help="run folder: checkpoints, logs; resumes from it")
        p.add_argument("--minutes", type=float, required=True, help="total wall-time budget of this stage")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--limit", type=int, default=None, help="use the first N samples only")
        if name == "decoder":
            p.add_argument("--name", default="decoder", choices=DECODER_STAGES, help="decoder pass")
            p.add_argument("--batch", type=int, default=16)
            p.add_argument("--crop", type=int, default=64, help="square crop size; 128 = whole images")
            p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine decay)")
    p = sub.add_parser("export")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.stage == "vae":
        train_vae(args.data, args.run, args.minutes, seed=args.seed, limit=args.limit)
    elif args.stage == "decoder":
        train_decoder(args.data, args.run, args.minutes, seed=args.seed, limit=args.limit, batch=args.batch,
                      crop=args.crop, lr=args.lr, name=args.name)
    elif args.stage == "sd":
        train_sd(args.data, args.run, args.minutes, seed=args.seed, limit=args.limit)
    else:
        print(export(args.run, args.out))


if __name__ == "__main__":
    main()
