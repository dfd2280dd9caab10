"""The denoising loop with control, written out once: text-to-image, img2img and inpainting,
any number of ControlNets, each with its scale, start/end window and control mode.

Control semantics (A1111 ``controlnet.py``: ``soft_injection = mode !=
balanced``, ``cfg_injection = mode == control``):

- ``balanced``: the net's residuals go to both classifier-free-guidance halves, flat scales;
- ``prompt`` ("my prompt is more important"): both halves, soft scales ``scale * 0.825**(n-1-i)``;
- ``control`` ("ControlNet is more important", the original guess mode, diffusers'
  ``guess_mode``): soft scales, and the net runs on the conditional half only (the unconditional
  half gets no control, so CFG multiplies the control's effect). Only half the batch goes through
  the ControlNet.
- A net is active at step i of N when ``i/N >= start`` and ``(i+1)/N <= end`` (diffusers' rule);
  inactive nets and nets with scale 0 (every residual's) are not run at all (diffusers runs them and
  multiplies by 0).
- Hint features (the hint encoder's output) are computed once per generation, not per step.
- Residuals of several nets are summed.
- ``every=k`` (ControlNet reuse): a net runs at the first of its active steps and every k-th after,
  and its last residuals are reused at the steps between. Neighbouring steps' residuals differ
  little (the latents and the timestep move a little, the hint not at all), so k = 2 saves about
  half the ControlNet's cost; its price in control is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..base import LockedBase
from ..models.control import controlled_unet_forward, is_zero_scale, sum_residuals
from ..models.controlnet import ControlNet
from .ranges import check, check_scale

CONTROL_MODES = ("balanced", "prompt", "control")


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Match the guided prediction's per-sample std to the conditional one's, mixed by ``guidance_rescale``
    (Lin et al. 2023, arXiv 2305.08891, section 3.4)."""
    if guidance_rescale <= 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def initial_noise(shape: tuple[int, ...], b: int, seed: int) -> torch.Tensor:
    """(b, *shape): sample i's noise from its own generator seeded ``seed + i``, so a sample
    does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)])


def default_guidance(base: LockedBase) -> tuple[float, float]:
    """(guidance, guidance_rescale) for a base: a zero-terminal-SNR model (nano) wants 2.5 / 0.7
    (Lin et al. 2023, arXiv 2305.08891), others the usual 7.5 / 0."""
    zsnr = bool(base.scheduler.config.get("rescale_betas_zero_snr", False))
    return (2.5, 0.7) if zsnr else (7.5, 0.0)


def check_control(mode: str, start: float, end: float, where: str = "control", scale=1.0, every: int = 1) -> None:
    """The rules every control obeys, user spec or runtime form alike (ranges: ``ranges.RANGES``)."""
    if mode not in CONTROL_MODES:
        raise ValueError(f"{where}: mode {mode!r} is not one of {', '.join(CONTROL_MODES)}")
    check("start", start, where)
    check("end", end, where)
    check("every", every, where)
    if start > end:
        raise ValueError(f"{where}: need start <= end, got start={start}, end={end}")
    check_scale(scale, where)


@dataclass
class ActiveControl:
    """One ControlNet ready for the loop: its hint features (computed once) and how it acts."""

    net: ControlNet
    hint: torch.Tensor  # (B, C0, h, w): net.embed_condition(condition), B = the latents' batch
    scale: float | Sequence[float] = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    every: int = 1  # run at every k-th active step, reuse the last residuals in between
    kwargs: dict = field(default_factory=dict)  # more for the net's forward (a Union net: its pairs' types)

    def __post_init__(self):
        check_control(self.mode, self.start, self.end, scale=self.scale, every=self.every)

    def active(self, i: int, n: int) -> bool:
        """Whether the net runs at step i of n (diffusers' window rule; a zero scale never runs)."""
        return not is_zero_scale(self.scale) and i / n >= self.start and (i + 1) / n <= self.end


@dataclass
class Inpainting:
    """What the loop needs to inpaint. A 4-channel UNet: the kept region (``mask`` 0) is re-noised
    to each step's level and pasted back (diffusers' StableDiffusionControlNetInpaintPipeline). A
    9-channel inpainting UNet instead reads ``mask`` and ``masked_image_latents`` concatenated to
    its input."""

    mask: torch.Tensor  # (B, 1, h, w), 1 = repaint
    image_latents: torch.Tensor  # (B, C, h, w) the init image's scaled latents
    noise: torch.Tensor  # (B, C, h, w) the generation's initial noise
    masked_image_latents: torch.Tensor | None = None  # (B, C, h, w), 9-channel UNets only


@dataclass
class RegionBatch:
    """Regional prompts for the loop: R more blocks of B rows go through the UNet and ControlNets
    with their own prompts; their predictions replace the main prompt's inside their weights."""

    text: torch.Tensor  # (R*B, T, D) region prompts' embeddings, region-major
    weights: torch.Tensor  # (R, B, 1, h, w) in [0, 1] on the latent grid
    prompts: list[list[str]]  # per image: its non-empty region prompts (for the parameters text)
    text_embeds: torch.Tensor | None = None  # (R*B, P) SDXL pooled text


def control_residuals(controls: Sequence[ActiveControl], i: int, n: int, model_in: torch.Tensor, t,
                      text: torch.Tensor, added: dict | None, uncond_rows: int, reuse: dict | None = None,
                      keep_copies: bool = False):
    """Summed residuals of the nets active at step i of n for the batch ``model_in`` (k * B rows in
    blocks of B: the unconditional block first when ``uncond_rows`` = B (CFG), then the conditional
    block, then one block per region prompt). ``reuse``: the loop's memory for nets with
    ``every`` > 1 (control index -> (active steps so far, last residuals)); ``keep_copies``: the
    residuals live in buffers the next call overwrites (CUDA graphs), so the kept ones are copies."""
    out = []
    for j, c in enumerate(controls):
        if not c.active(i, n):
            continue
        if c.every > 1 and reuse is not None:
            runs, kept = reuse.get(j, (0, None))
            reuse[j] = (runs + 1, kept)
            if runs % c.every and kept is not None:  # not this net's step: its last residuals again
                out.append(kept)
                continue
        net, soft = c.net, c.mode != "balanced"
        k = model_in.shape[0] // c.hint.shape[0]
        if uncond_rows and c.mode == "control":  # conditional rows only; zeros for the unconditional block
            u = uncond_rows
            cond_added = {key: v[u:] for key, v in added.items()} if added else None
            down, mid = net(model_in[u:].to(net.dtype), t, text[u:].to(net.dtype), hint=repeat_rows(c.hint, k - 1),
                            conditioning_scale=c.scale, guess_mode=soft, added_cond_kwargs=cond_added, **c.kwargs)
            down = tuple(torch.cat([d.new_zeros((u, *d.shape[1:])), d]) for d in down)  # (k*B, C, h, w)
            mid = torch.cat([mid.new_zeros((u, *mid.shape[1:])), mid])
        else:
            hint = repeat_rows(c.hint, k)  # (k*B, C0, h, w)
            down, mid = net(model_in.to(net.dtype), t, text.to(net.dtype), hint=hint, conditioning_scale=c.scale,
                            guess_mode=soft, added_cond_kwargs=added, **c.kwargs)
        if c.every > 1 and reuse is not None:
            kept = (tuple(d.clone() for d in down), mid.clone()) if keep_copies else (down, mid)
            reuse[j] = (reuse[j][0], kept)
        out.append((down, mid))
    return sum_residuals(out)


def repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (k*B, ...): k blocks of the same B rows."""
    return x.repeat(k, *[1] * (x.ndim - 1)) if k > 1 else x


@dataclass
class ActiveAdapter:
    """One T2I-Adapter ready for the loop: its features, computed once per generation and already
    multiplied by its scale, added inside the UNet's down blocks (``down_intrablock_additional_residuals``)
    at the steps of its window."""

    features: list[torch.Tensor]  # per adapter level (B, C_l, h_l, w_l), B = the latents' batch
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"  # balanced: both CFG halves; control: the conditional half only

    def __post_init__(self):
        check_control(self.mode, self.start, self.end)
        if self.mode == "prompt":
            raise ValueError("a T2I-Adapter has no per-residual soft scales: use mode balanced or control")

    def active(self, i: int, n: int) -> bool:
        return i / n >= self.start and (i + 1) / n <= self.end


def adapter_features(adapters: Sequence[ActiveAdapter], i: int, n: int, rows: int,
                     uncond_rows: int) -> list[torch.Tensor] | None:
    """Summed features of the adapters active at step i of n for a batch of ``rows`` = k * B rows
    (the unconditional block first when ``uncond_rows`` = B; ``control`` mode leaves it at zero)."""
    total = None
    for a in adapters:
        if not a.active(i, n):
            continue
        k = rows // a.features[0].shape[0]
        feats = [repeat_rows(f, k) for f in a.features]
        if uncond_rows and a.mode == "control":
            feats = [torch.cat([f.new_zeros((uncond_rows, *f.shape[1:])), f[uncond_rows:]]) for f in feats]
        if total is None:
            total = feats
        elif len(total) != len(feats):
            raise ValueError(f"cannot sum T2I-Adapters with {len(total)} and {len(feats)} feature levels")
        else:
            total = [x + y for x, y in zip(total, feats)]
    return total


def compose_regions(pred_cond: torch.Tensor, pred_regions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Regional prompting ("latent couple"): inside each region the conditional prediction is its
    own prompt's. pred_cond (B, C, h, w); pred_regions (R, B, C, h, w); weights (R, B, 1, h, w) in
    [0, 1]. Where regions overlap beyond 1 they are normalised; the rest keeps the main prompt's."""
    cover = weights.sum(0)  # (B, 1, h, w)
    weights = weights / cover.clamp(min=1)
    return pred_cond * (1 - cover.clamp(max=1)) + (weights * pred_regions).sum(0)


@torch.no_grad()
def denoise(base: LockedBase, latents: torch.Tensor, text: torch.Tensor, scheduler, timesteps: torch.Tensor,
            guidance: float, guidance_rescale: float = 0.0, controls: Sequence[ActiveControl] = (),
            added: dict | None = None, generator: torch.Generator | None = None,
            inpaint: Inpainting | None = None, callback: Callable[[int], None] | None = None,
            regions: RegionBatch | None = None, cuda_graphs: bool = False,
            stop: Callable[[], bool] | None = None, adapters: Sequence[ActiveAdapter] = ()) -> torch.Tensor:
    """Run the sampler over ``timesteps`` from ``latents`` (B, C, h, w) float32; returns the final latents
    (those after step i when ``stop()`` is true after step i: an interrupted generation).

    ``text`` is (2B, T, D) [uncond; cond] when ``guidance > 1``, else (B, T, D).
    ``adapters``: T2I-Adapters (``ActiveAdapter``) beside the ControlNets of ``controls``.
    ``inpaint``: see ``Inpainting``. ``regions``: see ``RegionBatch`` (composed by ``compose_regions``).
    ``cuda_graphs``: the models are compiled with CUDA graphs (``torch.compile(mode="reduce-overhead")``),
    whose outputs live in buffers the next replay overwrites: each step is marked as a new
    iteration and the prediction is copied out before the sampler keeps it.
    """
    unet = base.unet
    cfg = guidance > 1
    n = len(timesteps)
    b = latents.shape[0]
    blocks = (2 if cfg else 1) + (regions.weights.shape[0] if regions else 0)  # row blocks of B per UNet call
    if regions:  # (k*B, ...) rows: [uncond;] cond; region 1; ...; region R
        text = torch.cat([text, regions.text.to(text.dtype)])
        if added:
            added = {"text_embeds": torch.cat([added["text_embeds"], regions.text_embeds.to(text.dtype)]),
                     "time_ids": added["time_ids"][:b].repeat(blocks, 1)}
    # only stochastic samplers (DDPM, Euler a, ...) take a generator
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    reuse: dict = {}  # ControlNet reuse (``every``): per net, its active steps so far and last residuals
    for i, t in enumerate(timesteps):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        model_in = torch.cat([latents] * blocks) if blocks > 1 else latents  # (k*B, C, h, w)
        model_in = scheduler.scale_model_input(model_in, t)
        if inpaint is not None and unet.config.in_channels == 9:
            extra = torch.cat([inpaint.mask, inpaint.masked_image_latents], dim=1)  # (B, 5, h, w)
            unet_in = torch.cat([model_in, extra.repeat(blocks, 1, 1, 1)], dim=1)
        else:
            unet_in = model_in
        residuals = control_residuals(controls, i, n, model_in, t, text, added, b if cfg else 0, reuse, cuda_graphs)
        intrablock = adapter_features(adapters, i, n, model_in.shape[0], b if cfg else 0) if adapters else None
        pred = controlled_unet_forward(unet, unet_in.to(unet.dtype), t, text.to(unet.dtype), residuals,
                                       added_cond_kwargs=added, intrablock=intrablock).float()
        if cuda_graphs:
            pred = pred.clone()  # samplers such as PNDM keep past predictions
        if regions:  # the conditional block becomes the composition of the main and the region prompts
            main_rows = (2 if cfg else 1) * b
            pred_regions = pred[main_rows:].reshape(blocks - main_rows // b, b, *pred.shape[1:])  # (R, B, C, h, w)
            cond = compose_regions(pred[main_rows - b:main_rows], pred_regions, regions.weights)
            pred = torch.cat([pred[:b], cond]) if cfg else cond
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale)
        latents = scheduler.step(pred, t, latents, return_dict=False, **step_kwargs)[0]
        if inpaint is not None and unet.config.in_channels == 4:
            kept = inpaint.image_latents
            if i < n - 1:
                kept = scheduler.add_noise(kept, inpaint.noise, timesteps[i + 1:i + 2])
            latents = (1 - inpaint.mask) * kept + inpaint.mask * latents
        if callback is not None:
            callback(i)
        if stop is not None and i < n - 1 and stop():
            break
    return latents


@torch.no_grad()
def decode(base: LockedBase, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images."""
    vae = base.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def encode_image(base: LockedBase, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w), float32 (the posterior's mean when no generator)."""
    vae = base.vae
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator) if generator is not None else dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z.float() - shift) * vae.config.scaling_factor)
