"""DWPose: multi-person whole-body pose (body, hands, face) drawn in the OpenPose convention, as
``dw_openpose_full`` (the A1111 extension's preprocessor) and ``dw_openpose`` (body only).

Weights (ONNX, run with onnxruntime, the optional extra ``ctrlnet[detectors]``), both from
https://huggingface.co/yzd-v/DWPose, the files A1111 (``annotator/downloads/openpose/``),
controlnet_aux and comfyui_controlnet_aux users have:

- ``yolox_l.onnx``: the YOLOX-L COCO detector (80 classes), input ``images`` 1x3x640x640, output
  ``output`` 1x8400x85 (per anchor: x, y, log w, log h offsets, objectness, 80 class scores);
- ``dw-ll_ucoco_384.onnx``: RTMPose-l distilled by DWPose on UBody + COCO-WholeBody, input ``input``
  Nx3x384x288, outputs ``simcc_x`` Nx133x576 and ``simcc_y`` Nx133x768 (SimCC, split ratio 2).

Processing (the A1111 extension's ``annotator/openpose/cv_ox_det.py``, ``cv_ox_pose.py``,
``wholebody.py``, ``__init__.py`` and ``util.py``, ported from DWPose's own ``onnx`` branch):

- detector: the RGB image (as A1111 passes it) resized by r = min(640 / h, 640 / w) (bilinear) into
  the top-left of a 640x640 canvas of 114, float 0..255; anchors decoded on the 8 / 16 / 32 stride
  grids ((offset + cell) x stride, exp(log size) x stride), score = objectness x class score,
  boxes / r; class-wise NMS (IoU 0.45, candidates over 0.1), then people = class 0 over 0.3
  (``min_person_score``). As in A1111: nothing over 0.1 at all -> no pose; something, but no person
  -> the pose model runs on the whole image (DWPose's own fallback for an empty box list);
- pose, per person box (one pose pass for all boxes, of all images in a batch, where the model's
  batch dimension is dynamic; one box at a time otherwise): the box grown 1.25x about its centre
  and widened to 288:384, warped (bilinear affine, black outside) to 288x384, RGB normalised with
  the ImageNet mean / std (x 255); SimCC decoding: argmax of each axis / 2, score = the smaller of
  the two maxima (a location of -1 where it is <= 0), mapped back through the box;
- the 133 COCO-WholeBody keypoints -> OpenPose: 18 body points (neck = the shoulders' mean, seen
  when both shoulders score over ``min_confidence``; the reference's mmpose -> openpose index map),
  hands = points 91-111 (left) and 112-132 (right), face = points 23-90 plus the two eyes as the
  pupils (68 + 2 = OpenPose's 70); a point is seen when it scores >= ``min_confidence`` (0.3), a
  hand or face with no point seen is left out, the feet (17-22) are not used;
- drawing: ``pose.draw_openpose`` person after person (body, hands, face; a later person drawn over
  an earlier one, as A1111 does); hand and face points with x or y under 1 px are not drawn
  (A1111's ``eps`` test) but kept in the keypoints.

``detect_people`` returns the keypoints in ``pose.detect_people``'s format (dicts of ``body``
(18, 3), ``left_hand`` / ``right_hand`` (21, 3), ``face`` (70, 3); rows x px, y px, score, 0 = not
seen) for ``pose.openpose_json``. The model files are checked when loaded (inputs and outputs of the
published shapes), so a swapped or foreign file is a ``WeightsError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import weights
from .pose import draw_openpose
from .spec import Spec
from .weights import Weights, WeightsError

POSE = Weights("dw-ll_ucoco_384.onnx", ("yzd-v/DWPose",),
               "the DWPose whole-body keypoint model (RTMPose-l, 133 COCO-WholeBody keypoints, ONNX: input "
               "Nx3x384x288, outputs simcc_x Nx133x576 and simcc_y Nx133x768)")
DETECTOR = Weights("yolox_l.onnx", ("yzd-v/DWPose",),
                   "the YOLOX-L COCO detector (ONNX: input 1x3x640x640, output 1x8400x85)")

DET_SIZE = 640  # the detector's square input
STRIDES = (8, 16, 32)  # YOLOX's grids: 80x80 + 40x40 + 20x20 = 8400 anchors
CLASSES = 80
PAD_VALUE = 114  # YOLOX's letterbox grey
NMS_IOU = 0.45
CANDIDATE_SCORE = 0.1  # multiclass_nms's score_thr: boxes under it are never kept
POSE_SIZE = (288, 384)  # (w, h) of the published pose model's crop
KEYPOINTS = 133  # COCO-WholeBody: body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132
SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
BOX_PADDING = 1.25
MEAN = np.array([123.675, 116.28, 103.53])  # RGB
STD = np.array([58.395, 57.12, 57.375])
POSE_BATCH = 16  # crops per pose pass at most (where the model's batch is dynamic)
# COCO-WholeBody body index of each OpenPose-18 point (None: the neck, the shoulders' mean): the
# reference's mmpose_idx / openpose_idx map written out.
WHOLEBODY_TO_OPENPOSE = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
LEFT_HAND = slice(91, 112)
RIGHT_HAND = slice(112, 133)
FACE = slice(23, 91)


# --- loading ---------------------------------------------------------------------------------

def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("the DWPose annotators need onnxruntime: pip install 'ctrlnet[detectors]'") from None
    return onnxruntime


def _providers(ort) -> list[str]:
    """CUDA when the annotators run on CUDA (``weights.device``) and this onnxruntime has it; CPU otherwise."""
    if weights.device().type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _fits(shape, expected) -> bool:
    """Whether an ONNX shape (ints, or names / None for dynamic axes) can be ``expected`` (None: any)."""
    return len(shape) == len(expected) and all(
        e is None or not isinstance(d, int) or d == e for d, e in zip(shape, expected))


def _dynamic(dim) -> bool:
    return not isinstance(dim, int) or dim <= 0


class Net:
    """An onnxruntime session with what the processing needs to know of its model."""

    def __init__(self, path: Path, session, input_name: str, outputs: list[str], batch: bool,
                 size: tuple[int, int]):
        self.path = path
        self.session = session
        self.input_name = input_name
        self.outputs = outputs  # the output names in the order the processing uses them
        self.batch = batch  # the batch dimension is dynamic: several inputs per pass
        self.size = size  # (w, h) of the input

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input_name: x})

    def checked(self, out: np.ndarray, shape: tuple) -> np.ndarray:
        """``out``, or a ``WeightsError`` naming the file when a dynamic axis hid another shape."""
        if out.shape[1:] != shape:
            raise WeightsError(f"{self.path} gave an output of shape {out.shape}, expected "
                               f"(N, {', '.join(map(str, shape))})")
        return out


def _open(path: Path, name: str, w: Weights, ort) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings (e.g. unused initialisers) stay quiet
    try:
        return ort.InferenceSession(str(path), options, providers=_providers(ort))
    except Exception as e:  # onnxruntime raises its own InvalidProtobuf / Fail / ... for unreadable files
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise WeightsError(f"annotator {name!r}: {path} could not be read as an ONNX model (truncated or not "
                           f"an ONNX file: {detail}); expected {w.describe()}, {w.what}") from None


def _shapes(session) -> str:
    ins = ", ".join(f"{i.name} {list(i.shape)}" for i in session.get_inputs())
    outs = ", ".join(f"{o.name} {list(o.shape)}" for o in session.get_outputs())
    return f"inputs {ins}; outputs {outs}"


def load_detector(path: Path, name: str) -> Net:
    """The YOLOX session of ``path``, its inputs and outputs checked; ``WeightsError`` otherwise."""
    ort = _onnxruntime()
    session = _open(path, name, DETECTOR, ort)
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(ins) != 1 or not _fits(ins[0].shape, (None, 3, DET_SIZE, DET_SIZE)) or not outs or \
            not _fits(outs[0].shape, (None, 8400, 5 + CLASSES)):
        raise WeightsError(f"annotator {name!r}: {path} is not {DETECTOR.what}: it has {_shapes(session)}")
    return Net(path, session, ins[0].name, [outs[0].name], _dynamic(ins[0].shape[0]), (DET_SIZE, DET_SIZE))


def load_pose(path: Path, name: str) -> Net:
    """The RTMPose session of ``path``, its inputs and outputs checked; ``WeightsError`` otherwise.
    The crop size is read from the model (384x288 published; other RTMPose whole-body sizes fit too)."""
    ort = _onnxruntime()
    session = _open(path, name, POSE, ort)
    ins, outs = session.get_inputs(), session.get_outputs()
    shape = ins[0].shape if len(ins) == 1 else []
    size = (shape[3], shape[2]) if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]) \
        else POSE_SIZE
    by_name = {o.name: o for o in outs}
    # simcc_x then simcc_y: by name where the export kept mmdeploy's names, else in order (as the reference)
    pair = [by_name["simcc_x"], by_name["simcc_y"]] if {"simcc_x", "simcc_y"} <= set(by_name) else outs[:2]
    sx, sy = int(round(size[0] * SIMCC_SPLIT)), int(round(size[1] * SIMCC_SPLIT))
    if len(ins) != 1 or not _fits(shape, (None, 3, None, None)) or len(pair) != 2 or \
            not _fits(pair[0].shape, (None, KEYPOINTS, sx)) or not _fits(pair[1].shape, (None, KEYPOINTS, sy)):
        raise WeightsError(f"annotator {name!r}: {path} is not {POSE.what}: it has {_shapes(session)}")
    return Net(path, session, ins[0].name, [o.name for o in pair], _dynamic(shape[0]), size)


def load(name: str, model: str = "") -> tuple[Net, Net]:
    """(pose model, detector) for annotator ``name``: ``model`` replaces the pose model's path."""
    pose_path = weights.find(name, POSE, model)
    det_path = weights.find(name, DETECTOR)
    pose = weights.cached(pose_path, "dwpose-pose", lambda: load_pose(pose_path, name))
    det = weights.cached(det_path, "dwpose-yolox", lambda: load_detector(det_path, name))
    return pose, det


