"""condition_for: the detector runs at the size the map is used at (A1111's "pixel perfect"), so no
binary map is resized; with detect_resolution the map is resized to the target cleanly."""

import cv2
import numpy as np
import pytest

from ctrlnet.annotators import condition_for, get_annotator
from ctrlnet.eval.control import edge_f1
from ctrlnet.images import RESIZE_MODES, resize_photo, resize_to, scaled_size


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A photo-like (H, W, 3) uint8 image: overlapping anti-aliased shapes, slightly blurred, with noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 200, np.uint8)
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(8, w // 4)), colour, -1, cv2.LINE_AA)
        else:
            cv2.fillPoly(img, [rng.integers(0, [w, h], (4, 2)).astype(np.int32)], colour, cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_canny_runs_on_the_photo_at_the_target_size(mode):
    src = photo(300, 200)
    out = condition_for("canny", {"low": 80}, src, 256, 192, mode)
    assert out.shape == (192, 256, 3) and out.dtype == np.uint8
    canny = get_annotator("canny", low=80)
    if mode == "resize_and_fill":  # detected on the fitted photo; the map (not the photo) is padded
        nh, nw = scaled_size(200, 300, 256, 192, mode)
        fitted = canny(resize_photo(src, nw, nh))
        y, x = (192 - nh) // 2, (256 - nw) // 2
        assert np.array_equal(out[y:y + nh, x:x + nw], fitted)
        assert not out[:y].any() and not out[y + nh:].any()  # no edge where a padded photo would have one
    else:
        assert np.array_equal(out, canny(resize_to(src, 256, 192, mode, resize_photo)))


def test_pixel_perfect_is_the_detector_at_that_size_not_a_resized_map():
    src = photo(512, 384, seed=1)
    direct = get_annotator("canny")(resize_photo(src, 256, 192))
    assert np.array_equal(condition_for("canny", {}, src, 256, 192, "just_resize"), direct)
    # with detect_resolution the map is detected at 384 px and resized to 256 x 192, still clean
    # (binary, one pixel wide) and close to the direct detection
    resized = condition_for("canny", {"detect_resolution": 384}, src, 256, 192, "just_resize")
    assert resized.shape == (192, 256, 3) and set(np.unique(resized).tolist()) <= {0, 255}
    on = resized[..., 0] > 0
    assert (on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]).sum() <= 2
    assert edge_f1(resized, direct, tolerance=1) > 0.8


def test_other_annotators_and_errors():
    src = photo(120, 90, seed=2)
    seg = condition_for("seg_colour_clusters", {"k": 4}, src, 64, 96, "crop_and_resize")
    assert np.array_equal(seg, get_annotator("seg_colour_clusters", k=4)(resize_to(src, 64, 96, "crop_and_resize",
                                                                             resize_photo)))
    assert condition_for("palette", {"image_resolution": 512}, src, 64, 64).shape == (64, 64, 3)  # the target decides
    with pytest.raises(ValueError, match=r"annotator 'canny': low=-1 is not an integer in \[0, 2040\]"):
        condition_for("canny", {"low": -1}, src, 64, 64)
    with pytest.raises(ValueError, match="unknown resize mode"):
        condition_for("canny", {}, src, 64, 64, "stretch")
    with pytest.raises(ValueError, match=r"the target 0x64 must be positive"):
        condition_for("canny", {}, src, 0, 64)
