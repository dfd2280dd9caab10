"""OpenPose drawing and keypoint JSON on keypoints whose right rendering is known; BlazePose ->
COCO-18 mapping; mediapipe detection when the pose extra is installed."""

import importlib.util
import json
import os

import numpy as np
import pytest

from ctrlnet.annotators import available, get_annotator
from ctrlnet.annotators.pose import (BODY_COLOURS, BODY_LIMBS, HAND_EDGES, draw_openpose, from_blazepose,
                                     openpose_json)

from ctrlnet.testbed.figure import KEYPOINTS_256

# A standing figure on a 256 x 256 canvas, COCO-18 order, (x, y, confidence).
BODY = np.column_stack([KEYPOINTS_256, np.ones(18, np.float32)])


def test_body_keypoints_and_limbs_in_openpose_colours():
    canvas = draw_openpose(256, 256, [{"body": BODY}])
    for (x, y, _), colour in zip(BODY, BODY_COLOURS):
        assert tuple(canvas[int(y), int(x)]) == colour  # keypoints: full colour, drawn last
    # limb r-hip -> r-knee (9 -> 10, the 8th limb): 60% of its colour at the midpoint
    (a, b), colour = BODY_LIMBS[7], BODY_COLOURS[7]
    mx, my = (BODY[a - 1, :2] + BODY[b - 1, :2]) / 2
    assert tuple(canvas[int(my), int(mx)]) == tuple(int(c * 0.6) for c in colour)
    # a missing keypoint (left ankle) removes its circle and its limb
    body = BODY.copy()
    body[13, 2] = 0
    missing = draw_openpose(256, 256, [{"body": body}])
    assert missing[235, 152].sum() == 0 and missing[212, 151].sum() == 0
    assert np.array_equal(missing[:180], canvas[:180])  # the rest is unchanged


def test_hands_face_and_json_round_trip():
    hand = np.zeros((21, 3), np.float32)
    hand[0] = (60, 200, 1)
    for f in range(5):  # five straight fingers fanning upwards
        for k in range(4):
            hand[1 + 4 * f + k] = (30 + 15 * f, 180 - 14 * k, 1)
    face = np.array([[100 + 2 * i, 60, 1] for i in range(70)], np.float32)
    people = [{"body": BODY, "left_hand": hand, "face": face}]
    canvas = draw_openpose(256, 256, people)
    assert tuple(canvas[200, 60]) == (0, 0, 255)  # hand keypoints: blue dots
    # second edge of the first finger (1 -> 2): its colour on the HSV wheel at 1/20 (76.5 -> 77, as
    # OpenCV rounds the float colour A1111 passes)
    import colorsys
    want = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(1 / len(HAND_EDGES), 1, 1))  # OpenCV rounds, as in A1111
    p, q = hand[1], hand[2]
    mid = ((p + q) / 2).astype(int)
    assert tuple(canvas[mid[1], mid[0]]) == want
    assert tuple(canvas[60, 240]) == (255, 255, 255)  # a face dot, away from the body
    doc = json.loads(json.dumps(openpose_json(people, 256, 256)))
    person = doc["people"][0]
    assert len(person["pose_keypoints_2d"]) == 54 and len(person["face_keypoints_2d"]) == 210
    assert person["hand_right_keypoints_2d"] == [0.0] * 63  # not found: zeros, as OpenPose writes
    back = [{"body": person["pose_keypoints_2d"], "left_hand": person["hand_left_keypoints_2d"],
             "face": person["face_keypoints_2d"]}]
    assert np.array_equal(draw_openpose(256, 256, back), canvas)


