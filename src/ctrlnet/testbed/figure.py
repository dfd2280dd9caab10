"""A drawn cartoon person (head, shirt, trousers as flat strokes) with its COCO-18 keypoints: an
input for the pose annotators' tests and benchmark, since no photo of a person ships with the
project. mediapipe finds its head and shoulders well and its legs poorly."""

from __future__ import annotations

import cv2
import numpy as np

# A standing figure on a 256 x 256 canvas, COCO-18 order (x, y).
KEYPOINTS_256 = np.array([
    [128, 40], [128, 70], [98, 70], [88, 110], [84, 150], [158, 70], [168, 110], [172, 150], [108, 140],
    [106, 190], [104, 235], [148, 140], [150, 190], [152, 235], [120, 32], [136, 32], [110, 38], [146, 38]],
    np.float32)


def cartoon_person(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """((size, size, 3) uint8 RGB image, (18, 2) keypoints in its pixels)."""
    img = np.full((size, size, 3), 235, np.uint8)
    skin, shirt, trousers = (224, 172, 140), (40, 90, 200), (50, 50, 60)
    k = size / 256
    pts = (KEYPOINTS_256 * k).astype(int)
    for a, b in [(2, 3), (3, 4), (5, 6), (6, 7)]:  # arms
        cv2.line(img, tuple(pts[a]), tuple(pts[b]), shirt, int(13 * k))
    cv2.fillConvexPoly(img, np.array([pts[2], pts[5], pts[11], pts[8]]), shirt)
    for a, b in [(8, 9), (9, 10), (11, 12), (12, 13)]:  # legs
        cv2.line(img, tuple(pts[a]), tuple(pts[b]), trousers, int(15 * k))
    cv2.circle(img, tuple(pts[0]), int(15 * k), skin, -1)
    return img, pts.astype(np.float32)
