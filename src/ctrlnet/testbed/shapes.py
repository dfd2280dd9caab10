"""ShapesWorld: deterministic synthetic images of flat-coloured shapes with exact metadata.

Each sample: one to three shapes (circle, square, triangle) in named colours on a named
background colour, a caption ("a red circle and a blue square on a light gray background"),
the target image, three condition maps (Canny edges of the target, a segmentation map in a
fixed class palette, a fill50k-style white outline on black) and a metadata record of every
shape's class, colour and geometry, so that controllability is scored exactly.

Sample i depends only on (seed, i), so the output does not depend on the number of worker
processes. ``fill50k=True`` reproduces the fill50k tutorial recipe: one circle, outline
condition, prompt "<colour> circle with <colour> background".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

# Named colours, chosen to be far apart in RGB so that colour accuracy is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
    "blue": (30, 80, 220), "purple": (130, 50, 180), "pink": (245, 130, 190), "brown": (120, 70, 30),
    "black": (20, 20, 20), "white": (245, 245, 245), "cyan": (40, 200, 220), "magenta": (220, 40, 200),
    "navy": (20, 30, 110), "olive": (120, 130, 30), "light gray": (190, 190, 190), "teal": (20, 120, 120),
}
SHAPES = ("circle", "square", "triangle")
# Segmentation classes: background + one per shape, in a fixed palette (ADE20K-style RGB classes).
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0), "circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
}
CONDITIONS = ("canny", "segmentation", "outline")
CANNY_THRESHOLDS = (100, 200)  # the original apps' defaults


@dataclass
class Shape:
    shape: str  # circle / square / triangle
    colour: str
    rgb: tuple[int, int, int]
    cx: float  # centre, pixels
    cy: float
    size: float  # circle radius; half the side of a square; circumradius of an upright triangle
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (inclusive-exclusive)
    area: int = 0  # visible pixels in the rendered mask


@dataclass
class Sample:
    index: int
    prompt: str
    background: str
    background_rgb: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)


def with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def caption(shapes: list[Shape], background: str, fill50k: bool = False) -> str:
    if fill50k:
        return f"{shapes[0].colour} {shapes[0].shape} with {background} background"
    parts = [with_article(f"{s.colour} {s.shape}") for s in shapes]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{objects} on {with_article(background)} background"


def _polygon(s: Shape) -> np.ndarray:
    if s.shape == "square":
        d = s.size
        pts = [(s.cx - d, s.cy - d), (s.cx + d, s.cy - d), (s.cx + d, s.cy + d), (s.cx - d, s.cy + d)]
    elif s.shape == "triangle":  # upright equilateral
        pts = [(s.cx + s.size * np.cos(a), s.cy - s.size * np.sin(a)) for a in np.deg2rad([90, 210, 330])]
    else:
        raise ValueError(s.shape)
    return np.round(np.array(pts) * 16).astype(np.int32)  # 4 fractional bits for cv2's shift


def draw(mask_or_image: np.ndarray, s: Shape, colour, thickness: int = -1) -> None:
    """Draw ``s`` filled (thickness -1) or as an outline, with 1/16-pixel precision."""
    if s.shape == "circle":
        cv2.circle(mask_or_image, (round(s.cx * 16), round(s.cy * 16)), round(s.size * 16), colour, thickness,
                   lineType=cv2.LINE_8, shift=4)
    elif thickness < 0:
        cv2.fillPoly(mask_or_image, [_polygon(s)], colour, lineType=cv2.LINE_8, shift=4)
    else:
        cv2.polylines(mask_or_image, [_polygon(s)], True, colour, thickness, lineType=cv2.LINE_8, shift=4)


def _extent(kind: str, size: float) -> float:
    """Radius of the circle around a shape of this kind and size."""
    return size * np.sqrt(2) if kind == "square" else size


def sample_layout(index: int, seed: int, size: int, fill50k: bool = False) -> Sample:
    """The shapes, colours and caption of sample ``index``, from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    names = list(PALETTE)
    background = names[rng.integers(len(names))]
    n = 1 if fill50k else int(rng.integers(1, 4))
    kinds = ["circle"] * n if fill50k else [SHAPES[rng.integers(len(SHAPES))] for _ in range(n)]
    shapes: list[Shape] = []
    for kind in kinds:
        for _ in range(100):  # rejection sampling: shapes do not overlap, stay inside the frame
            r = rng.uniform(0.12, 0.3 if n == 1 else 0.2) * size
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            # Circumscribed circles 3 px apart: shapes never overlap or touch.
            if all(np.hypot(cx - o.cx, cy - o.cy) > _extent(kind, r) + _extent(o.shape, o.size) + 3
                   for o in shapes):
                break
        else:
            continue  # no room left: fewer shapes
        colour = names[rng.integers(len(names))]
        while colour == background:
            colour = names[rng.integers(len(names))]
        shapes.append(Shape(kind, colour, PALETTE[colour], float(cx), float(cy), float(r)))
    return Sample(index, caption(shapes, background, fill50k), background, PALETTE[background], shapes)


