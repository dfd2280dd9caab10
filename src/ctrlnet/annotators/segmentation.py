"""Segmentation by colour clustering, weight-free: k-means on the smoothed image's Lab colours,
small clusters merged into their nearest large one, regions painted with ADE20K palette colours
(the output convention of the seg ControlNets; here the colours stand for regions, not classes -
a neural segmenter would name classes, and can be added as one more module with local weights)."""

from __future__ import annotations

import cv2
import numpy as np

# The first entries of the ADE20K palette (mmsegmentation / ControlNet's uniformer order):
# wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk,
# person, earth, door, table.
ADE20K_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82]], dtype=np.uint8)


def segmentation(image: np.ndarray, k: int = 6, min_fraction: float = 0.005, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 region map; the largest region gets the first palette colour."""
    if not 1 <= k <= len(ADE20K_PALETTE):
        raise ValueError(f"segmentation: k must be in 1..{len(ADE20K_PALETTE)}, got {k}")
    h, w = image.shape[:2]
    lab = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 1.0), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    k = min(k, len(np.unique(lab[:: max(1, len(lab) // 5000)], axis=0)))
    cv2.setRNGSeed(seed)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, labels, centres = cv2.kmeans(lab, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    labels = labels.ravel()
    counts = np.bincount(labels, minlength=k)
    big = np.flatnonzero(counts >= min_fraction * len(labels))
    if len(big) == 0:
        big = np.array([int(np.argmax(counts))])
    # every cluster -> its nearest large cluster (large ones map to themselves)
    d = np.linalg.norm(centres[:, None, :] - centres[None, big, :], axis=-1)
    merged = big[np.argmin(d, axis=1)][labels]
    order = np.argsort(-np.bincount(merged, minlength=k))  # by size, largest first
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    label_map = cv2.medianBlur(rank[merged].reshape(h, w).astype(np.uint8), 3)
    return ADE20K_PALETTE[label_map]
