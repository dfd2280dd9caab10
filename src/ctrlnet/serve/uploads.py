"""Images in and out of the HTTP API: base64 / data-URL -> bytes -> (H, W, 3) uint8 (decoded by
``ctrlnet.images`` with the server's pixel cap) and HTTP statuses; PNG bytes -> data URL."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ..images import ImageError, ImageTooLarge, read_image


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
    try:
        return read_image(raw, where, max_pixels)
    except ImageTooLarge as e:
        raise UploadError(str(e), status=413) from None
    except ImageError as e:
        raise UploadError(str(e)) from None


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
