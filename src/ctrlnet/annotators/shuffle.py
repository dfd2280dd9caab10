"""Content shuffle (ControlNet 1.1 ``ContentShuffleDetector``): the image remapped through a
smooth random flow - colours and textures kept, layout scrambled - for the shuffle model (whose
residuals are globally pooled)."""

from __future__ import annotations

import cv2
import numpy as np


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1] of size (h, w): uniform noise on a coarse grid (every f px), cubic-upsampled."""
    noise = rng.uniform(0, 1, size=(h // f + 2, w // f + 2)).astype(np.float32)
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-6)


def shuffle(image: np.ndarray, f: int = 256, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8; ``f``: flow grid spacing in pixels; ``seed``: the flow."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    x = _noise_disk(h, w, f, rng) * float(w - 1)
    y = _noise_disk(h, w, f, rng) * float(h - 1)
    return cv2.remap(image, x, y, cv2.INTER_LINEAR)
