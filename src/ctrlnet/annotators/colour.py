"""Colour conditions: ``palette`` (T2I-Adapter's colour grid: the image averaged over cells of
``grid`` pixels, shown as flat blocks) and ``colour_shuffle`` (every pixel's colour moved to a random
place: the colour distribution kept, no layout)."""

from __future__ import annotations

import cv2
import numpy as np


def palette(image: np.ndarray, grid: int = 64) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // grid), max(1, h // grid)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def colour_shuffle(image: np.ndarray, seed: int = 0) -> np.ndarray:
    flat = image.reshape(-1, 3)
    order = np.random.default_rng(seed).permutation(len(flat))
    return flat[order].reshape(image.shape)
