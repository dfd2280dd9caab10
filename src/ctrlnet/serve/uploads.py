"""Images in and out of the HTTP API: base64 / data-URL / raw bytes -> (H, W, 3) uint8 with the
server's pixel cap checked before decoding; PNG (with the "parameters" chunk) -> data URL."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class UploadError(ValueError):
    """Bad upload; ``status`` is the HTTP status to answer with (400, or 413 for too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_base64(data: str, where: str) -> bytes:
    """Bytes of a base64 string, with or without a ``data:image/...;base64,`` prefix."""
    if not isinstance(data, str) or not data:
        raise UploadError(f"{where}: expected a base64 string (or a data URL)")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise UploadError(f"{where}: data URL must be base64-encoded")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(f"{where}: not valid base64") from None


def decode_image(raw: bytes, where: str, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB; 400 for undecodable, 413 above ``max_pixels`` (checked from the header)."""
    from ..pipeline.images import to_rgb
    if not raw:
        raise UploadError(f"{where}: empty image")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise UploadError(f"{where}: {im.width}x{im.height} has more than {max_pixels:,} pixels, this "
                                  "server's limit; downscale it first", status=413)
            im.load()
            rgb = to_rgb(im, where)
    except UploadError:
        raise
    except Image.DecompressionBombError:
        raise UploadError(f"{where}: too many pixels; downscale it first", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"{where}: cannot decode image ({e}); send a PNG, JPEG or WebP") from None
    if rgb.size == 0:
        raise UploadError(f"{where}: empty image")
    return rgb


def png_bytes(image: Image.Image | np.ndarray, parameters: str | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    info = None
    if parameters:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
