"""``ctrlnet annotate``: an annotator over single images or whole folders, in parallel, resumable,
optionally writing a training-ready data set.

- Inputs: image files and folders (searched recursively for .png/.jpg/.jpeg/.webp/.bmp/.tif/.tiff).
- Output: ``OUT/<path relative to its input folder>.png``, upright (EXIF orientation applied), with
  the annotator and every parameter that made it (defaults included) as JSON in its
  ``ctrlnet-annotator`` PNG text chunk. An existing output newer than its input and made the same
  way is skipped (rerun the command to finish an interrupted batch); one made by another annotator
  or other parameters (or by a version that recorded none) is redone; ``force=True`` redoes all.
- Bad files (undecodable, empty, too many pixels) do not stop the batch: they are listed at the end.
- ``dataset="fill50k"`` writes ``OUT/prompt.json`` (``{"source", "target", "prompt"}``),
  ``dataset="imagefolder"`` writes ``OUT/metadata.jsonl`` (``file_name``, ``conditioning_image``,
  ``text``); paths are relative to OUT. Captions come from ``.txt`` sidecars (``a.png`` ->
  ``a.txt``) or a ``captions`` file: CSV with columns ``file_name,text`` or JSON lines with those
  keys (``file_name`` relative to its input folder, or a bare file name).
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..images import ImageError, load_image, png_bytes, png_text
from . import BATCH, BATCH_SIZE, canonical, get_annotator, require, resolved_params
from .weights import WeightsError, WeightsNotFound
from . import dwpose
from .pose import detect_people, draw_openpose, openpose_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
RECORD_KEY = "ctrlnet-annotator"  # the PNG text chunk saying what made a map


@dataclass
class Job:
    source: Path
    rel: Path  # output path relative to OUT, ".png"


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already done, the same way
    replaced: list[Path] = field(default_factory=list)  # written over an output made another way (or forced)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    dataset: Path | None = None


def collect(inputs: list[str | Path]) -> list[Job]:
    jobs = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            jobs += [Job(p, p.relative_to(item).with_suffix(".png")) for p in files]
        elif item.is_file():
            jobs.append(Job(item, Path(item.name).with_suffix(".png")))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    seen: dict[Path, Path] = {}
    for j in jobs:
        if j.rel in seen:
            raise ValueError(f"{j.source} and {seen[j.rel]} would both be written to {j.rel}; annotate them separately")
        seen[j.rel] = j.source
    return jobs


def record(name: str, params: dict) -> str:
    """What makes a map, as the JSON kept in its ``RECORD_KEY`` text chunk: the annotator and all
    its parameters, defaults included (``low=100`` and no ``low`` make the same canny maps)."""
    return json.dumps({"annotator": name, "params": resolved_params(name, params)}, sort_keys=True)


def _keypoints(name: str, params: dict) -> bool:
    """Whether the pose keypoints JSON is written beside the map (not with a resolution given,
    which only the map honours)."""
    return name in ("openpose", "openpose_full", "dw_openpose", "dw_openpose_full") and \
        not {"detect_resolution", "image_resolution"} & set(params)


def _done(target: Path, source: Path, name: str, params: dict, made_by: str) -> bool:
    """Whether ``target`` is a finished output of ``source`` made by this annotator and parameters."""
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        return False
    if _keypoints(name, params) and not target.with_suffix(".json").is_file():
        return False
    return png_text(target).get(RECORD_KEY) == made_by


def _write(target: Path, out, keys, made_by: str) -> str:
    """``out`` (and the keypoints ``keys``, when not None) written atomically to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if keys is not None:  # the keypoints first: a map under its final name means both are there
        tmp = target.with_name(target.stem + ".json.tmp")
        tmp.write_text(json.dumps(keys))
        os.replace(tmp, target.with_suffix(".json"))
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(png_bytes(out, text={RECORD_KEY: made_by}))
    os.replace(tmp, target)  # never a half-written map under the final name
    return str(target)


def _run_one(args) -> tuple[str, str | None]:
    """Worker: annotate one file. Returns (output path, error or None)."""
    name, params, source, target = args
    try:
        image = load_image(source)  # upright: EXIF orientation applied
        annotator = get_annotator(name, **params)  # unknown names / parameters fail here
        keys = None
        if _keypoints(name, params):
            # one detection for both the map and the keypoints, in OpenPose's JSON layout
            full, values = name == "openpose_full", resolved_params(name, params)
            people = detect_people(image, hands=values.get("hands", full), face=values.get("face", full),
                                   min_confidence=values["min_confidence"])
            out = draw_openpose(image.shape[0], image.shape[1], people)
            keys = openpose_json(people, image.shape[0], image.shape[1])
        else:
            out = annotator(image)
        return _write(Path(target), out, keys, record(name, params)), None
    except (ImageError, ValueError, OSError) as e:
        return str(target), str(e)