def render(sample: Sample, size: int) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 RGB target and condition maps; fills in each shape's bbox and area."""
    target = np.empty((size, size, 3), np.uint8)
    target[:] = sample.background_rgb
    seg = np.zeros_like(target)
    outline = np.zeros_like(target)
    for s in sample.shapes:
        mask = np.zeros((size, size), np.uint8)
        draw(mask, s, 255)
        ys, xs = np.nonzero(mask)
        s.bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        s.area = int(len(xs))
        target[mask > 0] = s.rgb
        seg[mask > 0] = SEG_PALETTE[s.shape]
        draw(outline, s, (255, 255, 255), thickness=max(1, size // 64))
    edges = cv2.Canny(target, *CANNY_THRESHOLDS)
    return {"target": target, "canny": np.repeat(edges[:, :, None], 3, axis=2), "segmentation": seg,
            "outline": outline}


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def _make_one(args) -> dict:
    index, seed, size, fill50k, out = args
    sample = sample_layout(index, seed, size, fill50k)
    images = render(sample, size)
    for name, image in images.items():
        _write_png(Path(out) / name / f"{index}.png", image)
    record = asdict(sample)
    return record


def generate(out: str | Path, n: int, seed: int = 0, size: int = 128, fill50k: bool = False,
             workers: int | None = None, progress: bool = True) -> Path:
    """Write ``n`` samples to ``out`` (see module docstring); returns ``out``.

    Layout: ``target/``, ``canny/``, ``segmentation/``, ``outline/`` (``{i}.png``);
    ``prompt.json`` (fill50k format, source = outline), ``prompt_canny.json`` and
    ``prompt_segmentation.json`` (the same with another source); ``metadata.jsonl``
    (diffusers imagefolder convention: ``file_name``, ``conditioning_image`` = outline,
    ``text``, plus each condition's path and the shapes); ``shapes.json`` (the settings).
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {size}")
    out = Path(out)
    for folder in ("target", *CONDITIONS):
        (out / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(i, seed, size, fill50k, str(out)) for i in range(n)]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    with Pool(workers) if workers > 1 else _Serial() as pool:
        records = list(tqdm(pool.imap(_make_one, jobs, chunksize=256), total=n, disable=not progress,
                            desc="ShapesWorld", unit="img"))
    prompt_files = {"outline": "prompt.json", "canny": "prompt_canny.json",
                    "segmentation": "prompt_segmentation.json"}
    for condition, name in prompt_files.items():
        lines = [json.dumps({"source": f"{condition}/{r['index']}.png", "target": f"target/{r['index']}.png",
                             "prompt": r["prompt"]}) for r in records]
        _atomic_write(out / name, "\n".join(lines) + "\n")
    meta = [json.dumps({"file_name": f"target/{r['index']}.png", "conditioning_image": f"outline/{r['index']}.png",
                        "text": r["prompt"], **{c: f"{c}/{r['index']}.png" for c in CONDITIONS},
                        "background": r["background"], "background_rgb": r["background_rgb"],
                        "shapes": r["shapes"]}) for r in records]
    _atomic_write(out / "metadata.jsonl", "\n".join(meta) + "\n")
    _atomic_write(out / "shapes.json", json.dumps({"n": n, "seed": seed, "size": size, "fill50k": fill50k,
                                                   "palette": PALETTE, "segmentation_palette": SEG_PALETTE,
                                                   "canny_thresholds": CANNY_THRESHOLDS}, indent=2) + "\n")
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class _Serial:
    """Pool stand-in for one worker (no process start-up cost for small runs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)
