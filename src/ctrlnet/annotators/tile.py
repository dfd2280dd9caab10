"""Tile (ControlNet 1.1 ``tile_resample``): the image downsampled by ``down`` and blurred back up -
the tile model then restores the detail."""

from __future__ import annotations

import cv2
import numpy as np


def tile(image: np.ndarray, down: float = 4.0) -> np.ndarray:
    if down < 1:
        raise ValueError(f"tile: down must be >= 1, got {down}")
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w / down)), max(1, round(h / down))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