# --- person detection (YOLOX) ----------------------------------------------------------------

def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(3, 640, 640) float32 detector input (0..255, 114 around) and the scale r applied."""
    h, w = image.shape[:2]
    r = min(DET_SIZE / h, DET_SIZE / w)
    nh, nw = max(1, int(h * r)), max(1, int(w * r))  # (max: a strip over 640:1, where the reference fails)
    canvas = np.full((DET_SIZE, DET_SIZE, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), r


def _grids() -> tuple[np.ndarray, np.ndarray]:
    """(8400, 2) cell (x, y) and (8400, 1) stride of every anchor, stride 8 first, row by row."""
    cells, strides = [], []
    for s in STRIDES:
        n = DET_SIZE // s
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        cells.append(np.stack([xs, ys], -1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(cells), np.concatenate(strides)


def decode_yolox(out: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """(8400, 85) raw detector output -> (8400, 4) float32 boxes (x0, y0, x1, y1) in input pixels and
    (8400, 80) float32 scores (objectness x class score)."""
    cells, strides = _grids()
    xy = ((out[:, :2] + cells) * strides).astype(np.float32)  # float64 arithmetic, stored float32 (as the reference)
    wh = (np.exp(out[:, 2:4]) * strides).astype(np.float32)
    boxes = np.concatenate([xy - wh / 2.0, xy + wh / 2.0], 1)
    boxes /= r
    return boxes, out[:, 4:5] * out[:, 5:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Indices kept by greedy NMS, best first (OpenCV-era areas: (x1 - x0 + 1) (y1 - y0 + 1))."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return keep


def person_boxes(out: np.ndarray, r: float, min_person_score: float = 0.3) -> np.ndarray | None:
    """(P, 4) person boxes (float64 holding float32 values) from one image's (8400, 85) detector
    output, best first; None when nothing of any class is a candidate (score over 0.1), as A1111
    (then no pose is made). ``min_person_score`` under 0.1 lowers the candidates' bar with it."""
    boxes, scores = decode_yolox(out, r)
    candidate = min(CANDIDATE_SCORE, min_person_score)
    if not (scores > candidate).any():
        return None
    person = scores[:, 0] > candidate  # NMS is per class: class 0's boxes alone give the same people
    boxes, score = boxes[person], scores[person, 0]
    # the reference compares the kept scores as float64 (its dets array), the candidates as float32
    keep = [i for i in nms(boxes, score) if float(score[i]) > min_person_score]
    return boxes[keep].reshape(-1, 4).astype(np.float64)  # float64 from here on, as the reference's dets


