"""Images in and out, for every caller (pipeline, annotators, training data, eval, CLI, server):
decoding, colour modes, the resize modes, size rounding, and PNGs with their "parameters" text.

- Decoding (``read_image``): a file path or raw bytes; the pixel count is checked from the header
  before decoding (decompression bombs); the EXIF orientation tag is applied (a phone portrait
  stands upright); errors are ``ImageError`` naming the file or field.
- Any PIL mode becomes (H, W, 3) uint8 RGB: greyscale is repeated, RGBA/LA are composited on
  white (the original apps' ``HWC3``), 16-bit images are scaled to 8 bits.
- Output sizes are rounded to the nearest multiple of the model's size multiple (VAE factor x
  2**(number of UNet downsamplers): 64 for SD, 32 for the nano base), at least one multiple.
- Resize modes (A1111): ``just_resize`` stretches; ``crop_and_resize`` (default) scales to cover the
  target and crops the centre; ``resize_and_fill`` scales to fit inside and pads with the median
  colour of the image's border.
- Content-aware interpolation (A1111's ``high_quality_resize``): maps with few colours
  (segmentation) use nearest neighbour so no new classes appear; binary edge maps are resized
  smoothly, then thinned back to 1-pixel binary lines (non-maximum suppression, threshold, and
  hit-or-miss thinning), so edges stay thin and binary at any scale.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (8000 x 8000)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (a server answers 413)."""


