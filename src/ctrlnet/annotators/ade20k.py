"""Semantic segmentation into the ADE20K palette the seg ControlNets read (``control_v11p_sd15_seg``,
``control_sd15_seg``): every pixel painted with the colour of one of ADE20K's 150 classes.

The palette and class order are mmsegmentation's ``ADE20KDataset.PALETTE`` / ``CLASSES``, the ones
ControlNet v1.1's ``annotator/uniformer`` (``show_result_pyplot(..., get_palette('ade'), opacity=1)``)
and the A1111 extension's ``seg_ufade20k`` / ``seg_ofade20k`` paint with (OneFormer's
``ADE20K_150_CATEGORIES`` colours are the same list). ``colourise`` paints a class map,
``classes_of`` reads one back (nearest palette colour; -1 for colours far from every class), so eval
can score a map class by class.

Three segmenters, from transformers model folders (nothing is downloaded; ``weights.find``):

- ``seg_ofade20k`` (A1111's name): OneFormer, ``shi-labs/oneformer_ade20k_swin_tiny`` or
  ``..._swin_large`` (``OneFormerForUniversalSegmentation``), run with the task "semantic". A1111
  runs the original detectron2 Swin-L checkpoint (``250_16_swin_l_oneformer_ade20k_160k.pth``); the
  transformers port is the same network. Its processor's pieces are rebuilt offline: the task token
  ("the task is semantic", CLIP BPE, padded to ``task_seq_len`` with 0, as ``OneFormerProcessor``
  makes it) from the folder's tokenizer (or the CLIP BPE shipped with ctrlnet: the same OpenAI BPE),
  and the image processor without ``class_info_file`` (that class list is fetched from the hub and
  only serves training and instance/panoptic post-processing).
- ``seg_upernet_ade20k``: UperNet, ``openmmlab/upernet-convnext-small`` (tiny/base/large/xlarge,
  ``openmmlab/upernet-swin-*``; ``UperNetForSemanticSegmentation``) - the family of ControlNet's
  own UniFormer-UperNet annotator (``upernet_global_small.pth``, which needs mmcv and is not here).
- ``seg_segformer_ade20k``: SegFormer, ``nvidia/segformer-b0-finetuned-ade-512-512`` ... b5
  (``SegformerForSemanticSegmentation``).

Pre-processing is the folder's own image processor (the PIL backend: the torchvision one needs
torchvision): SegFormer / UperNet resize to 512 x 512, OneFormer's shortest edge to 512 (longest at
most 2048); ImageNet mean / std. Post-processing equals the processors'
``post_process_semantic_segmentation``: class scores (logits; for OneFormer the per-query class
probabilities without the null class times the masks' sigmoids, summed over queries) upsampled
bilinearly (align_corners=False) to the input size, argmax over the 150 classes, painted with the
palette. (A1111's OneFormer draws each region as a matplotlib polygon with off-white anti-aliased
edges; here every pixel is exactly one palette colour.) A folder whose ``id2label`` is not ADE20K's
150 classes (COCO, Cityscapes, ImageNet, ...) is refused: its class ids would paint wrong colours.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import logging as hf_logging
from transformers import (ConvNextConfig, OneFormerConfig, OneFormerModel, SegformerConfig,
                          SegformerForSemanticSegmentation, SwinConfig, UperNetConfig, UperNetForSemanticSegmentation)
from transformers.models.oneformer.image_processing_pil_oneformer import OneFormerImageProcessorPil
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from ..base import SHIPPED_BPE, BaseLoadError, load_tokenizer, shipped_tokenizer
from .weights import Weights, WeightsError, cached, check_folder, device, find

# --- the palette -----------------------------------------------------------------------------

# mmsegmentation's ADE20KDataset.CLASSES, in the order the seg ControlNets' palette follows (class i
# is painted ADE20K_PALETTE[i]); 'bed ' there has a trailing space, dropped here.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")

# mmsegmentation's ADE20KDataset.PALETTE (= ControlNet's get_palette('ade'), OneFormer's ADE20K
# colours), RGB. Two classes share a colour: road (6) and skyscraper (48) are both (140, 140, 140).
ADE20K_PALETTE = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255]], dtype=np.uint8)
NUM_CLASSES = len(ADE20K_CLASSES)  # 150
UNKNOWN_COLOUR = (0, 0, 0)  # what colourise paints for ids outside 0..149 (>= 106 from every palette colour)
MAX_DISTANCE = 16.0  # classes_of: a colour farther than this (RGB, Euclidean) from every class is -1


def colourise(class_ids: np.ndarray) -> np.ndarray:
    """(H, W) integer ADE20K class ids (0..149) -> (H, W, 3) uint8 palette colours; other ids
    (e.g. -1, unknown) are painted ``UNKNOWN_COLOUR``, which ``classes_of`` reads as -1."""
    ids = np.asarray(class_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"colourise: class ids must be integers, got {ids.dtype}")
    out = np.empty(ids.shape + (3,), np.uint8)
    out[:] = UNKNOWN_COLOUR
    valid = (ids >= 0) & (ids < NUM_CLASSES)
    out[valid] = ADE20K_PALETTE[ids[valid]]
    return out


def classes_of(seg_map: np.ndarray, max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """(H, W, 3) uint8 ADE20K-coloured map -> (H, W) int64 class ids: each pixel's nearest palette
    colour, -1 where that is farther than ``max_distance``. Road and skyscraper share a colour; it
    reads as road (6), the first. Distances are computed once per distinct colour."""
    a = np.asarray(seg_map)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"classes_of: expected an (H, W, 3) colour map, got shape {a.shape}")
    a = a.astype(np.int64)
    codes = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]  # (H, W) 24-bit colours
    colours, inverse = np.unique(codes.ravel(), return_inverse=True)
    palette = ADE20K_PALETTE.astype(np.float32)
    ids = np.empty(len(colours), np.int64)
    for start in range(0, len(colours), 65536):  # (chunk, 150) distances: bounded memory for photos
        c = colours[start:start + 65536]
        rgb = np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], axis=-1).astype(np.float32)
        d2 = ((rgb[:, None, :] - palette[None]) ** 2).sum(-1)
        nearest = d2.argmin(1)  # the first of equal distances: road before skyscraper
        ids[start:start + 65536] = np.where(d2[np.arange(len(c)), nearest] > max_distance ** 2, -1, nearest)
    return ids[inverse].reshape(a.shape[:2])


def _aliases(label: str) -> set[str]:
    return {a.strip().lower() for a in str(label).split(",") if a.strip()}


def _same_class(ours: str, theirs: str) -> bool:
    """Whether a folder's label names our class (OneFormer says "road, route", "window ", "tub" ...)."""
    return any(x == y or x.startswith(y) or y.startswith(x) for x in _aliases(ours) for y in _aliases(theirs))