def test_blazepose_to_coco18():
    lm = np.zeros((33, 4), np.float32)
    rng = np.random.default_rng(0)
    lm[:, :2] = rng.uniform(0.1, 0.9, (33, 2))
    lm[:, 3] = 0.9
    lm[27, 3] = 0.2  # left ankle barely visible
    kp = from_blazepose(lm, 200, 100)
    assert np.allclose(kp[2, :2], (lm[12, 0] * 100, lm[12, 1] * 200))  # right shoulder <- landmark 12
    assert np.allclose(kp[1, :2], ((lm[11, 0] + lm[12, 0]) * 50, (lm[11, 1] + lm[12, 1]) * 100))  # neck
    assert kp[13, 2] == 0 and (kp[[0, 1, 2, 12], 2] > 0).all()


def test_pose_annotators_need_their_extra_or_detect_nothing_on_a_blank_image():
    blank = np.zeros((128, 128, 3), np.uint8)
    if not available("openpose"):
        with pytest.raises(ValueError, match=r"ctrlnet\[pose\]"):
            get_annotator("openpose")(blank)
        return
    out = get_annotator("openpose_full")(blank)
    assert out.shape == blank.shape and out.sum() == 0


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None and not os.environ.get("CI"),
                    reason="pose extra (mediapipe) not installed; CI requires it (make test installs it)")
def test_mediapipe_detects_a_drawn_figure():
    """A flat cartoon person (testbed.figure): feasible for BlazePose at least for head and shoulders."""
    from ctrlnet.annotators.pose import detect_people
    from ctrlnet.testbed.figure import cartoon_person
    img, pts = cartoon_person(512)
    people = detect_people(img)
    assert people, "mediapipe found no person in the drawn figure"
    body = people[0]["body"]
    for k in (0, 2, 5):  # nose, shoulders
        assert body[k, 2] > 0 and np.linalg.norm(body[k, :2] - pts[k]) < 40, (k, body[k], pts[k])
    # the map draws what was found: the nose circle in its colour
    out = get_annotator("openpose")(img)
    x, y = body[0, :2].astype(int)
    assert tuple(out[y, x]) == BODY_COLOURS[0]


def test_keypoints_read_back_and_pck_by_hand():
    from ctrlnet.eval.control import keypoints_from_openpose_map, pose_pck
    canvas = draw_openpose(256, 256, [{"body": BODY}])
    back = keypoints_from_openpose_map(canvas)
    assert (back[:, 2] > 0).all() and np.abs(back[:, :2] - BODY[:, :2]).max() <= 1.0
    assert pose_pck(canvas, canvas) == 1.0
    assert pose_pck(np.zeros_like(canvas), canvas) == 0.0  # nothing found: all wrong
    # the legs (keypoints 8-13, 6 of 18) moved 40 px right: beyond 0.1 x 256 = 25.6 px
    moved = BODY.copy()
    moved[8:14, 0] += 40
    assert pose_pck(draw_openpose(256, 256, [{"body": moved}]), canvas) == pytest.approx(12 / 18)
    # everything 20 px right: within the tolerance
    shifted = BODY.copy()
    shifted[:, 0] += 20
    assert pose_pck(draw_openpose(256, 256, [{"body": shifted}]), canvas) == 1.0


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None and not os.environ.get("CI"),
                    reason="pose extra (mediapipe) not installed; CI requires it (make test installs it)")
def test_annotate_writes_pose_maps_and_keypoint_json(tmp_path):
    from PIL import Image
    from ctrlnet.annotators.batch import annotate
    from ctrlnet.testbed.figure import cartoon_person
    img, _ = cartoon_person(512)  # at 256 px mediapipe does not find it
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "person.png")
    report = annotate("openpose_full", [tmp_path / "in"], tmp_path / "out", workers=1, progress=False)
    assert not report.failed
    doc = json.loads((tmp_path / "out" / "person.json").read_text())
    assert len(doc["people"]) == 1 and len(doc["people"][0]["pose_keypoints_2d"]) == 54
    out = np.asarray(Image.open(tmp_path / "out" / "person.png").convert("RGB"))
    assert np.array_equal(out, get_annotator("openpose_full")(img))  # the map drawn from the same detection
