"""Line art, weight-free: a difference of Gaussians on the grey image keeps dark strokes; the result
is inverted to white lines on black, the input the ControlNet 1.1 line-art models expect (their
gradio demo feeds ``255 - detector(image)``)."""

from __future__ import annotations

import cv2
import numpy as np


def lineart(image: np.ndarray, sigma: float = 1.0, k: float = 1.6, gain: float = 12.0,
            coarse: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 lines (white on black). ``coarse`` doubles the scale."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    s = sigma * (2.0 if coarse else 1.0)
    g1 = cv2.GaussianBlur(grey, (0, 0), s)
    g2 = cv2.GaussianBlur(grey, (0, 0), s * k)
    line = np.clip((g2 - g1) * gain, 0, 1)  # > 0 where a pixel is darker than its surround: a stroke
    out = (line * 255).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)
