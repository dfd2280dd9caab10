"""Neural annotators at 512 px on this machine: load time, images/s one at a time and batched.

    .venv/bin/python benchmarks/bench_detectors.py [--size 512] [--batch 4] [--reps 2] [--only NAMES]

No real weights can be downloaded here, so each detector runs on RANDOM weights of its real size:
the original files (HED, PiDiNet, line art, M-LSD, MiDaS, NormalBAE) are written full-size by
each module's ``write_random_weights``; the transformers models are rebuilt at the published
sizes of the checkpoints named below (``FULL``) over the modules' tiny folders (their processor
configs kept); DWPose's ONNX stand-ins are tiny graphs, so its figure is the pre/post-processing
only and is marked so. Compute does not depend on the weights' values, except where a detector's
work follows what it finds (DWPose: people found; M-LSD: lines), which random weights change.

Per annotator: load = the first call after the cache is cleared minus a steady call (reading the
file, building the network, and the first call's one-off costs); single = --reps calls on one image
each; batch = --reps calls of --batch images (one size) through the annotator's list form
(``BATCH``), after one warm-up call; images/s. Inputs: ShapesWorld targets rendered at --size
(seeds 0..), torch's default threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (ConvNextConfig, DepthAnythingConfig, DepthAnythingForDepthEstimation,
                          Dinov2Config, OneFormerConfig, OneFormerModel, SegformerConfig,
                          SegformerForSemanticSegmentation, SwinConfig, UperNetConfig,
                          UperNetForSemanticSegmentation)
from safetensors.torch import save_file

from ctrlnet.annotators import (ANNOTATORS, BATCH, WEIGHTS, ade20k, depth, dwpose, get_annotator, hed, lineart_nets,
                                mlsd, normalbae, pidinet, unavailable)
from ctrlnet.annotators import weights as W
from ctrlnet.testbed.shapes import render, sample_layout

MODULES = (hed, pidinet, lineart_nets, mlsd, depth, normalbae, ade20k, dwpose)


def _labels(folder: Path) -> dict:
    c = json.loads((folder / "config.json").read_text())
    return {"id2label": c["id2label"], "label2id": c["label2id"]}


def count(net: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters, random"


def full_size(root: Path) -> dict[str, str]:
    """Overwrite the tiny transformers folders under ``root`` with random models of the published
    sizes; {folder: what it now holds}."""
    made = {}
    four = ["stage1", "stage2", "stage3", "stage4"]
    for name, v2 in (("Depth-Anything-V2-Small-hf", True), ("depth-anything-small-hf", False)):
        folder = root / name
        if folder.is_dir():  # ViT-S/14 DINOv2 backbone, DPT head 48/96/192/384, fusion 64 (the small models)
            backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                                    patch_size=14, out_indices=[3, 6, 9, 12] if v2 else [9, 10, 11, 12],
                                    reshape_hidden_states=False)
            config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                         neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
            net = DepthAnythingForDepthEstimation(config)
            net.save_pretrained(folder)
            made[name] = f"Depth Anything{' V2' if v2 else ''} small, {count(net)}"
    folder = root / "segformer-b0-finetuned-ade-512-512"
    if folder.is_dir():  # MiT-b0, 150 classes
        net = SegformerForSemanticSegmentation(SegformerConfig(**_labels(folder)))
        net.save_pretrained(folder)
        made[folder.name] = f"SegFormer-b0 ADE20K, {count(net)}"
    folder = root / "upernet-convnext-small"
    if folder.is_dir():  # ConvNeXt-S backbone, UperNet 512 channels
        backbone = ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768], out_features=four)
        net = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, hidden_size=512,
                                                           auxiliary_in_channels=384, **_labels(folder)))
        net.save_pretrained(folder)
        made[folder.name] = f"UperNet ConvNeXt-S ADE20K, {count(net)}"
    folder = root / "oneformer_ade20k_swin_tiny"
    if folder.is_dir():  # OneFormer's defaults are its ADE20K Swin-T model
        config = OneFormerConfig(backbone_config=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2],
                                                            num_heads=[3, 6, 12, 24], window_size=7,
                                                            out_features=four), **_labels(folder))
        config.architectures = ["OneFormerForUniversalSegmentation"]
        config.save_pretrained(folder)
        net = OneFormerModel(config)
        state = {"model." + k: v.contiguous() for k, v in net.state_dict().items()}
        state |= {"criterion.empty_weight": torch.ones(151), "criterion.logit_scale": torch.tensor(2.66)}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        made[folder.name] = f"OneFormer Swin-T ADE20K, {count(net)}"
    return made


def inputs(size: int, n: int) -> list[np.ndarray]:
    return [render(sample_layout(i, seed=0, size=size), size)["target"] for i in range(n)]


def measure(name: str, images: list[np.ndarray], reps: int) -> dict:
    W.clear_cache()
    one = get_annotator(name)
    start = time.perf_counter()
    one(images[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(reps):
        one(images[k % len(images)])
    single = (time.perf_counter() - start) / reps
    row = {"annotator": name, "load_s": round(max(first - single, 0.0), 2), "single_img_s": round(1 / single, 2)}
    if name in BATCH:
        one(images)  # warm the batch shapes
        start = time.perf_counter()
        for _ in range(reps):
            one(images)
        row["batch_img_s"] = round(reps * len(images) / (time.perf_counter() - start), 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated annotator names")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ctrlnet-detectors-"))
    for m in MODULES:
        try:
            m.write_random_weights(root, seed=0)
        except ImportError as e:  # onnx missing: DWPose is skipped
            print(f"# {m.__name__}: no random weights ({e})")
    made = full_size(root)
    os.environ["CTRLNET_ANNOTATORS"] = str(root)
    names = [n for n in (args.only.split(",") if args.only else sorted(WEIGHTS)) if n in ANNOTATORS]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.size} px, batch {args.batch}")
    for folder, what in made.items():
        print(f"# {folder}: {what}")
    images = inputs(args.size, args.batch)
    print("| annotator | load s | single img/s | batch img/s |\n|---|---|---|---|", flush=True)
    for name in names:
        reason = unavailable(name)
        if reason:
            print(f"| {name} | unavailable: {reason[:80]} | | |")
            continue
        r = measure(name, images, args.reps)
        note = " (tiny ONNX stand-ins)" if name.startswith("dw_") else ""
        print(f"| {name}{note} | {r['load_s']} | {r['single_img_s']} | {r.get('batch_img_s', '-')} |", flush=True)


if __name__ == "__main__":
    main()