def check_labels(config: dict, folder: Path, name: str, what: str) -> None:
    """A ``WeightsError`` naming ``folder`` unless its ``id2label`` is ADE20K's 150 classes in the
    palette's order (names compared loosely: the ports spell some differently; 135 of 150 must agree)."""
    labels = config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))]
    agree = sum(n is not None and _same_class(ours, n) for ours, n in zip(ADE20K_CLASSES, names))
    if len(labels) != NUM_CLASSES or agree < 135:
        shown = ", ".join(str(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        raise WeightsError(f"annotator {name!r}: {folder} predicts {len(labels)} classes ({shown or 'no id2label'}), "
                           f"not ADE20K's 150 (wall, building, sky, floor, ...) whose colours the seg ControlNets "
                           f"read; expected {what}")


# --- the segmenters --------------------------------------------------------------------------

ONEFORMER = Weights("", ("shi-labs/oneformer_ade20k_swin_tiny", "shi-labs/oneformer_ade20k_swin_large"),
                    "OneFormer trained on ADE20K (OneFormerForUniversalSegmentation, a transformers folder)")
UPERNET = Weights("", tuple(f"openmmlab/upernet-{b}" for b in (
    "convnext-small", "convnext-tiny", "convnext-base", "convnext-large", "convnext-xlarge",
    "swin-tiny", "swin-small", "swin-base", "swin-large")),
    "UperNet trained on ADE20K (UperNetForSemanticSegmentation, a transformers folder)")
SEGFORMER = Weights("", tuple(f"nvidia/segformer-{b}-finetuned-ade-{s}" for b, s in (
    ("b0", "512-512"), ("b1", "512-512"), ("b2", "512-512"), ("b3", "512-512"), ("b4", "512-512"),
    ("b5", "640-640"))),
    "SegFormer fine-tuned on ADE20K (SegformerForSemanticSegmentation, a transformers folder)")

TASK = "the task is semantic"  # OneFormerProcessor's task text for "semantic"
CHUNK_BYTES = 2 ** 28  # upsampled class scores held at once (150 x 16 MP x 4 B would be 10 GB)
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError, SafetensorError)


@dataclass
class Segmenter:
    model: torch.nn.Module
    processor: Any  # the folder's image processor (PIL backend)
    task: torch.Tensor | None = None  # (1, task_seq_len) float: OneFormer's task token ids


def _weights_file(folder: Path) -> Path:
    """The file whose size and mtime key the cache (a folder's own mtime misses files rewritten in place)."""
    for file in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "config.json"):
        if (folder / file).is_file():
            return folder / file
    return folder / "config.json"


