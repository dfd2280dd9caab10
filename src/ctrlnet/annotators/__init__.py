"""Annotators: ``image (H, W, 3) uint8 RGB -> condition map (H, W, 3) uint8``, by name.

    from ctrlnet.annotators import condition_for, get_annotator
    edges = get_annotator("canny", low=100, high=200)(image)
    edges = get_annotator("canny", detect_resolution=512)(image)   # detect at 512 px, map back to the input size
    cond = condition_for("canny", {"low": 100}, photo, 768, 512, "crop_and_resize")  # detected at 768 x 512

Weight-free, one module each: canny, scribble (xdog / thick), softedge, lineart, lines_lsd,
threshold, invert, shuffle, palette, colour_shuffle, tile, seg_colour_clusters (colour clustering;
formerly ``segmentation``, still accepted with a FutureWarning), openpose / openpose_full (mediapipe:
OpenPose drawing, keypoint JSON). The inpaint condition (masked pixels = -1) is made by the pipeline
(``Control(annotator="inpaint")``), since it needs the mask and is not a uint8 map.

Neural detectors from the published weight files users already have (``weights``: found offline
through ``model=PATH``, ``$CTRLNET_ANNOTATORS``, ``~/.cache/ctrlnet/annotators``, the Hugging Face
cache; loaded safely and strictly), one module each with its own ``ANNOTATORS`` / ``PARAMS`` /
``WEIGHTS`` / ``BATCH`` merged here: hed (softedge_hed, softedge_hedsafe, scribble_hed), pidinet,
lineart_nets (lineart_realistic / coarse / anime), mlsd, depth (depth_midas, depth_anything(_v2),
normal_midas), normalbae, ade20k (seg_ofade20k, seg_upernet_ade20k, seg_segformer_ade20k), dwpose
(dw_openpose_full, dw_openpose). ``require`` / ``unavailable`` say what stops one from running;
``describe`` is what ``ctrlnet annotators`` lists. A list of images goes through a detector's batched
form (``detect_many``).

Parameters: each has a declared type and range in ``PARAMS`` (``detect_resolution`` /
``image_resolution``: integers in [64, 2048]); ``check_params`` enforces them when an annotator
is bound (``get_annotator``, ``condition_for``, ``ctrlnet annotate``), so every caller - Python,
CLI, training, server - gets the same ValueError naming the annotator, the parameter, the value
and the valid range. The upper ends keep one call at 4096 x 4096 within a few seconds.

Resolution (the original apps' ``detect_resolution`` / ``image_resolution``): with
``detect_resolution=R`` the input is resized (photo interpolation) so its short side is R (sides
rounded to multiples of 64, like ``resize_image``), the detector runs there, and the map is
resized back to the input size, or to ``image_resolution`` on the short side, with content-aware
interpolation (1-pixel lines are redrawn clean, few-colour maps stay few-colour). A scaled size
over ``MAX_PIXELS`` (16.8 MP; a 64 x 65536 strip at R = 512 would be 512 x 524288) is a
ValueError naming the sizes, not a clamp: R keeps its meaning, and the caller picks a smaller one.

Pixel perfect (A1111): ``condition_for`` makes a generation's condition at the generation's size
by running the detector on the photo already brought to that size by the resize mode, so no binary
map is resized at all (with ``detect_resolution`` given, the map is resized to the target).
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any, Callable

import numpy as np

from ..images import resize_any, resize_photo, resize_to, scaled_size, to_rgb

from . import ade20k, depth, dwpose, hed, lineart_nets, mlsd, normalbae, pidinet
from .canny import canny
from .colour import colour_shuffle, palette
from .invert import invert
from .lineart import lineart
from .pose import openpose, openpose_full
from .scribble import scribble
from .segmentation import seg_colour_clusters
from .shuffle import shuffle
from .softedge import softedge
from .threshold import threshold
from .spec import MODEL, Spec
from .tile import tile
from .weights import Need, Weights, WeightsError, WeightsNotFound, find_any, locate_any, options

ANNOTATORS: dict[str, Callable[..., np.ndarray]] = {
    "canny": canny, "scribble": scribble, "softedge": softedge, "lineart": lineart, "threshold": threshold,
    "invert": invert, "shuffle": shuffle, "palette": palette, "colour_shuffle": colour_shuffle, "tile": tile,
    "seg_colour_clusters": seg_colour_clusters, "openpose": openpose, "openpose_full": openpose_full,
}
# Annotators that need an optional package (extra): name -> the module they import.
NEEDS: dict[str, str] = {"openpose": "mediapipe", "openpose_full": "mediapipe"}
# Neural annotators' weights (``weights.Weights``, all needed): name -> what ``find`` looks for.
WEIGHTS: dict[str, tuple[Need, ...]] = {}  # each a Weights or a tuple of alternatives
# Annotators with a batched form: name -> fn(list of same-size (H, W, 3) uint8, **params) -> list of maps.
BATCH: dict[str, Callable[..., list[np.ndarray]]] = {}
# Old names still accepted, with a FutureWarning: old -> new.
ALIASES: dict[str, str] = {"segmentation": "seg_colour_clusters"}


# Valid ranges. The upper ends keep one call bounded: at 4096 x 4096 (16 MP) each annotator at its
# maxima runs in a few seconds on 2 CPU cores (blur sigmas set the kernel size; detect_resolution
# the detector's size). The rest are where a parameter stops meaning anything (Canny's 3x3 Sobel
# L1 gradient is at most 2040; 16 palette colours for segmentation).
MAX_RESOLUTION = 2048  # detect_resolution / image_resolution (A1111's slider maximum)
MAX_PIXELS = 4096 * 4096  # the size a detector runs at, or a map is made at, at most
RESOLUTION = Spec(int, 64, MAX_RESOLUTION)
SEED = Spec(int, 0, 2 ** 32 - 1)
PARAMS: dict[str, dict[str, Spec]] = {
    "canny": {"low": Spec(int, 0, 2040), "high": Spec(int, 0, 2040)},
    "scribble": {"method": Spec(str, choices=("xdog", "thick")), "threshold": Spec(int, 0, 510),
                 "thickness": Spec(int, 1, 64)},
    "softedge": {"sigma": Spec(float, 0.1, 8), "safe": Spec(bool), "step": Spec(int, 1, 255)},
    "lineart": {"sigma": Spec(float, 0.1, 4), "k": Spec(float, 1.1, 4), "gain": Spec(float, 0.1, 100),
                "coarse": Spec(bool)},  # the wider blur is sigma x k (x 2 coarse) <= 32
    "threshold": {"threshold": Spec(int, 0, 255), "invert": Spec(bool)},
    "invert": {},
    "shuffle": {"f": Spec(int, 1, 1024), "seed": SEED},  # f: the flow's noise is made over the image + 2 f a side
    "palette": {"grid": Spec(int, 1, 4096)},
    "colour_shuffle": {"seed": SEED},
    "tile": {"down": Spec(float, 1, 128)},
    "seg_colour_clusters": {"k": Spec(int, 1, 16), "min_fraction": Spec(float, 0, 1), "seed": SEED},
    "openpose": {"hands": Spec(bool), "face": Spec(bool), "min_confidence": Spec(float, 0, 1)},
    "openpose_full": {"min_confidence": Spec(float, 0, 1)},
}
# Pairs that must be ordered (first <= second).
ORDERED: dict[str, tuple[str, str]] = {"canny": ("low", "high")}

# The neural detectors, one module each, each with its own ANNOTATORS / PARAMS / WEIGHTS (and
# BATCH / NEEDS where it has them); each with weights takes ``model`` (a path; "" = search, ``weights``).
for _module in (hed, pidinet, lineart_nets, mlsd, depth, normalbae, ade20k, dwpose):
    ANNOTATORS |= _module.ANNOTATORS
    PARAMS |= {name: ({"model": MODEL} if name in _module.WEIGHTS else {}) | specs
               for name, specs in _module.PARAMS.items()}
    WEIGHTS |= _module.WEIGHTS
    BATCH |= getattr(_module, "BATCH", {})
    NEEDS |= getattr(_module, "NEEDS", {})


def canonical(name: str) -> str:
    """``name``, or the current name of a renamed annotator (with a FutureWarning saying so)."""
    if name in ALIASES:
        warnings.warn(f"annotator {name!r} is now called {ALIASES[name]!r} (the old name will be removed)",
                      FutureWarning, stacklevel=3)
        return ALIASES[name]
    return name


def require(name: str, params: dict | None = None) -> None:
    """Raise what stops annotator ``name`` from running here: a ``ModuleNotFoundError`` for its
    missing optional package, ``WeightsNotFound`` (saying where it looked and where the file is
    published) or ``WeightsError`` for its weights. ``params["model"]`` replaces the search for the
    first weight file (``WEIGHTS``)."""
    name = ALIASES.get(name, name)
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(sorted(ANNOTATORS))}")
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        raise ModuleNotFoundError(f"annotator {name!r} needs the {NEEDS[name]!r} package (README, 'Annotators')")
    for k, need in enumerate(WEIGHTS.get(name, ())):
        find_any(name, need, (params or {}).get("model", "") if k == 0 else "")


def unavailable(name: str, params: dict | None = None) -> str:
    """Why annotator ``name`` cannot run here, in one line ("" when it can); see ``require``."""
    try:
        require(name, params)
    except (ValueError, OSError, ImportError) as e:
        return str(e)
    return ""


def available(name: str) -> bool:
    """Whether annotator ``name`` can run here (its optional package is installed, its weights found)."""
    return not unavailable(name)


def check_params(name: str, params: dict) -> dict:
    """Annotator ``name``'s ``params`` (``detect_resolution`` / ``image_resolution`` included; None =
    not used) checked against ``PARAMS`` and converted to their types; a ValueError naming the
    annotator, the parameter, the value and the valid range otherwise. Every caller (Python, CLI,
    training, server) binds through here."""
    name = canonical(name)
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(sorted(ANNOTATORS))}")
    specs = PARAMS[name] | {"detect_resolution": RESOLUTION, "image_resolution": RESOLUTION}
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ValueError(f"annotator {name!r}: unknown parameter(s) {unknown}; it accepts {sorted(specs)}")
    out = {}
    for key, value in params.items():
        if value is None and key in ("detect_resolution", "image_resolution"):
            continue
        checked = specs[key].check(value)
        if checked is None:
            raise ValueError(f"annotator {name!r}: {key}={value!r} is not {specs[key].describe()}")
        out[key] = checked
    if name in ORDERED:
        a, b = ORDERED[name]
        values = resolved_params(name, {}) | out
        if values[a] > values[b]:
            raise ValueError(f"annotator {name!r}: need {a} <= {b}, got {a}={values[a]}, {b}={values[b]}")
    return out


def resolved_params(name: str, params: dict) -> dict:
    """Every parameter of annotator ``name``: ``params`` checked, the rest at their defaults (and
    the resolutions when given) - what made a map, e.g. to record beside it."""
    name = ALIASES.get(name, name)
    defaults = {p.name: p.default for p in inspect.signature(ANNOTATORS[name]).parameters.values()
                if p.name != "image"}
    return defaults | (check_params(name, params) if params else {})


def describe(name: str) -> dict:
    """What ``ctrlnet annotators`` and the web UI show of annotator ``name``: its one-line doc,
    parameters (default and valid values), the weights it needs and where each was found (None:
    not found), the optional package it needs, and whether it can run here (``reason`` if not)."""
    fn = ANNOTATORS[name]
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.name != "image"}
    weights = [{"file": options(need)[0].file, "repos": list(options(need)[0].repos), "what": options(need)[0].what,
                "alternatives": [{"file": w.file, "repos": list(w.repos), "what": w.what} for w in options(need)[1:]],
                "found": str(found) if (found := locate_any(need)) else None} for need in WEIGHTS.get(name, ())]
    reason = unavailable(name)
    return {"name": name, "doc": (inspect.getdoc(fn) or "").split("\n")[0],
            "params": {k: {"default": defaults.get(k), "valid": spec.describe()} for k, spec in PARAMS[name].items()},
            "weights": weights, "needs": NEEDS.get(name, ""), "available": not reason, "reason": reason,
            "aliases": sorted(a for a, n in ALIASES.items() if n == name)}


def resolution_size(h: int, w: int, short: int, name: str, key: str, multiple: int = 64) -> tuple[int, int]:
    """(height, width) with the short side at ``short``, sides rounded to ``multiple``; a
    ValueError when that is over ``MAX_PIXELS`` (a 64 x 65536 strip at 512 would be 512 x 524288)."""
    k = short / min(h, w)
    sh = max(multiple, int(round(h * k / multiple)) * multiple)
    sw = max(multiple, int(round(w * k / multiple)) * multiple)
    if sh * sw > MAX_PIXELS:
        raise ValueError(f"annotator {name!r}: {key}={short} would scale the {w}x{h} image to {sw}x{sh} "
                         f"({sh * sw / 1e6:.0f} MP), over the limit of {MAX_PIXELS / 1e6:.1f} MP; use a smaller "
                         f"{key} or crop the image to a less extreme aspect")
    return sh, sw


def _detect(name: str, params: dict, image: np.ndarray) -> np.ndarray:
    """The map of (H, W, 3) uint8 ``image`` at its own size, or with ``detect_resolution`` at that
    size (the photo resized with photo interpolation); ``params`` as ``check_params`` returns them."""
    params = dict(params)
    resolution = params.pop("detect_resolution", None)
    params.pop("image_resolution", None)
    if resolution is not None:
        dh, dw = resolution_size(image.shape[0], image.shape[1], resolution, name, "detect_resolution")
        image = resize_photo(image, dw, dh)
    return ANNOTATORS[name](image, **params)


def get_annotator(name: str, detect_resolution: int | None = None, image_resolution: int | None = None,
                  **params) -> Callable[[np.ndarray], np.ndarray]:
    """The annotator ``name`` with ``params`` bound; a ValueError for unknown names or parameters
    and for values out of their range (``PARAMS``). The callable takes one image, or a list of
    images (run several per forward pass where the detector has a batched form, ``BATCH``)."""
    name = canonical(name)
    params = check_params(name, params | {"detect_resolution": detect_resolution,
                                          "image_resolution": image_resolution})

    def back(out: np.ndarray, h: int, w: int) -> np.ndarray:
        resolution = params.get("image_resolution")
        th, tw = (h, w) if resolution is None else resolution_size(h, w, resolution, name, "image_resolution")
        return resize_any(out, tw, th)

    def annotate(image):
        if isinstance(image, (list, tuple)):
            images = [to_rgb(i) for i in image]
            return [back(out, i.shape[0], i.shape[1]) for out, i in zip(detect_many(name, params, images), images)]
        image = to_rgb(image)
        return back(_detect(name, params, image), image.shape[0], image.shape[1])
    return annotate


BATCH_SIZE = 8  # images per forward pass at most, for detectors with a batched form


def detect_many(name: str, params: dict, images: list[np.ndarray]) -> list[np.ndarray]:
    """``_detect`` over (H, W, 3) uint8 ``images``: those of one size (after ``detect_resolution``)
    go through the detector's batched form together, ``BATCH_SIZE`` at a time; the rest one by one."""
    if name not in BATCH or len(images) < 2:
        return [_detect(name, params, i) for i in images]
    params = dict(params)
    resolution = params.pop("detect_resolution", None)
    params.pop("image_resolution", None)
    if resolution is not None:
        images = [resize_photo(i, *resolution_size(i.shape[0], i.shape[1], resolution, name,
                                                   "detect_resolution")[::-1]) for i in images]
    out: list[Any] = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for k, i in enumerate(images):
        groups.setdefault(i.shape, []).append(k)
    for ks in groups.values():
        for start in range(0, len(ks), BATCH_SIZE):
            chunk = ks[start:start + BATCH_SIZE]
            for k, m in zip(chunk, BATCH[name]([images[k] for k in chunk], **params)):
                out[k] = m
    return out


