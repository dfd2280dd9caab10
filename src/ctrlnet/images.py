"""Images in and out, for every caller (pipeline, annotators, training data, eval, CLI, server):
decoding, colour modes, the resize modes, size rounding, and PNGs with their text chunks (the
A1111 "parameters", and others such as the annotator that made a map).

- Decoding (``read_image``): a file path or raw bytes; the pixel count is checked from the header
  before decoding (decompression bombs); the EXIF orientation tag is applied (a phone portrait
  stands upright); errors are ``ImageError`` naming the file or field.
- Any PIL mode becomes (H, W, 3) uint8 RGB: greyscale is repeated, RGBA/LA are composited on
  white (the original apps' ``HWC3``). 16-bit images are divided by 257 (65535 -> 255; a dark
  16-bit scan stays dark): greyscale (PIL's "I;16*" modes, and "I" holding 16-bit values, clipped),
  uint16 arrays, and 16-bit colour PNG / TIFF files, which PIL would cut to their high byte, so
  OpenCV decodes those.
- Output sizes are rounded to the nearest multiple of the model's size multiple (VAE factor x
  2**(number of UNet downsamplers): 64 for SD, 32 for the nano base), at least one multiple.
- Resize modes (A1111): ``just_resize`` stretches; ``crop_and_resize`` (default) scales to cover the
  target and crops the centre; ``resize_and_fill`` scales to fit inside and pads with the median
  colour of the image's border (``scaled_size``: the size before the crop / padding).
- Content-aware interpolation (``resize_any``, after A1111's ``high_quality_resize``): grey 0/255
  maps of 1-pixel lines (Canny-style; most pixels go in a 3x3 opening) are redrawn, not
  interpolated: the lines are traced as a pixel graph, smoothed along themselves, scaled and drawn
  1 pixel wide, then thinned where they meet, so they stay clean (no double lines, meshes or spurs)
  at any scale; thick binary strokes are interpolated and thresholded at mid-grey (their width
  scales); maps with few colours (segmentation) use nearest neighbour so no new classes appear;
  photos use Lanczos up / area down (``resize_photo``).
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
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale (mode "I" is how PIL holds some 16-bit files as 32-bit ints): the
            # full 16-bit range maps to 8 bits, like any uint16 array below, never the image's own maximum
            image = np.asarray(image).clip(0, 65535).astype(np.uint16)
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
            alpha = rgba[..., 3:] / 255.0
            return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)  # on white
        else:
            return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257).round().astype(np.uint8)  # 65535 -> 255
    if a.dtype != np.uint8:
        raise ImageError(f"{where}: expected uint8 or uint16 pixels, got {a.dtype}")
    if a.ndim in (2, 3) and 0 in a.shape[:2]:
        raise ImageError(f"{where}: the image is empty ({a.shape[1]}x{a.shape[0]} pixels)")
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


# EXIF orientation -> the PIL transpose that makes the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _is_deep_colour(im: Image.Image) -> bool:
    """A 16-bit-per-channel colour file (PNG, TIFF), which PIL decodes to 8 bits by dropping the low
    byte (its raw mode says so: "RGB;16B", "RGBA;16B", "LA;16B", ("RGB;16N", ...))."""
    if im.mode not in ("RGB", "RGBA", "LA") or not im.tile:
        return False
    args = im.tile[0][3]  # (decoder, extents, offset, args)
    raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
    return isinstance(raw, str) and ";16" in raw


def _decode_deep_colour(data: bytes, im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a 16-bit colour file: OpenCV keeps all 16 bits (BGR(A) order, no EXIF
    rotation), scaled like any uint16 array, then turned upright by the file's EXIF tag."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None or a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] not in (3, 4):
        return to_rgb(ImageOps.exif_transpose(im))  # not what it looked like: PIL's 8-bit reading
    a = a[..., [2, 1, 0, 3][:a.shape[2]]]  # BGR(A) -> RGB(A)
    rgb = Image.fromarray(np.ascontiguousarray(to_rgb(a)))
    orientation = im.getexif().get(0x0112, 1)
    return np.asarray(rgb.transpose(_UPRIGHT[orientation]) if orientation in _UPRIGHT else rgb)


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
            if _is_deep_colour(im):
                rgb = _decode_deep_colour(bytes(source) if isinstance(source, (bytes, bytearray))
                                          else path.read_bytes(), im)
            else:
                im.load()
                rgb = to_rgb(ImageOps.exif_transpose(im), where)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{where}: too many pixels ({e}); downscale it first") from None
    except UnidentifiedImageError:  # its message names the file object (a memory address for bytes)
        raise ImageError(f"{where}: cannot decode image (not a recognised format); is it a PNG/JPEG/WebP "
                         "file?") from None
    except (OSError, SyntaxError, ValueError) as e:
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


def png_bytes(image: Image.Image | np.ndarray, parameters: str | None = None,
              text: dict[str, str] | None = None) -> bytes:
    """A PNG, with the generation parameters in a "parameters" text chunk (read by A1111 and
    others) when given, and one text chunk per ``text`` item."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    items = ({"parameters": parameters} if parameters else {}) | dict(text or {})
    info = None
    if items:
        info = PngInfo()
        for key, value in items.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image | np.ndarray, path: str | Path, parameters: str | None = None,
             text: dict[str, str] | None = None) -> Path:
    """``png_bytes`` written to ``path`` (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, parameters, text))
    return path


def png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG file (``{}`` for other or unreadable files); reads the header
    only, not the pixels (chunks written after the image data are not seen)."""
    try:
        with Image.open(path) as im:  # the chunks before the pixels are in .info (.text would decode the image)
            return {k: v for k, v in im.info.items() if isinstance(v, str)} if im.format == "PNG" else {}
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return {}


