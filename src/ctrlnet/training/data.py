"""Training data: (target image, condition map, caption) triples from the formats users have.

- fill50k (the ControlNet tutorial): a ``prompt.json`` file of JSON lines
  ``{"source": condition path, "target": image path, "prompt": caption}``; ``data`` may name the
  folder (uses ``prompt.json``) or the file itself (e.g. ShapesWorld's ``prompt_canny.json``).
- imagefolder (diffusers convention): ``metadata.jsonl`` with ``file_name``,
  ``conditioning_image`` and ``text`` (column names configurable).
- Hugging Face ``datasets`` saved with ``save_to_disk`` (columns ``image``,
  ``conditioning_image``, ``text`` by default); needs the ``datasets`` extra.

Geometry, identical for image and condition: resize so the short side is ``resolution``
(bilinear, antialiased), crop a ``resolution`` square (center, or random offsets drawn by the
trainer), then optionally flip horizontally. Images become [-1, 1] tensors, conditions [0, 1]
(the original repository's ranges).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..images import ImageError, read_image, to_rgb, upright_size


class DataError(ValueError):
    """Bad training data: names the file or key, and what to do."""


@dataclass
class Record:
    image: Any  # path (str) or a PIL image (HF datasets)
    condition: Any  # path, PIL image, or None when an annotator makes it
    text: str
    where: str  # for messages: "prompt.json line 12"


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _need(row: dict, key: str, path: Path, n: int) -> Any:
    if key not in row:
        raise DataError(f"{path} line {n}: missing key {key!r} (keys: {sorted(row)}); "
                        "set image_column / conditioning_image_column / caption_column to match")
    return row[key]


def read_records(data: str | Path, image_column: str = "file_name", conditioning_image_column: str = "conditioning_image",
                 caption_column: str = "text", need_condition: bool = True) -> list[Record]:
    """The records of a data set in any supported format (see the module docstring)."""
    path = Path(data)
    if not path.exists():
        raise DataError(f"data {path}: no such file or folder")
    if path.is_dir() and (path / "prompt.json").is_file():
        path = path / "prompt.json"
    elif path.is_dir() and (path / "metadata.jsonl").is_file():
        path = path / "metadata.jsonl"
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        rows = _read_jsonl(path)
        root = path.parent
        fill50k = "target" in rows[0][1] and "prompt" in rows[0][1]
        records = []
        for n, row in rows:
            where = f"{path.name} line {n}"
            if fill50k:
                image, cond, text = row["target"], row.get("source"), row.get("prompt", "")
                if need_condition and cond is None:
                    raise DataError(f"{path} line {n}: no 'source' (condition) path; add it or set an annotator")
            else:
                image = _need(row, image_column, path, n)
                cond = _need(row, conditioning_image_column, path, n) if need_condition else None
                text = _need(row, caption_column, path, n)
            records.append(Record(str(root / image), str(root / cond) if cond else None, str(text), where))
        return records
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        return _hf_records(path, image_column, conditioning_image_column, caption_column, need_condition)
    raise DataError(f"data {data}: not a fill50k folder/file (prompt.json), an imagefolder (metadata.jsonl) "
                    "or a Hugging Face dataset saved with save_to_disk")


def _hf_records(path: Path, image_column: str, conditioning_image_column: str, caption_column: str,
                need_condition: bool) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset; install the extra: pip install 'ctrlnet[datasets]'") \
            from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if image_column == "file_name" and "file_name" not in ds.column_names:
        image_column = "image"
    columns = [image_column, caption_column] + ([conditioning_image_column] if need_condition else [])
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"{path}: no column {column!r} (columns: {ds.column_names}); set image_column / "
                            "conditioning_image_column / caption_column")
    return [Record(row[image_column], row[conditioning_image_column] if need_condition else None,
                   str(row[caption_column]), f"{path.name} row {i}") for i, row in enumerate(ds)]


def open_image(item: Any, where: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a path or a PIL image; a DataError naming the file otherwise."""
    try:
        if isinstance(item, Image.Image):
            return to_rgb(item, where)
        return read_image(item)
    except (ImageError, OSError, ValueError) as e:
        name = item if isinstance(item, str) else where
        raise DataError(f"{name} ({where}): cannot read image: {e}; fix or remove it, or set skip_bad: true") \
            from None


def resize_short_side(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR, reducing_gap=None))


def crop_box(shape: tuple[int, int], size: int, center: bool, u: tuple[float, float] = (0.5, 0.5)) -> tuple[int, int]:
    """Top-left of a ``size`` crop: the center, or at uniform fractions ``u`` of the free range."""
    h, w = shape
    if center:
        return (h - size) // 2, (w - size) // 2
    return int(u[0] * (h - size + 1)) if h > size else 0, int(u[1] * (w - size + 1)) if w > size else 0


class ControlDataset:
    """Records plus the geometry; returns uint8 arrays (image, condition) of ``resolution``²."""

    def __init__(self, records: list[Record], resolution: int, center_crop: bool = True,
                 annotator: Callable[[np.ndarray], np.ndarray] | None = None):
        self.records = records
        self.resolution = resolution
        self.center_crop = center_crop
        self.annotator = annotator

    def __len__(self) -> int:
        return len(self.records)

    def text(self, i: int) -> str:
        return self.records[i].text

    def image(self, i: int, flip: bool = False, u: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
        r = self.records[i]
        return self._geometry(open_image(r.image, r.where), flip, u)

    def condition(self, i: int, flip: bool = False, u: tuple[float, float] = (0.5, 0.5),
                  image: np.ndarray | None = None) -> np.ndarray:
        """The condition map; made by the annotator from the (already cropped) image when set."""
        r = self.records[i]
        if self.annotator is not None:
            return self.annotator(image if image is not None else self.image(i, flip, u))
        cond = open_image(r.condition, r.where)
        img_size = None
        if isinstance(r.image, str):
            try:
                img_size = upright_size(r.image)
            except OSError:
                pass
        if img_size is not None and cond.shape[:2] != img_size:
            raise DataError(f"{r.condition} ({r.where}): condition is {cond.shape[1]}x{cond.shape[0]} but its image "
                            f"is {img_size[1]}x{img_size[0]}; they must have the same size")
        return self._geometry(cond, flip, u)

    def _geometry(self, image: np.ndarray, flip: bool, u: tuple[float, float]) -> np.ndarray:
        image = resize_short_side(image, self.resolution)
        y, x = crop_box(image.shape[:2], self.resolution, self.center_crop, u)
        image = image[y:y + self.resolution, x:x + self.resolution]
        return np.ascontiguousarray(image[:, ::-1] if flip else image)


def image_to_tensor(images: list[np.ndarray]):
    """uint8 (H, W, 3) list -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def condition_to_tensor(conditions: list[np.ndarray]):
    """uint8 (H, W, 3) list -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack(conditions)).permute(0, 3, 1, 2).float() / 255
