"""Condition image handling: modes (16-bit), resize modes, content-aware resizing (clean edge maps at
any scale), PNG text chunks, errors naming the file."""

import cv2
import numpy as np
import pytest
from PIL import Image

from ctrlnet.eval.control import edge_f1
from ctrlnet.images import (ImageError, load_image, png_text, read_image, resize_photo, resize_to, round_size,
                            save_png, scaled_size, thin, to_rgb, upright_size)


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
    with pytest.raises(ImageError, match=r"control image: the image is empty \(64x0 pixels\)"):
        to_rgb(np.zeros((0, 64, 3), np.uint8), "control image")  # not a division by zero later


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


# ---------------------------------------------------------------- 16-bit files (issue 20)

def add_exif_chunk(png: bytes, orientation: int) -> bytes:
    """A PNG with an eXIf chunk (EXIF orientation) right after IHDR; cv2 writes none."""
    import struct
    import zlib
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()
    data = data[6:] if data.startswith(b"Exif\x00\x00") else data  # PNG keeps the bare TIFF structure
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def test_16_bit_greyscale_is_scaled_by_257_not_by_its_maximum(tmp_path):
    """A dark 16-bit scan (values up to 1000 of 65535) stays dark, however it was written."""
    dark = np.array([[0, 257, 1000], [500, 1000, 1000]], np.uint16)
    want = np.round(dark / 257).astype(np.uint8)  # 1000 -> 4, not 255
    Image.fromarray(dark).save(tmp_path / "pil.png")  # PIL: mode I;16
    cv2.imwrite(str(tmp_path / "cv.png"), dark)  # OpenCV: a 16-bit greyscale PNG
    for name in ("pil.png", "cv.png"):
        with Image.open(tmp_path / name) as im:
            assert im.mode.startswith("I"), im.mode
        out = load_image(tmp_path / name)
        assert np.array_equal(out[..., 0], want) and out.max() == 4, name
    full = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert to_rgb(full)[0, :, 0].tolist() == [0, 255]
    # mode "I" (32-bit) holding 16-bit data: the same scale, clipped to 0..65535
    deep = Image.fromarray(np.array([[-5, 0, 1000, 65535, 70000]], np.int32))
    assert deep.mode == "I" and to_rgb(deep)[0, :, 0].tolist() == [0, 0, 4, 255, 255]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_colour_keeps_all_16_bits(tmp_path, suffix):
    """OpenCV writes 16-bit colour PNGs / TIFFs, which PIL opens as 8-bit RGB by dropping the low
    byte (1000 -> 3): read_image scales the full 16 bits by 257 (1000 -> 4), like a uint16 array."""
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 1000, 65535, 30000  # R, G, B
    path = tmp_path / f"c{suffix}"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV takes BGR
    with Image.open(path) as im:
        assert im.mode == "RGB"  # what PIL makes of it
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == (4, 255, 117)  # round(v / 257); PIL alone would give (3, 255, 117)
    assert np.array_equal(out, to_rgb(rgb))  # the same as the uint16 array


def test_16_bit_rgba_and_exif_orientation(tmp_path):
    rgba = np.zeros((2, 4, 4), np.uint16)
    rgba[..., :3] = 1000
    rgba[:, :2, 3] = 65535  # left half opaque, right half transparent
    ok, png = cv2.imencode(".png", rgba)
    out = read_image(png.tobytes(), "upload")
    assert tuple(out[0, 0]) == (4, 4, 4) and tuple(out[0, 3]) == (255, 255, 255)  # transparent -> white
    # a phone's 16-bit portrait: stored landscape, EXIF orientation 6
    stored = np.zeros((20, 40, 3), np.uint16)
    stored[:, :10] = 65535  # white band on the stored image's left
    ok, png = cv2.imencode(".png", stored)
    path = tmp_path / "portrait16.png"
    path.write_bytes(add_exif_chunk(png.tobytes(), 6))
    upright = read_image(path)
    assert upright.shape == (40, 20, 3) and upright_size(path) == (40, 20)
    assert upright[:10].min() == 255 and upright[10:].max() == 0  # the band is now on top


# ---------------------------------------------------------------- resizing edge maps (issue 20)

def known_lines(w: int, h: int) -> np.ndarray:
    """(h, w) uint8: straight lines at several angles, a circle, an ellipse and a rectangle, given in
    unit coordinates and drawn 1 px (no anti-aliasing) at (w, h) - what a resize of the same drawing
    at another size should give. Pixel centres map as in cv2.resize."""
    img = np.zeros((h, w), np.uint8)
    sub = 16  # cv2 fixed-point: 4 fractional bits
    at = lambda u, v: (int(round((u * w - 0.5) * sub)), int(round((v * h - 0.5) * sub)))
    for u0, v0, u1, v1 in [(0.05, 0.1, 0.95, 0.13), (0.1, 0.9, 0.9, 0.5), (0.2, 0.2, 0.3, 0.95),
                           (0.6, 0.05, 0.6, 0.45), (0.05, 0.3, 0.45, 0.3), (0.7, 0.95, 0.98, 0.6)]:
        cv2.line(img, at(u0, v0), at(u1, v1), 255, 1, cv2.LINE_8, 4)
    cv2.ellipse(img, at(0.65, 0.7), (int(0.2 * w * sub), int(0.2 * h * sub)), 0, 0, 360, 255, 1, cv2.LINE_8, 4)
    cv2.ellipse(img, at(0.3, 0.6), (int(0.08 * w * sub), int(0.12 * h * sub)), 30, 0, 360, 255, 1, cv2.LINE_8, 4)
    cv2.rectangle(img, at(0.75, 0.15), at(0.92, 0.4), 255, 1, cv2.LINE_8, 4)
    return img


