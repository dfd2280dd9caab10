"""Annotators: ``image (H, W, 3) uint8 RGB -> condition map (H, W, 3) uint8``, by name.

    from ctrlnet.annotators import get_annotator
    edges = get_annotator("canny", low=100, high=200)(image)
    edges = get_annotator("canny", detect_resolution=512)(image)   # detect at 512 px, map back to the input size

Weight-free, one module each: canny, scribble (xdog / thick), softedge, lineart, threshold,
invert, shuffle, palette, colour_shuffle, tile, segmentation (colour clustering); with the
``pose`` extra (mediapipe) also openpose / openpose_full (OpenPose drawing, keypoint JSON). The inpaint
condition (masked pixels = -1) is made by the pipeline (``Control(annotator="inpaint")``), since
it needs the mask and is not a uint8 map. Neural detectors (HED, MiDaS, ...) need
downloaded weights and are not bundled: adding one is one module whose function loads a local
weight file, plus a line in ``ANNOTATORS``.

Resolution (the original apps' ``detect_resolution`` / ``image_resolution``): with
``detect_resolution=R`` the input is resized so its short side is R (sides rounded to multiples of
64, like ``resize_image``), the detector runs there, and the map is resized back to the input size,
or to ``image_resolution`` on the short side, with content-aware interpolation (thin binary lines
stay thin, few-colour maps stay few-colour).
"""

from __future__ import annotations

import inspect
import importlib.util
from typing import Callable

import numpy as np

from ..images import resize_any, to_rgb

from .canny import canny
from .colour import colour_shuffle, palette
from .invert import invert
from .lineart import lineart
from .pose import openpose, openpose_full
from .scribble import scribble
from .segmentation import segmentation
from .shuffle import shuffle
from .softedge import softedge
from .threshold import threshold
from .tile import tile

ANNOTATORS: dict[str, Callable[..., np.ndarray]] = {
    "canny": canny, "scribble": scribble, "softedge": softedge, "lineart": lineart, "threshold": threshold,
    "invert": invert, "shuffle": shuffle, "palette": palette, "colour_shuffle": colour_shuffle, "tile": tile,
    "segmentation": segmentation, "openpose": openpose, "openpose_full": openpose_full,
}
# Annotators that need an optional package (extra): name -> the module they import.
NEEDS: dict[str, str] = {"openpose": "mediapipe", "openpose_full": "mediapipe"}


def available(name: str) -> bool:
    """Whether annotator ``name`` can run here (its optional package, if any, is installed)."""
    return name in ANNOTATORS and (name not in NEEDS or importlib.util.find_spec(NEEDS[name]) is not None)


def _scaled_size(h: int, w: int, short: int, multiple: int = 64) -> tuple[int, int]:
    k = short / min(h, w)
    return max(multiple, int(round(h * k / multiple)) * multiple), max(multiple, int(round(w * k / multiple)) * multiple)


def get_annotator(name: str, detect_resolution: int | None = None, image_resolution: int | None = None,
                  **params) -> Callable[[np.ndarray], np.ndarray]:
    """The annotator ``name`` with ``params`` bound; a clear error for unknown names or parameters."""
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(sorted(ANNOTATORS))}")
    fn = ANNOTATORS[name]
    accepted = set(inspect.signature(fn).parameters) - {"image"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"annotator {name!r}: unknown parameter(s) {unknown}; it accepts "
                         f"{sorted(accepted | {'detect_resolution', 'image_resolution'})}")

    def annotate(image: np.ndarray) -> np.ndarray:
        image = to_rgb(image)
        h, w = image.shape[:2]
        x = image
        if detect_resolution:
            dh, dw = _scaled_size(h, w, detect_resolution)
            x = resize_any(image, dw, dh)
        out = fn(x, **params)
        th, tw = (h, w) if not image_resolution else _scaled_size(h, w, image_resolution)
        return resize_any(out, tw, th) if out.shape[:2] != (th, tw) else out
    return annotate
