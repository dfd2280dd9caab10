"""The nano Stable Diffusion: configs, a word-level CLIP tokenizer for ShapesWorld, and the
resumable trainer that made the bundled weights: the VAE, then the text encoder + UNet on its
latents, then two decoder-only fine-tuning passes.

    python -m ctrlnet.testbed.nano vae --data DATA --run RUN --steps 2268
    python -m ctrlnet.testbed.nano sd --data DATA --run RUN --steps 3382 --limit 20000
    python -m ctrlnet.testbed.nano decoder --name decoder --data DATA --run RUN --steps 1519 --limit 20000
    python -m ctrlnet.testbed.nano decoder --name decoder2 --data DATA --run RUN --steps 846 --limit 20000 \\
        --batch 8 --crop 128 --lr 0.0002
    python -m ctrlnet.testbed.nano export --run RUN --out src/ctrlnet/testbed/nano-sd

Each stage runs exactly ``--steps`` optimizer steps and every schedule is a function of the step
alone, so rerunning a command, or resuming a killed or stopped stage by rerunning it, gives the
same bytes on the same machine and torch. ``--minutes``, a wall-time budget for one call, only
stops a stage early (checkpointed; rerun to resume); it changes no step. Checkpoints: ``RUN/<stage>/step-000100/`` (the scheme of
``ctrlnet.formats.checkpoint``, as in the ControlNet trainer).

Recipe (chosen by measurement while the nano model was built): zero-terminal-SNR betas with
v-prediction and trailing timesteps (Lin et al. 2023, arXiv 2305.08891), min-SNR-5 loss
weighting (Hang et al. 2023, arXiv 2303.09556), EMA weights, 10% empty captions for
classifier-free guidance, latents scaled to unit variance. Sample with guidance ~2-3 and
guidance_rescale 0.7.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from ..base import load_tokenizer, quiet_libraries
from ..formats.checkpoint import (flat, latest_checkpoint, load_optimizer, optimizer_tensors, read_checkpoint,
                                  rng_state, set_rng_state, unflat, write_checkpoint)
from ..formats.safe_load import write_safetensors
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


# ---------------------------------------------------------------- data

def load_images(data: str | Path, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """All ShapesWorld targets as uint8 (N, 3, H, W) and their captions."""
    data = Path(data)
    records = [json.loads(l) for l in (data / "metadata.jsonl").read_text().splitlines()][:limit]
    images = np.stack([cv2.cvtColor(cv2.imread(str(data / r["file_name"])), cv2.COLOR_BGR2RGB) for r in records])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [r["text"] for r in records]


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]


def psnr(mse: torch.Tensor) -> float:
    return round(10 * math.log10(4.0 / mse.item()), 2)  # peak-to-peak 2 in [-1, 1]


# ---------------------------------------------------------------- the stage loop

KEEP = 2  # checkpoints kept per stage (each holds the weights and the optimizer state)


class Log:
    """JSON lines, printed and appended to ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **record):
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def trim(self, step: int) -> None:
        """Keep the records up to ``step``: a resumed run logs the later steps again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError):  # a line cut short by a kill
                pass
        self.path.write_text("".join(kept))


@dataclass
class Stage:
    """What one stage hands ``run_stage``; seeding, resume, the loop, checkpoints and logs are shared."""

    modules: dict[str, torch.nn.Module]  # checkpointed, each under its name as prefix
    optimizer: torch.optim.Optimizer
    train_step: Callable[[int], dict]  # optimizer step s (0-based); returns the values to log
    recipe: dict  # hyper-parameters: saved with every checkpoint, must match on resume
    lr_factor: Callable[[int], float] = lambda s: 1.0  # LR multiplier of step s: a function of s alone
    info: dict = field(default_factory=dict)  # more JSON for the checkpoints (configs, scaling factor)


def run_stage(run: Path, name: str, steps: int, setup: Callable[[], Stage], seed: int = 0,
              minutes: float | None = None, save_every: int = 100, log_every: int = 20, keep: int = KEEP) -> Path:
    """Train stage ``name`` up to step ``steps`` in ``run/<name>/``, resuming from its latest
    checkpoint; returns the latest checkpoint.

    ``setup`` builds the stage after the seeding: model initialisation draws from the seeded
    generators exactly as in a fresh run, and a resume then restores the generators' state.
    ``minutes``, a wall-time budget for this call checked after each step, only stops the loop
    early (so every call makes at least one step; 0 makes exactly one); the checkpoint it leaves
    resumes to the weights of an uninterrupted run.
    """
    if steps < 1:
        raise ValueError(f"{name}: steps must be at least 1, got {steps}")
    folder, log = run / name, Log(run / f"{name}.log.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    stage = setup()
    recipe = json.loads(json.dumps({**stage.recipe, "seed": seed}))  # as a checkpoint reads back (lists)
    opt = stage.optimizer
    base_lrs = [group["lr"] for group in opt.param_groups]
    step, elapsed = 0, 0.0  # elapsed: seconds of earlier calls, recorded for information only
    last = latest_checkpoint(folder)
    if last is not None:
        tensors, state = read_checkpoint(last)
        if state["recipe"] != recipe:
            raise ValueError(f"{name}: {last} was trained with {state['recipe']}, this call asks for {recipe}; "
                             "resume with the same settings, or train into a new run folder")
        for prefix, module in stage.modules.items():
            module.load_state_dict(unflat(prefix, tensors))
        load_optimizer(opt, "opt", tensors, state["optimizer"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed"]
        log.trim(step)
        print(f"resumed {name} at step {step}", flush=True)
    if step >= steps:
        print(f"{name}: already at step {step} (asked for {steps})", flush=True)
        return last

    def save(step: int, elapsed: float) -> Path:
        opt_t, opt_s = optimizer_tensors(opt, "opt")
        tensors = dict(opt_t)
        for prefix, module in stage.modules.items():
            tensors.update(flat(prefix, module.state_dict()))
        state = {"step": step, "elapsed": elapsed, "optimizer": opt_s, "rng": rng_state(), "recipe": recipe,
                 **stage.info}
        return write_checkpoint(folder, step, tensors, state, keep=keep)

    started = time.monotonic()
    while True:
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["lr"] = base_lr * stage.lr_factor(step)
        values = stage.train_step(step)
        step += 1
        seconds = time.monotonic() - started  # decides when to stop, never what a step computes
        done = step == steps or (minutes is not None and seconds >= minutes * 60)
        if step % log_every == 0 or done:
            log(stage=name, step=step, **values, lr=opt.param_groups[0]["lr"],
                minutes=round((elapsed + seconds) / 60, 2))
        if step % save_every == 0 or done:
            last = save(step, elapsed + seconds)
        if done:
            break
    if step < steps:
        print(f"{name}: the {minutes}-minute budget stopped it at step {step} of {steps}; rerun to resume", flush=True)
    return last


# ---------------------------------------------------------------- stage 1: VAE

def train_vae(data: Path, run: Path, *, steps: int, minutes: float | None = None, batch: int = 16, crop: int = 64,
              lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, save_every: int = 100,
              limit: int | None = None) -> Path:
    """run/vae/: reconstruction (L1 + L2) + tiny KL on random crops, constant LR."""
    def setup() -> Stage:
        vae = AutoencoderKL(**VAE_CONFIG)
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=True)
        images, _ = load_images(data, limit)  # (N, 3, 128, 128) uint8

        def train_step(s: int) -> dict:
            idx = torch.randint(0, len(images), (batch,))
            y, x = np.random.randint(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8  # on the latent grid
            target = to_unit(images[idx, :, y:y + crop, x:x + crop])  # (B, 3, crop, crop)
            posterior = vae.encode(target).latent_dist  # (B, 4, crop/8, crop/8)
            recon = vae.decode(posterior.sample()).sample
            mse = F.mse_loss(recon, target)
            kl = posterior.kl().mean() / (crop * crop * 3)  # per pixel and channel
            loss = F.l1_loss(recon, target) + mse + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            return {"loss": round(loss.item(), 5), "psnr": psnr(mse)}

        return Stage({"vae": vae}, opt, train_step, info={"config": VAE_CONFIG},
                     recipe=dict(batch=batch, crop=crop, lr=lr, kl_weight=kl_weight, limit=limit))

    return run_stage(run, "vae", steps, setup, seed=seed, minutes=minutes, save_every=save_every)


DECODER_STAGES = ("decoder", "decoder2")  # decoder fine-tuning passes, applied in this order


def load_trained_vae(run: Path, before: str | None = None) -> AutoencoderKL:
    """The trained VAE with the decoder of the last decoder pass that has a checkpoint (only passes
    before ``before`` when given: the starting point of that pass)."""
    last = latest_checkpoint(run / "vae")
    if last is None:
        raise FileNotFoundError(f"{run / 'vae'}: no checkpoint; train the vae stage first")
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(unflat("vae", read_checkpoint(last)[0]))
    for name in DECODER_STAGES:
        if name == before:
            break
        if (last := latest_checkpoint(run / name)) is not None:
            vae.load_state_dict(unflat("vae", read_checkpoint(last)[0]))
    return vae.eval().requires_grad_(False)


def train_decoder(data: Path, run: Path, *, steps: int, minutes: float | None = None, batch: int = 16, crop: int = 64,
                  lr: float = 5e-4, seed: int = 0, save_every: int = 100, limit: int | None = None,
                  name: str = "decoder") -> Path:
    """run/<name>/: fine-tune the VAE decoder only, on posterior means, cosine LR decay over ``steps``.

    The encoder is frozen, so latents (and a UNet trained on them) stay valid. ``crop`` 128 trains
    on whole images: GroupNorm statistics then match inference exactly (64 px crops leave a colour
    bias at 128 px). ``name`` is the pass (DECODER_STAGES); each starts from the previous one.
    The cosine spans ``steps``, so a resume must ask for the same ``steps`` (checked).
    """
    if name not in DECODER_STAGES:
        raise ValueError(f"decoder pass name must be one of {DECODER_STAGES}, got {name!r}")

    def setup() -> Stage:
        vae = load_trained_vae(run, before=name)
        params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        images, _ = load_images(data, limit)  # (N, 3, 128, 128) uint8

        def train_step(s: int) -> dict:
            idx = torch.randint(0, len(images), (batch,))
            y, x = np.random.randint(0, IMAGE_SIZE - crop + 1, size=2) // 8 * 8
            target = to_unit(images[idx, :, y:y + crop, x:x + crop])  # (B, 3, crop, crop)
            with torch.no_grad():
                z = vae.encode(target).latent_dist.mean  # (B, 4, crop/8, crop/8)
            recon = vae.decode(z).sample
            mse = F.mse_loss(recon, target)
            loss = F.l1_loss(recon, target) + mse
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": round(loss.item(), 5), "psnr": psnr(mse)}

        return Stage({"vae": vae}, opt, train_step,
                     recipe=dict(batch=batch, crop=crop, lr=lr, limit=limit, steps=steps),
                     lr_factor=lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

    return run_stage(run, name, steps, setup, seed=seed, minutes=minutes, save_every=save_every)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Posterior means (N, 4, 16, 16), unscaled."""
    return torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


