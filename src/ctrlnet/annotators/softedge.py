"""Soft edges, weight-free: the Sobel gradient magnitude of a smoothed image, normalised, with
the "safe" quantisation of ControlNet 1.1's HED/PiDi preprocessors (``safe_step``: a few grey
levels, so the net cannot read hidden fine detail from the map). White edges on black."""

from __future__ import annotations

import cv2
import numpy as np


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """ControlNet 1.1 ``annotator/util.py``: quantise [0, 1] to ``step + 1`` levels."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def softedge(image: np.ndarray, sigma: float = 1.5, safe: bool = True, step: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 soft edge map (``safe``: quantised to ``step + 1`` levels)."""
    img = cv2.GaussianBlur(image.astype(np.float32) / 255.0, (0, 0), sigma)
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx ** 2 + gy ** 2).max(axis=2)  # strongest channel
    edge = mag / max(float(mag.max()), 1e-6)
    edge = cv2.GaussianBlur(edge, (0, 0), 0.5)
    if safe:
        edge = safe_step(edge, step)
    out = (edge * 255.0).clip(0, 255).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)
