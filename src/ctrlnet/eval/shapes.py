"""ShapesWorld metrics, read off generated pixels: background colour, object colour, shape class,
object mask IoU.

Pitfall: soft samples make raw masks ragged, so the object mask is
cleaned (median filter, largest connected component) before its geometry is classified.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..testbed.shapes import PALETTE, Shape, draw

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


def true_object_masks(record: dict, size: int) -> list[np.ndarray]:
    """(H, W) bool mask of every shape of a ShapesWorld metadata record, drawn from its geometry."""
    masks = []
    for s in record["shapes"]:
        shape = Shape(s["shape"], s["colour"], tuple(s["rgb"]), s["cx"], s["cy"], s["size"])
        m = np.zeros((size, size), np.uint8)
        draw(m, shape, 255)
        masks.append(m > 0)
    return masks


def score_objects(image: np.ndarray, record: dict) -> list[dict]:
    """Per object of a metadata record: mask IoU, colour and shape class read off ``image``.

    The generated mask of object j: pixels whose nearest colour among the sample's own colours
    (background and objects) is object j's colour, inside object j's bounding box grown by half
    its size (two objects may share a colour), median-filtered, largest component.
    Colour: the nearest palette name (not the background's) to the median colour inside the true
    mask, eroded by 2 px. Shape: the class of the generated mask's geometry.
    """
    size = image.shape[0]
    truth = true_object_masks(record, size)
    names = [record["background"]] + [s["colour"] for s in record["shapes"]]
    colours = np.array([PALETTE[n] for n in names], np.float32)  # (1 + K, 3)
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - colours[None, None], axis=-1)
    nearest = np.argmin(d, axis=-1)  # (H, W) index into names
    out = []
    for j, (s, true) in enumerate(zip(record["shapes"], truth)):
        x0, y0, x1, y1 = s["bbox"]
        pad = int(0.5 * max(x1 - x0, y1 - y0))
        window = np.zeros_like(true)
        window[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = True
        raw = np.isin(nearest, [k for k, name in enumerate(names) if name == s["colour"]]) & window
        raw = cv2.medianBlur(raw.astype(np.uint8) * 255, 5) > 0
        n, labels, stats, _ = cv2.connectedComponentsWithStats(raw.astype(np.uint8), connectivity=8)
        mask = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if n > 1 else np.zeros_like(raw)
        inner = cv2.erode(true.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        inner = inner if inner.any() else true
        found = nearest_colour(np.median(image[inner], axis=0), exclude=record["background"])
        out.append({"iou": mask_iou(mask, true), "colour_ok": found == s["colour"],
                    "shape_ok": shape_class(mask) == s["shape"]})
    return out


def colour_presence(image: np.ndarray, record: dict) -> list[bool]:
    """Per object of a metadata record: does the image hold a region of its colour anywhere?

    Location-free, so it scores generations with and without control alike (did the base still
    draw the colours the prompt asked for?). Every pixel takes the nearest named colour of the
    whole palette; object j's colour counts as present when a connected region of that colour
    (median-filtered) covers at least a third of the object's true area. Objects sharing a
    colour need that many such regions (largest region to the largest object, and so on).
    """
    size = image.shape[0]
    truth = true_object_masks(record, size)
    d = np.linalg.norm(image.astype(np.float32)[:, :, None, :] - RGB[None, None], axis=-1)
    nearest = np.argmin(d, axis=-1)  # (H, W) index into NAMES
    present = [False] * len(record["shapes"])
    for colour in {s["colour"] for s in record["shapes"]}:
        raw = cv2.medianBlur((nearest == NAMES.index(colour)).astype(np.uint8) * 255, 5) > 0
        n, _, stats, _ = cv2.connectedComponentsWithStats(raw.astype(np.uint8), connectivity=8)
        regions = sorted(stats[1:, cv2.CC_STAT_AREA].tolist(), reverse=True)
        objects = sorted((j for j, s in enumerate(record["shapes"]) if s["colour"] == colour),
                         key=lambda j: -int(truth[j].sum()))
        for rank, j in enumerate(objects):
            present[j] = rank < len(regions) and regions[rank] >= truth[j].sum() / 3
    return present
