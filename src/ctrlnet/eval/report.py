"""``ctrlnet eval``: does a ControlNet follow its condition, did the base keep its knowledge, and
when did training converge (the ControlNet++ protocol: re-extract the condition from the generated
image and compare it with the input condition).

For the first ``n`` samples of a data set (fill50k ``prompt.json``, ``metadata.jsonl``, or a
ShapesWorld folder), ``seeds`` images each are generated from (condition, caption), then scored:

- re-extraction: the control's annotator runs on the generated image and is compared with the
  input condition: canny / scribble -> edge F1 (1-pixel tolerance, ``eval.control.edge_f1``);
  softedge / lineart / others -> SSIM; seg_colour_clusters -> region mIoU; ADE20K segmenters ->
  class mIoU; depth -> RMSE (0-255); normals -> mean angle (degrees);
- ShapesWorld, exactly from the metadata: foreground mask IoU against the target, per-object mask
  IoU, colour accuracy against the prompt (the base kept its knowledge), shape-class accuracy;
- the same prompts and seeds without control: the baseline that shows what control adds.

Several ``--control`` units act together (residuals summed). ``split_objects``: on ShapesWorld
samples with two or more objects, control k sees its condition only around object k (e.g. canny
for one object, segmentation for another), and each object is scored on its own. A model given as
a glob (``run/checkpoints/step-*``) is evaluated per checkpoint: controllability against the
training step. Output: ``report.json`` (every number, the config, versions, seeds), ``report.md``,
``samples.png`` (condition | generated | re-extracted | without control), ``bars.png``,
``curves.png`` (with several checkpoints).
"""

from __future__ import annotations

import glob
import json
import platform
import re
import time
from dataclasses import replace
from pathlib import Path

import cv2
import diffusers
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from ..annotators import ALIASES, get_annotator, require
from ..images import load_image
from ..pipeline import Control, Pipeline, Region
from ..testbed.shapes import with_article
from ..training.data import read_records
from ..version import __version__

from .control import class_miou, depth_rmse, edge_f1, foreground_iou, normal_angular_error, pose_pck, region_miou, ssim
from .shapes import colour_presence, score_objects, true_object_masks

# binary line maps: edge F1 (1 px tolerance); soft edges / line art (grey levels): SSIM
EDGE_ANNOTATORS = {"canny", "scribble", "threshold", "scribble_hed", "scribble_pidinet", "mlsd", "lines_lsd"}
POSE_ANNOTATORS = {"openpose", "openpose_full", "dw_openpose", "dw_openpose_full"}


def report_control(c: Control) -> dict:
    """A control as report.json records it (``condition``: the metadata column, or null)."""
    return {"model": str(c.model), "annotator": c.annotator, "annotator_params": dict(c.annotator_params),
            "condition": c.image, "scale": c.scale, "start": c.start, "end": c.end, "mode": c.mode,
            "resize_mode": c.resize_mode, "every": c.every}


def reextraction_metric(annotator: str):
    """(name, fn(re_extracted, input_condition) -> float) for an annotator (ControlNet++'s metrics:
    edge F1, SSIM, depth RMSE, class mIoU; plus normal angular error, region mIoU, pose PCK)."""
    annotator = ALIASES.get(annotator, annotator)
    if annotator in EDGE_ANNOTATORS:
        return "edge_f1", lambda a, b: edge_f1(a, b, tolerance=1)
    if annotator == "seg_colour_clusters":
        return "region_miou", region_miou
    if annotator.startswith("seg_"):
        return "class_miou", class_miou
    if annotator.startswith("depth_"):
        return "depth_rmse", depth_rmse
    if annotator.startswith("normal_"):
        return "normal_angle", normal_angular_error
    if annotator in POSE_ANNOTATORS:
        return "pose_pck", pose_pck
    return "ssim", ssim


def load_samples(data: str | Path, n: int) -> list[dict]:
    """[{"target", "prompt", "condition" (the data's own), "columns": metadata row or {}, "root"}]."""
    path = Path(data)
    records = read_records(path, need_condition=False)[:n]
    folder = path if path.is_dir() else path.parent
    meta_path = folder / "metadata.jsonl"
    meta = [json.loads(l) for l in meta_path.read_text().splitlines() if l.strip()][:n] if meta_path.is_file() else []
    if meta and [folder / m["file_name"] for m in meta] != [Path(r.image) for r in records]:
        meta = []  # metadata of other images: not usable for exact scores
    samples = []
    for i, r in enumerate(records):
        samples.append({"target": load_image(r.image), "prompt": r.text, "condition": r.condition,
                        "columns": meta[i] if meta else {}, "root": folder})
    return samples


