"""ShapesWorld metrics, read off generated pixels: background colour, object colour, shape class,
object mask IoU.

Pitfall (REFERENCE.md section 9): soft samples make raw masks ragged, so the object mask is
cleaned (median filter, largest connected component) before its geometry is classified.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..testbed.shapes import PALETTE

NAMES = list(PALETTE)
RGB = np.array([PALETTE[n] for n in NAMES], dtype=np.float32)  # (K, 3)
# Fill of the bounding box by an upright shape: triangle 1/2, circle pi/4, square 1.
FILL = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}


def nearest_colour(rgb, exclude: str | None = None) -> str:
    d = np.linalg.norm(RGB - np.asarray(rgb, np.float32), axis=1)
    if exclude is not None:
        d[NAMES.index(exclude)] = np.inf
    return NAMES[int(np.argmin(d))]


def background_colour(image: np.ndarray) -> tuple[str, np.ndarray]:
    """Named colour of the image border (median), and that median RGB."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    median = np.median(border, axis=0)
    return nearest_colour(median), median


def object_mask(image: np.ndarray, background_rgb, threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels far from the background colour, cleaned, largest component only."""
    dist = np.linalg.norm(image.astype(np.float32) - np.asarray(background_rgb, np.float32), axis=-1)
    raw = (dist > threshold).astype(np.uint8)
    raw = cv2.medianBlur(raw * 255, 5) > 0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(raw.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(raw)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def shape_class(mask: np.ndarray) -> str | None:
    """circle / square / triangle from how much of its bounding box the mask fills."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 16:
        return None
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return min(FILL, key=lambda k: abs(FILL[k] - fill))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def score_single_shape(image: np.ndarray, colour: str, shape: str, background: str) -> dict:
    """Scores of one image generated from a single-shape prompt."""
    bg_name, bg_rgb = background_colour(image)
    mask = object_mask(image, bg_rgb)
    found_colour = nearest_colour(np.median(image[mask], axis=0), exclude=bg_name) if mask.any() else None
    return {"background_ok": bg_name == background, "colour_ok": found_colour == colour,
            "shape_ok": shape_class(mask) == shape, "found": [found_colour, shape_class(mask), bg_name]}
