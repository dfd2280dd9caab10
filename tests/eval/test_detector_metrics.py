"""The re-extraction metrics of the neural annotators' kinds on maps with known answers: depth RMSE
(0-255), mean normal angle (degrees), ADE20K class mIoU (colours read back to classes), and which
metric each annotator gets."""

import math

import numpy as np
import pytest

from ctrlnet.annotators.ade20k import colourise
from ctrlnet.eval.control import class_miou, depth_rmse, normal_angular_error
from ctrlnet.eval.report import reextraction_metric


def test_depth_rmse():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert depth_rmse(a, a) == 0 and depth_rmse(a, b) == pytest.approx(10)
    b[:2] = 0  # half the pixels off by 10: sqrt(50)
    assert depth_rmse(a, b) == pytest.approx(math.sqrt(50))


def normal_map(n):
    n = np.asarray(n, np.float64)
    n = n / np.linalg.norm(n)
    return np.tile(np.round((n + 1) * 127.5).astype(np.uint8), (8, 8, 1))


def test_normal_angle():
    up, right = normal_map([0, 0, 1]), normal_map([1, 0, 0])
    assert normal_angular_error(up, up) == pytest.approx(0, abs=0.5)
    assert normal_angular_error(up, right) == pytest.approx(90, abs=0.5)
    tilted = normal_map([1, 0, 1])
    assert normal_angular_error(up, tilted) == pytest.approx(45, abs=0.5)


def test_class_miou_reads_palette_colours_as_classes():
    truth = np.zeros((10, 10), int)
    truth[:, 5:] = 2  # wall | sky
    pred = truth.copy()
    assert class_miou(colourise(pred), colourise(truth)) == 1.0
    pred[:, 5] = 0  # one column of sky called wall: wall 50/60, sky 40/50
    assert class_miou(colourise(pred), colourise(truth)) == pytest.approx((50 / 60 + 40 / 50) / 2)
    pred[:] = 4  # all tree: no class right
    assert class_miou(colourise(pred), colourise(truth)) == 0.0


@pytest.mark.parametrize("name, metric", [
    ("canny", "edge_f1"), ("scribble_hed", "edge_f1"), ("mlsd", "edge_f1"), ("lines_lsd", "edge_f1"),
    ("softedge_hed", "ssim"), ("softedge_pidinet", "ssim"), ("lineart_realistic", "ssim"),
    ("depth_midas", "depth_rmse"), ("depth_anything_v2", "depth_rmse"),
    ("normal_bae", "normal_angle"), ("normal_midas", "normal_angle"),
    ("seg_ofade20k", "class_miou"), ("seg_segformer_ade20k", "class_miou"),
    ("seg_colour_clusters", "region_miou"), ("segmentation", "region_miou"),
    ("dw_openpose_full", "pose_pck"), ("openpose", "pose_pck")])
def test_each_kind_gets_its_metric(name, metric):
    assert reextraction_metric(name)[0] == metric
