"""Canny edges (OpenCV), as the original ControlNet's ``CannyDetector``: white edges on black."""

from __future__ import annotations

import cv2
import numpy as np


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 edge map; ``low``/``high`` are the hysteresis thresholds."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"canny expects an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not 0 <= low <= high:
        raise ValueError(f"canny: need 0 <= low <= high, got low={low}, high={high}")
    edges = cv2.Canny(image, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)
