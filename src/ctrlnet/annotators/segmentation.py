"""Segmentation by colour clustering, weight-free: k-means on the smoothed image's Lab colours,
fitted on at most ``FIT_PIXELS`` sampled pixels (on larger images every pixel then takes its
nearest centre), small clusters merged into their nearest large one, regions painted with ADE20K
palette colours (the output convention of the seg ControlNets; here the colours stand for regions,
not classes - a neural segmenter would name classes, and can be added as one more module with local
weights)."""

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


FIT_PIXELS = 2 ** 18  # k-means is fitted on at most this many pixels (a 512 x 512 image's worth)


def nearest_centre(lab: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N,) index of the nearest of the (k, 3) ``centres`` for each (N, 3) uint8 Lab pixel, through
    a table over Lab at 7 bits a channel (2 M cells, one look-up per pixel; comparing 16 M pixels
    with every centre directly takes seconds)."""
    cells = (np.indices((128, 128, 128)).reshape(3, -1).T * 2 + 0.5).astype(np.float32)  # (2M, 3) cell centres
    _, table = cv2.batchDistance(cells, centres.astype(np.float32), cv2.CV_32F, normType=cv2.NORM_L2SQR, K=1)
    q = (lab >> 1).astype(np.int32)
    return table.ravel()[(q[:, 0] << 14) | (q[:, 1] << 7) | q[:, 2]]


def seg_colour_clusters(image: np.ndarray, k: int = 6, min_fraction: float = 0.005, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 region map; the largest region gets the first palette colour."""
    if not 1 <= k <= len(ADE20K_PALETTE):
        raise ValueError(f"segmentation: k must be in 1..{len(ADE20K_PALETTE)}, got {k}")
    h, w = image.shape[:2]
    lab8 = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 1.0), cv2.COLOR_RGB2LAB).reshape(-1, 3)  # (N, 3) uint8
    k = min(k, len(np.unique(lab8[:: max(1, len(lab8) // 5000)], axis=0)))
    cv2.setRNGSeed(seed % 2 ** 31)  # OpenCV takes a C int; seeds go up to 2**32 - 1
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    if k == 1:  # one colour: one region (and OpenCV would read a single pixel as 3 one-dimensional points)
        labels, centres = np.zeros(len(lab8), np.int64), lab8[:1].astype(np.float32)
    elif len(lab8) <= FIT_PIXELS:
        _, labels, centres = cv2.kmeans(lab8.astype(np.float32), k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        labels = labels.ravel()
    else:  # fit on a sample, then every pixel takes its nearest centre: the work stays bounded
        sample = lab8[np.random.default_rng(seed).integers(0, len(lab8), FIT_PIXELS)].astype(np.float32)
        _, _, centres = cv2.kmeans(sample, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        labels = nearest_centre(lab8, centres)
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
