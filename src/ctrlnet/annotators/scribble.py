"""Scribbles from an image, weight-free: XDoG (ControlNet 1.1's ``scribble_xdog``) or thickened
Canny edges - white strokes on black, as the scribble ControlNets were trained on."""

from __future__ import annotations

import cv2
import numpy as np

from .canny import canny


def scribble(image: np.ndarray, method: str = "xdog", threshold: int = 32, thickness: int = 3) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 strokes.

    ``xdog``: difference of Gaussians (sigma 0.5 and 5.0), a pixel is a stroke where
    ``2 * (g2 - g1) > threshold`` in any channel (lower threshold, more strokes).
    ``thick``: Canny edges dilated to ``thickness`` pixels (hand-drawn looking lines).
    """
    if method == "xdog":
        img = image.astype(np.float32)
        g1 = cv2.GaussianBlur(img, (0, 0), 0.5)
        g2 = cv2.GaussianBlur(img, (0, 0), 5.0)
        dog = np.max(g2 - g1, axis=2)  # dark detail on a lighter neighbourhood
        strokes = (2 * dog > threshold).astype(np.uint8) * 255
    elif method == "thick":
        strokes = canny(image)[..., 0]
        strokes = cv2.dilate(strokes, np.ones((thickness, thickness), np.uint8))
    else:
        raise ValueError(f"scribble: method must be xdog or thick, got {method!r}")
    return np.repeat(strokes[:, :, None], 3, axis=2)
