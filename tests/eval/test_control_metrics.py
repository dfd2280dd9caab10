"""Controllability metrics on ShapesWorld samples with known answers."""

import numpy as np
from PIL import Image

from ctrlnet.eval.control import controllability, edge_f1, foreground_iou, foreground_mask
from ctrlnet.testbed.shapes import generate


def test_metrics_on_real_and_shifted_samples(tmp_path):
    data = generate(tmp_path / "d", 6, seed=3, size=128, workers=1, progress=False)
    meta = [__import__("json").loads(l) for l in (data / "metadata.jsonl").read_text().splitlines()]
    for i, m in enumerate(meta):
        target = np.asarray(Image.open(data / m["file_name"]).convert("RGB"))
        seg = np.asarray(Image.open(data / m["segmentation"]).convert("RGB"))
        # The foreground of the target is the segmentation map's non-background region.
        assert foreground_iou(target, target) == 1.0
        iou_seg = (foreground_mask(target) & (seg.max(-1) > 0)).sum() / (foreground_mask(target) | (seg.max(-1) > 0)).sum()
        assert iou_seg > 0.9
        s = controllability(target, target)
        assert s["iou"] == 1.0 and s["edge_f1"] == 1.0
        # Moving the image by 12 px breaks both scores; a blank image scores zero IoU.
        shifted = np.roll(target, 12, axis=1)
        moved = controllability(shifted, target)
        assert moved["iou"] < 0.8 and moved["edge_f1"] < 0.5
        blank = np.broadcast_to(np.array(m["background_rgb"], np.uint8), target.shape).copy()
        assert controllability(blank, target)["iou"] == 0.0


def test_edge_f1_tolerance():
    a = np.zeros((32, 32), np.uint8)
    a[10, 5:25] = 255
    b = np.roll(a, 1, axis=0)
    assert edge_f1(a, a) == 1.0
    assert edge_f1(b, a, tolerance=1) == 1.0 and edge_f1(b, a, tolerance=0) == 0.0
    assert edge_f1(np.zeros_like(a), a) == 0.0 and edge_f1(np.zeros_like(a), np.zeros_like(a)) == 1.0