def _from_pretrained(cls, folder: Path, name: str, what: str) -> torch.nn.Module:
    """``cls`` from ``folder`` (local files only), every weight present and of the right shape: a
    ``WeightsError`` naming the folder otherwise (transformers would fill missing ones at random)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report lists OneFormer's loss tensors as unexpected: expected here
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except LOAD_ERRORS as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise WeightsError(f"annotator {name!r}: {folder} could not be loaded ({detail}); expected {what}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k[0] if isinstance(k, tuple) else k)
                                                          for k in info.get("mismatched_keys") or [])
    if bad:
        raise WeightsError(f"annotator {name!r}: {folder} is not {what}: {len(bad)} weights missing or of other "
                           f"shapes ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return model.to(device=device(), dtype=torch.float32).eval()


def _processor(cls, folder: Path, name: str, what: str, **overrides):
    if not (folder / "preprocessor_config.json").is_file():
        raise WeightsError(f"annotator {name!r}: {folder} has no preprocessor_config.json; expected {what}")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **overrides)
    except LOAD_ERRORS as e:
        raise WeightsError(f"annotator {name!r}: {folder}/preprocessor_config.json could not be used "
                           f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); expected {what}") from None


def _build_plain(folder: Path, name: str, weights: Weights, model_type: str, cls) -> Segmenter:
    """SegFormer / UperNet: the model and its SegformerImageProcessor (both publish that processor)."""
    config = check_folder(folder, name, (model_type,), weights.what)
    check_labels(config, folder, name, weights.what)
    return Segmenter(_from_pretrained(cls, folder, name, weights.what),
                     _processor(SegformerImageProcessorPil, folder, name, weights.what))


def task_tokens(tokenizer, length: int) -> torch.Tensor:
    """(1, length) float: "the task is semantic" as OneFormerProcessor encodes it (CLIP BPE ids,
    padded to ``length``, the padding zeroed by the attention mask), the float vector OneFormer's
    task MLP reads."""
    tokens = tokenizer([TASK], padding="max_length", max_length=length, truncation=True)
    ids = torch.tensor(tokens["input_ids"]) * torch.tensor(tokens["attention_mask"])
    return ids.float()


def _build_oneformer(folder: Path, name: str) -> Segmenter:
    w = ONEFORMER
    config = check_folder(folder, name, ("oneformer",), w.what)
    check_labels(config, folder, name, w.what)
    # OneFormerModel holds every weight inference uses (the head class adds only the training loss,
    # which needs scipy); a OneFormerForUniversalSegmentation folder's "model." prefix is taken off.
    model = _from_pretrained(OneFormerModel, folder, name, w.what)
    # Legacy configs say size=512, max_size=2048 (detectron2's ResizeShortestEdge(512, 2048));
    # transformers 5 reads that as the short side only, so the long-side cap is restored here.
    pre = json.loads((folder / "preprocessor_config.json").read_text()) \
        if (folder / "preprocessor_config.json").is_file() else {}
    overrides: dict[str, Any] = {"class_info_file": None}  # the hub-fetched class list: not needed here
    if isinstance(pre.get("size"), int) and pre.get("max_size"):
        overrides["size"] = {"shortest_edge": pre["size"], "longest_edge": pre["max_size"]}
    processor = _processor(OneFormerImageProcessorPil, folder, name, w.what, **overrides)
    has_tokenizer = ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or \
        (folder / "tokenizer.json").is_file()
    try:
        tokenizer = load_tokenizer(folder) if has_tokenizer else shipped_tokenizer()
    except BaseLoadError as e:
        raise WeightsError(f"annotator {name!r}: {folder}: its tokenizer could not be loaded ({e}); expected "
                           f"{w.what}") from None
    return Segmenter(model, processor, task_tokens(tokenizer, model.config.task_seq_len).to(device()))


KINDS: dict[str, tuple[Weights, Callable[[Path, str], Segmenter]]] = {
    "seg_ofade20k": (ONEFORMER, _build_oneformer),
    "seg_upernet_ade20k": (UPERNET, lambda folder, name: _build_plain(
        folder, name, UPERNET, "upernet", UperNetForSemanticSegmentation)),
    "seg_segformer_ade20k": (SEGFORMER, lambda folder, name: _build_plain(
        folder, name, SEGFORMER, "segformer", SegformerForSemanticSegmentation)),
}


def load(name: str, model: str = "") -> Segmenter:
    """Annotator ``name``'s segmenter from ``model`` (a folder) or the usual places, loaded once."""
    weights, build = KINDS[name]
    folder = find(name, weights, model)
    return cached(_weights_file(folder), name, lambda: build(folder, name))