# ---------------------------------------------------------------- stage 2: text encoder + UNet

def text_encoder_for(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                        **TEXT_CONFIG))


def train_sd(data: Path, run: Path, *, steps: int, minutes: float | None = None, batch: int = 64, lr: float = 1e-3,
             ema_decay: float = 0.998, empty_prompt: float = 0.1, min_snr: float = 5.0, warmup: int = 200,
             seed: int = 0, save_every: int = 200, limit: int | None = None) -> Path:
    """run/sd/: text encoder + UNet on the VAE's latents: v-prediction, min-SNR weighting, linear
    LR warmup, EMA weights, ``empty_prompt`` of the captions replaced by ""."""
    tok_dir = run / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        write_word_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    # The latent cache, built here, before run_stage seeds: building it initialises a VAE (random
    # draws), and the UNet's initialisation must not depend on whether the cache already existed.
    latents_path = run / "latents.safetensors"
    if not latents_path.is_file():  # one VAE pass over the data set, ever
        images, captions = load_images(data, limit)
        latents = encode_latents(load_trained_vae(run), images)
        scale = 1.0 / latents.std().item()
        ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        write_safetensors({"latents": latents, "ids": ids}, latents_path, {"scaling_factor": str(scale)})
    with safe_open(str(latents_path), "pt") as f:
        scale = float(f.metadata()["scaling_factor"])
        latents, ids = f.get_tensor("latents") * scale, f.get_tensor("ids")  # (N, 4, 16, 16), (N, MAX_LENGTH)
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids

    def setup() -> Stage:
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = text_encoder_for(tokenizer)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
        noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
        alphas_cumprod = noise_scheduler.alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)  # (1000,)
        unet.train()
        text_encoder.train()

        def train_step(s: int) -> dict:
            idx = torch.randint(0, len(latents), (batch,))
            x0 = latents[idx]  # (B, 4, 16, 16)
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
            with torch.no_grad():
                decay = min(ema_decay, (1 + s) / (10 + s))
                for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                    for pe, pl in zip(ema.parameters(), live.parameters()):
                        pe.lerp_(pl, 1 - decay)
            return {"loss": round(loss.item(), 5)}

        return Stage({"unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}, opt,
                     train_step, lr_factor=lambda s: min(1.0, (s + 1) / warmup), info={"scaling_factor": scale},
                     recipe=dict(batch=batch, lr=lr, ema_decay=ema_decay, empty_prompt=empty_prompt,
                                 min_snr=min_snr, warmup=warmup, limit=limit))

    return run_stage(run, "sd", steps, setup, seed=seed, minutes=minutes, save_every=save_every)


# ---------------------------------------------------------------- export

def export(run: Path, out: Path) -> Path:
    """The diffusers pipeline folder of the EMA weights, and its TRAINING.json: what ships in the
    repository."""
    quiet_libraries()
    states = {}
    for name in ("vae", "sd", *DECODER_STAGES):
        last = latest_checkpoint(run / name)
        if last is None:
            if name in ("vae", "sd"):
                raise FileNotFoundError(f"{run / name}: no checkpoint; train the {name} stage first")
            continue
        states[name] = state = read_checkpoint(last)[1]
        span = state["recipe"].get("steps")  # a schedule spanning the stage: only its end is reproducible
        if span is not None and span != state["step"]:
            raise ValueError(f"{name} stopped at step {state['step']} of the {span} steps its schedule spans: finish it "
                             "(rerun the same command) before exporting")
    tensors = read_checkpoint(latest_checkpoint(run / "sd"))[0]
    tokenizer = load_tokenizer(run / "tokenizer")
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(unflat("ema_unet", tensors))
    text_encoder = text_encoder_for(tokenizer)
    text_encoder.load_state_dict(unflat("ema_text", tensors))
    vae = load_trained_vae(run)
    vae.register_to_config(scaling_factor=states["sd"]["scaling_factor"])
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
    record = {name: {"steps": st["step"], "minutes": round(st["elapsed"] / 60, 1), "recipe": st["recipe"]}
              for name, st in states.items()}
    record["sd"]["scaling_factor"] = states["sd"]["scaling_factor"]
    (out / "TRAINING.json").write_text(json.dumps({
        "commands": ["ctrlnet data shapes --n 50000 --out data/shapes-train --seed 0",
                     *(training_command(name, st) for name, st in states.items()),
                     "python -m ctrlnet.testbed.nano export --run RUN --out src/ctrlnet/testbed/nano-sd"],
        "note": "each stage ran exactly its --steps optimizer steps and every schedule is a function of the step, "
                "so these commands reproduce these weights bit for bit on the same machine and torch version; "
                "a stage stopped early by --minutes resumes, to the same result, when its command is rerun. "
                "minutes: the wall time each stage took, for information; recipe: every hyper-parameter",
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__} CPU, fp32",
        **record}, indent=2) + "\n")
    return out