def _run_batched(name: str, params: dict, chunk: list[tuple]) -> list[tuple[str, str | None]]:
    """A neural detector over several files in this process, several images per forward pass
    (``BATCH``; the model loads once). A file that cannot be read fails alone; a chunk whose batch
    fails is redone one file at a time, so one bad image costs only itself."""
    results: dict[int, tuple[str, str | None]] = {}
    images = {}
    for k, (_, _, source, target) in enumerate(chunk):
        try:
            images[k] = load_image(source)
        except (ImageError, ValueError, OSError) as e:
            results[k] = (str(target), str(e))
    try:
        batch = [images[k] for k in images]
        keys: list = [None] * len(batch)
        if _keypoints(name, params):  # DWPose: one detection for the maps and the keypoints JSON
            values, full = resolved_params(name, params), name == "dw_openpose_full"
            people = dwpose.detect_people_many(batch, values["model"], values["min_person_score"],
                                               values["min_confidence"], hands=full, face=full, name=name)
            maps = [dwpose.draw(i.shape[0], i.shape[1], p) for i, p in zip(batch, people)]
            keys = [openpose_json(p, i.shape[0], i.shape[1]) for i, p in zip(batch, people)]
        else:
            maps = get_annotator(name, **params)(batch)
        for k, out, key in zip(images, maps, keys):
            results[k] = (_write(Path(chunk[k][3]), out, key, record(name, params)), None)
    except (WeightsError, WeightsNotFound):
        raise  # the detector's file, not an image: one error for the batch, not one reload per file
    except (ValueError, OSError):
        for k in images:
            results[k] = _run_one(chunk[k])
    return [results[k] for k in range(len(chunk))]


def read_captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such captions file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"file_name", "text"} <= set(rows[0]):
            raise ValueError(f"{path}: a captions CSV needs columns file_name,text (found {list(rows[0])})")
    else:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e})") from None
    return {str(r["file_name"]): str(r["text"]) for r in rows}


def caption_for(job: Job, captions: dict[str, str] | None) -> str | None:
    if captions is not None:
        for key in (job.rel.with_suffix(job.source.suffix).as_posix(), job.source.name, str(job.source)):
            if key in captions:
                return captions[key]
        return None
    sidecar = job.source.with_suffix(".txt")
    return sidecar.read_text().strip() if sidecar.is_file() else None


def annotate(name: str, inputs: list[str | Path], out: str | Path, params: dict | None = None, workers: int = 1,
             dataset: str = "", captions: str | Path | None = None, progress: bool = True,
             force: bool = False) -> Report:
    """Annotate every input image into ``out``; see the module docstring. ``force``: redo outputs
    that are already done."""
    params = params or {}
    name = canonical(name)
    made_by = record(name, params)  # unknown annotator / parameters, values out of range: fail before any work
    require(name, params)  # its package and weights: one clear error, not one per file
    if dataset not in ("", "fill50k", "imagefolder"):
        raise ValueError(f"dataset must be fill50k or imagefolder, got {dataset!r}")
    out = Path(out)
    jobs = collect(inputs)
    caption_map = read_captions(Path(captions)) if captions else None
    report = Report()
    todo = []
    replacing = set()
    for j in jobs:
        target = out / j.rel
        if not force and _done(target, j.source, name, params, made_by):
            report.skipped.append(target)
        else:
            todo.append(j)
            if target.is_file():
                replacing.add(target)
    bar = tqdm(total=len(todo), desc=f"annotate {name}", unit="img", disable=not progress)
    args = [(name, params, str(j.source), str(out / j.rel)) for j in todo]
    results = []
    try:
        if name in BATCH:  # a neural detector: batched in this process (its torch threads use the cores)
            for start in range(0, len(args), BATCH_SIZE):
                results += _run_batched(name, params, args[start:start + BATCH_SIZE])
                bar.update(len(args[start:start + BATCH_SIZE]))
        elif workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for r in pool.map(_run_one, args, chunksize=max(1, len(args) // (workers * 8))):
                    results.append(r)
                    bar.update(1)
        else:
            for a in args:
                results.append(_run_one(a))
                bar.update(1)
    finally:
        bar.close()  # also when a detector's weights stop the batch
    for j, (target, error) in zip(todo, results):
        if error:
            report.failed.append((j.source, error))
        else:
            report.written.append(Path(target))
            if Path(target) in replacing:
                report.replaced.append(Path(target))
    if dataset:
        failed = {s for s, _ in report.failed}
        rows = []
        for j in jobs:
            if j.source in failed:
                continue
            cond = (out / j.rel).relative_to(out).as_posix()
            image = os.path.relpath(j.source.resolve(), out.resolve())
            text = caption_for(j, caption_map)
            if text is None:
                report.failed.append((j.source, "no caption (.txt sidecar or captions file); left out of the data set"))
                continue
            rows.append({"source": cond, "target": image, "prompt": text} if dataset == "fill50k"
                        else {"file_name": image, "conditioning_image": cond, "text": text})
        path = out / ("prompt.json" if dataset == "fill50k" else "metadata.jsonl")
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
        report.dataset = path
    return report