def upsampled_argmax(scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) class scores -> (B, height, width) int64: bilinear upsampling (align_corners=False)
    then argmax over C, as the processors' ``post_process_semantic_segmentation``; a few classes at a
    time (each channel is interpolated alone, so the result is the same) with a running maximum that
    keeps the first of equal scores, as argmax does."""
    b, c = scores.shape[:2]
    step = max(1, CHUNK_BYTES // (4 * b * height * width))
    best = index = None
    for start in range(0, c, step):
        up = F.interpolate(scores[:, start:start + step].float(), size=(height, width), mode="bilinear",
                           align_corners=False)  # (B, step, H, W)
        value, which = up.max(dim=1)
        if best is None:
            best, index = value, which + start
        else:
            better = value > best
            best, index = torch.where(better, value, best), torch.where(better, which + start, index)
    return index


def _scores(net: Segmenter, images: list[np.ndarray]) -> torch.Tensor:
    """(B, 150, h, w) class scores of same-size (H, W, 3) uint8 ``images``."""
    if net.task is None:
        # channels_last said: a 1- or 3-pixel-tall image would be read as channels-first
        pixels = net.processor(images=images, return_tensors="pt",
                               input_data_format="channels_last")["pixel_values"].to(device())  # (B, 3, h, w)
        if isinstance(net.model, UperNetForSemanticSegmentation):
            # the model's forward without its auxiliary head (a training aid, half the upsampling work)
            logits = net.model.decode_head(net.model.backbone(pixels).feature_maps)  # (B, 150, h / 4, w / 4)
            return F.interpolate(logits, size=pixels.shape[2:], mode="bilinear", align_corners=False)
        return net.model(pixel_values=pixels).logits  # (B, 150, h / 4, w / 4)
    inputs = net.processor(images=images, task_inputs=["semantic"] * len(images), return_tensors="pt",
                           input_data_format="channels_last")
    out = net.model(pixel_values=inputs["pixel_values"].to(device()), pixel_mask=inputs["pixel_mask"].to(device()),
                    task_inputs=net.task.expand(len(images), -1), output_hidden_states=False,
                    output_attentions=False, return_dict=True)
    return oneformer_scores(out.transformer_decoder_class_predictions, out.transformer_decoder_mask_predictions)


def oneformer_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """OneFormer's semantic scores (B, 150, h, w) from its (B, Q, 151) class and (B, Q, h, w) mask
    logits: per-query class probabilities without the null class, times the masks' sigmoids, summed
    over the queries (``post_process_semantic_segmentation``)."""
    classes = class_logits.softmax(dim=-1)[..., :-1]  # (B, Q, 150)
    return torch.einsum("bqc,bqhw->bchw", classes, mask_logits.sigmoid())


def segment_batch(name: str, images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
    """(H, W) int64 ADE20K class ids of each of the same-size (H, W, 3) uint8 RGB ``images``."""
    if not images:
        return []
    net = load(name, model)
    h, w = images[0].shape[:2]
    if any(i.shape[:2] != (h, w) for i in images):
        raise ValueError(f"annotator {name!r}: a batch must be of one size, got "
                         f"{sorted({i.shape[:2] for i in images})}")
    with torch.inference_mode():
        ids = upsampled_argmax(_scores(net, [np.ascontiguousarray(i[..., :3]) for i in images]), h, w)
    return list(ids.cpu().numpy())


def _annotator(name: str):
    def one(image: np.ndarray, model: str = "") -> np.ndarray:
        return colourise(segment_batch(name, [image], model)[0])

    def many(images: list[np.ndarray], model: str = "") -> list[np.ndarray]:
        return [colourise(ids) for ids in segment_batch(name, images, model)]
    one.__name__, many.__name__ = name, name + "_batch"
    one.__doc__ = f"(H, W, 3) uint8 RGB -> (H, W, 3) uint8 ADE20K-palette map ({KINDS[name][0].what})."
    return one, many


ANNOTATORS: dict[str, Callable[..., np.ndarray]] = {}
BATCH: dict[str, Callable[..., list[np.ndarray]]] = {}
for _name in KINDS:
    ANNOTATORS[_name], BATCH[_name] = _annotator(_name)
PARAMS: dict[str, dict] = {name: {} for name in KINDS}
WEIGHTS: dict[str, tuple[Weights, ...]] = {name: (weights,) for name, (weights, _) in KINDS.items()}


# --- tiny random folders (tests, benchmarks) --------------------------------------------------

def _labels() -> dict:
    return {"id2label": dict(enumerate(ADE20K_CLASSES)), "label2id": {n: i for i, n in enumerate(ADE20K_CLASSES)}}


def _write_random_weights(folder: Path, seed: int) -> None:
    """A TINY random model of each segmenter, with ADE20K's labels and its published processor
    config, in ``folder/<repo basename>`` (``segformer-b0-finetuned-ade-512-512``,
    ``upernet-convnext-small``, ``oneformer_ade20k_swin_tiny``), so ``CTRLNET_ANNOTATORS=folder``
    finds them all."""
    folder = Path(folder)
    torch.manual_seed(seed)
    four = ["stage1", "stage2", "stage3", "stage4"]

    out = folder / SEGFORMER.repos[0].split("/")[-1]
    config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 16], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=16, **_labels())
    config.architectures = ["SegformerForSemanticSegmentation"]
    SegformerForSemanticSegmentation(config).save_pretrained(out)
    # nvidia's file, as published (legacy keys: transformers reads size 512 as 512 x 512)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "SegformerFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "reduce_labels": True,
        "resample": 2, "size": 512}, indent=2))

    out = folder / UPERNET.repos[0].split("/")[-1]
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=four)
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=16,
                           auxiliary_channels=8, **_labels())
    config.architectures = ["UperNetForSemanticSegmentation"]
    UperNetForSemanticSegmentation(config).save_pretrained(out)
    # openmmlab's conversion saved SegformerImageProcessor() (512 x 512, ImageNet mean / std)
    SegformerImageProcessorPil().save_pretrained(out)
    _retype(out / "preprocessor_config.json", "SegformerImageProcessor")

    out = folder / ONEFORMER.repos[0].split("/")[-1]
    out.mkdir(parents=True, exist_ok=True)
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                          out_features=four)
    # GroupNorm(32, ...) in the pixel decoder: conv / mask / hidden dims are multiples of 32
    config = OneFormerConfig(backbone_config=backbone, num_queries=8, conv_dim=32, mask_dim=32, hidden_dim=32,
                             encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=1,
                             dim_feedforward=32, text_encoder_width=16, text_encoder_num_layers=1, **_labels())
    config.architectures = ["OneFormerForUniversalSegmentation"]
    config.save_pretrained(out)
    net = OneFormerModel(config)
    # the published layout: OneFormerForUniversalSegmentation's keys ("model." + the base model's,
    # and its loss's two tensors), written directly (building that class needs scipy)
    state = {"model." + k: v.contiguous() for k, v in net.state_dict().items()}
    empty_weight = torch.ones(len(ADE20K_CLASSES) + 1)
    empty_weight[-1] = config.no_object_weight
    state |= {"criterion.empty_weight": empty_weight,
              "criterion.logit_scale": torch.tensor(float(np.log(1 / config.contrastive_temperature)))}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # shi-labs' processor config (from the original cfg: mean / std / 255, ResizeShortestEdge(512, 2048));
    # class_info_file names a file on the hub, which this code never fetches
    (out / "preprocessor_config.json").write_text(json.dumps({
        "class_info_file": "ade20k_panoptic.json", "do_normalize": True, "do_resize": True, "ignore_index": 255,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "OneFormerImageProcessor", "num_labels": 150, "num_text": 134,
        "processor_class": "OneFormerProcessor", "repo_path": "shi-labs/oneformer_demo", "resample": 2,
        "size": 512, "max_size": 2048}, indent=2))
    for file in ("vocab.json", "merges.txt"):  # the CLIP BPE the published folder ships
        shutil.copyfile(SHIPPED_BPE / file, out / file)


def _retype(path: Path, processor_type: str) -> None:
    data = json.loads(path.read_text())
    data["image_processor_type"] = processor_type
    path.write_text(json.dumps(data, indent=2))


def write_random_weights(folder: Path, seed: int = 0) -> None:
    """``_write_random_weights`` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        _write_random_weights(folder, seed)