def condition_for(control: Control, sample: dict) -> np.ndarray:
    """A control's condition for a sample: its annotator run on the target; else ``image`` names the
    metadata column holding the condition's path (ShapesWorld: ``canny``, ``segmentation``,
    ``outline``); neither: the data's own condition column."""
    if control.annotator:
        return get_annotator(control.annotator, **control.annotator_params)(sample["target"])
    if control.image is not None:
        if not isinstance(control.image, str) or control.image not in sample["columns"]:
            raise ValueError(f"eval: the data has no metadata column {control.image!r} for control "
                             f"{control.model}")
        return load_image(sample["root"] / sample["columns"][control.image])
    if not sample["condition"]:
        raise ValueError(f"eval: control {control.model}: the data has no condition column; set annotator= "
                         "or condition=")
    return load_image(sample["condition"])


def object_regions(record: dict, size: int, dilate: int = 0) -> list:
    """ShapesWorld: one ``Region`` per object, its own one-object prompt inside its true mask
    (optionally dilated by ``dilate`` px; measured on 200 held-out samples with nano-canny: the exact
    mask gave mask IoU 0.853, dilated 2 px 0.848, 4 px 0.844; colour accuracy 96.7-97.3% for all three)."""
    if "shapes" not in record:
        raise ValueError("eval --regions: needs ShapesWorld metadata (a 'shapes' column)")
    masks = [m.astype(np.uint8) * 255 for m in true_object_masks(record, size)]
    if dilate:
        masks = [cv2.dilate(m, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)) for m in masks]
    return [Region(f"{with_article(s['colour'] + ' ' + s['shape'])} on {with_article(record['background'])} background", m)
            for s, m in zip(record["shapes"], masks)]


def expand_models(controls: list[Control]) -> list[tuple[int | None, list[Control]]]:
    """[(training step or None, controls)]: one entry, or one per checkpoint of a globbed model."""
    globbed = [i for i, c in enumerate(controls) if any(ch in c.model for ch in "*?[")]
    if not globbed:
        return [(None, controls)]
    if len(globbed) > 1:
        raise ValueError("eval: only one --control may name several checkpoints (a glob)")
    i = globbed[0]
    paths = sorted(glob.glob(controls[i].model))
    if not paths:
        raise ValueError(f"eval: {controls[i].model} matches nothing")
    step = lambda p: int(m.group(1)) if (m := re.search(r"(\d+)\D*$", Path(p).name)) else None
    out = []
    for p in sorted(paths, key=lambda p: (step(p) is None, step(p) or 0)):
        cs = list(controls)
        cs[i] = replace(controls[i], model=p)
        out.append((step(p), cs))
    return out


def score_image(image: np.ndarray, sample: dict, controls: list[Control], conditions: list[np.ndarray],
                split_objects: bool) -> dict[str, float]:
    scores = {}
    for k, (c, cond) in enumerate(zip(controls, conditions)):
        if c.annotator:
            name, fn = reextraction_metric(c.annotator)
            scores[f"control{k}_{name}"] = fn(get_annotator(c.annotator, **c.annotator_params)(image), cond)
    meta = sample["columns"]
    if meta.get("shapes"):
        scores["mask_iou"] = foreground_iou(image, sample["target"])
        objects = score_objects(image, meta)
        scores["object_iou"] = float(np.mean([o["iou"] for o in objects]))
        scores["colour_accuracy"] = float(np.mean([o["colour_ok"] for o in objects]))
        # by the number of objects in the prompt: attribute binding gets harder with more of them
        scores[f"colour_accuracy_{len(objects)}obj"] = scores["colour_accuracy"]
        scores["colour_presence"] = float(np.mean(colour_presence(image, meta)))
        scores["shape_accuracy"] = float(np.mean([o["shape_ok"] for o in objects]))
        if split_objects:
            for k in range(len(controls)):
                scores[f"object{k}_iou"] = objects[k]["iou"]
                scores[f"object{k}_colour_ok"] = float(objects[k]["colour_ok"])
    return scores


