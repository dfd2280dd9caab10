"""Condition image handling: modes, resize modes, content-aware resizing, errors naming the file."""

import cv2
import numpy as np
import pytest
from PIL import Image

from ctrlnet.images import ImageError, load_image, resize_to, round_size, thin, to_rgb


def test_modes_become_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(to_rgb(grey), np.repeat(grey[:, :, None], 3, 2))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red, transparent black becomes white
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    deep = Image.fromarray(np.array([[0, 65535]], np.uint16))
    deep.save(tmp_path / "d.png")
    assert load_image(tmp_path / "d.png")[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").shape == (4, 4, 3)
    with pytest.raises(ImageError, match="nothing.png: no such image file"):
        load_image(tmp_path / "nothing.png")
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(ImageError, match="t.png: cannot decode"):
        load_image(tmp_path / "t.png")


def test_resize_modes():
    a = np.zeros((50, 100, 3), np.uint8)
    a[:, :50] = (10, 200, 10)
    a[:, 50:] = (200, 10, 10)
    assert resize_to(a, 64, 64, "just_resize").shape == (64, 64, 3)
    crop = resize_to(a, 64, 64, "crop_and_resize")  # centre crop of the scaled image: both halves visible
    assert tuple(crop[32, 0]) == (10, 200, 10) and tuple(crop[32, 63]) == (200, 10, 10)
    fill = resize_to(a, 64, 64, "resize_and_fill")  # fits 64x32 inside, pads with the border median
    assert fill.shape == (64, 64, 3)
    inside = fill[16:48]
    assert tuple(inside[16, 0]) == (10, 200, 10) and tuple(inside[16, 63]) == (200, 10, 10)
    assert len({tuple(fill[0, 0]), tuple(fill[63, 63])}) == 1
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_to(a, 64, 64, "stretch")
    assert round_size(70, 64) == 64 and round_size(100, 64) == 128 and round_size(10, 64) == 64


def test_segmentation_maps_keep_their_classes():
    seg = np.zeros((40, 40, 3), np.uint8)
    seg[5:20, 5:20] = (255, 0, 0)
    seg[22:35, 10:38] = (0, 255, 0)
    for size in (23, 97):
        out = resize_to(seg, size, size, "just_resize")
        assert {tuple(c) for c in out.reshape(-1, 3)} <= {(0, 0, 0), (255, 0, 0), (0, 255, 0)}


@pytest.mark.parametrize("size", [64, 256])
def test_edge_maps_stay_thin_and_binary(size):
    edges = np.zeros((128, 128), np.uint8)
    cv2.circle(edges, (64, 64), 40, 255, 1)
    cv2.line(edges, (10, 10), (110, 30), 255, 1)
    out = resize_to(np.repeat(edges[:, :, None], 3, 2), size, size, "just_resize")[..., 0]
    assert set(np.unique(out).tolist()) <= {0, 255}
    on = out > 0
    assert on.sum() > 0.6 * (edges > 0).sum() * size / 128  # the lines survive, at the new scale
    blocks = on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]
    assert blocks.sum() <= 0.02 * on.sum()  # (almost) no 2x2 solid blocks: one pixel wide
    # the circle is still where it was (scaled): most edge pixels lie near radius 40 or the line
    naive = cv2.resize(edges, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    near = cv2.dilate(naive.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (on & near).sum() >= 0.95 * on.sum()


def test_thinning():
    block = np.zeros((20, 20), np.uint8)
    block[5:15, 8:11] = 255  # a 3-pixel-wide bar becomes a 1-pixel line
    t = thin(block)
    assert (t[7:13] > 0).sum(axis=1).tolist() == [1] * 6


def test_exif_orientation_is_applied_for_files_and_bytes(tmp_path):
    """A phone portrait: stored landscape with orientation tag 6 (rotate 90 degrees clockwise)."""
    from ctrlnet.images import read_image
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # white band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.png"
    Image.fromarray(stored).save(path, exif=exif)
    from ctrlnet.images import upright_size
    assert upright_size(path) == (40, 20)
    for upright in (read_image(path), read_image(path.read_bytes(), "upload")):
        assert upright.shape == (40, 20, 3)  # upright: portrait
        assert upright[:10].min() == 255 and upright[10:].max() == 0  # the band is now on top


def test_too_many_pixels_is_its_own_error(tmp_path):
    from ctrlnet.images import ImageTooLarge, read_image
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(path)
    with pytest.raises(ImageTooLarge, match="big.png: 30x30 has more than 899 pixels"):
        read_image(path, max_pixels=899)
