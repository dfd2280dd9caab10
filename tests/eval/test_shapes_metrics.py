"""ShapesWorld metrics on images whose right answer is known."""

import numpy as np

from ctrlnet.eval.shapes import mask_iou, object_mask, score_single_shape, shape_class
from ctrlnet.testbed.shapes import PALETTE, render, sample_layout


def test_real_single_shape_samples_score_perfectly():
    checked = 0
    for i in range(300):
        s = sample_layout(i, seed=7, size=128)
        if len(s.shapes) != 1:
            continue
        image = render(s, 128)["target"]
        shape = s.shapes[0]
        score = score_single_shape(image, shape.colour, shape.shape, s.background)
        assert score["colour_ok"] and score["background_ok"] and score["shape_ok"], (s.prompt, score)
        checked += 1
    assert checked > 50


def test_wrong_answers_are_caught():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = PALETTE["white"]
    image[16:48, 16:48] = PALETTE["red"]  # a red square
    assert shape_class(object_mask(image, PALETTE["white"])) == "square"
    score = score_single_shape(image, "blue", "circle", "black")
    assert not score["colour_ok"] and not score["shape_ok"] and not score["background_ok"]
    blank = np.full((64, 64, 3), PALETTE["white"], np.uint8)
    assert not score_single_shape(blank, "red", "square", "white")["colour_ok"]


def test_mask_iou_known_values():
    a = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True
    b = np.zeros((10, 10), bool)
    b[6:10, 6:10] = True
    shifted = np.zeros((10, 10), bool)
    shifted[0:4, 2:6] = True  # overlaps a in 4x2 = 8 pixels; union 16 + 16 - 8 = 24
    assert mask_iou(a, a) == 1.0 and mask_iou(a, b) == 0.0
    assert abs(mask_iou(a, shifted) - 8 / 24) < 1e-12