def evaluate(base: str, controls: list[Control], data: str | Path, out: str | Path, n: int = 200,
             seeds: int = 1, steps: int = 20, guidance: float | None = None, guidance_rescale: float | None = None,
             scheduler: str = "ddim", dtype: str = "fp32", baseline: bool = True, split_objects: bool = False,
             progress: bool = True, batch: int = 16, regions: bool = False, compile: bool | dict = False,
             tokenizer: str | Path | None = None, backend: str = "torch") -> dict:
    """Generate, score and write the report; returns the report dict (also ``out/report.json``).
    ``controls``: each unit's model, annotator (with its parameters), scale, start/end and mode act as
    in generation; its condition comes from ``condition_for`` (``image``: a metadata column or None).
    ``compile``: ``Pipeline(compile=...)`` (torch.compile of the UNet and ControlNets; with a checkpoint
    glob, each checkpoint's net compiles anew). ``backend``: ``Pipeline(backend=...)``."""
    if not controls:
        raise ValueError("eval: give at least one --control")
    for c in controls:  # a detector's weights or package: before the base loads
        if c.annotator:
            require(c.annotator, c.annotator_params)
    for c in controls:
        if c.multi:
            raise ValueError(f"eval: control {c.model}: several (image, type) pairs in one unit are not evaluated "
                             "(each unit is scored against its one condition); give one type= per --control")
        if not isinstance(c.model, (str, Path)):
            raise ValueError(f"eval: control model {type(c.model).__name__}: give a name or path (the report "
                             "records it, and a glob over checkpoints is expanded)")
    out = Path(out)
    samples = load_samples(data, n if not split_objects else 10 * n)
    if split_objects:
        samples = [s for s in samples if len(s["columns"].get("shapes", [])) >= len(controls)][:n]
        if not samples:
            raise ValueError(f"eval: split_objects needs ShapesWorld samples with >= {len(controls)} objects")
    variants = expand_models(controls)
    pipe = Pipeline.from_pretrained(base, dtype=dtype, compile=compile, tokenizer=tokenizer, backend=backend)
    size = samples[0]["target"].shape[0]
    conditions = []  # per sample: one map per control
    for s in samples:
        maps = [condition_for(c, s) for c in controls]
        if split_objects:  # control k acts around object k only
            masks = true_object_masks(s["columns"], maps[0].shape[0])
            maps = [m * (cv2.dilate(masks[k].astype(np.uint8), np.ones((7, 7), np.uint8))[..., None] > 0)
                    for k, m in enumerate(maps)]
        conditions.append([m.astype(np.uint8) for m in maps])
    region_lists = [object_regions(s["columns"], size) for s in samples] if regions else None
    settings = dict(steps=steps, guidance=guidance, guidance_rescale=guidance_rescale, scheduler=scheduler,
                    width=size, height=size)

    def run(units: list[Control] | None, label: str):
        images, scores = [], []
        bar = tqdm(total=len(samples), desc=label, disable=not progress, unit="sample")
        for s0 in range(0, len(samples), batch):  # one call per batch; image j of sample i: seed i * seeds + j
            chunk = range(s0, min(s0 + batch, len(samples)))
            ctrl = [replace(u, image=[conditions[i][k] for i in chunk], annotator="", annotator_params={})
                    for k, u in enumerate(units)] if units else []
            res = pipe([samples[i]["prompt"] for i in chunk], controls=ctrl, seed=s0 * seeds, num_images=seeds,
                       regions=[region_lists[i] for i in chunk] if region_lists and units else (), **settings)
            for b, img in enumerate(res.images):
                i = s0 + b // seeds
                a = np.asarray(img)
                images.append(a)
                scores.append(score_image(a, samples[i], controls, conditions[i], split_objects))
            bar.update(len(chunk))
        bar.close()
        keys = list(dict.fromkeys(k for sc in scores for k in sc))  # some keys only on some samples
        return images, {k: round(float(np.mean([sc[k] for sc in scores if k in sc])), 4) for k in sorted(keys)}

    start = time.perf_counter()
    results = []
    last_images = None
    for step, units in variants:
        images, metrics = run(units, f"eval {Path(units[0].model).name}")
        results.append({"models": [u.model for u in units], "step": step, "metrics": metrics})
        last_images = images
        for u in units:  # free the nets of this checkpoint before the next
            pipe.remove_controlnet(str(u.model))
    base_images, base_metrics = run(None, "eval without control") if baseline else (None, None)
    seconds = time.perf_counter() - start
    report = {
        "base": str(base), "data": str(data), "n": len(samples), "seeds": seeds, "images_per_config": len(last_images),
        "controls": [report_control(c) for c in controls], "split_objects": split_objects,
        "regions": regions, "settings": {**settings, "dtype": dtype, "compile": compile, "backend": backend,
                                         "seed_rule": "sample i, image j: seed i * seeds + j"},
        "results": results, "baseline": base_metrics, "seconds": round(seconds, 1),
        "versions": {"ctrlnet": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "metric_notes": {"edge_f1": "binary edges, a pixel matches within 1 px (Chebyshev)",
                         "pose_pck": "body keypoints read back from both OpenPose maps; correct within 0.1 x the "
                                     "longer side",
                         "ssim": "grey, Gaussian window 1.5", "region_miou": "each true region's best-matching region",
                         "class_miou": "ADE20K classes read back through the palette, mean IoU over classes present",
                         "depth_rmse": "0-255 depth maps (near = white), lower is better",
                         "normal_angle": "mean angle between decoded normals in degrees, lower is better",
                         "mask_iou": "foreground (far from the border colour) vs the target's",
                         "object_iou": "per ShapesWorld object, from metadata geometry",
                         "colour_accuracy": "object colour (median inside the true mask) vs the prompt's; "
                                            "colour_accuracy_Nobj: samples with N objects only",
                         "colour_presence": "location-free: a region of each prompted colour anywhere (>= 1/3 of "
                                            "the object's area); comparable with and without control",
                         "shape_accuracy": "cleaned-mask geometry"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=repr) + "\n")  # repr: a compile backend
    write_markdown(report, out / "report.md")
    write_figures(report, samples, conditions, last_images, base_images, controls, seeds, out)
    return report


def write_markdown(report: dict, path: Path) -> None:
    keys = list(report["results"][-1]["metrics"])
    lines = [f"# ctrlnet eval: {report['data']} ({report['n']} samples x {report['seeds']} seeds)", "",
             f"Base `{report['base']}`; controls: " + ", ".join(
                 f"`{c['model']}`" + (f" (annotator {c['annotator']})" if c["annotator"] else "")
                 for c in report["controls"]), "",
             "| model | step | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in report["results"]:
        lines.append(f"| {', '.join(Path(m).name for m in r['models'])} | {r['step'] if r['step'] is not None else '-'} | "
                     + " | ".join(f"{r['metrics'].get(k, float('nan')):.3f}" for k in keys) + " |")
    if report["baseline"]:
        lines.append("| without control | - | " + " | ".join(
            f"{report['baseline'][k]:.3f}" if k in report["baseline"] else "-" for k in keys) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_figures(report, samples, conditions, images, base_images, controls, seeds, out: Path) -> None:
    rows = []
    for i in range(min(6, len(samples))):
        g = images[i * seeds]
        cells = list(conditions[i]) + [g]
        cells += [get_annotator(c.annotator, **c.annotator_params)(g) for c in controls if c.annotator]
        if base_images:
            cells.append(base_images[i * seeds])
        rows.append(np.concatenate(cells, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "samples.png")
    final = report["results"][-1]["metrics"]
    keys = list(final)
    fig = Figure(figsize=(max(6, 1.2 * len(keys)), 3.6))  # no pyplot: no global backend state
    ax = fig.subplots()
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [final[k] for k in keys], 0.4, label="with control")
    if report["baseline"]:
        ax.bar(x + 0.2, [report["baseline"].get(k, 0) for k in keys], 0.4, label="without control")
    ax.set_xticks(x, keys, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bars.png", dpi=100)
    steps = [r for r in report["results"] if r["step"] is not None]
    if len(steps) > 1:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.subplots()
        for k in keys:
            ax.plot([r["step"] for r in steps], [r["metrics"][k] for r in steps], marker="o", label=k)
        ax.set(xlabel="training step", ylabel="score", ylim=(0, 1), title="controllability against training step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
    