"""The A1111 ControlNet extension's (sd-webui-controlnet, also Forge's) vocabulary, translated to
ours: its module names and sliders, its resize and control modes, its unit dicts with their legacy
spellings, its way of matching model names. No HTTP and no models here (``a1111`` and ``app`` use
it), so every rule can be tested by calling it.

A unit (one dict of ``alwayson_scripts.controlnet.args``) becomes a ``Unit``: our annotator and its
parameters, a ControlNet name, a ``pipeline.Control``'s numbers. Where the extension resets an
out-of-range slider value to the slider's default (its webuiapi defaults 64/64 on canny, -1 for
"unset"), so does this; what it would fail on (an unknown module or model, a start after the end)
is an ``ApiError`` naming the unit and the field - stricter than the extension, which logs the
error and generates without ControlNet, so that a client is told instead of silently ignored.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_VERSION = 3  # the extension's /controlnet/version since its 2024 pydantic rewrite (clients need >= 2)

RESIZE = {  # the extension's names, their aliases and 0-3 (3: A1111's "Just resize (latent upscale)")
    "just resize": "just_resize", "crop and resize": "crop_and_resize", "resize and fill": "resize_and_fill",
    "inner fit (scale to fit)": "crop_and_resize", "scale to fit (inner fit)": "crop_and_resize",
    "outer fit (shrink to fit)": "resize_and_fill", "envelope (outer fit)": "resize_and_fill",
    "0": "just_resize", "1": "crop_and_resize", "2": "resize_and_fill", "3": "just_resize",
}
CONTROL_MODES = {"balanced": "balanced", "my prompt is more important": "prompt",
                 "controlnet is more important": "control", "0": "balanced", "1": "prompt", "2": "control"}


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def pick(self, v: Any) -> float:
        """``v`` when it is a number within the slider, else the slider's default (the extension's rule)."""
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and self.min <= v <= self.max
        return float(v) if ok else self.value

    def json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Module:
    """One extension module: the annotator it is here ("" = the image is the condition), the
    parameter each threshold slider sets (and how its value becomes that parameter), fixed parameters."""
    annotator: str
    a: tuple[str, Slider, Any] | None = None  # (our parameter, the slider, value -> parameter value)
    b: tuple[str, Slider, Any] | None = None
    fixed: dict = field(default_factory=dict)
    resolution: bool = True   # has a Resolution slider (processor_res -> detect_resolution)
    tag: str = ""             # its control type (/controlnet/control_types)


whole = lambda v: int(round(v))  # noqa: E731 - sliders are floats; these parameters are integers
CANNY_LOW, CANNY_HIGH = Slider("Low Threshold", 100, 1, 255), Slider("High Threshold", 200, 1, 255)

# label (alias_names=true) -> Module, in the extension's order; NAMES gives its internal names
MODULES: dict[str, Module] = {
    "none": Module("", resolution=False),
    "tile_resample": Module("tile", a=("down", Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01), float), tag="Tile"),
    "softedge_pidinet": Module("softedge_pidinet", tag="SoftEdge"),
    "seg_ofade20k": Module("seg_ofade20k", tag="Segmentation"),
    "scribble_pidinet": Module("scribble_pidinet", tag="Scribble"),
    "openpose_full": Module("openpose_full", tag="OpenPose"),
    "normal_bae": Module("normal_bae", tag="NormalMap"),
    "mlsd": Module("mlsd", a=("thr_v", Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01), float),
                   b=("thr_d", Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01), float), tag="MLSD"),
    "inpaint_only": Module("inpaint", resolution=False, tag="Inpaint"),
    "depth_midas": Module("depth_midas", tag="Depth"),
    "canny": Module("canny", a=("low", CANNY_LOW, whole), b=("high", CANNY_HIGH, whole), tag="Canny"),
    "invert (from white bg & black line)": Module("invert", resolution=False, tag="Canny"),
    "threshold": Module("threshold", a=("threshold", Slider("Binarization Threshold", 127, 0, 255, 0.01), whole),
                        fixed={"invert": False}),
    "t2ia_color_grid": Module("palette", fixed={"grid": 64}, tag="T2I-Adapter"),
    "softedge_pidisafe": Module("softedge_pidisafe", tag="SoftEdge"),
    "softedge_hedsafe": Module("softedge_hedsafe", tag="SoftEdge"),
    "softedge_hed": Module("softedge_hed", tag="SoftEdge"),
    "shuffle": Module("shuffle", resolution=False, tag="Shuffle"),
    "scribble_xdog": Module("scribble", a=("threshold", Slider("XDoG Threshold", 32, 1, 64, 0.01), whole),
                            fixed={"method": "xdog"}, tag="Scribble"),
    "scribble_hed": Module("scribble_hed", tag="Scribble"),
    "openpose": Module("openpose", tag="OpenPose"),
    "normal_midas": Module("normal_midas", a=("bg_th", Slider("Normal Background Threshold", 0.4, 0.0, 1.0, 0.01),
                                              float), tag="NormalMap"),
    "lineart_realistic": Module("lineart_realistic", tag="Lineart"),
    "lineart_coarse": Module("lineart_coarse", tag="Lineart"),
    "lineart_anime": Module("lineart_anime", tag="Lineart"),
    "inpaint_global_harmonious": Module("inpaint", resolution=False, tag="Inpaint"),
    "dw_openpose_full": Module("dw_openpose_full", tag="OpenPose"),
    "depth_anything_v2": Module("depth_anything_v2", tag="Depth"),
    "depth_anything": Module("depth_anything", tag="Depth"),
}
NAMES = {  # the extension's internal name (alias_names=false) of a label, where they differ
    "softedge_pidinet": "pidinet", "seg_ofade20k": "oneformer_ade20k", "scribble_pidinet": "pidinet_scribble",
    "depth_midas": "depth", "invert (from white bg & black line)": "invert", "t2ia_color_grid": "color",
    "softedge_pidisafe": "pidinet_safe", "softedge_hedsafe": "hed_safe", "softedge_hed": "hed",
    "normal_midas": "normal_map", "lineart_realistic": "lineart", "inpaint_global_harmonious": "inpaint",
}
LABELS = {name: label for label, name in NAMES.items()}
# ours that the extension does not have, offered under our names (Resolution slider only)
OURS = ("softedge", "lineart_dog", "seg_colour_clusters", "seg_upernet_ade20k", "seg_segformer_ade20k",
        "lines_lsd", "dw_openpose", "colour_shuffle")
OUR_ANNOTATOR = {"lineart_dog": "lineart"}  # our classic line art, renamed: the extension's "lineart" is realistic
OUR_TAGS = {"softedge": "SoftEdge", "lineart_dog": "Lineart", "seg_colour_clusters": "Segmentation",
            "seg_upernet_ade20k": "Segmentation", "seg_segformer_ade20k": "Segmentation", "lines_lsd": "MLSD",
            "dw_openpose": "OpenPose", "colour_shuffle": "Shuffle"}


def module(name: str) -> tuple[str, Module] | None:
    """(label, Module) of a module name as a client sends it (label or internal name, case kept as the
    extension keeps it, then lower-cased), or None."""
    for key in (name, name.lower()):
        label = LABELS.get(key, key)
        if label in MODULES:
            return label, MODULES[label]
        if label in OURS:
            return label, Module(OUR_ANNOTATOR.get(label, label), tag=OUR_TAGS[label])
    return None


def all_modules() -> dict[str, Module]:
    return {**MODULES, **{name: module(name)[1] for name in OURS}}


def module_detail(m: Module) -> dict:
    sliders = ([RESOLUTION.json()] if m.resolution else []) + [s[1].json() for s in (m.a, m.b) if s]
    return {"model_free": False, "sliders": sliders}


def annotator_params(m: Module, processor_res: Any, threshold_a: Any, threshold_b: Any, pixel_perfect: bool) -> dict:
    """Our annotator parameters for a unit's sliders: out-of-range values (and -1, "unset") take the
    slider's default; ``processor_res`` becomes ``detect_resolution`` unless ``pixel_perfect`` (then
    the detector runs at the generation's own size: our pixel perfect)."""
    params = dict(m.fixed)
    for spec, v in ((m.a, threshold_a), (m.b, threshold_b)):
        if spec is not None:
            key, slider, convert = spec
            params[key] = convert(slider.pick(v))
    if m.annotator == "canny" and params["low"] > params["high"]:  # OpenCV's Canny takes them in either order
        params["low"], params["high"] = params["high"], params["low"]
    if m.annotator and m.resolution and not pixel_perfect:
        params["detect_resolution"] = whole(RESOLUTION.pick(processor_res))
    return params


