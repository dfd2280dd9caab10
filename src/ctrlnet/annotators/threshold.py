"""Binary threshold (A1111's "binary" preprocessor): dark pixels become white on black
(``THRESH_BINARY_INV``); threshold 0 picks one by Otsu's method."""

from __future__ import annotations

import cv2
import numpy as np


def threshold(image: np.ndarray, threshold: int = 0, invert: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 in {0, 255}."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mode = cv2.THRESH_BINARY_INV if invert else cv2.THRESH_BINARY
    if threshold <= 0 or threshold >= 255:
        _, out = cv2.threshold(grey, 0, 255, mode | cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(grey, threshold, 255, mode)
    return np.repeat(out[:, :, None], 3, axis=2)
