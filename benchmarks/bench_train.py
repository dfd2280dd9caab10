"""ControlNet training step, SD1.5-sized (random weights built from the shipped configs), CPU or GPU.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--resolution 256] [--device cpu|cuda]

Each mode runs in its own process (clean peak RSS), batch 1, `--steps` timed steps after one
warm-up step, `--repeat` rounds over the modes interleaved (this shared 2-vCPU machine drifts by
+-20%); s/step is the median of every timed step of a mode. Prints JSON per run and Markdown rows
for BENCHMARKS.md:

- ``diffusers-recipe``: the diffusers example (train_controlnet.py) reimplemented: diffusers'
  ``ControlNetModel.from_unet``, the VAE and the text encoder run every step, plain
  ``torch.optim.AdamW`` (default implementation), fp32, UNet frozen with ``requires_grad_(False)``,
  gradients clipped at norm 1.0 (its ``--max_grad_norm`` default) and zeroed, not freed
  (``--set_grads_to_none`` is off by default);
- ``ctrlnet-fp32`` / ``ctrlnet-bf16``: ctrlnet's ``Trainer`` itself (latent/text cache, fused AdamW,
  locked base; bf16 = the base in bf16 under autocast, ControlNet weights fp32);
- ``unet-finetune``: fine-tuning the whole base UNet instead (fused AdamW, cached latents, fp32):
  the seed's memory comparison.

The CPU allocator (``ctrlnet.allocator``): the Trainer keeps freed memory for reuse by default
(``retain_cpu_memory: true``), the baselines run with glibc's default, as each library's users get
them. Two more modes separate that setting from the rest: ``ctrlnet-fp32-system`` (ours with
``retain_cpu_memory: false``) and ``diffusers-recipe-retain`` (the recipe with
``retain_freed_memory()`` called first). Minor page faults per timed step are reported for every mode.

On a GPU (``--device cuda``) the baseline synchronises at the end of each step (where the
diffusers example reads the loss for its progress bar); ours reads the loss after the backward pass,
so its optimizer step's GPU work ends inside the next step's time: per-step times of consecutive
steps add up to the run's wall time in both. The memory column is then the peak of allocated GPU
memory (``torch.cuda.max_memory_allocated``) instead of the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "ctrlnet" / "configs" / "sd15"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_sd15_base(tmp: Path):
    """An SD1.5-sized LockedBase with random weights (no download): configs shipped in ctrlnet."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from ctrlnet.base import LockedBase, load_tokenizer, quiet_libraries
    from ctrlnet.models.control import lock
    from ctrlnet.testbed.tiny import write_byte_tokenizer
    quiet_libraries()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((CONFIGS / "vae" / "config.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in json.loads((CONFIGS / "text_encoder" / "config.json")
                                                                        .read_text()).items()
                                         if not k.startswith("_") and k != "architectures"}))
    tokenizer = load_tokenizer(write_byte_tokenizer(tmp / "tokenizer", max_length=77))
    scheduler = DDIMScheduler.from_config(json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text()))
    for m in (unet, vae, text):
        lock(m)
    return LockedBase(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler, kind="sd15",
                     source="random")


def make_data(tmp: Path, resolution: int) -> Path:
    from ctrlnet.testbed.shapes import generate
    return generate(tmp / "data", 8, seed=0, size=resolution, workers=1, progress=False)


def run_ctrlnet(mode: str, steps: int, resolution: int, tmp: Path, device: torch.device) -> dict:
    from ctrlnet.training import load_config
    from ctrlnet.training.trainer import Trainer
    base = random_sd15_base(tmp)
    data = make_data(tmp, resolution)
    cfg = load_config(None, dict(base="sd15-random", data=str(data / "prompt_canny.json"), output_dir=str(tmp / "run"),
                                 resolution=resolution, train_batch_size=1, max_train_steps=steps + 1,
                                 checkpointing_steps=10**6, log_every=1, tensorboard=False,
                                 mixed_precision="bf16" if mode == "ctrlnet-bf16" else "no",
                                 retain_cpu_memory=not mode.endswith("-system"),
                                 cpu=device.type == "cpu"))
    tr = Trainer(cfg, progress=False, base=base)
    stamps = []  # page-fault counter at each log call: once before the first step, then after every step
    log = tr.monitor.log
    tr.monitor.log = lambda **kw: (stamps.append(minor_faults()), log(**kw))[1]
    tr.train()
    log = [json.loads(l) for l in (tmp / "run" / "log.jsonl").read_text().splitlines() if "loss" in l]
    per_step = [r["step_s"] for r in log]  # wall time of each optimizer step (batch, forward, backward, AdamW)
    return {"times": per_step[1:], "first_step_s": per_step[0], "faults": stamps[-1] - stamps[1]}