def _mode(table: dict[str, str], v: Any, where: str, what: str, names: str) -> str:
    """Our mode for a client's: a name (any case, old spellings) or a whole number; NaN, infinity,
    3.5 and unknown names are a ValueError naming ``where`` and the names to use."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    whole = number and math.isfinite(v) and v == int(v)
    key = str(int(v)) if whole else str(v).strip().lower()
    if key not in table or (number and not whole):
        raise ValueError(f"{where}: unknown {what} {v!r}; use {names} (or 0-2)")
    return table[key]


def flag(v: Any, default: bool, where: str) -> bool:
    """A client's boolean: true/false, 0/1, "true"/"false" (form-minded clients); null = ``default``."""
    if v is None:
        return default
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", ""):
        return v.strip().lower() in ("true", "1")
    raise ValueError(f"{where}: expected true or false, got {v!r}")


def resize_mode(v: Any, where: str) -> str:
    return _mode(RESIZE, v, where, "resize mode", "Just Resize, Crop and Resize, Resize and Fill")


def control_mode(v: Any, where: str) -> str:
    return _mode(CONTROL_MODES, v, where, "control mode",
                 "Balanced, My prompt is more important, ControlNet is more important")


# ---------------------------------------------------------------------- models

def model_hash(path: str | Path) -> str:
    """A1111's short model hash ("old hash"): the first 8 hex of sha256 over 64 KiB at offset 1 MiB
    of the weight file (of a folder: its first .safetensors, else .bin, by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.safetensors")) or sorted(p.rglob("*.bin"))
        if not files:
            return "00000000"
        p = files[0]
    with open(p, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def match_model(requested: str, titles: dict[str, str]) -> str | None:
    """Our ControlNet name for a unit's ``model`` among ``titles`` ({"name [hash]": name}), as the
    extension matches: the exact title, then the bare name ignoring case, then the shortest name
    containing it; a title whose hash is not this file's is tried by its bare name too (a client
    that saved a title from another copy of the file)."""
    if requested in titles:
        return titles[requested]
    names = {name.lower(): name for name in titles.values()}
    for s in (requested.lower(), re.sub(r"\s*\[[0-9a-f]{8,10}\]$", "", requested.lower())):
        if s in names:
            return names[s]
        containing = sorted((k for k in names if s and s in k), key=len)
        if containing:
            return names[containing[0]]
    return None


# ---------------------------------------------------------------------- units

@dataclass
class Unit:
    """One enabled unit, in our terms."""
    index: int
    model: str                  # our ControlNet name
    label: str                  # the module's label
    annotator: str              # "" = the image is the condition; "inpaint" = init image + mask
    params: dict
    image: str | None           # base64 / data URL, or None: img2img's init image
    scale: float
    start: float
    end: float
    mode: str
    resize_mode: str
    save_detected_map: bool
    type: str = ""              # a Union ControlNet's condition type (the extension's union_control_type)


LEGACY = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "mask_image": "mask"}


def blank(v: Any) -> bool:
    return v is None or v == "" or v == []


def units(args: Any, titles: dict[str, str], where: str = "alwayson_scripts.controlnet.args") -> list[Unit]:
    """The enabled units of an ``args`` list: non-dict entries and ``enabled: false`` units skipped
    before anything else is read (clients send one dict per slot, empty ones included); a missing
    ``enabled`` is true (the extension's default before 2024, which old clients rely on)."""
    if args is None:
        return []
    if not isinstance(args, list):
        raise ValueError(f"{where}: must be a list of units")
    out = []
    for i, raw in enumerate(args):
        if not isinstance(raw, dict) or not flag(raw.get("enabled"), True, f"{where}[{i}].enabled"):
            continue
        out.append(unit(raw, i, titles, f"{where}[{i}]"))
    return out


def unit(raw: dict, index: int, titles: dict[str, str], where: str) -> Unit:
    d = {k: v for k, v in raw.items() if v is not None}  # null = the default, as clients send it
    for old, new in LEGACY.items():
        if old in d:
            if not blank(d.get(new)) and not blank(d[old]) and d[new] != d[old]:
                raise ValueError(f"{where}: both {old!r} and {new!r} given; send one")
            v = d.pop(old)
            if blank(d.get(new)):
                d[new] = v
    image, mask = d.get("image"), d.get("mask")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") if blank(mask) else mask
    elif isinstance(image, (list, tuple)):
        if len(image) != 2 or isinstance(image[0], dict):
            raise ValueError(f"{where}.image: a list must be [image, mask]; one image per unit here")
        image, mask = image
    if not blank(image) and not isinstance(image, str):
        raise ValueError(f"{where}.image: expected a base64 string or data URL")
    if not blank(mask):
        raise ValueError(f"{where}.mask: unit masks are not supported here; for inpainting send the mask as "
                         "img2img's 'mask' (an inpaint unit uses the init image and that mask)")
    name = d.get("module") or "none"
    found = module(str(name))
    if found is None:
        raise ValueError(f"{where}.module: unknown module {name!r}; GET /controlnet/module_list lists this server's")
    label, m = found
    requested = d.get("model")
    if blank(requested) or requested == "None":
        raise ValueError(f"{where}.model: no ControlNet model selected; GET /controlnet/model_list lists them")
    model = match_model(str(requested), titles)
    if model is None:
        raise ValueError(f"{where}.model: unknown ControlNet {requested!r}; available: {', '.join(titles) or 'none'}")
    guess = flag(d.get("guessmode", d.get("guess_mode")), False, f"{where}.guessmode")
    mode = "control" if d.get("control_mode") is None and guess \
        else control_mode(d.get("control_mode", "Balanced"), f"{where}.control_mode")
    number = lambda key, default: _number(d.get(key, default), f"{where}.{key}")  # noqa: E731
    return Unit(index=index, model=model, label=label, annotator=m.annotator,
                params=annotator_params(m, d.get("processor_res", -1), d.get("threshold_a", -1),
                                        d.get("threshold_b", -1),
                                        flag(d.get("pixel_perfect"), False, f"{where}.pixel_perfect")),
                image=None if blank(image) else image,
                scale=number("weight", 1.0), start=number("guidance_start", 0.0), end=number("guidance_end", 1.0),
                mode=mode, resize_mode=resize_mode(d.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode"),
                save_detected_map=flag(d.get("save_detected_map"), True, f"{where}.save_detected_map"),
                type=union_type(d.get("union_control_type"), f"{where}.union_control_type"))


# The extension's union_control_type labels (and the ones its clients send) -> Union type names.
UNION_LABELS = {"openpose": "openpose", "depth": "depth", "hed/pidi/scribble/ted": "hed", "soft edge": "hed",
                "canny/lineart/anime lineart/mlsd": "canny", "hard edge": "canny", "normal map": "normal",
                "segment": "segment", "tile": "tile", "inpaint": "repaint", "unknown": ""}


def union_type(v: Any, where: str) -> str:
    """The extension's ``union_control_type`` label ("Canny/Lineart/Anime Lineart/MLSD", "Depth", "Normal Map",
    "Soft Edge", "Unknown", ...) as a Union type name; another name passes through (an alias or a type the
    net checks); "" for none. Ignored for a unit whose model is not a Union net, as in the extension."""
    if blank(v):
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{where}: expected a type label such as 'Depth' or 'Canny/Lineart/Anime Lineart/MLSD'")
    label = v.strip().lower()
    return UNION_LABELS.get(label, label.split("/")[0].strip().replace(" ", "_"))


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: expected a number, got {v!r}")
    return float(v)