def detect_boxes(det: Net, images: list[np.ndarray], min_person_score: float) -> list[np.ndarray | None]:
    """Each image's person boxes (``person_boxes``): several images per pass where the detector's
    batch is dynamic, one at a time otherwise."""
    inputs = [letterbox(i) for i in images]
    step = len(inputs) if det.batch else 1
    outs = []
    for start in range(0, len(inputs), step):
        x = np.stack([x for x, _ in inputs[start:start + step]])  # (n, 3, 640, 640)
        outs += list(det.checked(det.run(x)[0], (8400, 5 + CLASSES)))
    return [person_boxes(o, r, min_person_score) for o, (_, r) in zip(outs, inputs)]


# --- keypoints (RTMPose, SimCC) --------------------------------------------------------------

def box_to_crop(box: np.ndarray, size: tuple[int, int] = POSE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(x0, y0, x1, y1) -> centre (2,) and the crop's (w, h) in image pixels: the box x 1.25, widened
    or heightened to the model's aspect."""
    box = np.asarray(box)
    centre = np.array([box[0] + box[2], box[1] + box[3]]) * 0.5
    scale = np.array([box[2] - box[0], box[3] - box[1]]) * BOX_PADDING
    aspect = size[0] / size[1]
    w, h = scale
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, scale.astype(centre.dtype)


def crop_matrix(centre: np.ndarray, scale: np.ndarray, size: tuple[int, int] = POSE_SIZE) -> np.ndarray:
    """2x3 affine map from the image to the (w, h) crop: three point pairs through OpenCV (the centre,
    the point half a width above it, and the third corner of the right angle they make), float32
    points computed in mmpose's order, so the map is the reference's to the last bit."""
    def corners(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b  # b + (a - b) turned 90 degrees
        return np.array([a, b, b + np.array([-d[1], d[0]], np.float32)], np.float32)
    centre = np.asarray(centre)
    src = corners(centre.astype(np.float32), (centre + np.array([0.0, scale[0] * -0.5])).astype(np.float32))
    mid = np.array([size[0] * 0.5, size[1] * 0.5], np.float32)
    dst = corners(mid, mid + np.array([0.0, size[0] * -0.5], np.float32))
    return cv2.getAffineTransform(src, dst)


def crop(image: np.ndarray, centre: np.ndarray, scale: np.ndarray, size: tuple[int, int] = POSE_SIZE) -> np.ndarray:
    """(3, h, w) float32 model input: the crop (bilinear, black outside) normalised by the mean / std."""
    warped = cv2.warpAffine(image, crop_matrix(centre, scale, size), size, flags=cv2.INTER_LINEAR)
    return ((warped - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, Wx), (N, K, Wy) -> (N, K, 2) float32 locations in crop pixels and (N, K) scores (the
    smaller of the two maxima; a location of -1 / 2 where that is <= 0, as mmpose)."""
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float32)
    vals = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[vals <= 0] = -1
    return locs / np.float32(SIMCC_SPLIT), vals


def crop_to_image(locs: np.ndarray, centre: np.ndarray, scale: np.ndarray,
                  size: tuple[int, int] = POSE_SIZE) -> np.ndarray:
    """(K, 2) crop pixels -> image pixels (float64)."""
    return locs / np.array(size) * scale + centre - scale / 2


def estimate(pose: Net, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(P, 133, 2) crop-pixel keypoints and (P, 133) scores of (3, h, w) ``crops``: ``POSE_BATCH`` per
    pass where the model's batch is dynamic, one at a time otherwise."""
    step = POSE_BATCH if pose.batch else 1
    sx, sy = int(round(pose.size[0] * SIMCC_SPLIT)), int(round(pose.size[1] * SIMCC_SPLIT))
    locs, vals = [], []
    for start in range(0, len(crops), step):
        out_x, out_y = pose.run(np.stack(crops[start:start + step]))
        loc, val = decode_simcc(pose.checked(out_x, (KEYPOINTS, sx)), pose.checked(out_y, (KEYPOINTS, sy)))
        locs.append(loc), vals.append(val)
    return np.concatenate(locs), np.concatenate(vals)


# --- OpenPose keypoints and drawing ----------------------------------------------------------

def _part(points: np.ndarray, scores: np.ndarray, min_confidence: float) -> np.ndarray:
    """(n, 3) float32 rows (x, y, score), score 0 where under ``min_confidence`` (a seen point with a
    score of exactly 0, possible at min_confidence 0, is kept as 1e-6)."""
    seen = scores >= min_confidence
    out = np.zeros((len(points), 3), np.float32)
    out[seen, :2] = points[seen]
    out[seen, 2] = np.maximum(scores[seen], 1e-6)
    return out


def to_openpose(keypoints: np.ndarray, scores: np.ndarray, min_confidence: float = 0.3,
                hands: bool = True, face: bool = True) -> dict:
    """One person's (133, 2) COCO-WholeBody keypoints (image pixels) and (133,) scores -> a
    ``pose.detect_people`` dict: ``body`` (18, 3) and, when any of their points is seen,
    ``left_hand`` / ``right_hand`` (21, 3) and ``face`` (70, 3: 68 points, then the right and left eye
    as the pupils)."""
    scores = np.asarray(scores, np.float64)  # thresholds compared in float64, as the reference
    index = [5 if j is None else j for j in WHOLEBODY_TO_OPENPOSE]
    body = _part(keypoints[index], scores[index], min_confidence)
    shoulders = scores[[5, 6]]
    if (shoulders > min_confidence).all():  # the reference's neck: both shoulders over the threshold
        body[1] = (*keypoints[[5, 6]].mean(0), max(float(shoulders.min()), 1e-6))
    else:
        body[1] = 0
    person = {"body": body}
    if hands:
        for key, part in (("left_hand", LEFT_HAND), ("right_hand", RIGHT_HAND)):
            points = _part(keypoints[part], scores[part], min_confidence)
            if points[:, 2].any():
                person[key] = points
    if face:
        points = _part(keypoints[FACE], scores[FACE], min_confidence)
        if points[:, 2].any():
            person["face"] = np.concatenate([points, body[[14, 15]]])
    return person


def _drawable(person: dict) -> dict:
    """``person`` as A1111 draws it: hand and face points with x or y under 1 px are not drawn
    (``int(x) > eps`` in its ``draw_handpose`` / ``draw_facepose``)."""
    out = dict(person)
    for key in ("left_hand", "right_hand", "face"):
        if key in out:
            p = np.array(out[key], np.float32)
            p[(p[:, 0] < 1) | (p[:, 1] < 1), 2] = 0
            out[key] = p
    return out


def draw(height: int, width: int, people: list[dict]) -> np.ndarray:
    """(H, W, 3) uint8 OpenPose map, person after person (body, hands, face each), as A1111's
    ``draw_poses``: each person is drawn alone and laid over the others (nothing is drawn black, so
    this is drawing them on one canvas in turn)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        layer = draw_openpose(height, width, [_drawable(person)])
        drawn = layer.any(-1)
        canvas[drawn] = layer[drawn]
    return canvas


# --- annotators ------------------------------------------------------------------------------

def detect_people_many(images: list[np.ndarray], model: str = "", min_person_score: float = 0.3,
                       min_confidence: float = 0.3, hands: bool = True, face: bool = True,
                       name: str = "dw_openpose_full") -> list[list[dict]]:
    """The people (``to_openpose`` dicts, best detection first) in each (H, W, 3) uint8 RGB image: one
    detector pass per image (or per batch, where the model allows), one pose pass for all their boxes."""
    pose, det = load(name, model)
    crops, owners, frames = [], [], []
    for k, (image, boxes) in enumerate(zip(images, detect_boxes(det, images, min_person_score))):
        if boxes is None:
            continue
        if len(boxes) == 0:  # candidates, but no person: the whole image (A1111 / DWPose)
            boxes = np.array([[0, 0, image.shape[1], image.shape[0]]])
        for box in boxes:
            centre, scale = box_to_crop(box, pose.size)
            crops.append(crop(image, centre, scale, pose.size))
            owners.append(k), frames.append((centre, scale))
    people: list[list[dict]] = [[] for _ in images]
    if crops:
        locs, vals = estimate(pose, crops)
        for k, loc, val, (centre, scale) in zip(owners, locs, vals, frames):
            points = crop_to_image(loc, centre, scale, pose.size)
            people[k].append(to_openpose(points, val, min_confidence, hands, face))
    return people


def detect_people(image: np.ndarray, model: str = "", min_person_score: float = 0.3, min_confidence: float = 0.3,
                  hands: bool = True, face: bool = True) -> list[dict]:
    """Keypoints of every person DWPose finds in an (H, W, 3) uint8 RGB image (``pose.openpose_json``
    writes them)."""
    return detect_people_many([image], model, min_person_score, min_confidence, hands, face)[0]


def dw_openpose_full_batch(images: list[np.ndarray], model: str = "", min_person_score: float = 0.3,
                           min_confidence: float = 0.3) -> list[np.ndarray]:
    found = detect_people_many(images, model, min_person_score, min_confidence, name="dw_openpose_full")
    return [draw(i.shape[0], i.shape[1], p) for i, p in zip(images, found)]


def dw_openpose_batch(images: list[np.ndarray], model: str = "", min_person_score: float = 0.3,
                      min_confidence: float = 0.3) -> list[np.ndarray]:
    found = detect_people_many(images, model, min_person_score, min_confidence, hands=False, face=False,
                               name="dw_openpose")
    return [draw(i.shape[0], i.shape[1], p) for i, p in zip(images, found)]


def dw_openpose_full(image: np.ndarray, model: str = "", min_person_score: float = 0.3,
                     min_confidence: float = 0.3) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenPose map of every person's body, hands and face (DWPose)."""
    return dw_openpose_full_batch([image], model, min_person_score, min_confidence)[0]


def dw_openpose(image: np.ndarray, model: str = "", min_person_score: float = 0.3,
                min_confidence: float = 0.3) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> OpenPose map of every person's body (DWPose)."""
    return dw_openpose_batch([image], model, min_person_score, min_confidence)[0]


ANNOTATORS = {"dw_openpose_full": dw_openpose_full, "dw_openpose": dw_openpose}
# min_person_score: the detector's person threshold (A1111: 0.3); min_confidence: a keypoint's (0.3)
PARAMS = {name: {"min_person_score": Spec(float, 0, 1), "min_confidence": Spec(float, 0, 1)} for name in ANNOTATORS}
WEIGHTS = {name: (POSE, DETECTOR) for name in ANNOTATORS}
BATCH = {"dw_openpose_full": dw_openpose_full_batch, "dw_openpose": dw_openpose_batch}
NEEDS = {name: "onnxruntime" for name in ANNOTATORS}


# --- stand-in weights ------------------------------------------------------------------------

OPSET = 17
IR_VERSION = 8  # opset 17's; read by every onnxruntime since 1.13


def _constant_plus_mean(input_name: str, input_shape: list, outputs: dict[str, tuple[np.ndarray, np.ndarray]],
                        graph_name: str):
    """An ONNX model whose every output is ``base + gain * mean(input)`` (per batch item): outputs of
    known values (gain 0) or ones that follow the image a little. ``outputs``: name -> (base, gain),
    each (1, ...) float32; the batch dimension is ``input_shape[0]`` (an int or a name)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2, 3], keepdims=1),  # (N, 1, 1, 1)
             helper.make_node("Reshape", ["mean", "to_n11"], ["mean_n11"])]  # (N, 1, 1)
    inits = [numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "to_n11")]
    outs = []
    for name, (base, gain) in outputs.items():
        inits += [numpy_helper.from_array(base.astype(np.float32), f"{name}_base"),
                  numpy_helper.from_array(gain.astype(np.float32), f"{name}_gain")]
        nodes += [helper.make_node("Mul", ["mean_n11", f"{name}_gain"], [f"{name}_moved"]),
                  helper.make_node("Add", [f"{name}_moved", f"{name}_base"], [name])]
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [input_shape[0], *base.shape[1:]]))
    graph = helper.make_graph(nodes, graph_name, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                                 input_shape)], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ctrlnet")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def detector_model(output: np.ndarray, gain: np.ndarray | None = None, batch: Any = 1):
    """A stand-in ``yolox_l.onnx``: input ``images`` (batch, 3, 640, 640), output ``output``
    (batch, 8400, 85) = ``output`` (8400, 85) + ``gain`` (85,) x the image's mean / 255."""
    gain = np.zeros(5 + CLASSES) if gain is None else gain
    return _constant_plus_mean("images", [batch, 3, DET_SIZE, DET_SIZE],
                               {"output": (output[None], gain.reshape(1, 1, -1) / 255.0)}, "yolox_l")


def pose_model(simcc_x: np.ndarray, simcc_y: np.ndarray, gain: float = 0.0, batch: Any = "batch",
               size: tuple[int, int] = POSE_SIZE):
    """A stand-in ``dw-ll_ucoco_384.onnx``: input ``input`` (batch, 3, h, w), outputs ``simcc_x``
    (batch, 133, 2w) = ``simcc_x`` + ``gain`` x the crop's mean, and ``simcc_y`` likewise."""
    gx, gy = (np.full((1, 1, a.shape[-1]), gain) * np.linspace(-1, 1, a.shape[-1]) for a in (simcc_x, simcc_y))
    return _constant_plus_mean("input", [batch, 3, size[1], size[0]],
                               {"simcc_x": (simcc_x[None], gx), "simcc_y": (simcc_y[None], gy)}, "rtmpose")


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``folder/yolox_l.onnx`` and ``folder/dw-ll_ucoco_384.onnx``: tiny stand-ins with the published
    file names, input / output names and shapes (detector batch 1, pose batch dynamic), seeded. The
    detector finds two or three overlapping people (their boxes move a little with the image), the
    pose model puts random keypoints in each (moving with the crop), so the whole path runs."""
    import onnx
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = np.zeros((8400, 5 + CLASSES), np.float32)
    out[:, :2] = rng.uniform(0, 1, (8400, 2))
    out[:, 2:4] = rng.normal(0, 0.3, (8400, 2))
    out[:, 4:] = 1 / (1 + np.exp(-rng.normal(-8, 1, (8400, 1 + CLASSES))))  # sigmoid scores: nothing, mostly
    first32 = sum((DET_SIZE // s) ** 2 for s in STRIDES[:2])  # the stride-32 anchors: 20x20 cells
    for k in rng.choice(np.arange(first32 + 5 * 20, first32 + 15 * 20), 3, replace=False):
        out[k, 2:4] = np.log([rng.uniform(4, 8), rng.uniform(8, 14)])  # 128-256 x 256-448 px at 640
        out[k, 4], out[k, 5] = rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)
    gain = np.zeros(5 + CLASSES)
    gain[:2] = rng.normal(0, 0.5, 2)  # boxes shift with the image's brightness
    onnx.save(detector_model(out, gain), str(folder / DETECTOR.file))
    sx = rng.normal(0, 0.2, (KEYPOINTS, int(POSE_SIZE[0] * SIMCC_SPLIT))).astype(np.float32)
    sy = rng.normal(0, 0.2, (KEYPOINTS, int(POSE_SIZE[1] * SIMCC_SPLIT))).astype(np.float32)
    onnx.save(pose_model(sx, sy, gain=0.05), str(folder / POSE.file))