def run_baseline(mode: str, steps: int, resolution: int, tmp: Path, device: torch.device) -> dict:
    """The diffusers example's step (VAE + text encoder every step), or whole-UNet fine-tuning."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler
    from PIL import Image
    base = random_sd15_base(tmp).to(device)
    data = make_data(tmp, resolution)
    rows = [json.loads(l) for l in (data / "prompt_canny.json").read_text().splitlines()]
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    if mode.startswith("diffusers-recipe"):
        controlnet = ControlNetModel.from_unet(unet).train().to(device)
        params = controlnet.parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-5)  # plain AdamW, as in the example
    else:  # unet-finetune
        controlnet = None
        unet.requires_grad_(True).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
        with torch.no_grad():  # cached latents / text, as our trainer does
            img = torch.from_numpy(np.asarray(Image.open(data / rows[0]["target"]).convert("RGB"))).permute(2, 0, 1)
            cached_latents = vae.encode(img[None].float().to(device) / 127.5 - 1).latent_dist.sample() * 0.18215
            ids = base.tokenizer([rows[0]["prompt"]], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            cached_text = text_encoder(ids.to(device))[0]
    times = []
    faults = 0
    for step in range(steps + 1):
        f0 = minor_faults()
        row = rows[step % len(rows)]
        sync(device)
        t0 = time.perf_counter()
        if controlnet is not None:
            img = torch.from_numpy(np.asarray(Image.open(data / row["target"]).convert("RGB"))).permute(2, 0, 1)
            cond = torch.from_numpy(np.asarray(Image.open(data / row["source"]).convert("RGB"))).permute(2, 0, 1)
            img, cond = img.to(device), cond.to(device)
            latents = vae.encode(img[None].float() / 127.5 - 1).latent_dist.sample() * 0.18215
            ids = base.tokenizer([row["prompt"]], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            hidden = text_encoder(ids.to(device), return_dict=False)[0]
        else:
            latents, hidden = cached_latents, cached_text
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        if controlnet is not None:
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond[None].float() / 255,
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        else:
            pred = unet(noisy, t, encoder_hidden_states=hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        if controlnet is not None:  # the example: clip at --max_grad_norm 1.0, zero_grad(set_to_none=False)
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=controlnet is None)
        sync(device)
        times.append(time.perf_counter() - t0)
        faults += (minor_faults() - f0) if step else 0
    return {"times": times[1:], "first_step_s": times[0], "faults": faults}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child(mode: str, steps: int, resolution: int, device: torch.device) -> None:
    torch.manual_seed(0)
    if mode.endswith("-retain"):
        from ctrlnet.allocator import retain_freed_memory
        assert retain_freed_memory() or sys.platform != "linux"
    with tempfile.TemporaryDirectory() as d:
        fn = run_ctrlnet if mode.startswith("ctrlnet") else run_baseline
        result = fn(mode, steps, resolution, Path(d), device)
    times = result.pop("times")
    result["faults_per_step"] = round(result.pop("faults") / len(times))
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()
    result.update(mode=mode, peak_memory_gib=round(memory, 2), resolution=resolution, batch=1, steps=steps,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  step_s=round(statistics.median(times), 4), step_times=[round(t, 4) for t in sorted(times)],
                  first_step_s=round(result["first_step_s"], 2), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--modes", default="diffusers-recipe,ctrlnet-fp32,ctrlnet-bf16,unet-finetune")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the modes, interleaved (machine noise)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.resolution, torch.device(args.device))
    results = []
    for mode in args.modes.split(",") * args.repeat:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                              "--resolution", str(args.resolution), "--device", args.device],
                             capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1]), flush=True)
    # per mode: the median of all its timed steps over the rounds
    modes = list(dict.fromkeys(r["mode"] for r in results))
    med = {}
    for m in modes:
        med[m] = statistics.median(t for r in results if r["mode"] == m for t in r["step_times"])
    ref = med.get("diffusers-recipe")
    memory = "peak GPU memory GiB" if args.device.startswith("cuda") else "peak RSS GiB"
    print(f"\n| mode | s/step (median) | speed-up vs diffusers recipe | {memory} | minor page faults per step |")
    print("|---|---|---|---|---|")
    for m in modes:
        speed = f"{ref / med[m]:.2f}x" if ref else "-"
        rss = max(r["peak_memory_gib"] for r in results if r["mode"] == m)
        faults = statistics.median(r["faults_per_step"] for r in results if r["mode"] == m)
        print(f"| {m} | {med[m]:.3g} | {speed} | {rss:.2f} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
