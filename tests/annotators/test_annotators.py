"""Every annotator on images whose right answer is known (ShapesWorld targets and drawn figures)."""

import importlib
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from ctrlnet.annotators import ANNOTATORS, WEIGHTS, available, get_annotator
from ctrlnet.eval.control import edge_f1
from ctrlnet.eval.shapes import true_object_masks
from ctrlnet.testbed.shapes import generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = generate(tmp_path_factory.mktemp("ann") / "d", 6, seed=4, size=128, workers=1, progress=False)
    meta = [json.loads(l) for l in (data / "metadata.jsonl").read_text().splitlines()]
    load = lambda p: np.asarray(Image.open(data / p).convert("RGB"))
    return [(load(m["file_name"]), m, load(m["canny"])) for m in meta]


# the neural detectors, on random weights: tests/annotators/test_detector_shapes.py
@pytest.mark.parametrize("name", sorted(set(ANNOTATORS) - set(WEIGHTS)))
def test_contract_shape_dtype_determinism(name, shapes):
    if not available(name):
        pytest.skip(f"{name} needs an optional extra (tests/annotators/test_pose.py checks its error)")
    target = shapes[0][0]
    a = get_annotator(name)(target)
    assert a.shape == target.shape and a.dtype == np.uint8
    assert np.array_equal(a, get_annotator(name)(target))
    grey = get_annotator(name)(target[..., 0])  # greyscale input is accepted
    assert grey.shape == target.shape


def test_segmentation_regions_agree_with_shapesworld(shapes):
    """Every object and the background (from the generator's metadata) is one region of the map,
    and no object shares the background's region."""
    seg = get_annotator("seg_colour_clusters")
    for target, record, _ in shapes:
        out = seg(target)
        objects = true_object_masks(record, 128)
        regions = objects + [~np.any(objects, axis=0)]
        labels = []
        for region in regions:
            inner = cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            colours, counts = np.unique(out[inner].reshape(-1, 3), axis=0, return_counts=True)
            assert counts.max() >= 0.95 * inner.sum()  # one label fills each true region
            labels.append(tuple(colours[np.argmax(counts)]))
        assert all(label != labels[-1] for label in labels[:-1])  # objects differ from the background


def test_edge_style_annotators_follow_the_true_edges(shapes):
    for target, _, canny in shapes:
        xdog = get_annotator("scribble")(target)
        assert edge_f1(xdog, canny, tolerance=3) > 0.6
        thick = get_annotator("scribble", method="thick", thickness=3)(target)
        assert (thick > 0).sum() > 2 * (canny > 0).sum() and edge_f1(thick, canny, tolerance=2) > 0.5
        soft = get_annotator("softedge")(target)[..., 0]
        assert len(np.unique(soft)) <= 3 + 1  # safe quantisation: step + 1 levels (+ rounding)
        on = cv2.dilate(canny[..., 0], np.ones((3, 3), np.uint8)) > 0
        assert soft[on].mean() > 5 * max(soft[~on].mean(), 1)


def test_lineart_threshold_invert():
    page = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(page, (8, 32), (56, 32), (0, 0, 0), 2)
    line = get_annotator("lineart")(page)[..., 0]
    assert line[31:34, 12:52].max() > 128 and line[:20].max() == 0  # white lines on black, only at the stroke
    binary = get_annotator("threshold")(page)[..., 0]  # Otsu; dark strokes -> white
    assert set(np.unique(binary)) == {0, 255} and binary[32, 30] == 255 and binary[5, 5] == 0
    assert get_annotator("threshold", threshold=10, invert=False)(page)[5, 5, 0] == 255
    assert np.array_equal(get_annotator("invert")(get_annotator("invert")(page)), page)


def test_shuffle_palette_colour_shuffle_tile(shapes):
    target = shapes[1][0]
    a, b = get_annotator("shuffle", seed=0)(target), get_annotator("shuffle", seed=1)(target)
    assert not np.array_equal(a, b) and not np.array_equal(a, target)
    colours = np.unique(target.reshape(-1, 3), axis=0).astype(int)
    d = np.abs(a.reshape(-1, 1, 3).astype(int) - colours[None]).sum(-1).min(1)
    assert (d < 30).mean() > 0.9  # the remap moves the image's own colours around
    grid = get_annotator("palette", grid=32)(target)
    assert all(len(np.unique(grid[y:y + 32, x:x + 32].reshape(-1, 3), axis=0)) == 1
               for y in range(0, 128, 32) for x in range(0, 128, 32))
    shuffled = get_annotator("colour_shuffle")(target)
    key = lambda im: np.sort(im.reshape(-1, 3).view([("", np.uint8)] * 3).ravel())
    assert np.array_equal(key(shuffled), key(target)) and not np.array_equal(shuffled, target)
    tiled = get_annotator("tile", down=4)(target).astype(float)
    lap = lambda im: np.abs(cv2.Laplacian(im, cv2.CV_64F)).mean()
    assert lap(tiled) < 0.5 * lap(target.astype(float)) and abs(tiled.mean() - target.mean()) < 3


def test_detect_and_image_resolution(shapes):
    target = shapes[2][0]
    out = get_annotator("canny", detect_resolution=256)(target)  # detected at 256, back to 128
    assert out.shape == (128, 128, 3) and set(np.unique(out)) <= {0, 255}
    assert edge_f1(out, shapes[2][2], tolerance=2) > 0.7
    big = get_annotator("seg_colour_clusters", image_resolution=256)(target)
    assert big.shape == (256, 256, 3)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown annotator 'hed'"):
        get_annotator("hed")
    with pytest.raises(ValueError, match="unknown parameter.*'sigma'"):
        get_annotator("canny", sigma=1)
    with pytest.raises(ValueError, match="method=.pencil. is not one of xdog, thick"):
        get_annotator("scribble", method="pencil")(np.zeros((8, 8, 3), np.uint8))


def test_segmentation_of_large_images_fits_on_a_sample(shapes, monkeypatch):
    """Over FIT_PIXELS pixels k-means sees a sample and every pixel takes its nearest centre (the
    work stays bounded at 16 MP): the same regions as the fit on all pixels."""
    seg = importlib.import_module("ctrlnet.annotators.segmentation")  # the package's `segmentation` is the function
    for target, _, _ in shapes[:3]:
        full = get_annotator("seg_colour_clusters")(target)
        monkeypatch.setattr(seg, "FIT_PIXELS", 2000)  # 128 x 128 = 16384 pixels: sampled
        sampled = get_annotator("seg_colour_clusters")(target)
        monkeypatch.undo()
        assert (full == sampled).all(axis=-1).mean() > 0.98