def training_command(name: str, state: dict) -> str:
    """The command that trains stage ``name`` as its checkpoint ``state`` records."""
    recipe = state["recipe"]
    command = "python -m ctrlnet.testbed.nano " + (f"decoder --name {name}" if name in DECODER_STAGES else name)
    command += f" --data data/shapes-train --run RUN --steps {state['step']} --seed {recipe['seed']}"
    options = [f" --{k} {recipe[k]}" for k in ("limit", "batch", "crop", "lr") if recipe.get(k) is not None]
    return command + "".join(options)


TRAINERS = {"vae": train_vae, "decoder": train_decoder, "sd": train_sd}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ctrlnet.testbed.nano", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, trainer in TRAINERS.items():
        defaults = {k: v.default for k, v in inspect.signature(trainer).parameters.items()}
        p = sub.add_parser(name)
        p.add_argument("--data", required=True, type=Path, help="ShapesWorld folder (ctrlnet data shapes)")
        p.add_argument("--run", required=True, type=Path, help="run folder: checkpoints, logs; resumes from it")
        p.add_argument("--steps", type=int, required=True, help="optimizer steps of this stage")
        p.add_argument("--minutes", type=float, default=None,
                       help="wall-time budget of this call: stops early (checkpointed; rerun to resume), "
                            "changes no step")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--limit", type=int, default=None, help="use the first N samples only")
        p.add_argument("--batch", type=int, default=defaults["batch"])
        p.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
        if "crop" in defaults:
            p.add_argument("--crop", type=int, default=defaults["crop"], help="square crop size; 128 = whole images")
        if name == "decoder":
            p.add_argument("--name", default="decoder", choices=DECODER_STAGES, help="decoder pass")
    p = sub.add_parser("export")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    return parser


def main(argv=None):
    args = vars(parser().parse_args(argv))
    stage = args.pop("stage")
    if stage == "export":
        print(export(args["run"], args["out"]))
    else:
        print(TRAINERS[stage](args.pop("data"), args.pop("run"), **args))


if __name__ == "__main__":
    main()