def round_size(value: int, multiple: int) -> int:
    """The nearest multiple of ``multiple`` (halves round up; at least one multiple)."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def _binary_grey(a: np.ndarray) -> np.ndarray | None:
    """(H, W) uint8 of a grey map whose pixels are all 0 or 255, else None."""
    grey = a[..., 0]
    if not (np.array_equal(grey, a[..., 1]) and np.array_equal(grey, a[..., 2])):
        return None
    return grey if not np.any((grey != 0) & (grey != 255)) else None


def _is_line_map(on: np.ndarray) -> bool:
    """One-pixel lines (A1111's test): a 3x3 opening removes most of the white pixels; thick
    strokes and filled areas survive it."""
    x = on.astype(np.uint8)
    opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
    return 2 * int((x > opened).sum()) > int(x.sum())


def _few_colours(a: np.ndarray, limit: int = 64) -> bool:
    flat = a.reshape(-1, 3)
    sample = flat[:: max(1, len(flat) // 20000)]
    return len(np.unique(sample, axis=0)) <= limit


# The 8 neighbours (dy, dx); the first four point forward, so each link is listed once from them.
_STEPS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
# Hit-or-miss kernels for thinning: each removes one kind of boundary pixel, in 4 rotations
# (1 = foreground, -1 = background, 0 = either); as lookup tables over a pixel's 8-neighbour code
# (bit j set = neighbour _STEPS[j] is white), so only the white pixels are visited.
_THIN = [np.rot90(k, r) for k in (np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], np.int32),
                                  np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], np.int32)) for r in range(4)]
_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (256 codes, 8 neighbours)
_THIN_LUTS = [np.all([(k[1 + dy, 1 + dx] == 0) | (_BITS[:, j] == (k[1 + dy, 1 + dx] == 1))
                      for j, (dy, dx) in enumerate(_STEPS)], axis=0) for k in _THIN]


def thin(mask: np.ndarray, max_iterations: int = 32) -> np.ndarray:
    """Morphological thinning of a binary uint8 mask (0/255) to 1-pixel lines (sequential
    hit-or-miss thinning; outside the image counts as black). Work follows the pixels that change:
    after the first pass only those whose neighbourhood lost a pixel are looked at again."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask > 0
    flat = padded.ravel()
    offsets = np.array([dy * (w + 2) + dx for dy, dx in _STEPS])  # (8,)
    code = np.zeros_like(flat)  # each white pixel's 8-neighbour code
    stamp = np.zeros(flat.size, np.int32)

    def recode(at: np.ndarray) -> None:
        code[at] = np.packbits(flat[at[:, None] + offsets], axis=1, bitorder="little")[:, 0]

    def unique(at: np.ndarray) -> np.ndarray:  # np.unique without sorting: the last of each value survives
        n = np.arange(len(at), dtype=np.int32)
        stamp[at] = n
        return at[stamp[at] == n]

    look = np.flatnonzero(flat)  # the white pixels a kernel may hit
    recode(look)
    for _ in range(max_iterations):
        touched = []
        for lut in _THIN_LUTS:
            hit = look[lut[code[look]] & (flat[look] > 0)]
            if not len(hit):
                continue
            flat[hit] = 0  # all hits of one kernel go at once, as a hit-or-miss does
            near = unique((hit[:, None] + offsets).ravel())
            near = near[flat[near] > 0]
            recode(near)
            look = np.concatenate([look, near])  # the later kernels of this pass see them too
            touched.append(near)
        if not touched:
            break
        # a pixel whose neighbourhood did not change cannot be hit now if it was not hit before
        look = unique(np.concatenate(touched))
    return padded[1:-1, 1:-1] * np.uint8(255)


def _line_graph(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The white pixels of a (H, W) bool 1-pixel line map as a graph: (n, 2) float64 positions
    (x, y) and (n, 8) int neighbour indices in ``_STEPS`` order (-1: none). A diagonal link is kept
    only where no 4-neighbour joins the two pixels, so a staircase's corners make no triangles
    (which would draw as little meshes)."""
    h, w = on.shape
    ys, xs = np.nonzero(on)
    index = np.full((h + 2, w + 2), -1, np.int32)  # padded by one: the border's outer neighbours are -1
    index[ys + 1, xs + 1] = np.arange(len(ys), dtype=np.int32)
    links = np.stack([index[ys + 1 + dy, xs + 1 + dx] for dy, dx in _STEPS], axis=1)
    for k, (dy, dx) in enumerate(_STEPS):
        if dy and dx:
            joined = (index[ys + 1 + dy, xs + 1] >= 0) | (index[ys + 1, xs + 1 + dx] >= 0)
            links[joined, k] = -1
    return np.stack([xs, ys], axis=1).astype(np.float64), links


def _draw_segments(p0: np.ndarray, p1: np.ndarray, w: int, h: int) -> np.ndarray:
    """(h, w) uint8 with the segments (m, 2) float (x, y) ``p0`` -> ``p1`` drawn white, one pixel
    per step along each segment's longer axis (a DDA: 8-connected, one pixel wide)."""
    out = np.zeros((h, w), np.uint8)
    steps = np.ceil(np.abs(p1 - p0).max(axis=1)).astype(np.int64)  # (m,)
    for n in np.unique(steps):
        sel = steps == n
        t = np.arange(n + 1) / max(int(n), 1)  # (n + 1,)
        pts = p0[sel, None] + (p1 - p0)[sel, None] * t[None, :, None]  # (m_n, n + 1, 2)
        xy = np.floor(pts.reshape(-1, 2) + 0.5).astype(np.int64)  # halves up, never to even: no gaps
        out[xy[:, 1].clip(0, h - 1), xy[:, 0].clip(0, w - 1)] = 255
    return out


def _resize_lines(on: np.ndarray, w: int, h: int) -> np.ndarray:
    """A 1-pixel line map redrawn at (h, w): the lines are traced as a pixel graph, smoothed along
    themselves (the source's pixel staircase would otherwise be magnified into steps), scaled, and
    drawn one pixel wide. Nothing is blurred and re-thresholded, so no double lines, meshes or
    spurs appear, at any up or down scale."""
    src_h, src_w = on.shape
    p, links = _line_graph(thin(on.astype(np.uint8) * 255) > 0)  # thick spots (2x2 blocks) would draw as rings
    # Laplacian smoothing of the pixels inside a line (2 links); ends and junctions stay put.
    # 4 passes of [1/4, 1/2, 1/4]: a sigma of ~1.4 px along the line, which flattens a staircase's
    # steps (and pulls a curve of radius r px in by ~1/r px)
    degree = (links >= 0).sum(axis=1)
    inner = np.flatnonzero(degree == 2)
    a, b = np.sort(links[inner], axis=1)[:, -2:].T  # the two neighbours (the rest are -1, sorted first)
    for _ in range(4):
        p[inner] = 0.5 * p[inner] + 0.25 * (p[a] + p[b])
    # pixel centres -> the target's pixel centres (cv2.resize's alignment)
    q = (p + 0.5) * np.array([w / src_w, h / src_h]) - 0.5
    i, k = np.nonzero(links[:, :4] >= 0)
    alone = np.flatnonzero(degree == 0)
    starts = np.concatenate([q[i], q[alone]])
    ends = np.concatenate([q[links[i, k]], q[alone]])
    return thin(_draw_segments(starts, ends, w, h))  # where lines meet or crowd (downscaling), one pixel again


def resize_photo(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Photo interpolation (the original apps' ``resize_image``): Lanczos up, area down."""
    if a.shape[1] == w and a.shape[0] == h:
        return a
    up = w * h > a.shape[0] * a.shape[1]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_LANCZOS4 if up else cv2.INTER_AREA)


def resize_any(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Resize with the interpolation the content needs (see the module docstring)."""
    if a.shape[1] == w and a.shape[0] == h:
        return a
    grey = _binary_grey(a)
    if grey is not None:
        on = grey > 0
        lines = _is_line_map(on)
        if lines and on.mean() <= 0.25:
            binary = _resize_lines(on, w, h)
        elif lines:
            # over a quarter white is texture, not lines (and redrawing costs what the white pixels
            # do): nearest neighbour, which costs the same at any density
            binary = cv2.resize(grey, (w, h), interpolation=cv2.INTER_NEAREST)
        else:  # thick strokes, filled shapes: smooth resize, then binary again at mid-grey
            y = cv2.resize(grey, (w, h), interpolation=cv2.INTER_LINEAR if w * h > grey.size else cv2.INTER_AREA)
            binary = np.where(y >= 128, 255, 0).astype(np.uint8)
        return np.repeat(binary[:, :, None], 3, axis=2)
    if _few_colours(a):
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST)
    return resize_photo(a, w, h)


def resize_plain(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Plain interpolation, for masks: a sparse white-on-black mask is not an edge map to thin."""
    if a.shape[1] == w and a.shape[0] == h:
        return a
    up = w * h > a.shape[0] * a.shape[1]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR if up else cv2.INTER_AREA)


def scaled_size(h: int, w: int, width: int, height: int, mode: str = "crop_and_resize") -> tuple[int, int]:
    """(height, width) an (h, w) image is scaled to by resize mode ``mode`` before its crop
    (``crop_and_resize``: covers the target) or padding (``resize_and_fill``: fits inside it)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}")
    if mode == "just_resize":
        return height, width
    if mode == "crop_and_resize":
        k = max(width / w, height / h)
        return max(height, round(h * k)), max(width, round(w * k))
    k = min(width / w, height / h)
    return min(height, max(1, round(h * k))), min(width, max(1, round(w * k)))


def resize_to(a: np.ndarray, width: int, height: int, mode: str = "crop_and_resize", resize=resize_any) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 by one of ``RESIZE_MODES``; ``resize`` scales
    (content-aware by default; ``resize_plain`` for masks, ``resize_photo`` for photos)."""
    h, w = a.shape[:2]
    nh, nw = scaled_size(h, w, width, height, mode)
    r = resize(a, nw, nh)
    if (nh, nw) == (height, width):
        return r
    if mode == "crop_and_resize":
        y, x = (nh - height) // 2, (nw - width) // 2
        return np.ascontiguousarray(r[y:y + height, x:x + width])
    # resize_and_fill: the image centred on its border's median colour
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    y, x = (height - nh) // 2, (width - nw) // 2
    out[y:y + nh, x:x + nw] = r
    return out