def condition_for(name: str, params: dict, image: Any, width: int, height: int,
                  resize_mode: str = "crop_and_resize") -> np.ndarray:
    """The (height, width, 3) uint8 condition map annotator ``name`` makes from ``image`` (a photo:
    array or PIL image) for a generation of that size - A1111's "pixel perfect": the photo is
    brought to (height, width) by ``resize_mode`` with photo interpolation and the detector runs
    there, so no map is resized (a resized binary map is never as clean as one detected at its
    size). ``resize_and_fill`` detects on the fitted photo and pads the map with its border's
    median colour (a padded photo would show an edge where the padding starts). With
    ``detect_resolution`` in ``params`` the detector runs at that resolution and its map is resized
    to the target by ``resize_mode`` (content-aware); ``image_resolution`` has no effect here."""
    name = canonical(name)
    params = check_params(name, dict(params))
    whole = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not (whole(width) and whole(height) and width > 0 and height > 0 and width * height <= MAX_PIXELS):
        raise ValueError(f"annotator {name!r}: the target {width}x{height} must be positive and at most "
                         f"{MAX_PIXELS / 1e6:.1f} MP")
    width, height = int(width), int(height)
    rgb = to_rgb(image)
    if params.get("detect_resolution") is not None:
        return resize_to(_detect(name, params, rgb), width, height, resize_mode)
    if resize_mode == "resize_and_fill":
        nh, nw = scaled_size(rgb.shape[0], rgb.shape[1], width, height, resize_mode)
        return resize_to(_detect(name, params, resize_photo(rgb, nw, nh)), width, height, resize_mode)
    return _detect(name, params, resize_to(rgb, width, height, resize_mode, resize_photo))
