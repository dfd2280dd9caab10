"""Encode once, train many times: VAE latents and text embeddings cached on disk.

The locked VAE and text encoder give the same output for the same input at every step, so the
diffusers recipe's per-step VAE and text-encoder passes are pure waste. The cache stores, per
sample, the VAE posterior (mean and log-variance: a fresh latent is still sampled every step,
exactly as an uncached run would) and an index into the unique prompts' embeddings ("" is entry
0, computed once). Arrays are float16 ``.npy`` files read memory-mapped, so a data set larger
than RAM works.

The cache folder is keyed by a fingerprint of everything that changes its content: the VAE and
text encoder weights, the records (paths, sizes, modification times, captions), the
resolution, the crop and flip rules. Change any of them and a new cache is built; the old one
is left for the user to delete. ``fingerprint.json``, written last, marks a cache complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..pipeline.text import encode_text
from .data import ControlDataset, DataError, Record, image_to_tensor

# 2: images decoded by ctrlnet.images (EXIF orientation, alpha on white, 16-bit scaled);
# 3: 16-bit images scaled by 1/257 (their own range), no longer stretched to their maximum
CACHE_VERSION = 3


def _hash_module(h, module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _hash_record(h, r: Record) -> None:
    for item in (r.image,):
        if isinstance(item, str):
            try:
                st = os.stat(item)
                h.update(f"{item}|{st.st_size}|{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{item}|missing".encode())
        else:  # a PIL image from an HF dataset
            h.update(item.tobytes())
    h.update(r.text.encode())


def fingerprint(base, records: list[Record], resolution: int, center_crop: bool, random_flip: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"version": CACHE_VERSION, "resolution": resolution, "center_crop": center_crop,
                         "random_flip": random_flip, "n": len(records)}).encode())
    for part in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(base, part)
        if module is not None:
            _hash_module(h, module)
    for r in records:
        _hash_record(h, r)
    return h.hexdigest()


class TrainCache:
    """Memory-mapped arrays of one complete cache folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.info = json.loads((folder / "fingerprint.json").read_text())
        load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        self.posterior = load("posterior")  # (N, V, 2C, h, w) float16; V = 2 with random_flip (flipped copy)
        self.prompt_index = load("prompt_index")  # (N,) int64 into the embeddings; 0 = ""
        self.hidden = load("hidden")  # (U, T, D) float16
        self.pooled = load("pooled") if (folder / "pooled.npy").is_file() else None  # (U, P) SDXL
        self.valid = load("valid")  # (M,) int64: indices of readable samples

    def latents(self, idx: list[int], flips: list[bool], eps: torch.Tensor) -> torch.Tensor:
        """Sampled (unscaled) latents: mean + std * eps, (B, C, h, w) float32."""
        post = torch.from_numpy(np.stack([self.posterior[i, int(f) if self.posterior.shape[1] > 1 else 0]
                                          for i, f in zip(idx, flips)])).float()
        mean, logvar = post.chunk(2, dim=1)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps

    def text(self, idx: list[int], empty: list[bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [0 if e else int(self.prompt_index[i]) for i, e in zip(idx, empty)]
        hidden = torch.from_numpy(np.stack([self.hidden[r] for r in rows])).float()
        pooled = torch.from_numpy(np.stack([self.pooled[r] for r in rows])).float() if self.pooled is not None else None
        return hidden, pooled


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)


@torch.no_grad()
def build_cache(base, dataset: ControlDataset, folder: Path, random_flip: bool, skip_bad: bool,
                batch: int = 16, progress: bool = True) -> TrainCache:
    """Encode every sample's image (and its flip) with the VAE and every unique prompt once."""
    folder.mkdir(parents=True, exist_ok=True)
    vae, n = base.vae, len(dataset)
    dtype = vae.dtype
    views = 2 if random_flip else 1
    c = vae.config.latent_channels
    h = dataset.resolution // base.vae_scale_factor
    tmp_post = folder / "posterior.npy.building"
    post = np.lib.format.open_memmap(tmp_post, mode="w+", dtype=np.float16, shape=(n, views, 2 * c, h, h))
    valid, bad = [], []
    bar = tqdm(total=n, desc="caching latents", disable=not progress, unit="img")
    for start in range(0, n, batch):
        ids, images = [], []
        for i in range(start, min(n, start + batch)):
            try:
                images.append(dataset.image(i))
                ids.append(i)
            except DataError:
                if not skip_bad:
                    raise
                bad.append(i)
        if ids:
            x = image_to_tensor(images).to(vae.device, dtype)
            for v in range(views):
                xv = x.flip(-1) if v == 1 else x
                post[ids, v] = vae.encode(xv).latent_dist.parameters.float().cpu().numpy().astype(np.float16)
            valid.extend(ids)
        bar.update(min(n, start + batch) - start)
    bar.close()
    post.flush()
    del post
    tmp_post.replace(folder / "posterior.npy")
    # Text: "" first, then each distinct caption once.
    prompts = [""] + sorted({dataset.text(i) for i in range(n)} - {""})
    row = {p: k for k, p in enumerate(prompts)}
    hidden, pooled = [], []
    for start in range(0, len(prompts), 64):
        hs, pl = encode_text(base, prompts[start:start + 64])
        hidden.append(hs.float().cpu().numpy().astype(np.float16))
        if pl is not None:
            pooled.append(pl.float().cpu().numpy().astype(np.float16))
    _save_npy(folder / "hidden.npy", np.concatenate(hidden))
    if pooled:
        _save_npy(folder / "pooled.npy", np.concatenate(pooled))
    _save_npy(folder / "prompt_index.npy", np.array([row[dataset.text(i)] for i in range(n)], dtype=np.int64))
    _save_npy(folder / "valid.npy", np.array(valid, dtype=np.int64))
    return bad


def open_or_build_cache(base, dataset: ControlDataset, root: Path, random_flip: bool, skip_bad: bool,
                        is_main: bool = True, wait=lambda: None, log=print) -> TrainCache:
    """The cache for this base + data + geometry under ``root/<fingerprint>``; built by the main
    process if missing (``wait`` is the barrier the other processes wait at)."""
    key = fingerprint(base, dataset.records, dataset.resolution, dataset.center_crop, random_flip)
    folder = root / key
    if is_main and not (folder / "fingerprint.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a half-built cache of a killed run
        log(f"building the latent/text cache in {folder} ({len(dataset)} samples)")
        bad = build_cache(base, dataset, folder, random_flip, skip_bad)
        info = {"fingerprint": key, "samples": len(dataset), "skipped_bad": len(bad),
                "bad_examples": [dataset.records[i].where for i in bad[:10]]}
        tmp = folder / "fingerprint.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(folder / "fingerprint.json")
    wait()
    return TrainCache(folder)