def to_rgb(image: Image.Image | np.ndarray, where: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PIL image or an array of any usual mode."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
            a = np.asarray(image).astype(np.float64)
            image = (a / max(a.max(), 1) * 255).round().astype(np.uint8)
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
            alpha = rgba[..., 3:] / 255.0
            return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)  # on white
        else:
            return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257).round().astype(np.uint8)
    if a.dtype != np.uint8:
        raise ImageError(f"{where}: expected uint8 or uint16 pixels, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:].astype(np.float32) / 255.0
        return (a[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    raise ImageError(f"{where}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")


def read_image(source: str | Path | bytes, where: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a file path or encoded bytes, upright (EXIF orientation applied).

    An ``ImageError`` naming ``where`` (default: the path) when it cannot be used; ``ImageTooLarge``
    above ``max_pixels``, checked from the header before decoding."""
    if isinstance(source, (bytes, bytearray)):
        where = where or "image"
        if not source:
            raise ImageError(f"{where}: empty image")
        opened = io.BytesIO(source)
    else:
        path = Path(source)
        where = where or str(path)
        if not path.is_file():
            raise ImageError(f"{where}: no such image file")
        opened = path
    try:
        with Image.open(opened) as im:
            if im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{where}: {im.width}x{im.height} has more than {max_pixels:,} pixels (the "
                                    "limit; a decompression bomb?); downscale it first")
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im), where)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{where}: too many pixels ({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{where}: cannot decode image ({e}); is it a PNG/JPEG/WebP file?") from None
    if rgb.size == 0:
        raise ImageError(f"{where}: empty image")
    return rgb


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as ``read_image`` returns it (EXIF orientation applied),
    read from the header without decoding."""
    with Image.open(path) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap the sides
    return (w, h) if turned else (h, w)


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a file; an ImageError naming the file when it cannot be used."""
    return read_image(path)


def as_rgb(item: Any, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from a path, PIL image or array."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    return to_rgb(item, where)


def png_bytes(image: Image.Image | np.ndarray, parameters: str | None = None) -> bytes:
    """A PNG, with the generation parameters in a "parameters" text chunk (read by A1111 and
    others) when given."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    info = None
    if parameters:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image | np.ndarray, path: str | Path, parameters: str | None = None) -> Path:
    """``png_bytes`` written to ``path`` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, parameters))
    return path


def round_size(value: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` (halves round up; at least one multiple)."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def _is_binary_edges(a: np.ndarray) -> bool:
    """White lines on black (0/255 only), sparse: a Canny/outline-style map."""
    grey = a.max(axis=2)
    values = np.unique(grey)
    return len(values) <= 2 and set(values.tolist()) <= {0, 255} and (grey > 0).mean() < 0.3


def _few_colours(a: np.ndarray, limit: int = 64) -> bool:
    flat = a.reshape(-1, 3)
    sample = flat[:: max(1, len(flat) // 20000)]
    return len(np.unique(sample, axis=0)) <= limit


# Hit-or-miss kernels for thinning: each removes one kind of boundary pixel, in 4 rotations
# (1 = foreground, -1 = background, 0 = either).
_THIN = [np.rot90(k, r) for k in (np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], np.int32),
                                  np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], np.int32)) for r in range(4)]


def thin(mask: np.ndarray, max_iterations: int = 32) -> np.ndarray:
    """Morphological thinning of a binary uint8 mask (0/255) to 1-pixel lines."""
    x = mask.copy()
    for _ in range(max_iterations):
        changed = False
        for k in _THIN:
            hit = cv2.morphologyEx(x, cv2.MORPH_HITMISS, k)
            if hit.any():
                x[hit > 0] = 0
                changed = True
        if not changed:
            break
    return x


def _resize_edges(a: np.ndarray, w: int, h: int) -> np.ndarray:
    grey = a.max(axis=2).astype(np.float32)
    y = cv2.resize(grey, (w, h), interpolation=cv2.INTER_CUBIC if w * h > a.shape[0] * a.shape[1] else cv2.INTER_AREA)
    # non-maximum suppression along the four directions, then threshold: lines stay one pixel wide
    y = cv2.GaussianBlur(y, (0, 0), 0.5)
    keep = np.zeros_like(y, bool)
    for k in (np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
              np.eye(3, dtype=np.uint8), np.fliplr(np.eye(3, dtype=np.uint8)).copy()):
        keep |= y >= cv2.dilate(y, k)
    peak = max(float(y.max()), 1e-6)
    binary = ((y > 0.25 * peak) & keep).astype(np.uint8) * 255
    # bridge the one-pixel gaps NMS can leave, then thin back to single lines
    binary = thin(cv2.dilate(binary, np.ones((2, 2), np.uint8)))
    return np.repeat(binary[:, :, None], 3, axis=2)


def resize_any(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize with the interpolation the content needs (see the module docstring)."""
    if a.shape[1] == w and a.shape[0] == h:
        return a
    if _is_binary_edges(a):
        return _resize_edges(a, w, h)
    if _few_colours(a):
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST)
    up = w * h > a.shape[0] * a.shape[1]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_LANCZOS4 if up else cv2.INTER_AREA)


def resize_plain(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Plain interpolation, for masks: a sparse white-on-black mask is not an edge map to thin."""
    if a.shape[1] == w and a.shape[0] == h:
        return a
    up = w * h > a.shape[0] * a.shape[1]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR if up else cv2.INTER_AREA)


def resize_to(a: np.ndarray, width: int, height: int, mode: str = "crop_and_resize", resize=resize_any) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 by one of ``RESIZE_MODES``; ``resize`` scales
    (content-aware by default; ``resize_plain`` for masks)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    h, w = a.shape[:2]
    if mode == "just_resize" or (h, w) == (height, width):
        return resize(a, width, height)
    if mode == "crop_and_resize":
        k = max(width / w, height / h)
        nw, nh = max(width, round(w * k)), max(height, round(h * k))
        r = resize(a, nw, nh)
        y, x = (nh - height) // 2, (nw - width) // 2
        return np.ascontiguousarray(r[y:y + height, x:x + width])
    # resize_and_fill
    k = min(width / w, height / h)
    nw, nh = min(width, max(1, round(w * k))), min(height, max(1, round(h * k)))
    r = resize(a, nw, nh)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    y, x = (height - nh) // 2, (width - nw) // 2
    out[y:y + nh, x:x + nw] = r
    return out