def line_stats(m: np.ndarray) -> tuple[int, int, int]:
    """(line ends, junction pixels, 2x2 solid blocks) of a white-on-black line map."""
    on = (m > 0).astype(np.uint8)
    neighbours = cv2.filter2D(on, -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT) - on
    blocks = on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]
    return int(((neighbours == 1) & (on > 0)).sum()), int(((neighbours >= 3) & (on > 0)).sum()), int(blocks.sum())


@pytest.mark.parametrize("src,dst", [
    ((128, 96), (192, 144)), ((128, 96), (256, 192)), ((128, 96), (384, 288)),  # x1.5, x2, x3
    ((256, 192), (128, 96)), ((256, 192), (192, 144)),  # x0.5, x0.75
    ((300, 200), (450, 300)), ((300, 200), (600, 400)), ((300, 200), (900, 600)),
    ((512, 384), (256, 192)), ((300, 200), (256, 192)), ((256, 192), (300, 200))])  # other aspects
def test_resized_edge_maps_match_the_lines_drawn_at_that_size(src, dst):
    """A 1-px line map resized up or down is the same drawing made at the new size: edge F1 >= 0.9
    at the eval's 1-px tolerance, one pixel wide, binary, and no spurs or meshes (as many line ends
    as the direct drawing, junction pixels not multiplying)."""
    (sw, sh), (w, h) = src, dst
    truth = known_lines(w, h)
    out = resize_to(np.repeat(known_lines(sw, sh)[:, :, None], 3, 2), w, h, "just_resize")
    assert out.shape == (h, w, 3) and set(np.unique(out).tolist()) <= {0, 255}
    assert edge_f1(out, truth, tolerance=1) >= 0.9
    ends, junctions, blocks = line_stats(out[..., 0])
    want_ends, want_junctions, want_blocks = line_stats(truth)
    assert ends <= want_ends + 2  # a spur or a broken line adds line ends
    assert junctions <= 1.25 * want_junctions + 8  # meshes / cross-links add junction pixels
    assert blocks <= max(2, want_blocks)  # one pixel wide


def test_thick_binary_maps_keep_their_width_and_two_colour_maps_their_colours():
    thick = np.zeros((64, 64, 3), np.uint8)
    thick[20:26, 8:56] = 255  # a 6-px stroke (scribble "thick", threshold maps): not a 1-px line map
    up = resize_to(thick, 128, 128, "just_resize")[..., 0]
    assert set(np.unique(up).tolist()) <= {0, 255} and 11 <= (up[:, 64] > 0).sum() <= 13  # twice as wide
    red = np.zeros((40, 40, 3), np.uint8)
    cv2.line(red, (2, 5), (37, 30), (255, 0, 0), 1)  # sparse, two colours, but not grey: not an edge map
    out = resize_to(red, 97, 97, "just_resize")
    assert {tuple(c) for c in out.reshape(-1, 3)} <= {(0, 0, 0), (255, 0, 0)} and (out[..., 0] > 0).any()


def test_dense_line_texture_and_empty_maps():
    rng = np.random.default_rng(0)
    noise = thin(((rng.random((96, 96)) < 0.5) * 255).astype(np.uint8))  # a 1-px maze, over a quarter white
    out = resize_to(np.repeat(noise[:, :, None], 3, 2), 64, 64, "just_resize")
    assert out.shape == (64, 64, 3) and set(np.unique(out).tolist()) <= {0, 255}
    blank = np.zeros((30, 50, 3), np.uint8)
    assert not resize_to(blank, 64, 48, "just_resize").any()


def test_thinning_at_the_border_and_of_a_staircase():
    corner = np.zeros((6, 6), np.uint8)
    corner[0:3, 0:3] = 255  # a block in the corner thins to a line, not to nothing
    t = thin(corner)
    assert 1 <= (t > 0).sum() < 9
    stairs = np.zeros((10, 10), np.uint8)
    for i in range(8):
        stairs[i + 1, i + 1] = stairs[i + 1, i + 2] = 255  # a 4-connected staircase: its corners go
    t = thin(stairs)
    _, _, blocks = line_stats(t)
    assert blocks == 0 and (t > 0).sum() < (stairs > 0).sum()


def test_scaled_size_and_photo_resize():
    assert scaled_size(200, 300, 256, 192, "crop_and_resize") == (192, 288)
    assert scaled_size(200, 300, 256, 192, "resize_and_fill") == (171, 256)
    assert scaled_size(200, 300, 256, 192, "just_resize") == (192, 256)
    photo = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert resize_photo(photo, 60, 40).shape == (40, 60, 3) and resize_photo(photo, 30, 20) is photo


def test_png_text_chunks(tmp_path):
    path = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png", "Steps: 20", text={"ctrlnet-annotator": "{}"})
    assert png_text(path) == {"parameters": "Steps: 20", "ctrlnet-annotator": "{}"}
    assert png_text(tmp_path / "missing.png") == {}
