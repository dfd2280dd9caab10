"""The ControlNet training loop (the seed's procedure), on accelerate.

- The base (UNet, VAE, text encoders) is locked: no gradients, eval mode, in the mixed-precision
  dtype; only the ControlNet (initialised from the base UNet's encoder) is trained, in fp32.
- Loss: the base's own objective (epsilon, v or sample prediction from its scheduler config),
  MSE; ``proportion_empty_prompts`` of the captions replaced by "".
- Exact and rank-independent randomness: the data order and every random draw of optimizer step
  s (timesteps, noise, latent samples, empty-prompt and flip choices, crop offsets) come from
  generators seeded by (seed, s) and are drawn for the whole global batch, each process taking
  its slice. So a resumed run continues bit-identically, and N processes with batch B train the
  same weights as one process with batch N*B (up to float summation order).
- Checkpoints every ``checkpointing_steps``: atomic, checksummed folders, the last K kept, each
  written only when every tensor in it (weights, EMA, AdamW moments) is finite.
- ``--resume latest`` continues from the newest checkpoint that verifies against its checksums,
  naming (and setting aside) damaged newer ones. The checkpoint's config is compared with the given
  one first: changes that only steer the run on are applied and logged, the rest refused
  (``config.resume_changes``), before the base or the data load.
- A non-finite loss stops the run before the optimizer step, leaving the last good checkpoint.
- ``skip_bad`` counts distinct unreadable samples: one found bad is skipped from then on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..allocator import retain_freed_memory
from ..annotators import get_annotator
from ..base import load_base
from ..formats.checkpoint import (MANIFEST, flat, latest_checkpoint, load_optimizer, newest_good_checkpoint,
                                  optimizer_tensors, read_checkpoint, rng_state, set_aside, set_rng_state, unflat,
                                  verify_checkpoint, write_checkpoint)
from ..formats.safe_load import CheckpointError
from ..models.control import controlled_unet_forward, lock
from ..models.controlnet import ControlNet
from ..pipeline.text import encode_text, sdxl_time_ids
from .cache import open_or_build_cache
from .config import ConfigError, TrainConfig, TrainingError, resume_changes, save_config
from .data import ControlDataset, DataError, condition_to_tensor, image_to_tensor, read_records
from .monitor import Monitor
from .networks import (FINAL_NAMES, build_network, control_signal, ema_copy, network_config, save_final, tied,
                       to_training, trainable_parameters, trainable_state)


def generator(seed: int, kind: str, n: int) -> torch.Generator:
    """A CPU generator for (seed, kind, n): independent streams without shared global state."""
    digest = hashlib.blake2b(f"{seed}/{kind}/{n}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def lr_factor(c: TrainConfig):
    """LR multiplier at optimizer step s: linear warmup, then constant or cosine decay to 0."""
    def factor(s: int) -> float:
        if c.lr_warmup_steps and s < c.lr_warmup_steps:
            return (s + 1) / c.lr_warmup_steps
        if c.lr_scheduler == "cosine":
            done = (s - c.lr_warmup_steps) / max(1, c.max_train_steps - c.lr_warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0
    return factor


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True, base=None, resume: str | None = None):
        """``base``: an already loaded ``LockedBase`` to use instead of loading ``config.base``;
        ``resume``: ``latest`` or a checkpoint folder, checked here before anything heavy loads."""
        self.started = time.time()  # the wall-time budget counts loading and caching too
        self.config = c = config.validate()
        # cpu=True when there is no accelerator: accelerate then runs several processes (torchrun /
        # accelerate launch) as MULTI_CPU over gloo instead of as independent single processes.
        self.acc = Accelerator(mixed_precision=c.mixed_precision, cpu=c.cpu or not has_accelerator())
        if c.retain_cpu_memory and self.acc.device.type == "cpu":  # process-wide, before the models load
            retain_freed_memory()
        self.progress = progress and self.acc.is_main_process
        self.out = Path(c.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.resume_from, self.resume_verified = None, False
        if resume:
            self._resolve_resume(resume)
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[c.mixed_precision]
        torch.manual_seed(c.seed)

        # The locked base.
        self.base = base = base if base is not None else load_base(c.base)
        for part in base.parts().values():
            lock(part).to(self.acc.device, self.weight_dtype)
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.vae_scale = base.vae.config.scaling_factor
        self.vae_shift = getattr(base.vae.config, "shift_factor", None) or 0.0
        if c.resolution % base.vae_scale_factor:
            raise ConfigError(f"config: resolution must be a multiple of {base.vae_scale_factor} (this base's VAE "
                              f"factor), got {c.resolution}")
        if c.gradient_checkpointing and hasattr(base.unet, "enable_gradient_checkpointing"):
            base.unet.enable_gradient_checkpointing()  # activations of the locked UNet are needed for the residuals' grads

        # The network (``network``): a copy of the base encoder (the seed), a Control-LoRA on it, or a
        # T2I-Adapter; new, or a checkpoint to continue from (``networks``).
        net = to_training(build_network(c, base.unet), self.acc.device)
        if c.gradient_checkpointing and isinstance(net, ControlNet):  # a T2I-Adapter is small and has none
            net.enable_gradient_checkpointing()
        fused = self.acc.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(trainable_parameters(net), lr=c.learning_rate,
                                           betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay,
                                           eps=c.adam_epsilon, fused=fused)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(c))
        self.net_raw = net
        # EMA weights: a frozen copy updated after every optimizer step (identical on every rank).
        self.ema = None
        if c.ema_decay:
            self.ema = ema_copy(net)

        # Data.
        records = read_records(c.data, c.image_column, c.conditioning_image_column, c.caption_column,
                               need_condition=not c.annotator)
        if c.max_train_samples:
            records = records[:c.max_train_samples]
        annotator = None
        if c.annotator:
            annotator = get_annotator(c.annotator, **c.annotator_params)
        self.dataset = ControlDataset(records, c.resolution, c.center_crop, annotator)
        self.cache = None
        # Dataset indices found unreadable: a set, so a bad sample met in every epoch counts once.
        self.bad: set[int] = set()
        if c.cache:
            cache_root = Path(c.cache_dir) if c.cache_dir else self.out / "cache"
            self.cache = open_or_build_cache(base, self.dataset, cache_root, c.random_flip, c.skip_bad,
                                             is_main=self.acc.is_main_process, wait=self.acc.wait_for_everyone,
                                             log=self.log_line)
            self.valid = torch.from_numpy(np.array(self.cache.valid))
            self.bad = set(range(len(self.dataset))) - set(self.valid.tolist())
            if self.skipped:
                self.log_line(f"skipped {self.skipped} unreadable samples (skip_bad), e.g. "
                              f"{self.cache.info['bad_examples'][:3]}")
        else:
            self.valid = torch.arange(len(self.dataset))
        if len(self.valid) == 0:
            raise DataError(f"data {c.data}: no readable samples")
        self.valid_set = set(self.valid.tolist())
        self._perms: dict[int, torch.Tensor] = {}
        self.monitor = Monitor(self, c) if self.acc.is_main_process else None
        self.step = 0
        self.elapsed_before = 0.0  # wall time of the run before this process (resumed runs)

    # ------------------------------------------------------------------ bookkeeping

    @property
    def skipped(self) -> int:
        """Distinct samples skipped as unreadable (skip_bad)."""
        return len(self.bad)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def out_of_time(self) -> bool:
        """The wall-time budget, decided on rank 0 and shared so every process stops at the same step."""
        if not self.config.max_train_minutes:
            return False
        flag = torch.tensor([float(self.elapsed() >= self.config.max_train_minutes * 60)], device=self.acc.device)
        return bool(broadcast(flag, from_process=0).item())

    def log_line(self, text: str) -> None:
        if self.acc.is_main_process:
            print(text, flush=True)

    @property
    def global_micro_batch(self) -> int:
        return self.config.train_batch_size * self.acc.num_processes

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.valid), generator=generator(self.config.seed, "epoch", epoch))}
        return self._perms[epoch]

    def indices(self, micro: int) -> list[int]:
        """Data indices of global micro-batch ``micro`` (= step * accumulation + k), all processes."""
        g = self.global_micro_batch
        out = []
        for pos in range(micro * g, (micro + 1) * g):
            epoch, k = divmod(pos, len(self.valid))
            out.append(int(self.valid[self._perm(epoch)[k]]))
        return out

    # ------------------------------------------------------------------ one step

    def _sample(self, i: int, flip: bool, u: tuple[float, float], need_image: bool):
        """(image or None, condition) uint8; with skip_bad an unreadable sample is replaced by the next one."""
        n = len(self.dataset)
        for attempt in range(n):
            j = (i + attempt) % n
            if j not in self.valid_set or j in self.bad:  # unreadable when the cache was built, or since
                continue
            try:
                image = self.dataset.image(j, flip, u) if need_image or self.dataset.annotator else None
                return j, image, self.dataset.condition(j, flip, u, image=image)
            except DataError as e:
                if not self.config.skip_bad:
                    raise
                # Not tried again: it would fail again, and the replacement (the next readable
                # index) is the same either way, so the draws stay exact across resumes.
                self.bad.add(j)
                self.log_line(f"skip_bad: skipping {self.dataset.records[j].where} from now on: {e}")
        raise DataError(f"data {self.config.data}: no readable samples")

    def batch(self, micro: int) -> dict:
        """This process's slice of global micro-batch ``micro``: tensors on the device."""
        c, dev = self.config, self.acc.device
        g = self.global_micro_batch
        latent_c = self.base.unet.config.in_channels
        h = c.resolution // self.base.vae_scale_factor
        rnd = generator(c.seed, "batch", micro)  # fixed order of draws, whole global batch
        n_t = self.noise_scheduler.config.num_train_timesteps
        if c.timestep_sampling == "cubic" and micro // c.gradient_accumulation_steps >= c.timestep_sampling_from:
            u = torch.rand(g, generator=rnd)
            timesteps = ((1 - u ** 3) * n_t).long().clamp(0, n_t - 1)
        else:
            timesteps = torch.randint(0, n_t, (g,), generator=rnd)
        noise = torch.randn(g, latent_c, h, h, generator=rnd)
        eps = torch.randn(g, latent_c, h, h, generator=rnd)
        empty = torch.rand(g, generator=rnd) < c.proportion_empty_prompts
        flips = (torch.rand(g, generator=rnd) < 0.5) & c.random_flip
        crops = torch.rand(g, 2, generator=rnd)
        r, b = self.acc.process_index, c.train_batch_size
        mine = slice(r * b, (r + 1) * b)
        idx = self.indices(micro)[mine]
        flips_l, empty_l = flips[mine].tolist(), empty[mine].tolist()
        need_image = self.cache is None
        samples = [self._sample(i, f, tuple(u), need_image) for i, f, u in zip(idx, flips_l, crops[mine].tolist())]
        idx = [s[0] for s in samples]
        condition = condition_to_tensor([s[2] for s in samples]).to(dev)
        if self.cache is not None:
            latents = self.cache.latents(idx, flips_l, eps[mine])
            hidden, pooled = self.cache.text(idx, empty_l)
        else:
            with torch.no_grad():
                x = image_to_tensor([s[1] for s in samples]).to(dev, self.weight_dtype)
                params = self.base.vae.encode(x).latent_dist.parameters.float().cpu()
                mean, logvar = params.chunk(2, dim=1)
                latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps[mine]
                texts = ["" if e else self.dataset.text(i) for i, e in zip(idx, empty_l)]
                hidden, pooled = encode_text(self.base, texts)
        latents = (latents - self.vae_shift) * self.vae_scale
        out = {"latents": latents.to(dev), "noise": noise[mine].to(dev), "timesteps": timesteps[mine].to(dev),
               "hidden": hidden.to(dev, torch.float32), "condition": condition}
        if pooled is not None:
            out["added"] = {"text_embeds": pooled.to(dev, torch.float32),
                            "time_ids": sdxl_time_ids(len(idx), c.resolution, c.resolution).to(dev)}
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:  # "sample"
            target = latents
        added = batch.get("added")
        with self.acc.autocast():
            residuals, features = control_signal(self.net_raw, self.net, noisy, t, batch["hidden"], batch["condition"],
                                                 added)
            wd = self.weight_dtype
            added_wd = {k: v.to(wd) for k, v in added.items()} if added else None
            pred = controlled_unet_forward(self.base.unet, noisy.to(wd), t, batch["hidden"].to(wd), residuals,
                                           added_cond_kwargs=added_wd, intrablock=features)
        if not self.config.snr_gamma:
            return F.mse_loss(pred.float(), target.float())
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return (per_sample * self.snr_weights(t)).mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights of timesteps ``t`` (B,): min(SNR, gamma) / SNR for epsilon targets,
        / (SNR + 1) for v-prediction, min(SNR, gamma) for x0 ("sample") targets, where
        SNR = alpha_bar / (1 - alpha_bar); an epsilon target at SNR = 0 gets weight 1."""
        # float64 on the CPU (diffusers' add_noise moves the table to the device, and MPS has no
        # float64), then the weights to t's device
        alpha_bar = self.noise_scheduler.alphas_cumprod.cpu().double()[t.cpu()]
        snr = alpha_bar / (1 - alpha_bar)
        clipped = snr.clamp(max=self.config.snr_gamma)
        if self.prediction_type == "v_prediction":
            w = clipped / (snr + 1)
        elif self.prediction_type == "sample":
            w = clipped
        else:
            w = torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
        return w.float().to(t.device)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        c = self.config
        net = self.acc.unwrap_model(self.net)
        opt_t, opt_s = optimizer_tensors(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                         else self.optimizer, "optimizer")
        tensors = {**flat("controlnet", trainable_state(net)), **opt_t}
        if self.ema is not None:
            tensors.update(flat("ema", trainable_state(self.ema)))
        # Only finite state is written, so the last checkpoint on disk is always one to resume from.
        # Every process checks (their tensors are identical) and all stop together, none left
        # waiting at the barrier below.
        nonfinite = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if nonfinite:
            raise TrainingError(f"non-finite values at step {self.step} in {len(nonfinite)} tensor(s), e.g. "
                                f"{nonfinite[:3]}; checkpoint not written. Last good checkpoint: "
                                f"{latest_checkpoint(self.ckpt_root) or 'none'}. Lower learning_rate (applied on "
                                "resume), or use mixed_precision: bf16/no instead of fp16, then --resume latest")
        path = None
        if self.acc.is_main_process:
            state = {"step": self.step, "elapsed": self.elapsed(), "optimizer": opt_s, "lr_scheduler": self.lr_scheduler.state_dict(),
                     "rng": rng_state(), "config": c.to_dict(), "controlnet_config": network_config(net),
                     "network": c.network,
                     "skipped_bad": self.skipped, "bad_samples": sorted(self.bad)}
            path = write_checkpoint(self.ckpt_root, self.step, tensors, state, keep=c.checkpoints_total_limit)
        self.acc.wait_for_everyone()
        return path

    def _resolve_resume(self, resume: str) -> None:
        """The checkpoint to continue from, verified against its checksums, and the config changes
        it allows (refused ones raise here, before the base and the data load). ``latest``: the
        newest folder that verifies; damaged newer ones are named and set aside. A folder given
        explicitly must verify itself."""
        if resume == "latest":
            path, verified, bad = newest_good_checkpoint(self.ckpt_root)
            if path is None and bad:
                raise TrainingError(f"resume latest: no checkpoint in {self.ckpt_root} verifies "
                                    f"({'; '.join(why for _, why in bad)}); move them away to start from step 0")
            if path is not None:  # a refused config change stops here, before anything on disk moves
                self._resume_changes(path)
            self.acc.wait_for_everyone()  # every process has chosen before the damaged folders move
            for folder, why in bad:
                aside = set_aside(folder) if self.acc.is_main_process else folder
                self.log_line(f"resume latest: {why}; resuming from {path.name} instead ({folder.name} set aside "
                              f"as {aside.name})")
            if path is None:
                self.log_line(f"resume latest: no checkpoint in {self.ckpt_root} yet, starting from step 0")
                return
        else:
            path = Path(resume)
            if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
                raise TrainingError(f"resume: {path} is not a checkpoint folder (no state.json); give a "
                                    "checkpoints/step-N folder, or latest")
            try:
                verified = verify_checkpoint(path)
            except CheckpointError as e:
                raise CheckpointError(f"resume: {e}") from None
            self._resume_changes(path)
        self.resume_from, self.resume_verified = path, verified

    def _resume_changes(self, path: Path) -> None:
        """Apply (and log) the config changes a resume from ``path`` allows; refused ones raise."""
        state = json.loads((path / "state.json").read_text())
        if "step" not in state:
            raise TrainingError(f"resume: {path / 'state.json'} has no step; not a ctrlnet training checkpoint")
        for change in resume_changes(state.get("config", {}), self.config, state["step"]):
            self.log_line(f"applied on resume: {change}")

    def load_checkpoint(self, path: Path, verify: bool = True) -> None:
        tensors, state = read_checkpoint(path, verify=verify)
        net = self.net_raw
        missing = net.load_state_dict(unflat("controlnet", tensors), strict=False)
        absent = [k for k in missing.missing_keys if k not in tied(net)]  # the base's own are not in a checkpoint
        if absent or missing.unexpected_keys:
            raise TrainingError(f"resume: {path} does not match this config's {self.config.network} "
                                f"(missing {absent[:3]}, unexpected {missing.unexpected_keys[:3]})")
        if self.ema is not None:
            ema = unflat("ema", tensors)
            if not ema:
                raise TrainingError(f"resume: {path} has no EMA weights but this config sets ema_decay; "
                                    "resume with --set ema_decay=0 or start a new run")
            self.ema.load_state_dict(ema, strict=not tied(self.ema))
        load_optimizer(self.optimizer, "optimizer", tensors, state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.apply_optimizer_config()
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.elapsed_before = state.get("elapsed", 0.0)
        self.bad |= set(state.get("bad_samples", []))

    def apply_optimizer_config(self) -> None:
        """The config's optimizer settings over those the optimizer state restored: the config is
        what train_config.yaml records, and it may have changed them on resume. Unchanged, this
        recomputes the same floats (LambdaLR's own base_lr * factor(step)): resume stays exact."""
        c, sched = self.config, self.lr_scheduler
        sched.base_lrs = [c.learning_rate for _ in sched.base_lrs]
        factor = lr_factor(c)(sched.last_epoch)  # the schedule may have changed too (warmup, cosine, steps)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=c.learning_rate, lr=c.learning_rate * factor, betas=(c.adam_beta1, c.adam_beta2),
                         weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ------------------------------------------------------------------ the loop

    def train(self, resume: str | None = None) -> Path:
        """``resume``: as the constructor's (there, a refused config change stops before loading)."""
        c, acc = self.config, self.acc
        if resume and self.resume_from is None:
            self._resolve_resume(resume)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from, verify=False)  # verified when resolved
            note = "" if self.resume_verified else " (unverified: written before checkpoints had checksums)"
            self.log_line(f"resumed from {self.resume_from} at step {self.step}{note}")
        self.net, self.optimizer = acc.prepare(self.net_raw, self.optimizer)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(c, self.out / "train_config.yaml")
            self.monitor.start(self.step)
            self.monitor.log(step=self.step, processes=acc.num_processes, device=str(acc.device),
                             global_batch=self.global_micro_batch * c.gradient_accumulation_steps,
                             mixed_precision=c.mixed_precision, samples=len(self.valid))
        bar = tqdm(total=c.max_train_steps, initial=self.step, disable=not self.progress, unit="step",
                   desc="training")
        accum = c.gradient_accumulation_steps
        if self.step == 0 and self.monitor is not None and self.monitor.enabled:
            self.monitor.validate(self.step)  # the base alone: where controllability starts
        acc.wait_for_everyone()
        window = []
        while self.step < c.max_train_steps:
            t0 = time.perf_counter()
            total = torch.zeros((), device=acc.device)
            for k in range(accum):
                micro = self.step * accum + k
                batch = self.batch(micro)
                sync = contextlib.nullcontext() if k == accum - 1 else acc.no_sync(self.net)
                with sync:
                    loss = self.loss(batch)
                    acc.backward(loss / accum)
                total += loss.detach() / accum
            mean_loss = acc.reduce(total, reduction="mean").item()
            if not math.isfinite(mean_loss):
                last = latest_checkpoint(self.ckpt_root)
                raise TrainingError(f"loss is {mean_loss} at step {self.step + 1}; stopped before the optimizer "
                                    f"step. Last good checkpoint: {last or 'none'}. Lower learning_rate (applied "
                                    "on resume), or use mixed_precision: bf16/no instead of fp16, then --resume latest")
            if c.max_grad_norm > 0:
                acc.clip_grad_norm_(self.net.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.update_ema()
            window = (window + [time.perf_counter() - t0])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if acc.is_main_process and (self.step % c.log_every == 0 or self.step == c.max_train_steps):
                self.monitor.log(step=self.step, loss=mean_loss, lr=self.lr_scheduler.get_last_lr()[0],
                                 minutes=round(self.elapsed() / 60, 2), step_s=round(window[-1], 4),
                                 img_per_s=round(c.train_batch_size * acc.num_processes * accum * len(window)
                                                 / sum(window), 2), skipped_bad=self.skipped)
            last = self.step == c.max_train_steps or self.out_of_time()
            if self.step % c.checkpointing_steps == 0 or last:
                self.save_checkpoint()
            if self.monitor is not None and self.monitor.enabled and (self.step % c.validation_steps == 0 or last):
                self.monitor.validate(self.step)
            acc.wait_for_everyone()
            if last:
                if self.step < c.max_train_steps:
                    self.log_line(f"max_train_minutes ({c.max_train_minutes}) reached at step {self.step}")
                break
        bar.close()
        return self.finish()

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        ema = trainable_parameters(self.ema)
        live = trainable_parameters(self.net_raw)  # the module DDP wraps: the same tensors
        torch._foreach_lerp_(ema, live, 1 - decay)  # ema += (1 - decay) * (live - ema)

    def output_net(self) -> torch.nn.Module:
        """The weights validation and the final folder use: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.net_raw

    def weights_digest(self) -> str:
        """A hash of this process's ControlNet weights (all ranks must agree)."""
        h = hashlib.blake2b(digest_size=16)
        for k, v in sorted(trainable_state(self.output_net()).items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def finish(self) -> Path:
        final = self.out / "controlnet"  # the final network's path (its name depends on the kind)
        digests = gather_object([self.weights_digest()])  # one per process, in rank order
        if self.acc.is_main_process:
            if len(set(digests)) != 1:
                raise TrainingError(f"processes ended with different ControlNet weights ({digests}); "
                                    "this is a bug - please report it with your launch command")
            final = save_final(self.output_net(), self.out)
            info = final / "training.json" if final.is_dir() else final.with_name(final.name + ".training.json")
            info.write_text(json.dumps(
                {"steps": self.step, "ema": bool(self.ema is not None), "config": self.config.to_dict(), "skipped_bad": self.skipped,
                 "processes": self.acc.num_processes, "weights_digest_per_rank": digests}, indent=2) + "\n")
            self.monitor.finish()
            self.log_line(f"{self.config.network} written to {final}")
        self.acc.wait_for_everyone()
        return self.out / FINAL_NAMES[self.config.network]


def train(config: TrainConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Train a ControlNet as ``config`` says; returns the final diffusers-format folder."""
    return Trainer(config, progress=progress, resume=resume).train()
