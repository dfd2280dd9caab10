"""Controllability: does the generated image follow the condition? (ControlNet++ protocol: run
the same annotator on the generated image and compare with the input condition.)

- ``edge_f1``: F1 between two edge maps, an edge pixel counting as matched when the other map
  has an edge within ``tolerance`` pixels (Chebyshev distance).
- ``foreground_iou``: IoU of the foreground masks (pixels far from the border's median colour)
  of the generated image and the target - on ShapesWorld that is the segmentation / outline
  region the condition asks for.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..annotators import ade20k
from ..annotators.canny import canny
from ..annotators.pose import BODY_COLOURS


def foreground_mask(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels whose colour is far from the border's median colour, median-filtered."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0).astype(np.float32)
    dist = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    return cv2.medianBlur((dist > threshold).astype(np.uint8) * 255, 5) > 0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def foreground_iou(generated: np.ndarray, target: np.ndarray) -> float:
    return mask_iou(foreground_mask(generated), foreground_mask(target))


def edge_f1(pred: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """F1 of edge maps ((H, W) or (H, W, 3), nonzero = edge) with a ``tolerance``-pixel match radius."""
    pred = (pred.max(axis=-1) if pred.ndim == 3 else pred) > 0
    truth = (truth.max(axis=-1) if truth.ndim == 3 else truth) > 0
    if not pred.any() and not truth.any():
        return 1.0
    kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
    near_truth = cv2.dilate(truth.astype(np.uint8), kernel) > 0
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel) > 0
    precision = (pred & near_truth).sum() / max(pred.sum(), 1)
    recall = (truth & near_pred).sum() / max(truth.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def controllability(generated: np.ndarray, target: np.ndarray, canny_low: int = 100,
                    canny_high: int = 200) -> dict[str, float]:
    """Scores of one generated image against its ground-truth target (both (H, W, 3) uint8)."""
    return {"iou": foreground_iou(generated, target),
            "edge_f1": edge_f1(canny(generated, canny_low, canny_high), canny(target, canny_low, canny_high))}


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two images ((H, W) or (H, W, 3) uint8, compared in grey):
    Gaussian window sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 (Wang et al. 2004)."""
    grey = lambda x: (cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) if x.ndim == 3 else x).astype(np.float64)
    x, y = grey(a), grey(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def region_miou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the regions (distinct colours) of ``truth``, each matched to the ``pred`` colour
    that overlaps it best - segmentation maps whose colours name regions, not fixed classes, as
    the colour-clustering annotator's do. With a fixed class palette on both sides it is the usual
    mIoU whenever each class's best match is itself."""
    t = truth.reshape(-1, truth.shape[-1]) if truth.ndim == 3 else truth.reshape(-1, 1)
    p = pred.reshape(-1, pred.shape[-1]) if pred.ndim == 3 else pred.reshape(-1, 1)
    _, t_id = np.unique(t, axis=0, return_inverse=True)
    _, p_id = np.unique(p, axis=0, return_inverse=True)
    t_id, p_id = t_id.ravel(), p_id.ravel()
    joint = np.zeros((t_id.max() + 1, p_id.max() + 1), np.int64)
    np.add.at(joint, (t_id, p_id), 1)
    union = joint.sum(1, keepdims=True) + joint.sum(0, keepdims=True) - joint
    return float((joint / np.maximum(union, 1)).max(axis=1).mean())


def keypoints_from_openpose_map(a: np.ndarray) -> np.ndarray:
    """(18, 3) COCO keypoints (x, y, found) read back from an OpenPose-style body map: each keypoint
    is a circle in its own full colour (limbs are drawn at 60%, so they never match); the centroid
    of the largest exact-colour component. Hand dots share keypoint 12's blue: body maps only."""
    out = np.zeros((18, 3), np.float32)
    for k, colour in enumerate(BODY_COLOURS):
        mask = np.all(a == np.array(colour, np.uint8), axis=-1).astype(np.uint8)
        n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if n > 1:
            j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if stats[j, cv2.CC_STAT_AREA] >= 5:
                out[k] = (*centroids[j], 1.0)
    return out


def pose_pck(generated_map: np.ndarray, condition_map: np.ndarray, alpha: float = 0.1) -> float:
    """PCK: the fraction of the condition's body keypoints that the re-extracted pose has within
    ``alpha`` x the image's longer side (missing = wrong). 1.0 when the condition has none."""
    truth = keypoints_from_openpose_map(condition_map)
    found = keypoints_from_openpose_map(generated_map)
    seen = truth[:, 2] > 0
    if not seen.any():
        return 1.0
    dist = np.linalg.norm(found[:, :2] - truth[:, :2], axis=1)
    ok = (found[:, 2] > 0) & (dist <= alpha * max(condition_map.shape[:2]))
    return float(ok[seen].mean())


def depth_rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """RMSE of two depth maps on their 0-255 scale ((H, W) or (H, W, 3) uint8, grey = mean of the
    channels), as ControlNet++ reports depth controllability (lower is better)."""
    grey = lambda x: (x.mean(axis=-1) if x.ndim == 3 else x).astype(np.float64)
    return float(np.sqrt(np.mean((grey(pred) - grey(truth)) ** 2)))


def normals_of(normal_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit vectors decoded from a normal map (each channel 0..255 -> -1..1)."""
    n = normal_map.astype(np.float64) / 127.5 - 1.0
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8)


def normal_angular_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean angle in degrees between the normals of two normal maps (lower is better), over the
    pixels where both hold a normal (a map's flat background, (127/128, 127/128, *) with a zero
    x-y part, counts as a normal pointing at the camera, as the maps draw it)."""
    cos = np.clip((normals_of(pred) * normals_of(truth)).sum(axis=-1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def class_miou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the ADE20K classes present in either map, both maps read back to class ids
    through the palette (``annotators.ade20k.classes_of``; colours far from every class are
    ignored) - the usual segmentation mIoU, for class-palette segmenters."""
    p, t = ade20k.classes_of(pred).ravel(), ade20k.classes_of(truth).ravel()
    keep = (p >= 0) & (t >= 0)
    p, t = p[keep], t[keep]
    classes = np.union1d(np.unique(p), np.unique(t))
    if not classes.size:
        return 1.0
    ious = [np.logical_and(p == c, t == c).sum() / np.logical_or(p == c, t == c).sum() for c in classes]
    return float(np.mean(ious))
